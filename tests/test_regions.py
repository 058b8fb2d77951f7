"""Graphs with higher-order ops: the BNs outside a region fold as in any graph; inside an
``invoke_subgraph`` region (``torch.compiler.nested_compile_region``) they fold per call site, each
with its own block's values (frozen in inference, per step in training); inside other regions
(``torch.cond``) they are kept, and said so."""

from __future__ import annotations

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error, run_bnfuse, run_exact
from test_training import assert_within_twice, compiled_step, errors, float64_step, sgd_beside_eager
from torch import nn

from compilefuse._torch_private import gates
from compilefuse.bench.training import eval_bn_for_finetuning

needs_regions = pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"),
                                   reason="this torch has no nested_compile_region")
_shared_region = getattr(torch.compiler, "nested_compile_region", lambda fn: fn)


class RepeatedBlocks(nn.Module):
    """A stem, then blocks compiled once as a shared region (``nested_compile_region``: an
    ``invoke_subgraph`` higher-order op in the graph)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        @_shared_region
        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.blocks = nn.ModuleList([self.Block() for _ in range(blocks)])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


class CountedBlocks(RepeatedBlocks):
    """The graph writes the middle block's BN statistics (a no-op write): a live input, not frozen."""

    def forward(self, x):
        self.blocks[1].bn.running_var.mul_(1.0)
        return super().forward(x)


class BranchOnSign(nn.Module):
    """A conv -> BN before a ``torch.cond`` whose branches each hold a conv -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.a, self.a_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.b, self.b_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.stem_bn(self.stem(x))
        return torch.cond(y.sum() > 0, lambda t: self.a_bn(self.a(t)), lambda t: self.b_bn(self.b(t)), (y,))


@needs_regions
def test_a_shared_region_folds_outside_and_per_call_site():
    result = run_exact(RepeatedBlocks(blocks=3), torch.randn(2, 3, 10, 10))
    decisions = {d.bn: d for d in result.decisions}
    assert list(decisions) == ["stem.1", "blocks.0.bn", "blocks.1.bn", "blocks.2.bn"], decisions  # program order
    assert all(d.folded for d in decisions.values()), decisions


@needs_regions
def test_each_call_site_of_a_region_reads_its_own_weights_after_a_change():
    """Three blocks share one body: a change to the middle block's BN reaches its call site only."""
    model, x = randomize_bn(RepeatedBlocks(blocks=3).eval()), torch.randn(2, 3, 10, 10)
    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        compiled(x)
    with torch.no_grad():
        model.blocks[1].bn.running_var.mul_(4.0)
        model.blocks[1].conv.weight.add_(0.5)
    with torch.inference_mode():
        out = compiled(x)
    assert relative_error(out, float64_reference(model, x)) < 1e-5


@needs_regions
def test_a_call_site_whose_state_the_graph_writes_keeps_its_bn():
    result = run_exact(CountedBlocks(blocks=3), torch.randn(2, 3, 10, 10))
    decisions = {d.bn: d for d in result.decisions}
    assert [bn for bn, d in decisions.items() if not d.folded] == ["blocks.1.bn"], decisions
    assert "not a frozen parameter or buffer" in decisions["blocks.1.bn"].reason, decisions


def test_cond_folds_around_it_and_in_each_branch():
    model, x = randomize_bn(BranchOnSign().eval()), torch.randn(2, 3, 8, 8)
    result = run_bnfuse(model, x)
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    compiled, branches = torch.compile(model, backend="bnfuse"), set()
    with torch.inference_mode():
        for scale in (100.0, -100.0):  # one input down each branch
            branches.add(bool(model.stem_bn(model.stem(scale * x)).sum() > 0))
            assert relative_error(compiled(scale * x), float64_reference(model, scale * x)) < 1e-5
    assert branches == {True, False}
    reasons = {d.bn: (d.folded, d.reason) for d in result.decisions}
    if not gates.AOT_DESCRIBES_INPUTS:  # this torch cannot tell a body from its caller: nothing folds
        assert not result.folded and "higher-order op" in reasons["stem_bn"][1], reasons
        return
    assert all(folded for folded, _ in reasons.values()) and sorted(reasons) == ["a_bn", "b_bn", "stem_bn"], reasons


@needs_regions
def test_a_shared_region_folds_per_step_with_gradients_as_exact_as_inductor():
    model, x = eval_bn_for_finetuning(randomize_bn(RepeatedBlocks(blocks=3))), torch.randn(2, 3, 10, 10)
    (loss, grads), records = compiled_step(model, x)
    decisions = [d for r in records for d in r.decisions]
    assert [(d.bn, d.folded, d.per_step) for d in decisions] == [
        (bn, True, True) for bn in ("stem.1", "blocks.0.bn", "blocks.1.bn", "blocks.2.bn")]
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    reference = float64_step(model, x)
    assert_within_twice(errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference), "Inductor")


@needs_regions
def test_weights_after_optimizer_steps_through_a_shared_region_match_eager():
    """Each step reads each block's weights of that step, in its own call site's folds."""
    model = eval_bn_for_finetuning(randomize_bn(RepeatedBlocks(blocks=2)))
    records = sgd_beside_eager(model, [torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    assert len(records) == 1 and all(d.folded and d.per_step for d in records[0].decisions), records


def test_a_training_graph_with_cond_folds_around_it_and_keeps_its_branches_bns():
    model, x = eval_bn_for_finetuning(randomize_bn(BranchOnSign())), torch.randn(2, 3, 8, 8)
    (loss, grads), records = compiled_step(model, x)
    decisions = {d.bn: d for r in records for d in r.decisions}
    assert sorted(decisions) == ["a_bn", "b_bn", "stem_bn"], decisions
    assert decisions["stem_bn"].folded and decisions["stem_bn"].per_step, decisions
    for inside in ("a_bn", "b_bn"):
        assert not decisions[inside].folded and "in the body of higher-order op cond" in decisions[inside].reason, decisions
    (inductor_loss, inductor_grads), _ = compiled_step(model, x, backend="inductor")
    reference = float64_step(model, x)
    assert_within_twice(errors(loss, grads, reference), errors(inductor_loss, inductor_grads, reference), "Inductor")
