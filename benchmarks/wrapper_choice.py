"""Issue 32 item 1: bnfuse's JIT call under Inductor's C++ wrapper (its default on CPU) and under
the Python wrapper, against the package (``compilefuse.load``), which runs the same folds under
AOTInductor's C++ runner without Dynamo.

Systems interleaved round by round in one process (``_against_package.compare``: the order rotated
each round, ``torch.utils.benchmark.Timer`` with the thread count set), the bench's calibrated
models, batch 1 by default.

    python benchmarks/wrapper_choice.py [--model mobilenet_v3_large] [--batch-size 1] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import copy

import _against_package  # benchmarks/_against_package.py (the script's folder is on sys.path)
import torch


def main() -> None:
    args, model, x = _against_package.model_from_arguments(__doc__.split("\n\n")[0], rounds=7)
    with torch.no_grad():
        reference = model(x)
    calls = {
        "bnfuse (C++ wrapper)": torch.compile(copy.deepcopy(model), backend="bnfuse"),
        "bnfuse, Python wrapper": torch.compile(copy.deepcopy(model), backend="bnfuse",
                                                options={"inductor": {"cpp_wrapper": False}}),
    }
    _against_package.against_package(calls, model, x, reference, args.threads, args.rounds,
                                     f"{args.model}, batch {x.shape[0]}")


if __name__ == "__main__":
    main()
