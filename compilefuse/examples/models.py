"""Built-in example models (no download) and BN randomisation, shared by the demo, the
benchmarks and the tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from . import branchy


def is_batch_norm(module: nn.Module) -> bool:
    """torch's BatchNorm modules (1d, 2d, 3d, synchronised, lazy), by their public classes."""
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                               nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d))


def randomize_bn(model: nn.Module, var_range: tuple[float, float] = (0.2, 3.0)) -> nn.Module:
    """Give every BatchNorm (torchvision's FrozenBatchNorm2d too) statistics and affine parameters far
    from identity, so folding matters
    (freshly built models have mean 0, var 1, gamma 1, beta 0: folding them changes nothing)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "FrozenBatchNorm2d":  # torchvision's: buffers only
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(*var_range)
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-1.0, 1.0)
            elif is_batch_norm(module):
                if module.running_mean is not None:
                    module.running_mean.uniform_(-1.0, 1.0)
                    module.running_var.uniform_(*var_range)
                if module.affine:
                    module.weight.uniform_(0.5, 2.0)
                    module.bias.uniform_(-1.0, 1.0)
    return model


def calibrate_bn(model: nn.Module, example: torch.Tensor, affine_range: tuple[float, float] = (0.5, 2.0)) -> nn.Module:
    """Give every BatchNorm statistics a trained model could have: random affine parameters, then
    running statistics measured on ``example`` (one forward pass in training mode, cumulative average).

    Random statistics far from a layer's real input scale compound through a deep network and
    overflow float16 (resnet50: NaN outputs); calibrated ones keep every activation in range, in
    every dtype, while the scales and shifts stay far from identity, so folding still matters.
    """
    norms = [m for m in model.modules() if is_batch_norm(m) and m.track_running_stats]
    saved = [(m.training, m.momentum) for m in norms]
    with torch.no_grad():
        for m in norms:
            if m.affine:
                m.weight.uniform_(*affine_range)
                m.bias.uniform_(-0.5, 0.5)
            m.reset_running_stats()
            m.train()
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model(example)
        for m, (training, momentum) in zip(norms, saved, strict=True):
            m.train(training)
            m.momentum = momentum
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


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet_style(width: int = 32, classes: int = 10) -> nn.Module:
    """A small ResNet: conv stem, four basic blocks (two downsampling), linear head. 11 BNs, all after a conv."""
    return nn.Sequential(
        *_conv_bn_relu(3, width), _BasicBlock(width, width, 1), _BasicBlock(width, 2 * width, 2),
        _BasicBlock(2 * width, 4 * width, 2), _BasicBlock(4 * width, 4 * width, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            *_conv_bn_relu(channels, hidden, 1), *_conv_bn_relu(hidden, hidden, 3, groups=hidden),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def mobilenet_style(width: int = 16, classes: int = 10) -> nn.Module:
    """A small MobileNetV2: depthwise-separable inverted residuals. 8 BNs, all after a conv."""
    return nn.Sequential(
        *_conv_bn_relu(3, width, 3, 2), _InvertedResidual(width, 4), *_conv_bn_relu(width, 2 * width, 3, 2),
        _InvertedResidual(2 * width, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


def pointnet_head(points_features: int = 3, classes: int = 16) -> nn.Module:
    """PointNet's classifier (Qi et al.): a shared per-point MLP (Conv1d k=1 + BN1d), max-pool over
    points, then Linear + BN1d layers. 7 BNs: 4 after a Conv1d, 3 after a Linear (inputs (N, C))."""

    def shared(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout), nn.ReLU(True)]

    def dense(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(True)]

    return nn.Sequential(
        *shared(points_features, 64), *shared(64, 64), *shared(64, 128), *shared(128, 256),
        nn.AdaptiveMaxPool1d(1), nn.Flatten(), *dense(256, 128), *dense(128, 64), *dense(64, 32),
        nn.Linear(32, classes),
    )


def audio_cnn(classes: int = 10, width: int = 32) -> nn.Module:
    """The M5 raw-waveform CNN (Dai et al.): Conv1d + BN1d + ReLU + MaxPool1d blocks. 4 BNs after a Conv1d."""

    def block(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv1d(cin, cout, kernel, stride), nn.BatchNorm1d(cout), nn.ReLU(True), nn.MaxPool1d(4)]

    return nn.Sequential(
        *block(1, width, 80, 4), *block(width, width, 3), *block(width, 2 * width, 3), *block(2 * width, 2 * width, 3),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


class _PreActivationBlock(nn.Module):
    """BN -> conv (reflect padding) -> ReLU, BN -> conv 1x1, residual: the BN sits *before* each conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.bn2(torch.relu(self.conv1(self.bn1(x)))))


