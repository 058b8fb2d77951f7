"""Built-in example models (no download) and BN randomisation, shared by the demo, the
benchmarks and the tests."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, var_range: tuple[float, float] = (0.2, 3.0)) -> nn.Module:
    """Give every BatchNorm statistics and affine parameters far from identity, so folding matters
    (freshly built models have mean 0, var 1, gamma 1, beta 0: folding them changes nothing)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.running_mean is not None:
                    module.running_mean.uniform_(-1.0, 1.0)
                    module.running_var.uniform_(*var_range)
                if module.affine:
                    module.weight.uniform_(0.5, 2.0)
                    module.bias.uniform_(-1.0, 1.0)
    return model


class SmallCNN(nn.Module):
    """Conv+BN, depthwise Conv+BN, ConvTranspose+BN, Linear+BN1d, and one BN that cannot fold."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 12, 2, stride=2, groups=4), nn.BatchNorm2d(12), nn.ReLU())
        self.skip_bn = nn.BatchNorm2d(3)  # normalises the raw input: no producer to fold into
        self.head = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.depthwise(self.stem(x)))
        y = y + self.skip_bn(x).mean(1, keepdim=True)
        return self.head(y.mean((2, 3)))


def dcgan_generator(nz: int = 100, ngf: int = 64) -> nn.Module:
    """The DCGAN generator (Radford et al.): ConvTranspose + BN + ReLU blocks, 64x64 output."""
    def block(cin: int, cout: int, stride: int, pad: int) -> list[nn.Module]:
        return [nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

    return nn.Sequential(
        *block(nz, ngf * 8, 1, 0), *block(ngf * 8, ngf * 4, 2, 1), *block(ngf * 4, ngf * 2, 2, 1),
        *block(ngf * 2, ngf, 2, 1), nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh(),
    )
