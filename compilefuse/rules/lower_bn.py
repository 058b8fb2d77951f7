"""Lower every inference BatchNorm that no rule folded into Inductor's usual decomposition.

bnfuse keeps BN whole through AOTAutograd so the folding rules can see it; whatever they leave must
then look exactly as Inductor would have produced it, so unfolded BNs cost what they cost today.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from .._torch_private import BN_INFERENCE_OP, KeywordArg, Match
from ._base import BN_ARGS, bn_of

PATTERN = bn_of(KeywordArg("input"))
TENSOR_ARGS = ("bn_weight", "bn_bias", "running_mean", "running_var")


def producer_description(match: Match) -> str:
    """How a kept BN's input was produced, for the reason shown to the user."""
    source = match.kwargs["input"]
    if not isinstance(source, torch.fx.Node) or source.op != "call_function":
        return "its input is a graph input, not a conv or linear output"
    return f"unsupported producer {source.target}"


def decomposition(match: Match) -> tuple[Callable[..., torch.Tensor], list[torch.fx.Node]]:
    """The decomposed BN as a replacement function, and the graph nodes it takes."""
    kw = match.kwargs
    present = [name for name in TENSOR_ARGS if kw[name] is not None]
    momentum, eps = kw["momentum"], kw["eps"]

    def bn(x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        given = dict(zip(present, tensors))
        args = [given.get(name) for name in TENSOR_ARGS]
        return BN_INFERENCE_OP(x, *args, momentum, eps)[0]

    return bn, [kw["input"], *(kw[name] for name in present)]

