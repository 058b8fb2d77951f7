"""conv_bn: Conv{1,2,3}d -> BatchNorm folds for every hyper-parameter combination, exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, Branches, check_branches, float64_reference, op_bn_branches, randomize_bn, run_bnfuse
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: 11, 2: 9, 3: 6}


def conv_bn_branches(dims: int) -> Branches:
    configs = [
        (dict(in_channels=4, out_channels=6, kernel_size=3), {}),
        (dict(in_channels=4, out_channels=6, kernel_size=3, bias=False), dict(affine=False)),
        (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2), {}),
        (dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=2), dict(eps=1e-3, momentum=0.3)),
        (dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1), {}),  # depthwise
        (dict(in_channels=4, out_channels=8, kernel_size=1), dict(eps=0.5, momentum=None)),
        (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"), {}),
        (dict(in_channels=4, out_channels=6, kernel_size=2, padding=1, padding_mode="circular", stride=(2,) * dims), {}),
    ]
    return op_bn_branches(CONV[dims], dims, configs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_bn_folds_every_configuration(dims, device):
    x = torch.randn(2, 4, *([SIZE[dims]] * dims), device=device)
    check_branches(conv_bn_branches(dims).to(device), x, "conv_bn")


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_folds_channels_last(device):
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8)
    )
    model = randomize_bn(model.eval()).to(device, memory_format=torch.channels_last)
    x = torch.randn(2, 4, 10, 10, device=device).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = model(x)
    result = run_bnfuse(model, x)
    assert len(result.folded) == 2 and not result.kept
    reference = float64_reference(model, x)
    assert (result.outputs.double() - reference).abs().max() / reference.abs().max() < 1e-5
    assert (eager.double() - reference).abs().max() / reference.abs().max() < 1e-5
