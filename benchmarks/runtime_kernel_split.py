"""Issue 32 item 2: where the package's time goes against ONNX Runtime's and OpenVINO's, by kind of
kernel, on one model.

Each system's own profiler, over the same calls: ``torch.profiler`` on the package (built with
``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1``, so AOTInductor's C-shim operator calls and Inductor's
own kernels show), ONNX Runtime's session profiling, OpenVINO's ``PERF_COUNT``. Time is
grouped by operator (OpenVINO's: by node type and implementation). A
profiler adds its own cost per call: read the split, and take totals from the timed benchmark.

    python benchmarks/runtime_kernel_split.py [--model mobilenet_v3_large] [--batch-size 1] [--threads 2] [--calls 200]
"""

from __future__ import annotations

import os

os.environ["TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE"] = "1"  # read when Inductor's config is imported

import argparse
import collections
import json
import tempfile

import torch

import compilefuse
from compilefuse.bench.catalog import resolve


def _inside_an_operator(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("aoti_torch", "aten::")) or "cpp_fused" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def package_split(package, x: torch.Tensor, calls: int) -> dict[str, float]:
    """Time per call (ms) by outermost operator (its callees included) or Inductor kernel."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(5):
            package(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                package(x)
    split: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if _inside_an_operator(event):
            continue  # in its operator's total
        name = event.name
        key = "Inductor kernels" if name.startswith("cpp_fused") or "_cpp_fused_" in name else name
        split[key] += event.cpu_time_total / 1e3 / calls
    return dict(split)


def onnxruntime_split(model, x: torch.Tensor, threads: int, calls: int) -> dict[str, float]:
    import io

    import onnxruntime

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["input"], output_names=["output"], dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = os.path.join(folder, "ort")
        session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}
        for _ in range(5 + calls):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes = nodes[-len(nodes) * calls // (5 + calls):]
    split: dict[str, float] = collections.defaultdict(float)
    for e in nodes:
        op = e["args"].get("op_name", "?")
        split[op] += e["dur"] / 1e3 / calls
    return dict(split)


def openvino_split(model, x: torch.Tensor, threads: int, calls: int) -> dict[str, float]:
    import openvino

    with torch.no_grad():
        converted = openvino.convert_model(model, example_input=x, input=[list(x.shape)])
    compiled = openvino.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": True})
    request = compiled.create_infer_request()
    for _ in range(5):
        request.infer([x.numpy()])
    split: dict[str, float] = collections.defaultdict(float)
    for _ in range(calls):
        request.infer([x.numpy()])
        for info in request.get_profiling_info():
            if info.status != info.Status.EXECUTED:
                continue
            split[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e3 / calls
    return dict(split)


def _print(title: str, split: dict[str, float]) -> None:
    total = sum(split.values())
    print(f"\n{title}: {total:.3f} ms a call under its profiler")
    for name, ms in sorted(split.items(), key=lambda kv: -kv[1]):
        if ms >= 0.005:
            print(f"  {ms:7.3f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--prepack", choices=("rule", "all", "none"), default="rule",
                        help="which convolutions the package packs for oneDNN: bnfuse's rule, all, none")
    parser.add_argument("--only-package", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = resolve(args.model)
    model, x = spec.build().eval(), spec.make_input(args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        inductor = {} if args.prepack == "rule" else {"cpp.weight_prepack": args.prepack == "all"}
        compilefuse.export(model, (x,), f"{folder}/model.pt2", options={"inductor": inductor})
        package = compilefuse.load(f"{folder}/model.pt2")
        _print(f"package (convolutions packed: {args.prepack})", package_split(package, x, args.calls))
    if args.only_package:
        return
    _print("ONNX Runtime", onnxruntime_split(model, x, args.threads, args.calls))
    _print("OpenVINO", openvino_split(model, x, args.threads, args.calls))


if __name__ == "__main__":
    main()
