"""Issue 32 item 1: the least any ``torch.compile`` backend can cost per call, against the package.

The floor is a backend that does no work of its own: Dynamo traces the model as it would for bnfuse
(guards over every parameter and buffer, the compiled region's bytecode), and the backend's
callable hands the user's input straight to the package (``compilefuse.load``) and returns its
output. Whatever separates the floor from the package is Dynamo's; whatever separates bnfuse from
the floor is bnfuse's (its freshness check, AOTAutograd's runtime wrapper, Inductor's wrapper and
the weights it passes in).

Systems, interleaved round by round in one process (``_against_package.compare``): the package,
the floor, bnfuse, and ``backend="eager"`` (Dynamo's frame around the eager model).

    python benchmarks/dynamo_floor.py [--model mobilenet_v3_large] [--batch-size 1] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence

import _against_package  # benchmarks/_against_package.py (the script's folder is on sys.path)
import torch

import compilefuse


def floor_backend(package: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable:
    """A backend whose compiled graph only calls ``package`` on the graph input that is ``x``."""

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        index = next(i for i, t in enumerate(example_inputs)
                     if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)
                     and t.shape == x.shape and t.data_ptr() == x.data_ptr())

        def run(*args: torch.Tensor) -> tuple[torch.Tensor]:
            return (package(args[index]),)

        return run

    return backend


def main() -> None:
    args, model, x = _against_package.model_from_arguments(__doc__.split("\n\n")[0], rounds=7)
    with torch.no_grad():
        reference = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        compilefuse.export(copy.deepcopy(model), (x,), f"{tmp}/model.pt2")
        package = compilefuse.load(f"{tmp}/model.pt2")
        calls = {
            "package": package,
            "floor: Dynamo around the package": torch.compile(copy.deepcopy(model), backend=floor_backend(package, x)),
            "bnfuse": torch.compile(copy.deepcopy(model), backend="bnfuse"),
            'backend="eager"': torch.compile(copy.deepcopy(model), backend="eager"),
        }
        tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
        _against_package.compare(calls, x, reference, args.threads, args.rounds,
                                 f"{args.model} ({tensors} parameters and buffers), batch {x.shape[0]}")


if __name__ == "__main__":
    main()
