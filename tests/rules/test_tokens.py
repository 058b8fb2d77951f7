"""linear_tokens_bn and bn_tokens_linear: a BN over the channels of token sequences (N, C, L), with
the reshapes between it and a Linear on the features (N, L, C). Folded where every element's
channel is the Linear's feature, refused where the reshapes move the channel axis or their sizes
are dynamic."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, run_exact
from torch import nn

from compilefuse.examples import branchy


class NormLinear(nn.Module):
    """BN over (N, C, L) on tokens (N, L, C), then a Linear on the features: the mirror case."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.linear = nn.BatchNorm1d(8), nn.Linear(8, 6)

    def forward(self, tokens):
        return self.linear(self.bn(tokens.transpose(1, 2)).transpose(1, 2))


class LinearOnChannels(nn.Module):
    """A Linear on the last dimension of (N, C, L), then BatchNorm1d over C: the BN's channels are
    not the Linear's features (the wrong fold another project shipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.linear(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("model", "rule"), [(lambda: branchy.LinearNorm(8, 6), "linear_tokens_bn"),
                                             (NormLinear, "bn_tokens_linear")])
def test_bn_on_tokens_folds_through_the_reshapes(model, rule, device):
    result = run_exact(model().to(device), torch.randn(2, 5, 8, device=device))
    [decision] = result.decisions
    assert decision.folded and decision.rule == rule, decision


def test_bn_over_a_dimension_that_is_not_the_linear_features_is_refused():
    result = run_exact(LinearOnChannels(), torch.randn(2, 8, 8))  # L == C: the shapes alone cannot tell
    [decision] = result.decisions
    assert not decision.folded
    assert decision.reason == "the BN's channels are not the linear's features (the reshapes between them move the channel axis)"


def test_bn_on_tokens_with_dynamic_sizes_is_refused_and_exact():
    result = run_exact(NormLinear(), torch.randn(2, 5, 8), dynamic=True)
    [decision] = result.decisions
    assert not decision.folded
    assert decision.reason == "dynamic sizes in the reshapes between the BN and the linear"
