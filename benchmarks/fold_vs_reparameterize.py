"""``compilefuse.fold`` against timm's ``reparameterize_model`` (issue 22's targets), CPU.

    python benchmarks/fold_vs_reparameterize.py [--models mobileone_s0 repvgg_a0 fastvit_t8] [--threads 2]

Per model, batch 1, 224 px: tensors (parameters + buffers) as trained, re-parameterised and
folded; eager latency of the re-parameterised and the folded module; bnfuse (JIT) on each; ONNX
Runtime on the as-trained and on the folded module's export; every output's error against a
float64 copy of the as-trained model. Systems interleaved round by round, medians, the thread count
set for torch, the Timer and ONNX Runtime alike (ONNX Runtime's threads not spinning between runs).
Needs timm, onnx, onnxscript, onnxruntime.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile

import torch
import torch.utils.benchmark as benchmark

import compilefuse
from compilefuse.examples.models import calibrate_bn
from compilefuse.examples.reference import float64_reference, relative_error


def tensors(module: torch.nn.Module) -> int:
    return len(list(module.parameters())) + len(list(module.buffers()))


def onnx_session(module: torch.nn.Module, x: torch.Tensor, threads: int, folder: str, name: str):
    import onnxruntime

    path = os.path.join(folder, name + ".onnx")
    torch.onnx.export(module, (x,), path, dynamo=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # Its threads would otherwise spin after each run and slow the torch systems interleaved with it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed_name = session.get_inputs()[0].name
    return lambda: torch.from_numpy(session.run(None, {feed_name: x.numpy()})[0])


def measure(name: str, threads: int, rounds: int) -> dict:
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    trained = calibrate_bn(timm.create_model(name), torch.randn(8, 3, 224, 224)).eval()
    reference = float64_reference(trained, x)
    reparameterized = reparameterize_model(copy.deepcopy(trained))
    folded = compilefuse.fold(trained, (x,))
    row = {"model": name, "tensors": {"trained": tensors(trained), "reparameterized": tensors(reparameterized),
                                      "folded": tensors(folded)}}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        systems = {
            "eager reparameterized": reparameterized,
            "eager folded": folded,
            "bnfuse reparameterized": torch.compile(reparameterized, backend="bnfuse"),
            "bnfuse folded": torch.compile(folded, backend="bnfuse"),
        }
        calls = {k: (lambda fn=fn: fn(x)) for k, fn in systems.items()}
        try:
            calls["ort trained"] = onnx_session(trained, x, threads, folder, "trained")
            calls["ort folded"] = onnx_session(folded, x, threads, folder, "folded")
        except Exception as error:  # noqa: BLE001 - recorded, not fatal
            row["onnx_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        row["error"] = {k: relative_error(call(), reference) for k, call in calls.items()}
        times: dict[str, list[float]] = {k: [] for k in calls}
        names = list(calls)
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                timer = benchmark.Timer("call()", globals={"call": calls[k]}, num_threads=threads)
                times[k] += [t * 1e3 for t in timer.blocked_autorange(min_run_time=0.5).times]
    row["median_ms"] = {k: statistics.median(v) for k, v in times.items()}
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["mobileone_s0", "repvgg_a0", "fastvit_t8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        row = measure(name, args.threads, args.rounds)
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
