"""Rules folding into a Linear on (N, C) input: linear_bn and bn_linear.

Inductor lowers ``F.linear`` to ``addmm(b, x, permute(W, [1, 0]))``, or ``mm`` without a bias.

linear_bn (BatchNorm1d, or a frozen affine map, after the linear)::

    W'[c] = W[c] * scale[c]        (W laid out as out_features x in_features)
    b'    = b * scale + shift      (b = 0 without a bias)

bn_linear (BatchNorm1d before the linear)::

    W'[:, j] = W[:, j] * scale[j]
    b'       = b + W @ shift

Both are exact for any shapes: each output feature is one dot product with one weight row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import fold_math
from .._torch_private.patterns import MULTIPLE, CallFunction, KeywordArg, Match
from .rule import AFTER, AFTER_THROUGH_SHAPES, BEFORE, BEFORE_THROUGH_SHAPES, BnSite, FoldRule, Producer

aten = torch.ops.aten

_TRANSPOSED_WEIGHT = CallFunction(aten.permute.default, KeywordArg("weight"), KeywordArg("perm"), _users=MULTIPLE)
ADDMM = CallFunction(aten.addmm.default, KeywordArg("bias"), KeywordArg("input"), _TRANSPOSED_WEIGHT, _users=MULTIPLE)
MM = CallFunction(aten.mm.default, KeywordArg("input"), _TRANSPOSED_WEIGHT, _users=MULTIPLE)


class Linear(Producer):
    targets = (aten.addmm.default, aten.mm.default)
    patterns = (ADDMM, MM)

    def claims(self, match: Match) -> bool:
        return list(match.kwargs["perm"]) == [1, 0]  # x @ W.T, not some other matmul

    def kind(self, site: BnSite) -> str:
        return "linear"

    def scale_output_channels(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        return fold_math.scale_output_channels(weight, scale)

    def operands(self, node: torch.fx.Node) -> dict[str, Any] | None:
        if node.op != "call_function" or node.target not in self.targets:
            return None
        bias, x, transposed = (None, *node.args) if node.target is aten.mm.default else node.args
        if not (isinstance(transposed, torch.fx.Node) and transposed.target is aten.permute.default
                and list(transposed.args[1]) == [1, 0]):
            return None
        return {"input": x, "weight": transposed.args[0], "bias": bias}

    def rebuild(self, site: BnSite) -> Callable[..., torch.Tensor]:
        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if bias is None:  # (``rule._bias_after`` adds it)
                return aten.mm.default(x, aten.permute.default(weight, [1, 0]))
            return aten.addmm.default(bias, x, aten.permute.default(weight, [1, 0]))

        return linear


LINEAR_BN = FoldRule("linear_bn", Linear(), AFTER)
BN_LINEAR = FoldRule("bn_linear", Linear(), BEFORE)
LINEAR_TOKENS_BN = FoldRule("linear_tokens_bn", Linear(), AFTER_THROUGH_SHAPES)
BN_TOKENS_LINEAR = FoldRule("bn_tokens_linear", Linear(), BEFORE_THROUGH_SHAPES)
