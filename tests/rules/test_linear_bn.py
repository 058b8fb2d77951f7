"""linear_bn: Linear -> BatchNorm1d on (N, C) input folds with or without bias and affine."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, Branches, check_branches
from torch import nn


@pytest.mark.parametrize("device", DEVICES)
def test_linear_bn_folds_every_configuration(device):
    model = Branches(
        [
            nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)),
            nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6)),
            nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, affine=False, eps=1e-2)),
            nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4, affine=False, momentum=None)),
        ]
    ).to(device)
    check_branches(model, torch.randn(7, 5, device=device), "linear_bn")
