"""Model factories for the benchmark tests, loaded as ``--model bench_fixtures:NAME``."""

from __future__ import annotations

import torch
from torch import nn

from compilefuse.examples.models import randomize_bn


def tiny():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU()).eval())
    return model, torch.randn(1, 3, 8, 8)


def not_a_pair():
    return nn.Linear(2, 2)
