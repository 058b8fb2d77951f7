"""Issue 32 item 1: what reading a large linear layer's weight packed for oneDNN does to the JIT
path, against the same compile with every linear layer on ATen's ``addmm`` and against the package
(``compilefuse.load``, whose freezing packs them too).

The two JIT systems are compiled in one process from functions of their own (each its own Dynamo
cache entry), with bnfuse's shared compiles cleared between them; then all three are interleaved
round by round, each timed with ``torch.utils.benchmark.Timer`` (thread count set).

    python benchmarks/linear_packing.py [--model mobilenet_v3_large] [--batch-size 1] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from unittest import mock

import torch
from torch.utils.benchmark import Timer

import compilefuse
from compilefuse import compiled_graph, weight_packing
from compilefuse.bench.catalog import resolve


def compiled(model: torch.nn.Module, tag: str):
    namespace = {"model": model}
    exec(f"def run_{tag}(x):\n    return model(x)\n", namespace)  # a code object, so a cache entry, of its own
    compiled_graph._SHARED.clear()  # no compile shared with the other system
    return torch.compile(namespace[f"run_{tag}"], backend="bnfuse", options={"strict": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = resolve(args.model)
    model, x = spec.build(), spec.make_input(args.batch_size)
    calls = {}
    with torch.no_grad():
        reference = model(x)
        with mock.patch.object(weight_packing, "worth_packing_linear", lambda *_sizes: False):
            calls["bnfuse, linear layers on addmm"] = compiled(copy.deepcopy(model), "addmm")
            calls["bnfuse, linear layers on addmm"](x)
        calls["bnfuse"] = compiled(copy.deepcopy(model), "packed")
        calls["bnfuse"](x)
        with tempfile.TemporaryDirectory() as tmp:
            compilefuse.export(copy.deepcopy(model), (x,), f"{tmp}/model.pt2")
            calls["package"] = compilefuse.load(f"{tmp}/model.pt2")
            for name, fn in calls.items():
                error = ((fn(x) - reference).abs().max() / reference.abs().max()).item()
                print(f"{name}: relative error {error:.1e}", flush=True)
            times: dict[str, list[float]] = {name: [] for name in calls}
            names = list(calls)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    timer = Timer("fn(x)", globals={"fn": calls[name], "x": x}, num_threads=args.threads)
                    times[name].append(timer.blocked_autorange(min_run_time=0.5).median * 1e3)
    print({name: [round(t, 2) for t in values] for name, values in times.items()})
    package = statistics.median(times["package"])
    print(f"\n{args.model}, batch {args.batch_size}, {args.threads} threads, medians of {args.rounds} rounds")
    print("| system | ms per call | x package |\n| --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / package:.2f} |")


if __name__ == "__main__":
    main()
