"""bn_linear: BatchNorm1d -> Linear on (N, C) input folds into the linear's input columns."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, Branches, check_branches, float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn


@pytest.mark.parametrize("device", DEVICES)
def test_bn_linear_folds_every_configuration(device):
    model = Branches(
        [
            nn.Sequential(nn.BatchNorm1d(20), nn.Linear(20, 24)),
            nn.Sequential(nn.BatchNorm1d(20), nn.Linear(20, 24, bias=False)),
            nn.Sequential(nn.BatchNorm1d(20, affine=False, eps=1e-2), nn.Linear(20, 18)),
            nn.Sequential(nn.BatchNorm1d(20, momentum=None), nn.Linear(20, 32, bias=False)),
        ]
    ).to(device)
    check_branches(model, torch.randn(7, 20, device=device), "bn_linear")


class SharedBnOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(20), nn.Linear(20, 20)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        return self.fc(y) * y


@pytest.mark.parametrize("device", DEVICES)
def test_bn_linear_refuses_output_used_elsewhere(device):
    model = randomize_bn(SharedBnOutput().eval()).to(device)
    x = torch.randn(7, 20, device=device)
    result = run_bnfuse(model, x)
    [decision] = result.decisions
    assert not decision.folded and decision.rule == "bn_linear" and decision.reason == "output also used by mul"
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
