"""Issue 32 item 1: what torch's public guard options do to bnfuse's per-call cost, against the
package (``compilefuse.load``), which runs the same folds without Dynamo.

Systems, interleaved round by round in one process, each timed with ``torch.utils.benchmark.Timer``
(thread count set): bnfuse as is; with ``guard_filter_fn=skip_guard_on_all_nn_modules_unsafe``
(no guards on module attributes, parameters and buffers); with ``skip_guard_eval_unsafe`` (the
stance: guards checked only where several graphs compete); with Inductor's Python wrapper (bnfuse's
default on CPU is its C++ one); frozen (the weights compiled in, as the package has them); and the
exported package.

    python benchmarks/guard_options.py [--model mobilenet_v3_large] [--batch-size 1] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import copy

import _against_package  # benchmarks/_against_package.py (the script's folder is on sys.path)
import torch


def main() -> None:
    args, model, x = _against_package.model_from_arguments(__doc__.split("\n\n")[0], rounds=5)
    with torch.no_grad():
        reference = model(x)
    calls = {}
    calls["bnfuse"] = torch.compile(copy.deepcopy(model), backend="bnfuse")
    calls["bnfuse, no nn-module guards"] = torch.compile(
        copy.deepcopy(model), backend="bnfuse",
        options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    calls["bnfuse, Python wrapper"] = torch.compile(copy.deepcopy(model), backend="bnfuse",
                                                    options={"inductor": {"cpp_wrapper": False}})
    calls["bnfuse, freeze=True"] = torch.compile(copy.deepcopy(model), backend="bnfuse", options={"freeze": True})
    skipping = torch.compile(copy.deepcopy(model), backend="bnfuse")

    def skip_guard_eval(x: torch.Tensor, fn=skipping) -> torch.Tensor:
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return fn(x)

    calls["bnfuse, skip_guard_eval_unsafe"] = skip_guard_eval
    _against_package.against_package(calls, model, x, reference, args.threads, args.rounds,
                                     f"{args.model}, batch {x.shape[0]}")


if __name__ == "__main__":
    main()
