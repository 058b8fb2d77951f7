"""Per-call cost of bnfuse's freshness check (identity, version counter and data pointer of every
frozen tensor: ``FrozenTensors.match``), against the latency of the compiled model.

    python benchmarks/check_overhead.py --model resnet50 --threads 2 [--device cuda]

Prints the check's median time per call, the model's, and, on CUDA, how much of the check the
launch-first order hides: the time from a call's start to its return with the check, and without.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch.utils.benchmark import Timer

from compilefuse.examples.models import randomize_bn
from compilefuse.jit import compiled_graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = randomize_bn(getattr(torchvision.models, args.model)().eval()).to(args.device)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=args.device)
    calls: list[tuple[compiled_graph.CompiledGraph, tuple]] = []
    original = compiled_graph.CompiledGraph.__call__

    def spy(self, *call_args):
        calls.append((self, call_args))
        return original(self, *call_args)

    compiled_graph.CompiledGraph.__call__ = spy
    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        compiled(x)
    compiled_graph.CompiledGraph.__call__ = original
    graph, call_args = calls[-1]
    frozen = graph._last.frozen
    sync = "torch.cuda.synchronize()" if args.device == "cuda" else ""
    scope = {"frozen": frozen, "call_args": call_args, "compiled": compiled, "x": x, "torch": torch,
             "raw": graph._last.compiled.call, "taken": [call_args[i] for i in graph._last.compiled.inputs_taken]}

    def timed(statement: str, seconds: float) -> float:
        with torch.inference_mode():
            timer = Timer(statement, globals=scope, num_threads=args.threads)
            return timer.blocked_autorange(min_run_time=seconds).median

    assert frozen.match(call_args)
    check_s = timed("frozen.match(call_args)", 1)
    # The check as it was before (a Python loop: identity and version counter, no data pointer).
    scope["old"] = [(i, ref, version) for i, ref, version, _ in frozen._versioned]
    old_s = timed("all(call_args[i] is ref() and call_args[i]._version == v for i, ref, v in old)", 1)
    model_s = timed(f"compiled(x); {sync}", 3)
    raw_s = timed(f"raw(*taken); {sync}", 3)
    print(f"{args.model} batch {args.batch_size} on {args.device}, {args.threads} threads, torch {torch.__version__}")
    print(f"frozen tensors checked per call: {len(frozen.indices)}")
    print(f"check: {check_s * 1e6:.1f} us per call (the former Python loop: {old_s * 1e6:.1f} us); "
          f"compiled model: {model_s * 1e3:.3f} ms "
          f"(check = {100 * check_s / model_s:.3f} % of it); the compiled graph alone, no Dynamo guards "
          f"and no check: {raw_s * 1e3:.3f} ms (bnfuse's call with Dynamo: {100 * (model_s / raw_s - 1):+.2f} %)")


if __name__ == "__main__":
    main()
