"""bn_conv: inference BatchNorm followed by Conv{1,2,3}d (a BN normalising a conv's input).

    W'[o, j] = W[o, j] * scale[in(o, j)]
    b'[o]    = b[o] + sum_{j, k} W[o, j, k] * shift[in(o, j)]

Exact only when every output sums real inputs: no zero padding (a padded zero would become
``shift`` before the fold and stay zero after it). Padding modes 'reflect', 'replicate' and
'circular' pad with copies of real inputs, which commute with the BN (see ``_channel_local``),
so they fold. A transposed convolution never folds this way: its border outputs sum fewer
inputs than its inner ones, so the shift would not be one bias per channel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._base import BnSite, InputChannelRule
from ._conv import CONVOLUTION, conv_kind, convolution_like


class BnConvRule(InputChannelRule):
    id = "bn_conv"
    producer_targets = (torch.ops.aten.convolution.default,)
    patterns = (CONVOLUTION,)

    def producer_kind(self, site: BnSite) -> str:
        return conv_kind(site)

    def refusal(self, site: BnSite) -> str | None:
        if site.args["transposed"]:
            return "BN before a transposed convolution: border outputs would get a different bias"
        if any(site.args["padding"]):
            return f"conv zero-pads its input (padding={list(site.args['padding'])}): the border would change"
        return None

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        return convolution_like(site)
