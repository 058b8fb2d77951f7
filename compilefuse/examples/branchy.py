"""Built-in models whose BNs sit in branches, concatenations and token reshapes, the shapes of whole
model families (RepVGG, MobileOne, FastViT, MixNet, LeViT), small enough for tests.

``RepVGGStyle`` and ``MobileOneStyle`` are trained with parallel branches and served merged; each has
``reparameterize()``, the model-specific deploy step their papers ship (as timm's
``reparameterize_model`` does), written by hand here so the benchmark can compare it with bnfuse
merging the as-trained model on its own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


def _fused(branch: nn.Module, cin: int, cout: int, kernel: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A branch (conv + BN, or an identity BN) as a kernel of size ``kernel`` and a bias, in float64."""
    if isinstance(branch, nn.Sequential):
        conv, bn = branch
        weight = conv.weight.double()
        pad = (kernel - weight.shape[-1]) // 2
        weight = nn.functional.pad(weight, [pad] * 4)
    else:
        bn = branch
        weight = torch.zeros(cout, cin // groups, kernel, kernel, dtype=torch.float64, device=bn.weight.device)
        weight[torch.arange(cout), torch.arange(cout) % (cin // groups), kernel // 2, kernel // 2] = 1.0
    std = (bn.running_var.double() + bn.eps).sqrt()
    scale = bn.weight.double() / std
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * scale


class RepBlock(nn.Module):
    """RepVGG / MobileOne block: ``k`` parallel kxk conv+BN branches, a 1x1 conv+BN branch, and an
    identity BN when the block keeps shape; their sum, then ReLU. ``deploy()`` merges them by hand."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3, branches: int = 1) -> None:
        super().__init__()
        self.shape = (cin, cout, kernel, stride, groups)
        self.kxk = nn.ModuleList([_conv_bn(cin, cout, kernel, stride, groups) for _ in range(branches)])
        self.scale = _conv_bn(cin, cout, 1, stride, groups) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.identity(x) if self.identity is not None else 0
        if self.scale is not None:
            out = out + self.scale(x)
        for branch in self.kxk:
            out = out + branch(x)
        return torch.relu(out)

    def deploy(self) -> nn.Module:
        cin, cout, kernel, stride, groups = self.shape
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, device=self.kxk[0][0].weight.device)
        branches = [*self.kxk, *(b for b in (self.scale, self.identity) if b is not None)]
        parts = [_fused(b, cin, cout, kernel, groups) for b in branches]
        with torch.no_grad():
            conv.weight.copy_(sum(w for w, _ in parts))
            conv.bias.copy_(sum(b for _, b in parts))
        return nn.Sequential(conv, nn.ReLU())


class _RepModel(nn.Module):
    def __init__(self, blocks: list[nn.Module], width: int, classes: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))

    def reparameterize(self) -> nn.Module:
        """A copy with every branchy block merged into one conv (the deploy step)."""
        deployed = copy.deepcopy(self)
        deployed.blocks = nn.Sequential(*(b.deploy() if isinstance(b, RepBlock) else b for b in deployed.blocks))
        return deployed


def repvgg_style(width: int = 32, classes: int = 10) -> nn.Module:
    """RepVGG-A-like: 3x3 + 1x1 + identity branches. 6 blocks (2 downsampling, no identity there):
    16 BNs, all foldable (12 into their convs, 4 identity BNs merged)."""
    blocks = [RepBlock(3, width, 2), RepBlock(width, width), RepBlock(width, width),
              RepBlock(width, 2 * width, 2), RepBlock(2 * width, 2 * width), RepBlock(2 * width, 2 * width)]
    return _RepModel(blocks, 2 * width, classes)


def mobileone_style(width: int = 32, classes: int = 10) -> nn.Module:
    """MobileOne-like: a stem block, then 3 stages of a depthwise 3x3 block (2 kxk branches + 1x1
    scale + identity) and a pointwise 1x1 block (2 branches + identity); the middle stage
    downsamples and widens (no identity there). 22 BNs, all foldable."""
    blocks: list[nn.Module] = [RepBlock(3, width, 2, branches=2)]
    for cin, cout, stride in ((width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1)):
        blocks += [RepBlock(cin, cin, stride, groups=cin, branches=2), RepBlock(cin, cout, 1, kernel=1, branches=2)]
    return _RepModel(blocks, 2 * width, classes)


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + layer_scale * (mixer(x) - norm(x))``, the mixer a depthwise kxk
    conv+BN plus a 1x1 scale branch, the norm an identity BN. 3 BNs."""

    def __init__(self, dim: int, kernel: int = 3) -> None:
        super().__init__()
        self.mixer = _conv_bn(dim, dim, kernel, groups=dim)
        self.scale = _conv_bn(dim, dim, 1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) + self.scale(x) - self.norm(x))


def fastvit_style(width: int = 32, classes: int = 10) -> nn.Module:
    """A stem conv+BN and 4 RepMixer blocks, each followed by a 1x1 conv+BN MLP: 1 + 4 * 4 = 17 BNs,
    all foldable (the mixers merge into one depthwise conv each)."""
    layers: list[nn.Module] = [_conv_bn(3, width, 3, 2), nn.ReLU()]
    for _ in range(4):
        layers += [RepMixer(width), _conv_bn(width, width, 1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


class MixedConv(nn.Module):
    """MixNet's mixed-kernel depthwise conv: split the channels, one kernel size per split, concatenate, BN."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        self.splits = [channels // len(kernels)] * len(kernels)
        self.splits[0] += channels - sum(self.splits)
        self.convs = nn.ModuleList([nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
                                    for c, k in zip(self.splits, kernels, strict=True)])
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.relu(self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], 1)))


class GroupedPointwise(nn.Module):
    """A grouped 1x1 conv written as split -> two 1x1 convs -> cat -> BN (MixNet's grouped pointwise)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(cin // 2, cout // 2, 1, bias=False) for _ in range(2)])
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, 2, 1)
        return self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], 1))


def mixnet_style(width: int = 24, classes: int = 10) -> nn.Module:
    """A stem conv+BN, 3 blocks of (mixed-kernel depthwise, grouped pointwise), a 1x1 conv+BN head:
    1 + 3 * 2 + 1 = 8 BNs, all foldable (6 after a concatenation)."""
    layers: list[nn.Module] = [_conv_bn(3, width, 3, 2), nn.ReLU()]
    for _ in range(3):
        layers += [MixedConv(width), GroupedPointwise(width, width)]
    return nn.Sequential(*layers, _conv_bn(width, 2 * width, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, classes))


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d on tokens (timm's ``LinearNorm``): the BN sees (N*L, C)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTStyle(nn.Module):
    """Patch embedding (conv+BN), 3 residual token MLPs of two LinearNorms, then a BatchNorm1d before
    the classifier (timm's ``NormLinear``): 1 + 6 + 1 = 8 BNs, all foldable."""

    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.embed = _conv_bn(3, dim, 4, 4)
        self.mlps = nn.ModuleList([nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))
                                   for _ in range(3)])
        self.head_bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, L, C)
        for mlp in self.mlps:
            tokens = tokens + mlp(tokens)
        return self.head(self.head_bn(tokens.mean(1)))
