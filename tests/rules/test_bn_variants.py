"""BatchNorm in other clothes: functional, frozen (torchvision), synchronised, chained, and shared
convolutions. Each folds exactly where a plain BN would, and is left alone where it would not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def check(model: nn.Module, x: torch.Tensor, folded: list[tuple[str, str]], kept: int = 0):
    """Compile, compare with float64, and check which BNs folded by which rule, in program order."""
    model = randomize_bn(model.eval())
    result = run_bnfuse(model, x)
    assert [(d.bn, d.rule) for d in result.folded] == folded, result.decisions
    assert len(result.kept) == kept, result.kept
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    return result


class FunctionalBn(nn.Module):
    """timm's norm_act style: the module calls F.batch_norm on its own buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, training=False, eps=1e-3)
        return F.relu(y)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_batch_norm_on_buffers_folds(device):
    check(FunctionalBn().to(device), torch.randn(2, 4, 8, 8, device=device), [("batch_norm", "conv_bn")])


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_batch_norm_folds_after_conv_conv_transpose_and_linear(device):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn1 = nn.Conv2d(4, 8, 3, bias=False), FrozenBatchNorm2d(8)
            self.up, self.bn2 = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), FrozenBatchNorm2d(6)
            self.fc = nn.Linear(6, 20)
            self.register_buffer("scale", torch.rand(20) + 0.5)  # a layer-scale: per channel, frozen
            self.register_buffer("shift", torch.randn(20))

        def forward(self, x):
            y = self.bn2(self.up(torch.relu(self.bn1(self.conv(x)))))
            return self.fc(y.mean((2, 3))) * self.scale + self.shift

    check(Model().to(device), torch.randn(2, 4, 8, 8, device=device),
          [("bn1", "conv_bn"), ("bn2", "conv_transpose_bn"), ("add_4", "linear_bn")])


class NotPerChannel(nn.Module):
    """A mul-add that is no BN: a spatial mask, and a scale that is a graph input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("mask", torch.rand(1, 1, 8, 8))

    def forward(self, x, gate):
        return self.conv2(self.conv1(x) * self.mask + 1.0) * gate + 2.0


def test_mul_add_that_is_not_a_frozen_per_channel_affine_is_left_alone():
    model = NotPerChannel().eval()
    x, gate = torch.randn(2, 4, 8, 8), torch.rand(1, 4, 1, 1)
    result = run_bnfuse(model, x, gate)
    assert result.decisions == []
    assert relative_error(result.outputs, float64_reference(model, x, gate)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_sync_batch_norm_in_eval_folds(device):
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(), nn.SyncBatchNorm(8), nn.Conv2d(8, 8, 1))
    check(model.to(device), torch.randn(2, 4, 8, 8, device=device), [("1", "conv_bn"), ("3", "bn_conv")])


@pytest.mark.parametrize("device", DEVICES)
def test_chains_fold_completely(device):
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
    )
    result = check(model.to(device), torch.randn(2, 4, 10, 10, device=device),
                   [("1", "conv_bn"), ("2", "conv_bn"), ("4", "bn_conv"), ("5", "bn_conv"), ("7", "conv_bn")])
    assert result.records[0].bn_ops_after == 0


class SharedConv(nn.Module):
    """One conv weight at three call sites: two BNs after it, one site reused with the first BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x, y):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(y)) * self.bn_a(self.conv(x + y))


@pytest.mark.parametrize("device", DEVICES)
def test_shared_conv_folds_per_call_site_and_never_touches_the_shared_weight(device):
    model = randomize_bn(SharedConv().eval()).to(device)
    weight = model.conv.weight.detach().clone()
    x, y = torch.randn(2, 4, 6, 6, device=device), torch.randn(2, 4, 6, 6, device=device)
    with torch.inference_mode():
        eager = model(x, y)
    result = run_bnfuse(model, x, y)
    assert [d.folded for d in result.decisions] == [True, True, True]
    assert relative_error(result.outputs, float64_reference(model, x, y)) < 1e-5
    assert torch.equal(model.conv.weight, weight)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, y), eager, rtol=0, atol=0)


def test_shared_conv_gets_its_own_fold_per_call_site():
    """Module-level fusers fold a shared conv once, for one of its BNs, and every other site is then
    wrong (``torch.fx.experimental.optimization.fuse``: see docs/benchmarks.md). bnfuse folds each
    call site into constants of its own."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3)
            self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn_a(y), self.bn_b(self.conv(x * 2))

    model = randomize_bn(Shared().eval())
    x = torch.randn(2, 4, 6, 6)
    reference = float64_reference(model, x)
    result = run_bnfuse(model, x)
    assert len(result.folded) == 2
    assert max(relative_error(a, r) for a, r in zip(result.outputs, reference, strict=True)) < 1e-5
