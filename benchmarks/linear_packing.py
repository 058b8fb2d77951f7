"""Issue 32 item 1: what reading a large linear layer's weight packed for oneDNN does to the JIT
path, against the same compile with every linear layer on ATen's ``addmm`` and against the package
(``compilefuse.load``, whose freezing packs them too).

The two JIT systems are compiled in one process from functions of their own (each its own Dynamo
cache entry), with bnfuse's shared compiles cleared between them; then all three are interleaved
round by round, each timed with ``torch.utils.benchmark.Timer`` (thread count set).

    python benchmarks/linear_packing.py [--model mobilenet_v3_large] [--batch-size 1] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import copy
from unittest import mock

import _against_package  # benchmarks/_against_package.py (the script's folder is on sys.path)
import torch

from compilefuse import weight_packing
from compilefuse.jit import compiled_graph


def compiled(model: torch.nn.Module, tag: str):
    namespace = {"model": model}
    exec(f"def run_{tag}(x):\n    return model(x)\n", namespace)  # a code object, so a cache entry, of its own
    compiled_graph._SHARED.clear()  # no compile shared with the other system
    return torch.compile(namespace[f"run_{tag}"], backend="bnfuse", options={"strict": True})


def main() -> None:
    args, model, x = _against_package.model_from_arguments(__doc__.split("\n\n")[0], rounds=5)
    calls = {}
    with torch.no_grad():
        reference = model(x)
        with mock.patch.object(weight_packing, "worth_packing_linear", lambda *_sizes: False):
            calls["bnfuse, linear layers on addmm"] = compiled(copy.deepcopy(model), "addmm")
            calls["bnfuse, linear layers on addmm"](x)
        calls["bnfuse"] = compiled(copy.deepcopy(model), "packed")
        calls["bnfuse"](x)
        _against_package.against_package(calls, model, x, reference, args.threads, args.rounds,
                                         f"{args.model}, batch {args.batch_size}")


if __name__ == "__main__":
    main()
