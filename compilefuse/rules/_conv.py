"""The convolution pattern shared by the conv rules.

Conv and conv-transpose both lower to ``aten.convolution`` and differ only in its ``transposed``
flag, so the rules match the same patterns and each claims the matches with its own flag.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._torch_private import MULTIPLE, CallFunction, KeywordArg, Match
from ._base import BnSite, OutputChannelRule, affine_of, bn_of

aten = torch.ops.aten

CONV_ARGS = ("stride", "padding", "dilation", "transposed", "output_padding", "groups")

CONVOLUTION = CallFunction(
    aten.convolution.default,
    KeywordArg("input"),
    KeywordArg("weight"),
    KeywordArg("bias"),
    *(KeywordArg(name) for name in CONV_ARGS),
    _users=MULTIPLE,  # matched even when shared, so the refusal can say why
)


def convolution_like(site: BnSite) -> Callable[..., torch.Tensor]:
    """The matched convolution, rebuilt around a new weight and bias."""
    hyper = [site.args[name] for name in CONV_ARGS]

    def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return aten.convolution.default(x, weight, bias, *hyper)

    return conv


def conv_kind(site: BnSite) -> str:
    name = "conv_transpose" if site.args["transposed"] else "conv"
    return f"{name}{len(site.args['stride'])}d"


class ConvolutionRule(OutputChannelRule):
    producer_targets = (aten.convolution.default,)
    patterns = (bn_of(CONVOLUTION), *affine_of(CONVOLUTION))
    transposed: bool

    def applies(self, match: Match) -> bool:
        return bool(match.kwargs["transposed"]) == self.transposed

    def producer_kind(self, site: BnSite) -> str:
        return conv_kind(site)

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        return convolution_like(site)