def preact_cnn(width: int = 32, classes: int = 10) -> nn.Module:
    """Normalise-then-convolve: an input BN before the stem conv, pre-activation blocks, and a BN1d
    before the classifier. 6 BNs, every one before a conv or linear."""
    return nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, width, 3, stride=2),
        _PreActivationBlock(width), _PreActivationBlock(width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(width), nn.Linear(width, classes),
    )


class _DenseLayer(nn.Module):
    """DenseNet's layer: BN -> ReLU -> conv 1x1 -> BN -> ReLU -> conv 3x3 on the concatenation of
    all earlier features. The first BN follows a concatenation and precedes a ReLU: no exact fold."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


class DenseNetStyle(nn.Module):
    """A small DenseNet: stem conv + BN, two dense layers, a pre-activation transition, a final BN.

    7 BNs, 3 foldable: the stem BN and each layer's ``norm2`` follow a conv. Each layer's ``norm1``
    (after a concatenation, before a ReLU), the transition's BN (likewise) and the final BN (after
    pooling, before a ReLU) have no exact fold: the counting tests see a fold that should not happen.
    """

    def __init__(self, width: int = 16, growth: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.layers = nn.ModuleList([_DenseLayer(width, growth), _DenseLayer(width + growth, growth)])
        channels = width + 2 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, width, 1), nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        y = torch.relu(self.norm(self.transition(torch.cat(features, 1))))
        return self.head(y.mean((2, 3)))


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A built-in model (no download), its example input shape at batch 1, and how many of its
    BNs are exactly foldable (counted by hand from the architecture)."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    foldable: int
    total: int

    def example(self, batch: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
        return torch.randn(batch, *self.input_shape[1:], dtype=dtype, device=device)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "resnet_style": BuiltinModel(resnet_style, (1, 3, 32, 32), 11, 11),
    "mobilenet_style": BuiltinModel(mobilenet_style, (1, 3, 32, 32), 8, 8),
    "dcgan_generator": BuiltinModel(dcgan_generator, (1, 100, 1, 1), 4, 4),
    "pointnet_head": BuiltinModel(pointnet_head, (1, 3, 1024), 7, 7),
    "audio_cnn": BuiltinModel(audio_cnn, (1, 1, 8000), 4, 4),
    "preact_cnn": BuiltinModel(preact_cnn, (1, 3, 32, 32), 6, 6),
    "densenet_style": BuiltinModel(DenseNetStyle, (1, 3, 16, 16), 3, 7),
    "repvgg_style": BuiltinModel(branchy.repvgg_style, (1, 3, 32, 32), 16, 16),
    "mobileone_style": BuiltinModel(branchy.mobileone_style, (1, 3, 32, 32), 22, 22),
    "fastvit_style": BuiltinModel(branchy.fastvit_style, (1, 3, 32, 32), 17, 17),
    "mixnet_style": BuiltinModel(branchy.mixnet_style, (1, 3, 32, 32), 8, 8),
    "levit_style": BuiltinModel(branchy.LeViTStyle, (1, 3, 32, 32), 8, 8),
}
