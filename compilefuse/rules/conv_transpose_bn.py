"""conv_transpose_bn: ConvTranspose{1,2,3}d followed by inference BatchNorm (or a frozen affine map).

The weight is laid out as in_channels x out_channels/groups x kernel, so output channel
``g * (out/groups) + j`` is column ``j`` of group ``g``'s block of rows:

    W'[g, :, j] = W[g, :, j] * scale[g * out_per_group + j]
    b'          = b * scale + shift

Scaling dimension 0, or dimension 1 without splitting groups, is the classic bug (Inductor's
binary folding and ``fuse_conv_bn_weights(transpose=True)`` with groups > 1 get it wrong).
"""

from __future__ import annotations

import torch

from .. import fold_math
from ._base import BnSite
from ._conv import ConvolutionRule


class ConvTransposeBnRule(ConvolutionRule):
    id = "conv_transpose_bn"
    transposed = True

    def scale_weight(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        return fold_math.scale_transposed_output_channels(weight, scale, int(site.args["groups"]))
