"""conv_transpose_bn: ConvTranspose{1,2,3}d -> BatchNorm folds along the right (grouped) weight axis."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, Branches, check_branches, op_bn_branches
from torch import nn

CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SIZE = {1: 7, 2: 5, 3: 4}


def conv_transpose_bn_branches(dims: int) -> Branches:
    configs = [
        (dict(in_channels=4, out_channels=6, kernel_size=3), {}),
        (dict(in_channels=4, out_channels=4, kernel_size=3, bias=False), dict(affine=False)),  # in == out
        (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, output_padding=1, groups=2), {}),
        (dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding=1), dict(eps=1e-3)),
        (dict(in_channels=4, out_channels=6, kernel_size=2, stride=3, dilation=2, output_padding=2), dict(momentum=None)),
    ]
    return op_bn_branches(CONV_T[dims], dims, configs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_bn_folds_every_configuration(dims, device):
    x = torch.randn(2, 4, *([SIZE[dims]] * dims), device=device)
    check_branches(conv_transpose_bn_branches(dims).to(device), x, "conv_transpose_bn")
