"""cat_bn: a BN after a concatenation of conv outputs folds slice by slice into each conv, or is
refused with the slice that cannot take it."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, run_exact
from torch import nn

from compilefuse.examples import branchy


@pytest.mark.parametrize("device", DEVICES)
def test_bn_after_a_concatenation_of_convs_folds_slice_by_slice(device):
    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed, self.pointwise = branchy.MixedConv(12), branchy.GroupedPointwise(12, 8)
            self.up = nn.ModuleList([nn.ConvTranspose2d(4, 3, 2, stride=2), nn.ConvTranspose2d(4, 5, 2, stride=2, groups=1)])
            self.up_bn = nn.BatchNorm2d(8)

        def forward(self, x):
            a, b = torch.chunk(self.pointwise(self.mixed(x)), 2, 1)
            return self.up_bn(torch.cat([self.up[0](a), self.up[1](b)], 1))

    result = run_exact(Blocks().to(device), torch.randn(2, 12, 6, 6, device=device))
    assert [(d.rule, d.folded) for d in result.decisions] == [("cat_bn", True)] * 3, result.decisions
    assert result.decisions[0].producer == "mixed.convs.0, mixed.convs.1, mixed.convs.2"


class CatOf(nn.Module):
    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shared = shared

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(torch.cat([y, torch.relu(x)], 1))
        return out + y.sum() if self.shared else out


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (CatOf(), "channels 4:8 (relu) do not come from a conv"),
        (CatOf(shared=True), "channels 0:4 (conv): output also used by sum"),
    ],
)
def test_cat_bn_refuses_slices_that_cannot_take_the_fold(model, reason):
    result = run_exact(model, torch.randn(2, 4, 6, 6))
    [decision] = result.decisions
    assert not decision.folded and decision.reason.startswith(reason), decision
