"""linear_bn: Linear on (N, C_in) input followed by BatchNorm1d.

Inductor lowers ``F.linear`` to ``addmm(b, x, permute(W, [1, 0]))``, or ``mm`` without a bias.

    W'[c] = W[c] * scale[c]        (W laid out as out_features x in_features)
    b'    = b * scale + shift      (b = 0 without a bias)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import fold_math
from .._torch_private import MULTIPLE, CallFunction, KeywordArg, Match
from ._base import BnSite, FoldRule, bn_of

aten = torch.ops.aten


def _transposed_weight() -> CallFunction:
    return CallFunction(aten.permute.default, KeywordArg("weight"), KeywordArg("perm"), _users=MULTIPLE)


class LinearBnRule(FoldRule):
    id = "linear_bn"
    producer_targets = (aten.addmm.default, aten.mm.default)
    patterns = (
        bn_of(
            CallFunction(
                aten.addmm.default,
                KeywordArg("bias"),
                KeywordArg("input"),
                _transposed_weight(),
                _users=MULTIPLE,
            )
        ),
        bn_of(CallFunction(aten.mm.default, KeywordArg("input"), _transposed_weight(), _users=MULTIPLE)),
    )

    def applies(self, match: Match) -> bool:
        return list(match.kwargs["perm"]) == [1, 0]

    def producer_kind(self, site: BnSite) -> str:
        return "linear"

    def scale_weight(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        return fold_math.scale_output_channels(weight, scale)

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return aten.addmm.default(bias, x, aten.permute.default(weight, [1, 0]))

        return linear
