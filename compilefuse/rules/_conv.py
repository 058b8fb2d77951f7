"""The convolution pattern shared by ``conv_bn`` and ``conv_transpose_bn``.

Both lower to ``aten.convolution`` and differ only in its ``transposed`` flag, so they match the
same pattern and each rule claims the matches with its own flag.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._torch_private import MULTIPLE, CallFunction, KeywordArg, Match
from ._base import BnSite, FoldRule, bn_of

aten = torch.ops.aten

CONV_ARGS = ("stride", "padding", "dilation", "transposed", "output_padding", "groups")

CONV_BN_PATTERN = bn_of(
    CallFunction(
        aten.convolution.default,
        KeywordArg("input"),
        KeywordArg("weight"),
        KeywordArg("bias"),
        *(KeywordArg(name) for name in CONV_ARGS),
        _users=MULTIPLE,  # matched even when shared, so the refusal can say why
    )
)


class ConvolutionRule(FoldRule):
    producer_targets = (aten.convolution.default,)
    patterns = (CONV_BN_PATTERN,)
    transposed: bool

    def applies(self, match: Match) -> bool:
        return bool(match.kwargs["transposed"]) == self.transposed

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        hyper = [site.args[name] for name in CONV_ARGS]

        def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return aten.convolution.default(x, weight, bias, *hyper)

        return conv

    @staticmethod
    def spatial_dims(site: BnSite) -> int:
        return len(site.args["stride"])
