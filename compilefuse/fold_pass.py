"""The bnfuse graph passes: Inductor pattern-matcher replacements run as custom passes.

``BnFoldPass`` runs inside Inductor's freezing compile as a joint-graph pass, before freezing's
constant folding and binary folding, on a graph whose module state is still placeholders. For each
BatchNorm matched next to a conv or linear (after it or before it) the rule's checks decide; a fold
computes the new weight and bias once, from the real frozen tensors, in float64, and rebuilds the op
to read them as graph constants. The rules run until nothing more folds. ``BnLowerPass`` runs after freezing and decomposes every BN left, exactly as Inductor
would have.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.fx

from . import _torch_private as tp
from .decisions import FoldDecision, module_path
from .rules import RULES, FoldRule
from .rules import _base as base
from .rules import lower_bn


@dataclasses.dataclass
class FoldRecord:
    """What one compiled graph's pass decided and how long it took."""

    decisions: list[FoldDecision] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    #: Inference BN ops in the graph before and after the fold rules ran, counted on the graph
    #: itself (independently of the decisions, so the two can be checked against each other).
    bn_ops_before: int = 0
    bn_ops_after: int = 0


@dataclasses.dataclass
class _PassContext:
    graph: torch.fx.Graph
    frozen: dict[torch.fx.Node, torch.Tensor]
    enabled: frozenset[str]
    record: FoldRecord
    folded: set[torch.fx.Node] = dataclasses.field(default_factory=set)
    #: The first reason each BN was refused for; reported only if no rule folds it in the end.
    refused: dict[torch.fx.Node, FoldDecision] = dataclasses.field(default_factory=dict)
    constants: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def fold(self, bn: torch.fx.Node, decision: FoldDecision) -> None:
        self.folded.add(bn)
        self.record.decisions.append(decision)

    def refuse(self, bn: torch.fx.Node, decision: FoldDecision) -> None:
        self.refused.setdefault(bn, decision)

    def add_constant(self, value: torch.Tensor, like: torch.fx.Node) -> torch.fx.Node:
        gm = self.graph.owning_module
        name = next(f"_bnfuse_folded{i}" for i in self.constants if not hasattr(gm, f"_bnfuse_folded{i}"))
        tp.mark_frozen(value)
        gm.register_buffer(name, value)
        with self.graph.inserting_before(like):
            node = self.graph.get_attr(name)
        node.meta["val"] = tp.fake_tensor_of(like, value)
        self.frozen[node] = value  # a folded op can fold again (conv -> BN -> BN)
        return node


_ACTIVE: contextvars.ContextVar[_PassContext] = contextvars.ContextVar("bnfuse_pass")


def _fold(match: tp.Match, rule: FoldRule) -> None:
    ctx = _ACTIVE.get()
    site = rule.site(match)
    if site is None or not base.recognised(site, ctx.frozen):
        return
    if rule.id not in ctx.enabled:
        ctx.refuse(site.bn, base.decision(rule, site, f"rule {rule.id} disabled by options"))
        return
    reason = base.refusal_reason(rule, site, ctx.frozen)
    with tp.real_tensor_math():
        folded = reason or base.folded_constants(rule, site, ctx.frozen)
    if isinstance(folded, str):
        ctx.refuse(site.bn, base.decision(rule, site, folded))
        return
    weight, bias = (ctx.add_constant(value, like=site.producer) for value in folded)
    data = site.input
    if site.before is not None:  # the op now reads what the BN normalised, moved the same way
        site.bn.replace_all_uses_with(site.bn_input)
        data = site.bn_input if data is site.bn else data
    match.replace_by_example(rule.replacement(site), [data, weight, bias])
    if site.before is not None:
        _erase_unused(site.bn)
    ctx.fold(site.bn, base.decision(rule, site, None))


def _erase_unused(bn: torch.fx.Node) -> None:
    """Remove a BN folded into the op after it (its output and the BN op itself)."""
    bn_op = bn.args[0]
    graph = bn.graph
    graph.erase_node(bn)
    if not bn_op.users:
        graph.erase_node(bn_op)


def _lower(match: tp.Match) -> None:
    replacement, args = lower_bn.decomposition(match)
    match.replace_by_example(replacement, args)


