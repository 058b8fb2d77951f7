"""Every case the rules must refuse: the BN stays, is computed exactly as eager does, and the
decision says why."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn


class SharedConvOutput(nn.Module):
    """The conv's output feeds the BN and the residual add: scaling it would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class StatsAsInputs(nn.Module):
    """BN statistics arrive as call arguments: not constant, so not foldable at compile time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x, mean, var):
        return F.batch_norm(self.conv(x), mean, var, training=False)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_refuses_output_used_elsewhere(device):
    model = randomize_bn(SharedConvOutput().eval()).to(device)
    x = torch.randn(2, 4, 6, 6, device=device)
    result = run_bnfuse(model, x)
    [decision] = result.decisions
    assert not decision.folded and decision.rule == "conv_bn"
    assert decision.reason == "output also used by add", decision
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_refuses_statistics_that_are_not_constant(device):
    model = StatsAsInputs().eval().to(device)
    x = torch.randn(2, 4, 6, 6, device=device)
    mean, var = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    result = run_bnfuse(model, x, mean, var)
    [decision] = result.decisions
    assert not decision.folded
    assert decision.reason == "running_mean is not a frozen parameter or buffer"
    assert relative_error(result.outputs, float64_reference(model, x, mean, var)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_bn_in_training_mode_is_not_folded_and_updates_statistics_like_eager(device):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train().to(device)
    eager_model = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6, device=device)
    with torch.inference_mode():
        expected = eager_model(x)
    result = run_bnfuse(model, x)
    assert not result.folded
    torch.testing.assert_close(result.outputs, expected)
    torch.testing.assert_close(model[1].running_mean, eager_model[1].running_mean)
    torch.testing.assert_close(model[1].running_var, eager_model[1].running_var)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_without_running_stats_is_not_folded(device):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval().to(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    result = run_bnfuse(model, x)
    assert not result.folded
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5


def test_conv_bn_refuses_fold_that_overflows_float16():
    """W * scale overflows float16 although eager's BN output is finite: folding would return inf."""
    conv = nn.Conv2d(4, 4, 1, bias=False)
    bn = nn.BatchNorm2d(4, eps=1e-6)
    with torch.no_grad():
        conv.weight.fill_(100.0)
        bn.running_var.fill_(1e-6)  # scale ~ 707, folded weight ~ 7e4 > float16 max
    model = nn.Sequential(conv, bn).eval().half()
    x = torch.full((1, 4, 3, 3), 0.01).half()
    with torch.inference_mode():
        eager = model(x)
    assert torch.isfinite(eager).all()
    result = run_bnfuse(model, x)
    [decision] = result.decisions
    assert not decision.folded and decision.reason == "folded weight is not finite in torch.float16"
    torch.testing.assert_close(result.outputs, eager)


def test_the_rules_option_disables_a_rule_end_to_end():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    result = run_bnfuse(model, x, options={"rules": ["linear_bn"]})
    [decision] = result.decisions
    assert not decision.folded and decision.reason == "rule conv_bn disabled by options"
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
