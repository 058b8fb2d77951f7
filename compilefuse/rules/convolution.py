"""Rules folding into ``aten.convolution``: conv_bn, conv_transpose_bn and bn_conv.

conv_bn: Conv{1,2,3}d followed by inference BatchNorm (or by the per-channel affine map of a frozen
BatchNorm computed in ``forward``, torchvision's ``FrozenBatchNorm2d``: ``x * scale + shift``)::

    W'[c] = W[c] * scale[c]        (W laid out as out_channels x in_channels/groups x kernel)
    b'    = b * scale + shift

Exact for any stride, padding, padding mode, dilation and groups: output channel ``c`` depends on
weight row ``c`` alone.

conv_transpose_bn: ConvTranspose{1,2,3}d followed by BN. The weight is laid out as in_channels x
out_channels/groups x kernel, so output channel ``g * (out/groups) + j`` is column ``j`` of group
``g``'s block of rows::

    W'[g, :, j] = W[g, :, j] * scale[g * out_per_group + j]
    b'          = b * scale + shift

Scaling dimension 0, or dimension 1 without splitting groups, is the classic bug (Inductor's binary
folding and ``fuse_conv_bn_weights(transpose=True)`` with groups > 1 get it wrong).

bn_conv: BN followed by Conv{1,2,3}d, normalising the conv's input channels::

    W'[o, j] = W[o, j] * scale[in(o, j)]
    b'[o]    = b[o] + sum_{j, k} W[o, j, k] * shift[in(o, j)]

Exact only when every output sums real inputs: refused with zero padding (a padded zero would
become ``shift`` before the fold and stay zero after it). Reflect, replicate and circular padding
copy real inputs, which commute with the BN (``_channel_local``), so they fold. Refused for a
transposed convolution: its border outputs sum fewer inputs than its inner ones, so the shift
would not be one bias per channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import fold_math
from .._torch_private.patterns import MULTIPLE, CallFunction, KeywordArg, Match
from .rule import AFTER, BEFORE, BnSite, FoldRule, Producer, Side

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


class Convolution(Producer):
    """``aten.convolution``; ``transposed`` picks plain or transposed convolutions (None: both)."""

    targets = (aten.convolution.default,)
    patterns = (CONVOLUTION,)

    def __init__(self, transposed: bool | None) -> None:
        self.transposed = transposed

    def claims(self, match: Match) -> bool:
        return self.transposed is None or bool(match.kwargs["transposed"]) == self.transposed

    def kind(self, site: BnSite) -> str:
        return conv_kind(site.producer)

    def refusal(self, site: BnSite) -> str | None:
        if site.side is Side.INPUT:
            if site.args["transposed"]:
                return "BN before a transposed convolution: border outputs would get a different bias"
            if any(site.args["padding"]):
                return f"conv zero-pads its input (padding={list(site.args['padding'])}): the border would change"
        return None

    def groups(self, site: BnSite) -> int:
        return int(site.args["groups"])

    def scale_output_channels(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        if site.args["transposed"]:
            return fold_math.scale_transposed_output_channels(weight, scale, self.groups(site))
        return fold_math.scale_output_channels(weight, scale)

    def rebuild(self, site: BnSite) -> Callable[..., torch.Tensor]:
        hyper = [site.args[name] for name in CONV_ARGS]

        def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return aten.convolution.default(x, weight, bias, *hyper)

        return conv


def conv_hyper(conv: torch.fx.Node) -> dict[str, Any]:
    """An ``aten.convolution`` node's hyper-parameters by name (``CONV_ARGS``)."""
    return dict(zip(CONV_ARGS, conv.args[3:], strict=True))


def conv_kind(conv: torch.fx.Node) -> str:
    """``conv2d``, ``conv_transpose1d``, ...: what the report calls an ``aten.convolution`` node."""
    hyper = conv_hyper(conv)
    return f"{'conv_transpose' if hyper['transposed'] else 'conv'}{len(hyper['stride'])}d"


CONV_BN = FoldRule("conv_bn", Convolution(transposed=False), AFTER)
CONV_TRANSPOSE_BN = FoldRule("conv_transpose_bn", Convolution(transposed=True), AFTER)
BN_CONV = FoldRule("bn_conv", Convolution(transposed=None), BEFORE)
