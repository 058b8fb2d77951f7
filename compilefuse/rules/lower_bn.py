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


def neighbours_description(bn: torch.fx.Node) -> str:
    """Why no rule matched a kept BN: what produced its input and what reads its output."""
    return f"no conv or linear next to it (input from {_op_name(bn.args[0].args[0])}, output to {_readers(bn)})"


def _op_name(source: object) -> str:
    if isinstance(source, torch.fx.Node) and source.target is operator.getitem:
        source = source.args[0]  # an output of a multi-output op, e.g. max_pool2d_with_indices
    if not isinstance(source, torch.fx.Node) or source.op != "call_function":
        return "a graph input"
    return str(source.target).removesuffix(".default")


def _readers(bn: torch.fx.Node) -> str:
    users = list(bn.users)
    if not users:
        return "nothing"
    if any(user.op == "output" for user in users) and len(users) == 1:
        return "the graph output"
    return ", ".join(sorted({_op_name(user) if user.op != "output" else "the graph output" for user in users}))


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

