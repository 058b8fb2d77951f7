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


def overflowing():
    """A model whose float16 output is inf (a BN scale past float16's range), finite in float32."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, eps=0.0)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_var.fill_(1e-12)  # scale 1e6: float16 overflows, float32 does not
    return model, torch.ones(1, 3, 4, 4)
