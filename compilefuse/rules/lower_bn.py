"""Lower every inference BatchNorm that no rule folded into Inductor's usual decomposition.

bnfuse keeps BN whole through AOTAutograd and freezing so the folding rules can see it and
Inductor's own folding cannot touch it; whatever the rules leave is then decomposed exactly as
Inductor would have, so an unfolded BN costs what it costs today.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx

from .._torch_private import BN_INFERENCE_OP, KeywordArg, Match
from ._base import bn_of

PATTERN = bn_of(KeywordArg("input"))
TENSOR_ARGS = ("bn_weight", "bn_bias", "running_mean", "running_var")


def producer_description(source: object) -> str:
    """How a kept BN's input was produced, for the reason shown to the user."""
    if isinstance(source, torch.fx.Node) and source.target is operator.getitem:
        source = source.args[0]  # an output of a multi-output op, e.g. max_pool2d_with_indices
    if not isinstance(source, torch.fx.Node) or source.op != "call_function":
        return "input is a graph input, not a conv or linear output"
    name = str(source.target).removesuffix(".default")
    return f"unsupported producer {name}"


def decomposition(match: Match) -> tuple[Callable[..., torch.Tensor], list[torch.fx.Node]]:
    """The decomposed BN as a replacement function, and the graph nodes it takes."""
    kw = match.kwargs
    present = [name for name in TENSOR_ARGS if kw[name] is not None]
    momentum, eps = kw["momentum"], kw["eps"]

    def bn(x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        given = dict(zip(present, tensors, strict=True))
        args = [given.get(name) for name in TENSOR_ARGS]
        return BN_INFERENCE_OP(x, *args, momentum, eps)[0]

    return bn, [kw["input"], *(kw[name] for name in present)]

