"""linear_bn and bn_linear: Linear on (N, C) input, followed or preceded by BatchNorm1d.

Inductor lowers ``F.linear`` to ``addmm(b, x, permute(W, [1, 0]))``, or ``mm`` without a bias.

linear_bn (BN after; or a frozen affine map after)::

    W'[c] = W[c] * scale[c]        (W laid out as out_features x in_features)
    b'    = b * scale + shift      (b = 0 without a bias)

bn_linear (BN before)::

    W'[:, j] = W[:, j] * scale[j]
    b'       = b + W @ shift
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import fold_math
from .._torch_private import MULTIPLE, CallFunction, KeywordArg, Match
from ._base import BnSite, InputChannelRule, OutputChannelRule, affine_of, bn_of

aten = torch.ops.aten

_TRANSPOSED_WEIGHT = CallFunction(aten.permute.default, KeywordArg("weight"), KeywordArg("perm"), _users=MULTIPLE)
ADDMM = CallFunction(aten.addmm.default, KeywordArg("bias"), KeywordArg("input"), _TRANSPOSED_WEIGHT, _users=MULTIPLE)
MM = CallFunction(aten.mm.default, KeywordArg("input"), _TRANSPOSED_WEIGHT, _users=MULTIPLE)
LINEAR_TARGETS = (aten.addmm.default, aten.mm.default)


def _is_linear(match: Match) -> bool:
    return list(match.kwargs["perm"]) == [1, 0]


def _linear(site: BnSite) -> Callable[..., torch.Tensor]:
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return aten.addmm.default(bias, x, aten.permute.default(weight, [1, 0]))

    return linear


class LinearBnRule(OutputChannelRule):
    id = "linear_bn"
    producer_targets = LINEAR_TARGETS
    patterns = (bn_of(ADDMM), bn_of(MM), *affine_of(ADDMM), *affine_of(MM))

    def applies(self, match: Match) -> bool:
        return _is_linear(match)

    def producer_kind(self, site: BnSite) -> str:
        return "linear"

    def scale_weight(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        return fold_math.scale_output_channels(weight, scale)

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        return _linear(site)


class BnLinearRule(InputChannelRule):
    id = "bn_linear"
    producer_targets = LINEAR_TARGETS
    patterns = (ADDMM, MM)

    def applies(self, match: Match) -> bool:
        return _is_linear(match)

    def producer_kind(self, site: BnSite) -> str:
        return "linear"

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        return _linear(site)
