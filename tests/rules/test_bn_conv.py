"""bn_conv: BatchNorm -> Conv{1,2,3}d folds into the conv's input channels wherever no zero padding
reaches the conv, and is refused where it does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICES,
    bn_op_branches,
    check_branches,
    float64_reference,
    randomize_bn,
    relative_error,
    run_bnfuse,
    run_exact,
)
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: 11, 2: 9, 3: 6}


def bn_conv_branches(dims: int):
    configs = [
        (dict(in_channels=4, out_channels=6, kernel_size=3), {}),
        (dict(in_channels=4, out_channels=6, kernel_size=3, bias=False), dict(affine=False)),
        (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2), dict(eps=1e-3, momentum=None)),
        (dict(in_channels=4, out_channels=6, kernel_size=3, groups=2), {}),
        (dict(in_channels=4, out_channels=8, kernel_size=3, groups=4), {}),  # depthwise, 2 per group
        (dict(in_channels=4, out_channels=6, kernel_size=1), {}),
        # Padding modes that copy real inputs commute with the BN:
        (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"), {}),
        (dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, padding_mode="replicate", groups=2), {}),
        (dict(in_channels=4, out_channels=6, kernel_size=2, padding=1, padding_mode="circular", stride=2), {}),
    ]
    return bn_op_branches(CONV[dims], dims, configs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bn_conv_folds_every_configuration_without_zero_padding(dims, device):
    x = torch.randn(2, 4, *([SIZE[dims]] * dims), device=device)
    result = check_branches(bn_conv_branches(dims).to(device), x, "bn_conv")
    assert result.records[0].bn_ops_after == 0


class AfterRelu(nn.Module):
    """relu -> BN -> op: the BN has no producer to fold into, only the op after it."""

    def __init__(self, op: nn.Module, channels: int) -> None:
        super().__init__()
        self.bn, self.op = nn.BatchNorm2d(channels), op

    def forward(self, x):
        return self.op(self.bn(torch.relu(x)))


class SharedBnOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        return self.conv(y) + y


class ConstantPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv(F.pad(self.bn(torch.relu(x)), (1, 1, 1, 1), value=0.0))


REFUSALS = [
    (AfterRelu(nn.Conv2d(4, 6, 3, padding=1), 4), "conv zero-pads its input (padding=[1, 1]): the border would change"),
    (AfterRelu(nn.Conv2d(4, 6, 3, padding=(0, 2)), 4), "conv zero-pads its input (padding=[0, 2]): the border would change"),
    (AfterRelu(nn.ConvTranspose2d(4, 6, 3, stride=2), 4),
     "BN before a transposed convolution: border outputs would get a different bias"),
    (SharedBnOutput(), "output also used by add"),
    # A zero pad written out with F.pad is no conv padding, but it makes up values all the same:
    (ConstantPad(), "no conv or linear next to it (input from relu, output to pad)"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model, reason", REFUSALS, ids=[r[1][:30] for r in REFUSALS])
def test_bn_conv_refuses_where_the_border_or_another_user_would_change(model, reason, device):
    model = randomize_bn(model.eval()).to(device)
    x = torch.randn(2, 4, 7, 7, device=device)
    result = run_bnfuse(model, x)
    [decision] = result.decisions
    assert not decision.folded and decision.reason == reason, decision
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5


def test_zero_padding_refusal_has_teeth():
    """Folding across zero padding anyway (what a naive BN->conv fold does) is measurably wrong."""
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)
    model = randomize_bn(nn.Sequential(bn, conv).eval())
    x = torch.randn(2, 4, 7, 7)
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
    shift = (bn.bias - bn.running_mean * scale).detach()
    naive_weight = conv.weight * scale.view(1, -1, 1, 1)
    naive_bias = conv.bias + (conv.weight * shift.view(1, -1, 1, 1)).sum((1, 2, 3))
    with torch.inference_mode():
        naive = F.conv2d(x, naive_weight, naive_bias, padding=1)
    assert relative_error(naive, float64_reference(model, x)) > 1e-2


# A BN read by several convs; FrozenBatchNorm2d before a conv.


class Inception(nn.Module):
    def __init__(self, zero_padded_branch: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 3, padding=1 if zero_padded_branch else 0)
        self.c = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.bn(x)
        return self.a(y), self.b(y), self.c(y)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_read_by_several_convs_folds_into_each(device):
    result = run_exact(Inception().to(device), torch.randn(2, 6, 7, 7, device=device))
    [decision] = result.decisions
    assert decision.folded and decision.rule == "bn_conv"
    assert sum(r.bn_ops_after for r in result.records) == 0


def test_bn_read_by_a_zero_padded_conv_too_is_kept():
    result = run_exact(Inception(zero_padded_branch=True), torch.randn(2, 6, 7, 7))
    [decision] = result.decisions
    assert not decision.folded and decision.reason.startswith("output also used by")


def test_frozen_batch_norm_before_a_conv_folds():
    model = nn.Sequential(FrozenBatchNorm2d(6), nn.Conv2d(6, 4, 3))
    result = run_exact(model, torch.randn(2, 6, 7, 7))
    [decision] = result.decisions
    assert decision.folded and decision.rule == "bn_conv" and decision.bn == "0"
