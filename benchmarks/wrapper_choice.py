"""Issue 32 item 1: bnfuse's JIT call under Inductor's C++ wrapper (its default on CPU) and under
the Python wrapper, against the package (``compilefuse.load``), which runs the same folds under
AOTInductor's C++ runner without Dynamo.

Systems interleaved round by round in one process (``_against_package.compare``: the order rotated
each round, ``torch.utils.benchmark.Timer`` with the thread count set), the bench's calibrated
models, batch 1 by default.

    python benchmarks/wrapper_choice.py [--model mobilenet_v3_large] [--batch-size 1] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy

import _against_package  # benchmarks/_against_package.py (the script's folder is on sys.path)
import torch

from compilefuse.bench.catalog import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = resolve(args.model)
    model, x = spec.build(), spec.make_input(args.batch_size)
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
