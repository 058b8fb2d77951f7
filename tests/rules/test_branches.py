"""Model families whose BNs sit in branches, concatenations and token reshapes: branch_merge, cat_bn,
linear_tokens_bn / bn_tokens_linear, and a BN read by several convs. Folded and refused cases, each
against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from compilefuse.examples import branchy


def check(model: nn.Module, *inputs: torch.Tensor, tol: float = 1e-5, **compile_kwargs):
    model = randomize_bn(model.eval())
    result = run_bnfuse(model, *inputs, **compile_kwargs)
    reference = float64_reference(model, *inputs)
    outputs, references = (result.outputs, reference) if isinstance(reference, tuple) else ((result.outputs,), (reference,))
    for out, ref in zip(outputs, references, strict=True):
        assert relative_error(out, ref) < tol
    return result


def merges(result) -> list:
    return [m for r in result.records for m in r.merges]


# --- branch_merge -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("block", "terms"),
    [
        (lambda: branchy.RepBlock(8, 8), 3),  # RepVGG: 3x3 + 1x1 + identity BN
        (lambda: branchy.RepBlock(8, 16, stride=2), 2),  # downsampling: 3x3 + 1x1, no identity
        (lambda: branchy.RepBlock(8, 8, groups=8, branches=3), 5),  # MobileOne depthwise: 3 kxk + 1x1 + identity
        (lambda: branchy.RepBlock(8, 8, kernel=1, branches=2), 3),  # MobileOne pointwise: 2 x 1x1 + identity
        (lambda: branchy.RepBlock(8, 8, kernel=5, groups=2), 3),  # grouped, 5x5 + 1x1 + identity
        (lambda: branchy.RepMixer(8), 4),  # FastViT: x + layer_scale * (mixer + scale - norm)
    ],
)
def test_parallel_branches_merge_into_one_conv(block, terms, device):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block()).to(device)
    result = check(model, torch.randn(2, 3, 9, 9, device=device))
    [merge] = merges(result)
    assert len(merge.branches) == terms and merge.rule == "branch_merge"
    assert all(d.folded for d in result.decisions), result.decisions


class TwoBranches(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, identity: int = 0, share: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.share = a, b, share
        self.identity = nn.BatchNorm2d(identity) if identity else None

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        out = a + b + (self.identity(x) if self.identity is not None else 0)
        return (out, a) if self.share else out


def bn_conv(kernel, stride=1, padding=None, cin=8):
    padding = kernel // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(cin, 8, kernel, stride, padding, bias=False), nn.BatchNorm2d(8))


@pytest.mark.parametrize(
    ("model", "size", "reason"),
    [
        # Shapes that add up but kernels that do not line up: no identity BN to carry the reason.
        (TwoBranches(bn_conv(3, 1, padding=0), bn_conv(1, 2, 0)), 5, None),  # strides differ
        (TwoBranches(bn_conv(3, 2, 1), bn_conv(2, 2, 0)), 8, None),  # not centred alike
        # An identity BN on a 1-channel input that broadcasts over 8 output channels.
        (TwoBranches(bn_conv(3, cin=1), bn_conv(1, cin=1), identity=1), 6,
         "an identity branch, but the convs change the number of channels"),
        (TwoBranches(bn_conv(3), bn_conv(1), identity=8, share=True), 6, "branch output also used by output"),
    ],
)
def test_branch_merge_refuses_what_it_cannot_merge_exactly(model, size, reason):
    cin = model.a[0].in_channels
    result = check(model, torch.randn(2, cin, size, size))
    if reason is None:
        assert not merges(result)
    else:  # the two convs alone may still merge; the identity BN stays, and says why
        [identity] = [d for d in result.decisions if d.bn == "identity"]
        assert not identity.folded and identity.reason == reason, identity


class InputWeightBranch(nn.Module):
    """Two convs of one input summed, one of them with a weight the caller passes in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, weight):
        return self.conv(x) + nn.functional.conv2d(x, weight, padding=1)