def _count_bn_ops(graph: torch.fx.Graph) -> int:
    return len(graph.find_nodes(op="call_function", target=tp.BN_INFERENCE_OP))


def _record_kept(ctx: _PassContext) -> None:
    """Every BN left in the graph is kept: for the first reason a rule refused it, or, if no rule
    matched it, because no conv or linear is next to it (naming the ops that are)."""
    for bn, decision in ctx.refused.items():
        if bn not in ctx.folded:
            ctx.record.decisions.append(decision)
    for bn_op in ctx.graph.find_nodes(op="call_function", target=tp.BN_INFERENCE_OP):
        users = set(bn_op.users)
        if users and users.isdisjoint(ctx.refused) and users.isdisjoint(ctx.folded):
            bn = next(iter(bn_op.users))
            reason = lower_bn.neighbours_description(bn)
            ctx.record.decisions.append(FoldDecision(bn=module_path(bn), folded=False, reason=reason))


def _handler(fn: Callable[[tp.Match], None]) -> Callable[..., None]:
    """The pattern matcher also passes the matched arguments; the handlers read them off the match."""

    def handle(match: tp.Match, *args: object, **kwargs: object) -> None:
        fn(match)

    return handle


@functools.cache
def _pattern_passes() -> tuple[tp.PatternMatcherPass, tp.PatternMatcherPass, tp.PatternMatcherPass]:
    """Register the patterns once, on first use (never at import: it is not free): the rules
    folding a BN into the op after it, those folding into the op before it, and the lowering."""
    after, before, lower = tp.PatternMatcherPass(), tp.PatternMatcherPass(), tp.PatternMatcherPass()
    for rule in RULES:
        for pattern in rule.patterns:
            tp.register_graph_pattern(
                pattern, extra_check=rule.applies, pass_dict=before if rule.position == "before" else after
            )(_handler(functools.partial(_fold, rule=rule)))
    tp.register_graph_pattern(lower_bn.PATTERN, pass_dict=lower)(_handler(_lower))
    return after, before, lower


def _fold_to_fixed_point(ctx: _PassContext, passes: tuple[tp.PatternMatcherPass, ...]) -> None:
    """Apply the rules until nothing more folds: a fold can make another site foldable (conv ->
    BN -> BN: the second BN follows a conv only once the first is folded into it)."""
    while True:
        before = len(ctx.folded)
        for fold in passes:
            fold.apply(ctx.graph)
        if len(ctx.folded) == before:
            return


def _source_hash(extra: str = "") -> bytes:
    sources = sorted(str(p) for p in Path(__file__).parent.rglob("*.py"))
    return tp.file_hash(sources, extra=extra)


class BnFoldPass(tp.CustomGraphPass):
    """Joint-graph pass folding inference BatchNorm; its uuid keys Inductor's FX graph cache."""

    def __init__(self, enabled_rules: frozenset[str], record: FoldRecord) -> None:
        self.enabled_rules = enabled_rules
        self.record = record

    def __call__(self, graph: torch.fx.Graph) -> None:
        start = time.perf_counter()
        after, before, _ = _pattern_passes()
        ctx = _PassContext(graph, tp.frozen_placeholder_values(graph), self.enabled_rules, self.record)
        token = _ACTIVE.set(ctx)
        try:
            self.record.bn_ops_before += _count_bn_ops(graph)
            _fold_to_fixed_point(ctx, (after, before))
            self.record.bn_ops_after += _count_bn_ops(graph)
            _record_kept(ctx)
        finally:
            _ACTIVE.reset(token)
            self.record.seconds += time.perf_counter() - start

    def uuid(self) -> bytes:
        return _source_hash(extra=",".join(sorted(self.enabled_rules)))


class BnLowerPass(tp.CustomGraphPass):
    """Post-grad pass decomposing the BNs left unfolded, exactly as Inductor would have.

    It runs after freezing on purpose: a kept BN decomposed earlier would be picked up by
    Inductor's binary folding, which folds it anyway, in low precision, and wrongly for
    transposed convolutions, which is what the refusal was there to prevent.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        *_, lower = _pattern_passes()
        lower.apply(graph)

    def uuid(self) -> bytes:
        return _source_hash(extra="lower")
