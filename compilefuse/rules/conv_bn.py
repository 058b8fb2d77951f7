"""conv_bn: Conv{1,2,3}d followed by inference BatchNorm, or by the per-channel affine map of a
frozen BatchNorm computed in ``forward`` (torchvision's ``FrozenBatchNorm2d``: ``x * scale + shift``).

    W'[c] = W[c] * scale[c]        (W laid out as out_channels x in_channels/groups x kernel)
    b'    = b * scale + shift

Exact for any stride, padding, padding mode, dilation and groups: the BN acts on output channels
only, and conv output channel ``c`` depends on weight row ``c`` alone.
"""

from __future__ import annotations

import torch

from .. import fold_math
from ._base import BnSite
from ._conv import ConvolutionRule


class ConvBnRule(ConvolutionRule):
    id = "conv_bn"
    transposed = False

    def scale_weight(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        return fold_math.scale_output_channels(weight, scale)
