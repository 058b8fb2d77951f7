"""A folding rule: the op a BatchNorm folds into (its *producer*) and the place of the BN beside it.

Every rule takes one path, ``Rule.rewrite``: find the site, refuse it (turned off, its one ordered
check, its values) or fold it, and write its report rows. Most rules are
``FoldRule(id, producer, place)``: the producer (``Convolution``, ``Linear``) says which aten ops it
is, how its weight feeds its channels, when it cannot take a fold, and how to rebuild it; the place
(``site.AFTER``, ``BEFORE`` and the two ``THROUGH_SHAPES``) says where the BN is and how a match
becomes a site. Everything that decides *whether* a fold is exact and is common to all rules lives
here, once, in ``FoldRule.refusal``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
import torch.fx

from .. import fold_math
from .._torch_private.patterns import Match
from ..decisions import FoldDecision, MergeDecision, module_path
from ..graph_ops import BN_INFERENCE_OP
from ..value_checks import Judge, Judged, NumericJudge
from . import _constants, _tokens
from .site import (
    AFTER,
    AFTER_THROUGH_SHAPES,
    BEFORE,
    BEFORE_THROUGH_SHAPES,
    BN_ARGS,
    BN_TENSORS,
    BatchNormStats,
    BnSite,
    Frozen,
    FrozenAffine,
    Place,
    Side,
    affine_of,
    bn_of,
)

__all__ = [
    "AFTER",
    "AFTER_THROUGH_SHAPES",
    "BEFORE",
    "BEFORE_THROUGH_SHAPES",
    "BN_ARGS",
    "BN_TENSORS",
    "BatchNormStats",
    "BnSite",
    "Compute",
    "FoldRule",
    "Folded",
    "Frozen",
    "FrozenAffine",
    "Judge",
    "Place",
    "Producer",
    "Refused",
    "RewriteContext",
    "Rule",
    "Side",
    "affine_of",
    "bn_of",
    "disabled",
    "erase_bn",
    "keep_module_names",
]

aten = torch.ops.aten


#: A fold's arithmetic: the folded weight and bias from the values of the frozen nodes it reads.
Compute = Callable[[Frozen], "Folded"]  # a fold's arithmetic, on values its checks passed


class RewriteContext(Protocol):
    """What a rule's rewrite gets from the pass running it (``passes/fold.py``). The pass decides
    what a fold becomes: constants computed once (an inference graph), or the same arithmetic in
    the graph, run at every step (a training graph)."""

    frozen: Frozen  # every frozen node's value (real, or a fake one per step), folds' outputs included
    real: Frozen  # the real values of the graph's frozen inputs (per step too: their values at compile time)
    #: Whether a fold's bias is added after the op rather than by it (``_bias_after``): per step,
    #: so that the bias's gradient is Inductor's reduction, not the op's backward (ATen's
    #: ConvTranspose3d bias reduction lost two digits of a BN's beta gradient).
    bias_after: bool
    #: Whether the folds run at every step (a training graph), not once per set of weights.
    per_step: bool

    def enabled(self, rule_id: str) -> bool: ...
    # run ``compute``: refused, or its result; ``judge`` says why a result would round or overflow
    # where eager does not (``value_checks.NumericJudge``), given what it read and computed, on real values
    def evaluate(self, compute: Compute, judge: Judge | None = None) -> Folded | Refused: ...
    # the graph nodes of a fold ``evaluate`` returned ``folded`` for, placed before ``like``
    def operands(self, compute: Compute, folded: Folded, like: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]: ...
    def replace(self, match: Match, fn: Callable[..., Any], args: list[Any]) -> None: ...
    def add_constant(self, value: torch.Tensor, like: torch.fx.Node) -> torch.fx.Node: ...
    def fold(self, bn: torch.fx.Node, decision: FoldDecision) -> None: ...
    def refuse(self, bn: torch.fx.Node, decision: FoldDecision) -> None: ...
    def merge(self, merge: MergeDecision) -> None: ...
    def progress(self) -> None: ...  # a rewrite that is a step of a fold (more steps follow)
    def holds_bn_op(self, module: str) -> bool: ...  # whether the user's module ``module`` has a BN op in the graph


class Rule:
    """The path every rule takes (``rewrite``), so that a rule says only what is its own.

    For one match: the site it describes (``find``; None: none of this rule's business, no row),
    the BNs it writes report rows for (``reported``), then one refusal, the first that applies:
    the rule turned off by options, ``refusal`` (the rule's one ordered check), or the fold's
    values (``compute``: refused where they would not be exact in the op's dtype). Only then the
    graph changes (``replace``). Every refusal becomes a row per reported BN, and so does the fold.
    """

    id: str
    stage: int  # rules run stage by stage (``passes/fold.py``)
    patterns: tuple[Any, ...]
    #: Whether the fold is exact as arithmetic run at every step (a training graph), too.
    per_step: bool

    def claims(self, match: Match) -> bool:
        """The matcher's ``extra_check``: whether this rule, rather than another matching the same
        ops, owns the match."""
        return True

    def find(self, match: Match, run: RewriteContext) -> Any:
        raise NotImplementedError

    def reported(self, site: Any, run: RewriteContext) -> list[torch.fx.Node]:
        raise NotImplementedError

    def refusal(self, site: Any, frozen: Frozen) -> str | None:
        raise NotImplementedError

    def compute(self, site: Any, run: RewriteContext) -> Any:
        """The fold's values (whatever ``replace`` takes), or ``Refused``."""
        raise NotImplementedError

    def replace(self, match: Match, site: Any, values: Any, run: RewriteContext) -> bool:
        """Rewrite the graph; False when this was one step of a fold that more steps finish."""
        raise NotImplementedError

    def decision(self, site: Any, bn: torch.fx.Node, reason: str | None = None) -> FoldDecision:
        """``bn``'s report row: folded (no reason) or kept for ``reason``."""
        raise NotImplementedError

    def rewrite(self, match: Match, run: RewriteContext) -> None:
        site = self.find(match, run)
        if site is None:
            return
        bns = self.reported(site, run)
        reason = self.refusal(site, run.frozen) if run.enabled(self.id) else disabled(self.id)
        values = Refused(reason) if reason else self.compute(site, run)
        if isinstance(values, Refused):
            for bn in bns:
                run.refuse(bn, self.decision(site, bn, values.reason))
            return
        rows = [(bn, self.decision(site, bn)) for bn in bns]  # before ``replace`` removes what they name
        if self.replace(match, site, values, run) and rows:
            for bn, row in rows:
                run.fold(bn, row)
        else:
            run.progress()


@dataclasses.dataclass(frozen=True)
class Folded:
    """The folded weight and bias, in the dtype the op reads its weight in, and what the fold's
    value check reads (None: a fold with none)."""

    weight: torch.Tensor
    bias: torch.Tensor
    judged: Judged | None = None


@dataclasses.dataclass(frozen=True)
class Refused:
    reason: str



class Producer:
    """An op a BN folds into: which aten ops it is, and how its weight meets its channels."""

    targets: tuple[Any, ...]
    patterns: tuple[Any, ...]  # the op, with KeywordArgs ``input``, ``weight``, ``bias`` and its hyper-parameters

    def claims(self, match: Match) -> bool:
        """Whether this producer, rather than a sibling matching the same aten op, owns the match."""
        return True

    def kind(self, site: BnSite) -> str:
        raise NotImplementedError

    def refusal(self, site: BnSite) -> str | None:
        """Why this op, with these hyper-parameters, cannot absorb a BN on ``site.side`` exactly."""
        return None

    def groups(self, site: BnSite) -> int:
        return 1

    def scale_output_channels(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        """``weight`` (float64) with the slice feeding output channel ``c`` times ``scale[c]``."""
        raise NotImplementedError

    def rebuild(self, site: BnSite) -> Callable[..., torch.Tensor]:
        """A function ``(input, folded_weight, folded_bias) -> output`` rebuilding the matched op."""
        raise NotImplementedError

    def operands(self, node: torch.fx.Node) -> dict[str, Any] | None:
        """``input``, ``weight`` and ``bias`` of ``node`` if it is this op (for sites found by walking
        the graph rather than by a pattern); None otherwise."""
        return None


@dataclasses.dataclass(frozen=True)
class FoldRule(Rule):
    """Fold a BN found at ``place`` beside ``producer``. ``id`` names the rule in options, logs, the
    report, tests and docs."""

    id: str
    producer: Producer
    place: Place
    per_step: ClassVar[bool] = True

    @property
    def stage(self) -> int:
        return 0 if self.place.side is Side.OUTPUT else 1

    @property
    def patterns(self) -> tuple[Any, ...]:
        return self.place.patterns(self.producer)

    def claims(self, match: Match) -> bool:
        return self.place.claims(match, self.producer)

    def find(self, match: Match, run: RewriteContext) -> BnSite | None:
        """The BN site the match describes (None: an op with no BN at this rule's place, or a
        mul-add that is no frozen per-channel affine map)."""
        site = self.place.find(match, self.producer)
        return site if site is not None and site.recognised(run.frozen) else None

    def reported(self, site: BnSite, run: RewriteContext) -> list[torch.fx.Node]:
        # Arithmetic after the BN op in a BN module's own forward (``super().forward(x) * 2 + 1``)
        # folds as a frozen affine map, yet is no BN of its own: the BN op's row speaks for it.
        own_row = not (isinstance(site.norm, FrozenAffine) and run.holds_bn_op(module_path(site.bn)))
        return [site.bn] if own_row else []

    def refusal(self, site: BnSite, frozen: Frozen) -> str | None:
        """Why folding ``site`` would not be exact, or None when it is: the site's own tensors
        first (each read only by the fold, frozen, real floating point on a real device), then the
        normalisation, the op and the place, then the dtypes."""
        for node in site.private:
            for user in node.users:
                if user not in site.readers:
                    return f"output also used by {module_path(user)}"
        operands = {"weight": site.weight, "bias": site.bias}
        for name, node in operands.items():
            if node is not None and _constants.frozen_operand(node, frozen) is None:
                return f"{name} is not a frozen parameter or buffer"
        tensors = site.norm.inputs(frozen)
        for name, node in tensors.items():
            if node is not None and node not in frozen:
                return f"{name} is not a frozen parameter or buffer"
        reason = site.norm.check() or self.producer.refusal(site) or self.place.refusal(site)
        if reason:
            return reason
        values = {name: _constants.frozen_operand(node, frozen).value for name, node in operands.items() if node is not None}
        values.update({name: frozen[node] for name, node in tensors.items() if node is not None})
        for name, value in values.items():
            if value.is_meta:
                return f"{name} is on the meta device: no values to fold"
            if not value.is_floating_point() or value.is_complex():
                return f"{name} has dtype {value.dtype}, only real floating point is folded"
        before, after = site.normalised.meta["val"].dtype, site.bn.meta["val"].dtype
        if before != after and not self._promotes_to_bias_dtype(site, frozen, before, after):
            return f"the normalisation changes the dtype ({before} to {after})"
        return None

    def _promotes_to_bias_dtype(self, site: BnSite, frozen: Frozen, before: torch.dtype, after: torch.dtype) -> bool:
        """A normalisation after the op that promotes its low-precision output to the precision the
        folded bias keeps (``_bias_dtype``): torchvision's ``FrozenBatchNorm2d`` under autocast,
        whose float32 scale times a bfloat16 conv output is float32. Folded, the op's output plus
        that bias is the same dtype, its rounding moved from the op's output to the folded weight."""
        weight = _constants.frozen_operand(site.weight, frozen)
        return site.side is Side.OUTPUT and before == _computes_in(site) and weight is not None \
            and _bias_dtype(site, weight) == after

    def fold(self, site: BnSite, frozen: Frozen) -> Folded:
        """The folded weight and bias of a site ``refusal`` passes: computed in float64 from the
        frozen tensors, rounded once to the dtype the op reads its weight in. Plain tensor
        arithmetic that reads no graph structure: on real values it gives the constants (once, or
        in a prologue for each set of weights), traced it gives the per-step fold."""
        scale, shift = site.norm.scale_shift(frozen, site.normalised.meta["val"])
        judged = self._judged(site, frozen, scale)
        weight = _constants.frozen_operand(site.weight, frozen)
        bias = None if site.bias is None else _constants.frozen_operand(site.bias, frozen).value
        if site.side is Side.OUTPUT:
            folded_weight = self.producer.scale_output_channels(weight.value.to(fold_math.fold_dtype()), scale, site)
            folded_bias = fold_math.fold_bias(bias, scale, shift)
        else:
            folded_weight, folded_bias = fold_math.fold_into_input_channels(
                weight.value, bias, scale, shift, self.producer.groups(site)
            )
        return Folded(fold_math.cast_like(folded_weight, weight.value, weight.dtype),
                      folded_bias.to(_bias_dtype(site, weight)), judged)

    def _fold_in(self, dtype: torch.dtype, site: BnSite, frozen: Frozen) -> Folded:
        with fold_math.computed_in(dtype):
            return self.fold(site, frozen)

    def _judged(self, site: BnSite, frozen: Frozen, scale: torch.Tensor) -> Judged:
        """What ``NumericJudge`` reads of this fold: the op's stored weight, and a BN's statistics
        where the BN comes before the op (a frozen affine map has none)."""
        statistics = None
        if site.side is Side.INPUT and isinstance(site.norm, BatchNormStats):
            tensors = site.norm.tensors
            beta = tensors["bn_bias"]
            statistics = (frozen[tensors["running_mean"]], frozen[tensors["running_var"]],
                          None if beta is None else frozen[beta])
        return Judged(scale, frozen[site.weight] if site.weight in frozen else None, statistics, _computes_in(site))

    def compute(self, site: BnSite, run: RewriteContext) -> tuple[Compute, Folded] | Refused:
        """The fold's arithmetic and its values on the real frozen tensors (``fold``), refused
        where they would round or overflow where eager does not."""
        dtype = _fold_dtype(site, run)
        compute: Compute = lambda frozen: self._fold_in(dtype, site, frozen)  # noqa: E731
        result = run.evaluate(compute, NumericJudge(site.side is Side.OUTPUT))
        return result if isinstance(result, Refused) else (compute, result)

    def replace(self, match: Match, site: BnSite, values: tuple[Compute, Folded], run: RewriteContext) -> bool:
        """Rebuild the op on the folded weight and bias, in the BN's place (after) or reading what
        the BN normalised (before)."""
        compute, folded = values
        weight, bias = run.operands(compute, folded, like=site.producer)
        data = site.input
        if site.side is Side.INPUT:  # this op (only) now reads what the BN normalised, moved the same way
            for reader in [*site.private, site.producer]:
                reader.replace_input_with(site.bn, site.bn_input)
            data = site.bn_input if data is site.bn else data
        rebuild = self.producer.rebuild(site)
        if folded.bias.dtype != _computes_in(site) or run.bias_after:  # autocast: the bias at full precision
            replaced = site.bn if site.side is Side.OUTPUT else site.producer
            rebuild = _bias_after(rebuild, replaced.meta["val"].dtype)
        if site.side is Side.OUTPUT and site.chain:  # the BN's place: the op, then the same shape ops
            rebuild = _then(rebuild, site.chain)
        run.replace(match, rebuild, [data, weight, bias])
        keep_module_names(weight, site.producer)
        if site.side is Side.OUTPUT and site.chain:
            for node in [*reversed(site.chain), site.producer]:  # the unfolded op and its shape ops
                if not node.users:
                    node.graph.erase_node(node)
        if site.side is Side.INPUT:
            if site.bn.users:  # other ops still read the BN: each folds it in turn, the last removes it
                return False
            erase_bn(site.bn)
        return True

    def decision(self, site: BnSite, bn: torch.fx.Node, reason: str | None = None) -> FoldDecision:
        return FoldDecision(
            bn=module_path(bn),
            folded=reason is None,
            rule=self.id,
            producer=module_path(site.producer),
            producer_kind=self.producer.kind(site),
            reason=reason,
        )


def disabled(rule_id: str) -> str:
    """The reason of a BN a rule would fold, with the rule turned off by ``options={"rules": ...}``."""
    return f"rule {rule_id} disabled by options"


def erase_bn(bn: torch.fx.Node) -> None:
    """Remove a BN output no one reads any more (a BN op's output, or a frozen affine map's add),
    and what computed it once nothing else reads that."""
    graph, inputs = bn.graph, [n for n in bn.all_input_nodes if n.op == "call_function"]
    graph.erase_node(bn)
    for node in inputs:
        if not node.users and (node.target is BN_INFERENCE_OP or node.target is aten.mul.Tensor):
            graph.erase_node(node)



def keep_module_names(constant: torch.fx.Node, op: torch.fx.Node) -> None:
    """Name the op rebuilt on ``constant`` after the user's module ``op`` came from, as the report
    and any later rule see it (the matcher names it after what it replaced): every node from the
    constant through ops of it alone (a linear's ``permute``) to the op that reads it with data."""
    frontier, seen = [constant], set()
    while frontier:
        for user in frontier.pop().users:
            if user in seen:
                continue
            seen.add(user)
            for key in ("nn_module_stack", "source_fn_stack"):
                if key in op.meta:
                    user.meta[key] = op.meta[key]
            if len(user.all_input_nodes) == 1:  # still computing the weight
                frontier.append(user)


def _fold_dtype(site: BnSite, run: RewriteContext) -> torch.dtype:
    """What a fold computes in: float64, rounded once to the op's dtype. But per step, for an op
    that computes in a lower precision than its weight is stored in (autocast), the stored dtype,
    as autocast would take the weight (issue 31 item 1): the float64 arithmetic and its
    conversions to bfloat16, at every step, made a bf16 step on resnet18 1.5x Inductor's, and
    float32 then one rounding to bfloat16 lies within that rounding."""
    weight = _constants.frozen_operand(site.weight, run.frozen) if run.per_step else None
    return (None if weight is None else _stored_above_op(site, weight)) or fold_math.FOLD_DTYPE


def _stored_above_op(site: BnSite, weight: _constants.FrozenOperand) -> torch.dtype | None:
    """The dtype the op's weight is stored in, where the op computes in a lower precision
    (autocast); None elsewhere."""
    stored = weight.value.dtype if weight.value.dtype != fold_math.FOLD_DTYPE else weight.dtype
    computes = _computes_in(site)
    if not stored.is_floating_point or not computes.is_floating_point:
        return None
    return stored if torch.finfo(computes).bits < torch.finfo(stored).bits else None


def _computes_in(site: BnSite) -> torch.dtype:
    """The dtype the op computes in: under autocast, autocast's, whatever its weight is stored in."""
    return site.producer.meta["val"].dtype


def _bias_dtype(site: BnSite, weight: _constants.FrozenOperand) -> torch.dtype:
    """A folded bias's dtype: the one the op reads its weight in; but where the op computes in a
    lower precision than the weight is stored in (autocast), the stored one, for the op to add
    after it computes (``_bias_after``). A BN adds its shift at full precision: rounded to the op's
    dtype, the bias (and its gradient, in the backward) would carry that rounding too."""
    return _stored_above_op(site, weight) or weight.dtype


def _bias_after(op: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``op`` without a bias, the bias added to its output at the bias's precision and the sum in
    ``dtype`` (what the value the fold replaces had): as a BN adds its shift to a low-precision input."""
    def op_then_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out = op(x, weight, None)
        summed = aten.add.Tensor(out, aten.reshape.default(bias, [-1] + [1] * (out.dim() - 2)))
        return summed if summed.dtype == dtype else aten._to_copy.default(summed, dtype=dtype)

    return op_then_bias


def _then(op: Callable[..., torch.Tensor], chain: list[torch.fx.Node]) -> Callable[..., torch.Tensor]:
    def op_then_chain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _tokens.replay(chain, op(x, weight, bias))

    return op_then_chain
