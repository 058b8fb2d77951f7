"""Property tests for the rules that fold across structure: random parallel branches (kernels 1/3/5,
paddings, strides, groups, an identity BN or not, a layer scale, add or sub), concatenations of convs,
and token reshapes around a BatchNorm1d. Each asserts bnfuse == eager against a float64 reference,
and that the merge or fold happens exactly when the rule's conditions allow it.

Each example is a Dynamo trace and an Inductor compile, so these keep to what that adds (modules
traced to aten, the BNs' decomposition, generated code); the rules' merges and folds over the same
random branch and concatenation cases run far more broadly at graph level, in milliseconds an
example (``tests/rules/test_fuzz_graphs.py``).

Profiles (``HYPOTHESIS_PROFILE``, read in ``fuzzing.py``): ``ci`` runs 12 examples of each here.
"""

from __future__ import annotations

import torch
from fuzzing import addable, branch_cases, cat_cases, expected_merge, fuzz_settings
from helpers import float64_reference, randomize_bn, relative_error, run_bnfuse
from hypothesis import HealthCheck, assume, given
from hypothesis import strategies as st
from torch import nn

FUZZ = fuzz_settings(ci=12, quick=4, long=1000, suppress=tuple(HealthCheck))


class Branches(nn.Module):
    def __init__(self, convs, identity, scale, subtract) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels)) for conv in convs)
        self.identity = nn.BatchNorm2d(convs[0].in_channels) if identity else None
        self.scale = nn.Parameter(torch.rand(convs[0].out_channels, 1, 1) + 0.5) if scale else None
        self.subtract = subtract

    def forward(self, x):
        out = self.convs[0](x)
        for branch in self.convs[1:]:
            out = out - branch(x) if self.subtract else out + branch(x)
        if self.scale is not None:
            out = out * self.scale
        return out + self.identity(x) if self.identity is not None else out


@FUZZ
@given(branch_cases())
def test_random_branches_merge_exactly_when_allowed(case):
    assume(addable(case))
    torch._dynamo.reset()  # each example compiles afresh: no automatic dynamic shapes from the last one
    channels = case["channels"]
    convs = [nn.Conv2d(channels, channels, c["kernel"], c["stride"], c["padding"], groups=c["groups"], bias=False)
             for c in case["convs"]]
    model = randomize_bn(Branches(convs, case["identity"], case["scale"], case["subtract"]).eval())
    x = torch.randn(2, channels, case["size"], case["size"])
    result = run_bnfuse(model, x)
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5, case
    merges, all_folded = expected_merge(case)
    merged = [len(m.branches) for r in result.records for m in r.merges]
    assert merged == merges, (case, merged)
    assert all(d.folded for d in result.decisions) == all_folded, (case, result.decisions)


class CatBlock(nn.Module):
    def __init__(self, splits, kernels, transposed) -> None:
        super().__init__()
        self.splits = splits
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.convs = nn.ModuleList(conv(c, c + 1, k, padding=k // 2) for c, k in zip(splits, kernels, strict=True))
        self.bn = nn.BatchNorm2d(sum(c + 1 for c in splits))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], 1))


@FUZZ
@given(cat_cases())
def test_random_concatenations_of_convs_fold(case):
    torch._dynamo.reset()
    model = randomize_bn(CatBlock(case["splits"], case["kernels"], case["transposed"]).eval())
    x = torch.randn(2, sum(case["splits"]), 6, 6)
    result = run_bnfuse(model, x)
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    [decision] = result.decisions
    assert decision.folded and decision.rule == "cat_bn", decision


class Tokens(nn.Module):
    """A Linear on tokens (N, L, C) and a BatchNorm1d arranged one of three ways."""

    def __init__(self, features: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.linear = nn.Linear(features, features)
        self.bn = nn.BatchNorm1d(features)

    def forward(self, x):
        if self.layout == "flatten":  # LeViT: BN over (N*L, C)
            y = self.linear(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y)
        if self.layout == "transpose":  # BN over (N, C, L), the channels are the features
            return self.bn(self.linear(x).transpose(1, 2))
        return self.bn(self.linear(x.transpose(1, 2)))  # BN over (N, C, L), the Linear on L: no fold


@FUZZ
@given(st.integers(1, 3), st.sampled_from([4, 6]), st.sampled_from(["flatten", "transpose", "wrong"]))
def test_random_token_layouts_fold_exactly_when_the_channels_are_the_features(batch, features, layout):
    torch._dynamo.reset()
    model = randomize_bn(Tokens(features, layout).eval())
    x = torch.randn(batch, features, features)  # L == C: the shapes alone cannot tell the layouts apart
    result = run_bnfuse(model, x)
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    [decision] = result.decisions
    assert decision.folded == (layout != "wrong"), (layout, decision)
