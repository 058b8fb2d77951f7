"""BnFoldPass: fold inference BatchNorm into the conv / conv-transpose / linear next to it.

It runs inside Inductor's freezing compile as a joint-graph pass: after AOTAutograd, before
freezing's constant folding and binary folding, on a graph whose module state is still
placeholders. Each rule's patterns are registered with Inductor's pattern matcher, its producer's
``claims`` as the ``extra_check``; for each match the rule's checks decide, and a fold computes the
new weight and bias once, from the real frozen tensors, in float64, and rebuilds the op to read them
as graph constants. The rules run until nothing more folds (conv -> BN -> BN folds completely), and
a BN is reported as kept, with the first refusal, only if it is still in the graph at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import operator
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any

import torch
import torch.fx

from .. import aliasing, code_identity, freezing, graph_ops
from .._torch_private import aot_autograd, fake_tensors, inductor, ops, patterns, pre_dispatch
from ..decisions import FoldDecision, FoldRecord, MergeDecision, module_path, neighbours_description
from ..rules import RULES
from ..rules.rule import Compute, Folded, Frozen, Refused, Rule
from ..runtime import _torch_runtime
from ..runtime.prologue import Fold, JudgedSlots
from ..value_checks import Judge, value_refusal
from .regions import CallSite, free_name
from .tape import NotRecordable, Tape, traced

#: The name (plus a number) of each constant a fold adds to the graph's module.
FOLDED_PREFIX = "_bnfuse_folded"


def fold_graph(graph: torch.fx.Graph, frozen: Frozen, enabled_rules: frozenset[str], record: FoldRecord) -> None:
    """Fold every BN of ``graph`` that the enabled rules allow, given the real values of its frozen
    inputs, and add a decision for every BN to ``record``."""
    _FoldRun(graph, frozen, enabled_rules, record).run()


def fold_graph_per_step(
    graph: torch.fx.Graph, readable: Frozen, real: Frozen, enabled_rules: frozenset[str], record: FoldRecord
) -> None:
    """Fold every BN of a training graph (aten ops before autograd) that the enabled rules allow,
    as arithmetic on the tensors themselves at every step. ``readable``: the graph inputs a fold
    may read (module state the graph does not write), with their fake values; ``real``: their
    values now, for the checks that judge values (``value_checks.NumericJudge``)."""
    _PerStepRun(graph, readable, real, enabled_rules, record).run()


class _FoldRun:
    """One application of the rules to one graph: each fold becomes constants, computed once."""

    bias_after = False
    per_step = False

    def __init__(self, graph: torch.fx.Graph, frozen: Frozen, enabled_rules: frozenset[str], record: FoldRecord) -> None:
        self.graph, self.frozen, self.enabled_rules, self.record = graph, frozen, enabled_rules, record
        self.real: Frozen = frozen
        self.folded: set[torch.fx.Node] = set()
        #: The first reason each BN was refused for; reported only if no rule folds it in the end.
        self.refused: dict[torch.fx.Node, FoldDecision] = {}
        self.merges = 0
        self.steps = 0
        self._bn_modules = frozenset(module_path(bn) for bn in _bn_outputs(graph))
        rules = [rule for rule in RULES if self.takes(rule)]
        stages = sorted({rule.stage for rule in rules})
        self.passes = [patterns.PatternMatcherPass() for _ in stages]
        for rule in rules:
            for pattern in rule.patterns:
                stage = self.passes[stages.index(rule.stage)]
                patterns.register_graph_pattern(pattern, extra_check=rule.claims, pass_dict=stage)(
                    functools.partial(self.apply, rule))

    def takes(self, rule: Rule) -> bool:
        return True

    def run(self) -> None:
        self.record.bn_ops_before += _count_bn_ops(self.graph)
        self.fold_to_fixed_point()
        self.record.bn_ops_after += _count_bn_ops(self.graph)
        self.record_kept()

    def fold_to_fixed_point(self) -> None:
        """A fold can make another site foldable (conv -> BN -> BN: the second BN follows a conv
        only once the first is folded into it), so apply the rules, stage by stage, until nothing
        more changes."""
        while True:
            changes = self.changes
            for stage in self.passes:
                stage.apply(self.graph)
            if self.changes == changes:
                return

    def apply(self, rule: Rule, match: patterns.Match, *_matched_args: object, **_matched_kwargs: object) -> None:
        """The pattern matcher's handler: the rule rewrites the site ``match`` describes, or says why not."""
        rule.rewrite(match, self)

    # -- what a rule's rewrite uses (rules.rule.RewriteContext) ---------------------------------

    def enabled(self, rule_id: str) -> bool:
        return rule_id in self.enabled_rules

    def fold(self, bn: torch.fx.Node, decision: FoldDecision) -> None:
        self.folded.add(bn)
        self.record.decisions.append(decision)

    def refuse(self, bn: torch.fx.Node, decision: FoldDecision) -> None:
        self.refused.setdefault(bn, decision)

    def merge(self, merge: MergeDecision) -> None:
        self.merges += 1
        self.record.merges.append(merge)

    def progress(self) -> None:
        self.steps += 1

    def holds_bn_op(self, module: str) -> bool:
        return module in self._bn_modules

    @property
    def changes(self) -> int:
        return len(self.folded) + self.merges + self.steps

    def evaluate(self, compute: Compute, judge: Judge | None = None) -> Folded | Refused:
        """The fold on the real frozen tensors, refused if not finite in the op's dtype or if
        ``judge`` refuses it."""
        with _torch_runtime.real_tensor_math():
            result = compute(self.frozen)
            if isinstance(result, Folded):
                reason = value_refusal(result.weight, result.bias, judge, result.judged)
                if reason is not None:
                    return Refused(reason)
        return result

    def operands(self, compute: Compute, folded: Folded, like: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
        return self.add_constant(folded.weight, like), self.add_constant(folded.bias, like)

    def replace(self, match: patterns.Match, fn: Callable[..., Any], args: list[Any]) -> None:
        match.replace_by_example(fn, args)

    def add_constant(self, value: torch.Tensor, like: torch.fx.Node) -> torch.fx.Node:
        gm = self.graph.owning_module
        name = free_name(gm, FOLDED_PREFIX)
        inductor.mark_frozen(value)
        gm.register_buffer(name, value)
        with self.graph.inserting_before(like):
            node = self.graph.get_attr(name)
        node.meta["val"] = fake_tensors.fake_tensor_of(like, value)
        self.frozen[node] = value  # a folded op can fold again (conv -> BN -> BN)
        return node

    def record_kept(self) -> None:
        """Every BN left in the graph is kept: for the first reason a rule refused it, or, if no
        rule matched it, because no conv or linear is next to it (naming the ops that are)."""
        for bn, decision in self.refused.items():
            if bn not in self.folded:
                self.record.decisions.append(decision)
        for bn in _bn_outputs(self.graph):
            if bn not in self.refused and bn not in self.folded:
                self.record.decisions.append(FoldDecision(bn=module_path(bn), folded=False, reason=neighbours_description(bn)))


class _RegionRun(_FoldRun):
    """The rules applied to a call site's copy of a region's body: each constant a fold adds is
    passed in by the call (``regions.CallSite``)."""

    def __init__(self, site: CallSite, body: int, enabled_rules: frozenset[str], record: FoldRecord) -> None:
        super().__init__(site.bodies[body].graph, site.frozen[body], enabled_rules, record)
        self.site = site

    def add_constant(self, value: torch.Tensor, like: torch.fx.Node) -> torch.fx.Node:
        node = self.site.add_constant(value, like, free_name(self.site.outer.owning_module, FOLDED_PREFIX))
        self.frozen[node] = value  # a folded op can fold again (conv -> BN -> BN)
        return node


class _PerStepRun(_FoldRun):
    """The rules applied to a training graph: each fold is the same float64 arithmetic, traced
    into the graph before the op it feeds, so that it runs at every step on the tensors of that
    step and autograd differentiates it (the weight, bias, and BN affine get exact gradients); a
    fold's bias is added after the op, its gradient summed by Inductor.
    Nothing is baked in; the values a rule sees are fake."""

    bias_after = True
    per_step = True

    def __init__(self, graph: torch.fx.Graph, readable: Frozen, real: Frozen, enabled_rules: frozenset[str],
                 record: FoldRecord) -> None:
        super().__init__(graph, _with_values_computed_from(graph, readable), enabled_rules, record)
        self.real = _real_values_computed_from(graph, real)
        self.fake_mode = next((v.fake_mode for v in readable.values() if isinstance(v, torch._subclasses.FakeTensor)), None)
        #: The frozen nodes each evaluated fold read: the inputs of its traced arithmetic.
        self.leaves: dict[Compute, list[torch.fx.Node]] = {}

    def takes(self, rule: Rule) -> bool:
        return rule.per_step

    def run(self) -> None:
        with self.fake_mode or contextlib.nullcontext():
            super().run()

    def evaluate(self, compute: Compute, judge: Judge | None = None) -> Folded | Refused:
        """The fold on fake values: refused as the constant fold would be, by ``judge`` on the
        values at compile time, and in float16, whose range a per-step fold could leave where the
        BN would not (that cannot be checked ahead)."""
        result = self._traced(compute)
        if isinstance(result, Folded) and (result.judged.dtype if result.judged else result.weight.dtype) == torch.float16:
            return Refused("per-step fold in float16: the folded weight could overflow where the BN does not")
        if isinstance(result, Folded) and judge is not None and all(leaf in self.real for leaf in self.leaves[compute]):
            with _torch_runtime.real_tensor_math(), torch.no_grad():
                now = compute(self.real)
                reason = judge(now.judged) if now.judged is not None else None
            if reason is not None:
                return Refused(reason)
        return result

    def _traced(self, compute: Compute) -> Folded | Refused:
        reads = _ReadsRecorded(self.frozen)
        result = compute(reads)
        self.leaves[compute] = list(reads.read)
        return result

    def operands(self, compute: Compute, folded: Folded, like: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
        leaves = self.leaves.pop(compute)

        def fold(*values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            result = compute(dict(zip(leaves, values, strict=True)))
            assert isinstance(result, Folded)
            return result.weight, result.bias

        traced = pre_dispatch.trace_before_autograd(fold, [leaf.meta["val"] for leaf in leaves])
        _hoist_before(leaves, like)
        weight, bias = _inline(traced, leaves, before=like)
        for node in (weight, bias):
            self.frozen[node] = node.meta["val"]  # a folded op can fold again (conv -> BN -> BN)
        return weight, bias

    def replace(self, match: patterns.Match, fn: Callable[..., Any], args: list[Any]) -> None:
        match.replace_by_example(fn, args, trace_fn=pre_dispatch.trace_before_autograd)

    def fold(self, bn: torch.fx.Node, decision: FoldDecision) -> None:
        super().fold(bn, dataclasses.replace(decision, per_step=True))


class _AsDataRun(_PerStepRun):
    """The rules applied to an inference graph whose module state stays data: each fold becomes
    one call in the graph (``prologue.Fold``), to be split out into a prologue that runs once
    per set of weights (``fold_prologue``). The value checks wait for real values: each call
    runs its fold's, on every set the prologue folds."""

    bias_after = False  # an inference graph: no gradient to sum
    per_step = False  # each fold runs once per set of weights

    def __init__(self, graph: torch.fx.Graph, readable: Frozen, enabled_rules: frozenset[str], record: FoldRecord) -> None:
        super().__init__(graph, readable, {}, enabled_rules, record)
        self._pending: dict[Compute, tuple[Judge | None, Tape, list[int | None]]] = {}

    def evaluate(self, compute: Compute, judge: Judge | None = None) -> Folded | Refused:
        """The fold on fake values, its aten calls recorded (``Tape``) for the prologue to replay."""
        reads = _ReadsRecorded(self.frozen, tape := Tape())
        with tape:
            result = compute(reads)
        self.leaves[compute] = list(reads.read)
        self._pending[compute] = (judge, tape, [reads.slots.get(leaf) for leaf in reads.read])
        return result

    def operands(self, compute: Compute, folded: Folded, like: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
        """One call of the fold (``prologue.Fold``, its checks with it), not its arithmetic traced
        op by op: tracing cost a trace per fold in every compile, warm starts included, for ops
        run once a set."""
        (judge, tape, slots), leaves = self._pending.pop(compute), self.leaves.pop(compute)
        judged = folded.judged
        computation = Fold(tape.calls, slots, (tape.slot(folded.weight), tape.slot(folded.bias)), judge, None if judged is None
                           else JudgedSlots(tape.slot(judged.scale), None if judged.weight is None else tape.slot(judged.weight),
                                            None if judged.statistics is None else
                                            tuple(None if v is None else tape.slot(v) for v in judged.statistics),
                                            judged.dtype))
        tape.release()
        _hoist_before(leaves, like)
        graph = like.graph
        with graph.inserting_before(like):
            call = graph.call_function(computation, tuple(leaves))
            weight, bias = (graph.call_function(operator.getitem, (call, i)) for i in (0, 1))
        for node, value in ((call, (folded.weight, folded.bias)), (weight, folded.weight), (bias, folded.bias)):
            _name_after(node, like)
            node.meta["val"] = value
        for node in (weight, bias):
            self.frozen[node] = node.meta["val"]  # a folded op can fold again (conv -> BN -> BN)
        return weight, bias

    def replace(self, match: patterns.Match, fn: Callable[..., Any], args: list[Any]) -> None:
        """Traced from the aten calls it makes (``tape.traced``), not with ``make_fx``: an
        inference graph is traced again by AOTAutograd anyway."""
        try:
            match.replace_by_example(fn, args, trace_fn=traced)
        except NotRecordable:
            super().replace(match, fn, args)

    def fold(self, bn: torch.fx.Node, decision: FoldDecision) -> None:
        _FoldRun.fold(self, bn, decision)


def computed_from(graph: torch.fx.Graph, sources: Collection[torch.fx.Node]) -> list[torch.fx.Node]:
    """The calls of ``graph`` (in its order) that compute a value from ``sources`` alone, by pure
    ops: a function of them, whenever it runs."""
    computed, found = set(sources), []
    for node in graph.nodes:
        if node.op != "call_function" or not node.all_input_nodes:
            continue
        if all(n in computed for n in node.all_input_nodes) and (
                node.target is operator.getitem or isinstance(node.target, Fold)
                or ops.is_pure_operator(node.target)):
            computed.add(node)
            found.append(node)
    return found


def _with_values_computed_from(graph: torch.fx.Graph, readable: Frozen) -> Frozen:
    """``readable`` and every tensor the graph computes from it alone by pure ops: a parametrised
    weight (``weight_norm``, ``spectral_norm`` in eval mode), a frozen affine's scale. A per-step
    fold is arithmetic on the step's values, so a computed weight folds as a stored one does."""
    values = dict(readable)
    for node in computed_from(graph, readable):
        if isinstance(node.meta.get("val"), torch.Tensor):
            values[node] = node.meta["val"]
    return values


def _real_values_computed_from(graph: torch.fx.Graph, real: Frozen) -> Frozen:
    """``real`` and the value now of every tensor the graph computes from it alone by pure ops
    (``_with_values_computed_from``'s, on real values): what the checks judge a computed weight by."""
    values = dict(real)
    with _torch_runtime.real_tensor_math(), torch.no_grad():
        for node in computed_from(graph, real):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = node.target(*args, **kwargs)
    return values


def fold_graph_as_data(graph: torch.fx.Graph, readable: Frozen, enabled_rules: frozenset[str], record: FoldRecord) -> None:
    """Fold every BN of an inference graph (aten ops before autograd) that the enabled rules allow,
    as calls in the graph (``prologue.Fold``, each with its value checks) on the module state in
    ``readable`` (node: fake value)."""
    _AsDataRun(graph, readable, enabled_rules, record).run()


def merges_read_values(traced: torch.fx.GraphModule) -> bool:
    """Whether ``merges_when_frozen`` reads the values it is given (a rule that runs on constants
    only exists, and the graph sums anything), not the graph alone."""
    sums = (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor)
    return any(not rule.per_step for rule in RULES) and \
        any(traced.graph.find_nodes(op="call_function", target=op) for op in sums)


def merges_when_frozen(traced: torch.fx.GraphModule, values: Frozen, enabled_rules: frozenset[str]) -> bool:
    """Whether the rules that run only on constants (``branch_merge``: it reads the folded
    constants' values) would merge or judge anything in this graph, folding with ``values`` (node:
    real tensor) as constants: such a graph is folded frozen, so that they do. Judged on a copy,
    only where the graph sums anything."""
    if not merges_read_values(traced):
        return False
    frozen_only = {rule.id for rule in RULES if not rule.per_step}
    twin = copy.deepcopy(traced)
    nodes = dict(zip(traced.graph.nodes, twin.graph.nodes, strict=True))
    record = FoldRecord()
    _FoldRun(twin.graph, {nodes[node]: value for node, value in values.items()}, enabled_rules, record).run()
    return bool(record.merges) or any(decision.rule in frozen_only for decision in record.decisions)


def _hoist_before(leaves: list[torch.fx.Node], like: torch.fx.Node) -> None:
    """Move the computed leaves a fold reads (and what they are computed from) ahead of ``like``,
    where the fold's arithmetic goes: a frozen affine's scale may be computed after the conv it
    folds into. They are pure functions of module state (``_with_values_computed_from``), so
    computing them earlier changes nothing."""
    nodes = list(like.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    late: set[torch.fx.Node] = set()
    pending = [leaf for leaf in leaves if position[leaf] > position[like]]
    while pending:
        node = pending.pop()
        if node not in late and node.op == "call_function" and position[node] > position[like]:
            late.add(node)
            pending.extend(node.all_input_nodes)
    if not late:
        return
    passed = nodes[position[like]:max(position[n] for n in late)]
    if any(node.op == "call_function" and not ops.is_operator(node.target) and node.target is not operator.getitem
           for node in passed):  # a grad-mode change (or another call) would now lie on the other side
        raise RuntimeError("bnfuse: a value a per-step fold reads is computed after the op, past a grad-mode "
                           "change or a non-aten call; it cannot be moved ahead")
    for node in sorted(late, key=position.__getitem__):
        like.prepend(node)


class _ReadsRecorded(dict):  # type: ignore[type-arg]
    """A frozen-value map that records the nodes a fold reads (looked up, or found present), and
    with a ``tape``, gives each value looked up a slot on it (``slots``)."""

    def __init__(self, values: Frozen, tape: Tape | None = None) -> None:
        super().__init__(values)
        self.read: dict[torch.fx.Node, None] = {}
        self.tape, self.slots = tape, {}

    def __contains__(self, node: object) -> bool:
        found = super().__contains__(node)
        if found:
            self.read[node] = None  # type: ignore[index]
        return found

    def __getitem__(self, node: torch.fx.Node) -> torch.Tensor:
        self.read[node] = None
        value = super().__getitem__(node)
        if self.tape is not None:
            self.slots[node] = self.tape.add_input(value)
        return value


def _inline(sub: torch.fx.GraphModule, inputs: list[torch.fx.Node], before: torch.fx.Node) -> list[torch.fx.Node]:
    """Copy the ops of ``sub`` into ``before``'s graph, ahead of it, on ``inputs``; its outputs.
    A constant the trace made (a Python number of the fold, as a tensor) goes along with it."""
    env = dict(zip(sub.graph.find_nodes(op="placeholder"), inputs, strict=True))
    graph = before.graph
    with graph.inserting_before(before):
        for node in sub.graph.nodes:
            if node.op == "output":
                return [env[out] for out in node.args[0]]
            if node.op == "get_attr":
                owner = graph.owning_module
                name = next(f"_bnfuse_traced_{i}" for i in itertools.count() if not hasattr(owner, f"_bnfuse_traced_{i}"))
                owner.register_buffer(name, freezing.attribute(sub, node.target))
                env[node] = graph.get_attr(name)
                env[node].meta.update(node.meta)
            elif node.op != "placeholder":
                env[node] = graph.node_copy(node, env.__getitem__)
                _name_after(env[node], before)
                aot_autograd.recompute_in_backward(env[node])
    raise RuntimeError("bnfuse: a traced fold has no output")


def _name_after(node: torch.fx.Node, like: torch.fx.Node) -> None:
    """Give a node a fold adds the module path of the op it folds into (what reports name)."""
    node.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "source_fn_stack")})


def _count_bn_ops(graph: torch.fx.Graph) -> int:
    return len(graph.find_nodes(op="call_function", target=graph_ops.BN_INFERENCE_OP))


def _keep(graph: torch.fx.Graph, record: FoldRecord, reason: str) -> None:
    """Every BN of ``graph`` kept, for ``reason``."""
    bns = _bn_outputs(graph)
    record.bn_ops_before += len(bns)
    record.bn_ops_after += len(bns)
    record.decisions += [FoldDecision(module_path(bn), folded=False, reason=reason) for bn in bns]


def _keep_in_body(call: torch.fx.Node, body: torch.fx.GraphModule, record: FoldRecord) -> None:
    _keep(body.graph, record, f"not folded: in the body of higher-order op {call.target.name()}, which bnfuse does not fold into")


def _fold_regions(graph: torch.fx.Graph, frozen: Frozen, enabled_rules: frozenset[str], record: FoldRecord) -> None:
    """Fold the BNs in the bodies ``graph``'s higher-order ops call: a shared region's and
    ``cond``'s, per call site (``regions.CallSite``), each with that call's values. Other bodies
    (other higher-order ops, a body that calls another) keep their BNs: their operands are not
    paired with values here."""
    copies: dict[Hashable, str] = {}
    for call, bodies in ops.region_bodies(graph).items():
        if not _foldable_region(call, bodies):
            for body in bodies:
                _keep_in_body(call, body, record)
            continue
        site = CallSite(call, frozen)
        changes = 0
        for index in range(len(site.bodies)):
            run = _RegionRun(site, index, enabled_rules, record)
            run.run()
            changes += run.changes
        if changes:
            site.install(copies)


def _foldable_region(call: torch.fx.Node, bodies: list[torch.fx.GraphModule]) -> bool:
    """A shared region's or ``cond``'s call whose bodies call no higher-order op themselves."""
    return (ops.is_shared_region_call(call) or ops.is_cond_call(call)) and \
        not any(ops.region_bodies(body.graph) for body in bodies)


def fold_regions_per_step(graph: torch.fx.Graph, readable: Frozen, real: Frozen, enabled_rules: frozenset[str],
                          record: FoldRecord) -> None:
    """Fold the BNs in each shared region's body of a training graph per step, in a copy per call
    site (``regions.CallSite``) on the module state that call passes and its body does not write:
    the checks judge that call's values. Copies alike share one body, as in inference. The bodies
    of other higher-order ops (``cond``'s branches; not checkpointing's) keep their BNs."""
    for call, bodies in ops.region_bodies(graph).items():
        if ops.body_and_operands(call) is None:
            for body in bodies:
                _keep_in_body(call, body, record)
    copies: dict[Hashable, str] = {}
    for call in [node for node in graph.nodes if ops.is_shared_region_call(node)]:
        site = CallSite(call, readable)
        [body] = site.bodies
        if ops.region_bodies(body.graph):
            _keep(body.graph, record, "not folded: in a region called from another region, which bnfuse does not fold into")
            continue
        written = aliasing.written_placeholders(body.graph)
        passed = {node: value for node, value in site.frozen[0].items() if node not in written}
        run = _PerStepRun(body.graph, passed, {node: value for node, value in site.passed(real).items() if node in passed},
                          enabled_rules, record)
        run.run()
        if run.changes:
            site.install(copies)


def _bn_outputs(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The normalised output (``getitem 0``) of each inference BN op in the graph."""
    return [next(iter(op.users)) for op in graph.find_nodes(op="call_function", target=graph_ops.BN_INFERENCE_OP) if op.users]


class BnFoldPass(inductor.CustomGraphPass):
    """Joint-graph pass folding inference BatchNorm; its uuid keys Inductor's caches."""

    def __init__(
        self,
        enabled_rules: frozenset[str],
        record: FoldRecord,
        state: Sequence[torch.Tensor],
        effects: freezing.GraphEffects,
    ) -> None:
        """``state``: the module state lifted for freezing, in AOTAutograd's order (``freezing.state_in_aot_order``);
        ``effects`` is filled with what the graph writes and whether it draws random numbers."""
        self.enabled_rules = enabled_rules
        self.record = record
        self.state = state
        self.effects = effects

    def __call__(self, graph: torch.fx.Graph) -> None:
        start = time.perf_counter()
        self.effects.observe(graph)
        body = aot_autograd.is_region_body(graph)
        if body:  # folded per call site, from the graph that calls it (called after its bodies)
            return
        state, self.state = self.state, ()  # Inductor may keep the pass: it must not keep the weights
        try:
            frozen = freezing.frozen_values(graph, state)
        except freezing.FrozenValuesMismatch as mismatch:  # fold nothing rather than fold wrong
            reason = f"not folded: {mismatch}"
            _keep(graph, self.record, reason)
            if body is False:  # this torch tells bodies apart: theirs are this graph's BNs too
                for call, bodies in ops.region_bodies(graph).items():
                    for region in (CallSite(call, {}).bodies if _foldable_region(call, bodies) else bodies):
                        _keep(region.graph, self.record, reason)
            return
        try:
            fold_graph(graph, frozen, self.enabled_rules, self.record)
            if body is False:
                _fold_regions(graph, frozen, self.enabled_rules, self.record)
        finally:
            self.record.seconds += time.perf_counter() - start

    def uuid(self) -> bytes:
        return code_identity.code_hash(__name__, extra=",".join(sorted(self.enabled_rules)))
