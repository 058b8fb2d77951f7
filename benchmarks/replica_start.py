"""A replica's start (issue 23): a fresh process from its start to its first answer, and the
per-call cost of ``compilefuse.load``'s input check, against raw AOTInductor and ONNX Runtime.

    python benchmarks/replica_start.py [--model resnet18] [--runs 5] [--json OUT]

Builds once (a compilefuse package, torch's own ``aoti_compile_and_package`` package, an ONNX
file, the shipped C++ example), then starts each replica kind ``--runs`` times, interleaved, with
warm file caches, and reports medians: ``import torch`` alone; ONNX Runtime (a session from the
``.onnx`` file); ``import torch`` + ``torch._inductor.aoti_load_package``; ``import compilefuse`` +
``compilefuse.load``; the C++ example (``examples/cpp/run_package.cpp``). Every replica answers
one batch-1 input. Per call: a one-conv model's package, interleaved Timer medians, 2 threads.
Needs torchvision, onnx, onnxscript, onnxruntime and a C++ compiler.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _results  # benchmarks/_results.py (the script's folder is on sys.path)
import torch
import torch.utils.benchmark as benchmark

import compilefuse

REPLICAS = {
    "import torch": "import torch",
    "onnxruntime": (
        "import numpy, onnxruntime\n"
        "o = onnxruntime.SessionOptions(); o.intra_op_num_threads = 2\n"
        "s = onnxruntime.InferenceSession({onnx!r}, o, providers=['CPUExecutionProvider'])\n"
        "s.run(None, {{s.get_inputs()[0].name: numpy.ones((1, 3, 224, 224), numpy.float32)}})"
    ),
    "torch + aoti_load_package": (
        "import torch, torch._inductor\n"
        "torch._inductor.aoti_load_package({raw!r})(torch.ones(1, 3, 224, 224))"
    ),
    "compilefuse.load": (
        "import torch, compilefuse\n"
        "compilefuse.load({package!r})(torch.ones(1, 3, 224, 224))"
    ),
}


def build(model_name: str, folder: str) -> dict[str, str]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval()
    x = torch.randn(1, 3, 224, 224)
    paths = {name: os.path.join(folder, name) for name in ("package.pt2", "raw.pt2", "model.onnx", "run_package")}
    compilefuse.export(model, (x,), paths["package.pt2"])
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=paths["raw.pt2"])
        torch.onnx.export(model, (x,), paths["model.onnx"], dynamo=True)
    from torch.utils import cpp_extension

    library = cpp_extension.library_paths()[0]
    source = os.path.join(os.path.dirname(compilefuse.__file__), "examples", "cpp", "run_package.cpp")
    includes = [flag for include in cpp_extension.include_paths() for flag in ("-I", include)]
    subprocess.run(["c++", "-std=c++20", "-O2", *includes, source, "-o", paths["run_package"], f"-L{library}",
                    f"-Wl,-rpath,{library}", "-ltorch", "-ltorch_cpu", "-lc10",
                    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"], check=True)
    return {"package": paths["package.pt2"], "raw": paths["raw.pt2"], "onnx": paths["model.onnx"],
            "cpp": paths["run_package"], "library": library}


def start_seconds(kind: str, paths: dict[str, str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if kind == "C++ example":
        command = [paths["cpp"], paths["package"], "1", "3", "224", "224"]
        env["LD_LIBRARY_PATH"] = paths["library"]
    else:
        command = [sys.executable, "-c", REPLICAS[kind].format(**paths)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def per_call_us(folder: str, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    x = torch.randn(1, 3, 16, 16)
    path = os.path.join(folder, "conv.pt2")
    compilefuse.export(model, (x,), path)
    calls = {"aoti_load_package": torch._inductor.aoti_load_package(path), "compilefuse.load": compilefuse.load(path),
             "compilefuse.load, check_inputs=False": compilefuse.load(path, check_inputs=False)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    with torch.inference_mode():
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                timer = benchmark.Timer("f(x)", globals={"f": calls[k], "x": x}, num_threads=2)
                times[k].append(timer.blocked_autorange(min_run_time=0.5).median * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        paths = build(args.model, folder)
        kinds = [*REPLICAS, "C++ example"]
        for kind in kinds:  # once each, unmeasured: warm file caches
            start_seconds(kind, paths)
        starts: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.runs):
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                starts[kind].append(start_seconds(kind, paths))
        result = {"model": args.model, "torch": torch.__version__, "runs": args.runs,
                  "start_s": {k: statistics.median(v) for k, v in starts.items()},
                  "start_s_all": starts, "per_call_us": per_call_us(folder, 7)}
    _results.emit(result, args.json)


if __name__ == "__main__":
    main()
