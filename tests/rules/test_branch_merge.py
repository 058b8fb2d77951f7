"""branch_merge: parallel conv branches of one input, each with its BN, and identity BNs, summed
(RepVGG, MobileOne, FastViT's RepMixer) merge into one conv. Merged and refused cases, each against
a float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, float64_reference, randomize_bn, relative_error, run_exact
from torch import nn

from compilefuse.examples import branchy


def merges(result) -> list:
    return [m for r in result.records for m in r.merges]


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
    result = run_exact(model, torch.randn(2, 3, 9, 9, device=device))
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
    result = run_exact(model, torch.randn(2, cin, size, size))
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
        result = run_exact(model(), *inputs())
    assert reason in seen, seen
    assert not merges(result)


def test_branch_merge_disabled_keeps_the_identity_bn():
    result = run_exact(branchy.RepBlock(8, 8), torch.randn(2, 8, 6, 6),
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

    result = run_exact(Residual(), torch.randn(2, 8, 6, 6))
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