@pytest.mark.parametrize(
    ("model", "inputs", "reason"),
    [
        # sizes at which the branches add up
        (lambda: TwoBranches(bn_conv(3, 1, padding=0), bn_conv(1, 2, 0)), lambda: (torch.randn(2, 8, 5, 5),),
         "branches differ in stride: [1, 1], [2, 2]"),
        (lambda: TwoBranches(bn_conv(3, 2, 1), bn_conv(2, 2, 0)), lambda: (torch.randn(2, 8, 8, 8),),
         "kernels are not centred alike (2 * padding - dilation * (kernel - 1) differs between branches)"),
        (lambda: TwoBranches(nn.Sequential(nn.ConvTranspose2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
                             bn_conv(3)),
         lambda: (torch.randn(2, 8, 5, 5),), "a branch is a transposed convolution"),
        (InputWeightBranch, lambda: (torch.randn(2, 8, 5, 5), torch.randn(8, 8, 3, 3)),
         "a branch's weight or bias is not a frozen parameter or buffer"),
    ],
    ids=["stride", "centring", "transposed", "weight_from_an_input"],
)
def test_branch_merge_refusal_reasons(model, inputs, reason):
    """The reasons of refusals whose trees carry no BN of their own, read off the rule itself; the
    tree is not merged and the answer is exact."""
    from compilefuse.rules import branch_merge

    seen = []
    real = branch_merge._refusal

    def spy(tree, frozen):
        seen.append(real(tree, frozen))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(branch_merge, "_refusal", spy)
        result = check(model(), *inputs())
    assert reason in seen, seen
    assert not merges(result)


def test_branch_merge_disabled_keeps_the_identity_bn():
    result = check(branchy.RepBlock(8, 8), torch.randn(2, 8, 6, 6),
                   options={"rules": ["conv_bn", "conv_transpose_bn", "linear_bn", "bn_conv", "bn_linear"]})
    assert not merges(result)
    [identity] = [d for d in result.decisions if d.bn == "identity"]
    assert identity.reason == "rule branch_merge disabled by options"


def test_residual_of_another_tensor_is_no_branch():
    """``conv(relu(conv(x))) + x`` (ResNet) sums terms of two different inputs: nothing merges."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(bn_conv(3), nn.ReLU(), bn_conv(3))

        def forward(self, x):
            return x + self.body(x)

    result = check(Residual(), torch.randn(2, 8, 6, 6))
    assert not merges(result) and all(d.folded and d.rule == "conv_bn" for d in result.decisions)


@pytest.mark.parametrize("name", ["repvgg_style", "mobileone_style"])
def test_hand_reparameterised_copy_matches_the_as_trained_model(name):
    """The benchmark compares bnfuse on the as-trained model with this copy: it must be the same function."""
    from compilefuse.examples.models import BUILTIN_MODELS

    spec = BUILTIN_MODELS[name]
    model = randomize_bn(spec.build().eval())
    x = spec.example(2)
    with torch.inference_mode():
        assert relative_error(model.reparameterize()(x), float64_reference(model, x)) < 1e-5


# --- cat_bn -------------------------------------------------------------------------------------


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

    result = check(Blocks().to(device), torch.randn(2, 12, 6, 6, device=device))
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
    result = check(model, torch.randn(2, 4, 6, 6))
    [decision] = result.decisions
    assert not decision.folded and decision.reason.startswith(reason), decision


# --- BN on token sequences ----------------------------------------------------------------------


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
    result = check(model().to(device), torch.randn(2, 5, 8, device=device))
    [decision] = result.decisions
    assert decision.folded and decision.rule == rule, decision


def test_bn_over_a_dimension_that_is_not_the_linear_features_is_refused():
    result = check(LinearOnChannels(), torch.randn(2, 8, 8))  # L == C: the shapes alone cannot tell
    [decision] = result.decisions
    assert not decision.folded
    assert decision.reason == "the BN's channels are not the linear's features (the reshapes between them move the channel axis)"


def test_bn_on_tokens_with_dynamic_sizes_is_refused_and_exact():
    result = check(NormLinear(), torch.randn(2, 5, 8), dynamic=True)
    [decision] = result.decisions
    assert not decision.folded
    assert decision.reason == "dynamic sizes in the reshapes between the BN and the linear"


# --- a BN read by several ops; FrozenBatchNorm2d before a conv -----------------------------------


class Inception(nn.Module):
    def __init__(self, zero_padded_branch: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 3, padding=1 if zero_padded_branch else 0)
        self.c = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.bn(x)
        return self.a(y), self.b(y), self.c(y)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_read_by_several_convs_folds_into_each(device):
    result = check(Inception().to(device), torch.randn(2, 6, 7, 7, device=device))
    [decision] = result.decisions
    assert decision.folded and decision.rule == "bn_conv"
    assert sum(r.bn_ops_after for r in result.records) == 0


def test_bn_read_by_a_zero_padded_conv_too_is_kept():
    result = check(Inception(zero_padded_branch=True), torch.randn(2, 6, 7, 7))
    [decision] = result.decisions
    assert not decision.folded and decision.reason.startswith("output also used by")


def test_frozen_batch_norm_before_a_conv_folds():
    model = nn.Sequential(FrozenBatchNorm2d(6), nn.Conv2d(6, 4, 3))
    result = check(model, torch.randn(2, 6, 7, 7))
    [decision] = result.decisions
    assert decision.folded and decision.rule == "bn_conv" and decision.bn == "0"
