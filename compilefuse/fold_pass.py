"""The bnfuse graph passes: Inductor pattern-matcher replacements run as custom passes.

``BnFoldPass`` runs inside Inductor's freezing compile as a joint-graph pass, before freezing's
constant folding and binary folding, on a graph whose module state is still placeholders. For each
``producer -> BatchNorm`` match the rule's check decides; a fold computes the new weight and bias
once, from the real frozen tensors, in float64, and rewires the producer to read them as graph
constants. ``BnLowerPass`` runs after freezing and decomposes every BN left, exactly as Inductor
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
    decided: set[torch.fx.Node] = dataclasses.field(default_factory=set)
    constants: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def decide(self, bn: torch.fx.Node, decision: FoldDecision) -> None:
        self.decided.add(bn)
        self.record.decisions.append(decision)

    def add_constant(self, value: torch.Tensor, like: torch.fx.Node) -> torch.fx.Node:
        gm = self.graph.owning_module
        name = next(f"_bnfuse_folded{i}" for i in self.constants if not hasattr(gm, f"_bnfuse_folded{i}"))
        tp.mark_frozen(value)
        gm.register_buffer(name, value)
        with self.graph.inserting_before(like):
            node = self.graph.get_attr(name)
        node.meta["val"] = tp.fake_tensor_of(like, value)
        return node


_ACTIVE: contextvars.ContextVar[_PassContext] = contextvars.ContextVar("bnfuse_pass")


def _fold(match: tp.Match, rule: FoldRule) -> None:
    ctx = _ACTIVE.get()
    site = base.BnSite.from_match(match, rule.producer_targets)
    if rule.id not in ctx.enabled:
        ctx.decide(site.bn, base.decision(rule, site, f"rule {rule.id} disabled by options"))
        return
    reason = base.refusal_reason(site, ctx.frozen)
    with tp.real_tensor_math():
        folded = reason or base.folded_constants(rule, site, ctx.frozen)
    if isinstance(folded, str):
        ctx.decide(site.bn, base.decision(rule, site, folded))
        return
    weight, bias = (ctx.add_constant(value, like=site.producer) for value in folded)
    match.replace_by_example(rule.replacement(site), [site.input, weight, bias])
    ctx.decide(site.bn, base.decision(rule, site, None))


def _lower(match: tp.Match) -> None:
    replacement, args = lower_bn.decomposition(match)
    match.replace_by_example(replacement, args)


def _count_bn_ops(graph: torch.fx.Graph) -> int:
    return len(graph.find_nodes(op="call_function", target=tp.BN_INFERENCE_OP))


def _record_unmatched(ctx: _PassContext) -> None:
    """Every BN no rule matched is kept; say what produced its input."""
    for bn_op in ctx.graph.find_nodes(op="call_function", target=tp.BN_INFERENCE_OP):
        if bn_op.users and ctx.decided.isdisjoint(bn_op.users):
            bn = next(iter(bn_op.users))
            reason = lower_bn.producer_description(bn_op.args[0])
            ctx.decide(bn, FoldDecision(bn=module_path(bn), folded=False, reason=reason))


def _handler(fn: Callable[[tp.Match], None]) -> Callable[..., None]:
    """The pattern matcher also passes the matched arguments; the handlers read them off the match."""

    def handle(match: tp.Match, *args: object, **kwargs: object) -> None:
        fn(match)

    return handle


@functools.cache
def _pattern_passes() -> tuple[tp.PatternMatcherPass, tp.PatternMatcherPass]:
    """Register the patterns once, on first use (never at import: it is not free)."""
    fold, lower = tp.PatternMatcherPass(), tp.PatternMatcherPass()
    for rule in RULES:
        for pattern in rule.patterns:
            tp.register_graph_pattern(pattern, extra_check=rule.applies, pass_dict=fold)(
                _handler(functools.partial(_fold, rule=rule))
            )
    tp.register_graph_pattern(lower_bn.PATTERN, pass_dict=lower)(_handler(_lower))
    return fold, lower


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
        fold, _ = _pattern_passes()
        ctx = _PassContext(graph, tp.frozen_placeholder_values(graph), self.enabled_rules, self.record)
        token = _ACTIVE.set(ctx)
        try:
            self.record.bn_ops_before += _count_bn_ops(graph)
            fold.apply(graph)
            self.record.bn_ops_after += _count_bn_ops(graph)
            _record_unmatched(ctx)
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
        _, lower = _pattern_passes()
        lower.apply(graph)

    def uuid(self) -> bytes:
        return _source_hash(extra="lower")
