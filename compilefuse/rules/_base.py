"""What every folding rule shares: the patterns of a BatchNorm, the site a match describes, the
safety checks, and the rewrite into frozen constants.

A rule says which op it folds into, on which side of it the BN sits, how the BN's per-channel
scale and shift enter that op's weight and bias, and how to rebuild the op. Everything that
decides *whether* a fold is exact and common to all rules lives here, once, so it cannot drift
between rules; a rule adds only the conditions of its own op (``FoldRule.refusal``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .. import fold_math
from .._torch_private import BN_INFERENCE_OP, MULTIPLE, CallFunction, KeywordArg, Match
from ..decisions import FoldDecision, module_path
from . import _channel_local, _constants

aten = torch.ops.aten

BN_ARGS = ("bn_weight", "bn_bias", "running_mean", "running_var", "momentum", "eps")
BN_TENSORS = ("bn_weight", "bn_bias", "running_mean", "running_var")


def bn_of(producer: Any) -> Any:
    """Pattern: ``getitem(_native_batch_norm_legit_no_training(producer, ...), 0)``."""
    bn = CallFunction(BN_INFERENCE_OP, producer, *(KeywordArg(name) for name in BN_ARGS))
    return CallFunction(operator.getitem, bn, 0)


def affine_of(producer: Any) -> tuple[Any, ...]:
    """Patterns: ``producer * scale + shift`` in every argument order (``FrozenBatchNorm2d``)."""
    scale, shift = KeywordArg("affine_scale"), KeywordArg("affine_shift")
    products = (
        CallFunction(aten.mul.Tensor, producer, scale, _users=MULTIPLE),
        CallFunction(aten.mul.Tensor, scale, producer, _users=MULTIPLE),
    )
    return tuple(
        CallFunction(aten.add.Tensor, *operands)
        for product in products
        for operands in ((product, shift), (shift, product))
    )


@dataclasses.dataclass
class BatchNormStats:
    """An inference BN op: scale and shift from its running statistics and affine parameters."""

    tensors: dict[str, torch.fx.Node | None]
    eps: Any

    def inputs(self, frozen: dict[torch.fx.Node, torch.Tensor]) -> dict[str, torch.fx.Node | None]:
        return dict(self.tensors)

    def check(self) -> str | None:
        return None if isinstance(self.eps, (int, float)) else "eps is not a compile-time number"

    def scale_shift(self, frozen: dict[torch.fx.Node, torch.Tensor], output: torch.Tensor):
        value = {k: None if v is None else frozen[v] for k, v in self.tensors.items()}
        return fold_math.bn_scale_shift(
            value["running_mean"], value["running_var"], value["bn_weight"], value["bn_bias"], float(self.eps)
        )


@dataclasses.dataclass
class FrozenAffine:
    """``x * scale + shift`` with scale and shift computed from frozen tensors in ``forward``."""

    scale: Any
    shift: Any

    def inputs(self, frozen: dict[torch.fx.Node, torch.Tensor]) -> dict[str, torch.fx.Node | None]:
        leaves = [*(_constants.expression_leaves(self.scale, frozen) or []),
                  *(_constants.expression_leaves(self.shift, frozen) or [])]
        return {f"affine input {leaf.name}": leaf for leaf in leaves}

    def check(self) -> str | None:
        return None

    def recognised(self, output: torch.fx.Node, frozen: dict[torch.fx.Node, torch.Tensor]) -> bool:
        """Whether this mul-add is a frozen per-channel affine map at all (if not, it is none of
        bnfuse's business and gets no report row)."""
        for operand in (self.scale, self.shift):
            if _constants.expression_leaves(operand, frozen) is None:
                return False
            shape = operand.meta["val"].shape if isinstance(operand, torch.fx.Node) else ()
            if not _constants.is_per_channel(shape, output.meta["val"].shape):
                return False
        return True

    def scale_shift(self, frozen: dict[torch.fx.Node, torch.Tensor], output: torch.Tensor):
        scale = _constants.per_channel(_constants.evaluate_float64(self.scale, frozen), output)
        shift = _constants.per_channel(_constants.evaluate_float64(self.shift, frozen), output)
        return scale, shift


@dataclasses.dataclass
class BnSite:
    """A BatchNorm (or frozen per-channel affine) next to the op it can fold into."""

    bn: torch.fx.Node  # the node whose value the fold replaces (or, before the op, removes)
    producer: torch.fx.Node  # the conv / linear the BN folds into
    input: torch.fx.Node  # the op's data input, as the folded op will read it
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    norm: BatchNormStats | FrozenAffine
    args: dict[str, Any]  # the matched hyper-parameters of the op (stride, groups, ...)
    #: Nodes the fold removes; any use of them outside the site makes the fold inexact.
    private: list[torch.fx.Node]
    #: The nodes that may read the private ones.
    readers: set[torch.fx.Node]
    before: _channel_local.BnBefore | None = None

    @classmethod
    def on_output(cls, match: Match, producer_targets: tuple[Any, ...]) -> BnSite:
        """A BN (or frozen affine) applied to the output of the matched producer."""
        kw = match.kwargs
        producer = next(n for n in match.nodes if n.target in producer_targets)
        output = match.output_node()
        if "running_mean" in kw:
            norm: BatchNormStats | FrozenAffine = BatchNormStats({k: kw[k] for k in BN_TENSORS}, kw["eps"])
            private, readers = [producer], {output.args[0]}
        else:
            norm = FrozenAffine(kw["affine_scale"], kw["affine_shift"])
            product = next(n for n in match.nodes if n.target is aten.mul.Tensor)
            private, readers = [producer, product], {product, output}
        return cls(output, producer, kw["input"], kw["weight"], kw.get("bias"), norm, kw, private, readers)

    @classmethod
    def on_input(cls, match: Match, consumer_targets: tuple[Any, ...]) -> BnSite | None:
        """A BN whose output the matched op reads, possibly through channel-local moves (None when
        the op's input is not such a BN)."""
        kw = match.kwargs
        consumer = next(n for n in match.nodes if n.target in consumer_targets)
        before = _channel_local.bn_before(kw["input"])
        if before is None:
            return None
        bn_op = before.bn.args[0]
        bn_kw = dict(zip(("input", *BN_ARGS), bn_op.args, strict=True))
        norm = BatchNormStats({k: bn_kw[k] for k in BN_TENSORS}, bn_kw["eps"])
        private = [before.bn, *before.moves]
        return cls(
            before.bn, consumer, kw["input"], kw["weight"], kw.get("bias"), norm, kw, private,
            readers={*private, consumer}, before=before,
        )

    @property
    def bn_input(self) -> torch.fx.Node:
        """For a BN before the op: what the BN normalises."""
        return self.bn.args[0].args[0]

    @property
    def normalised(self) -> torch.fx.Node:
        """The node the normalisation is applied to: the BN's input before the op, else the op."""
        return self.bn_input if self.before is not None else self.producer


def recognised(site: BnSite, frozen: dict[torch.fx.Node, torch.Tensor]) -> bool:
    """Whether the match is a BN site at all: every BN op is; a mul-add only if it is a frozen
    per-channel affine map."""
    return not isinstance(site.norm, FrozenAffine) or site.norm.recognised(site.producer, frozen)


class FoldRule:
    """A BN-folding rule. Subclasses set ``id``, ``patterns``, ``producer_targets`` and ``position``."""

    id: str
    producer_targets: tuple[Any, ...]
    patterns: tuple[Any, ...]
    position: str = "after"  # where the BN sits relative to the op: "after" or "before"

    def applies(self, match: Match) -> bool:
        """Whether this rule (rather than a sibling matching the same op) owns the match."""
        return True

    def site(self, match: Match) -> BnSite | None:
        """The BN site the match describes (None: a "before" match with no BN before the op)."""
        if self.position == "before":
            return BnSite.on_input(match, self.producer_targets)
        return BnSite.on_output(match, self.producer_targets)

    def producer_kind(self, site: BnSite) -> str:
        raise NotImplementedError

    def refusal(self, site: BnSite) -> str | None:
        """Why this op, with these hyper-parameters, cannot absorb the BN exactly (None: it can)."""
        return None

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
             shift: torch.Tensor, site: BnSite) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight and bias in float64, from the op's and the BN's values."""
        raise NotImplementedError

    def replacement(self, site: BnSite) -> Callable[..., torch.Tensor]:
        """A function ``(input, folded_weight, folded_bias) -> output`` rebuilding the op."""
        raise NotImplementedError


def refusal_reason(rule: FoldRule, site: BnSite, frozen: dict[torch.fx.Node, torch.Tensor]) -> str | None:
    """Why folding ``site`` would not be exact, or None when it is."""
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
    reason = site.norm.check() or rule.refusal(site)
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
    if before != after:
        return f"the normalisation changes the dtype ({before} to {after})"
    return None


def folded_constants(
    rule: FoldRule, site: BnSite, frozen: dict[torch.fx.Node, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The folded (weight, bias) in the dtype the op reads its weight in, or why they cannot be used."""
    scale, shift = site.norm.scale_shift(frozen, site.normalised.meta["val"])
    if scale is None or shift is None:
        return "scale or shift is not one number per channel"
    weight = _constants.frozen_operand(site.weight, frozen)
    bias = None if site.bias is None else _constants.frozen_operand(site.bias, frozen).value
    folded_weight, folded_bias = rule.fold(weight.value, bias, scale, shift, site)
    folded_weight = fold_math.cast_like(folded_weight, weight.value, weight.dtype)
    folded_bias = folded_bias.to(weight.dtype)
    for name, folded in (("weight", folded_weight), ("bias", folded_bias)):
        if not torch.isfinite(folded).all():
            return f"folded {name} is not finite in {weight.dtype}"
    return folded_weight, folded_bias


def decision(rule: FoldRule, site: BnSite, reason: str | None) -> FoldDecision:
    return FoldDecision(
        bn=module_path(site.bn),
        folded=reason is None,
        rule=rule.id,
        producer=module_path(site.producer),
        producer_kind=rule.producer_kind(site),
        reason=reason,
    )


class OutputChannelRule(FoldRule):
    """The BN acts on the op's output channels: scale the weight slices that feed each channel."""

    def scale_weight(self, weight: torch.Tensor, scale: torch.Tensor, site: BnSite) -> torch.Tensor:
        raise NotImplementedError

    def fold(self, weight, bias, scale, shift, site):
        return self.scale_weight(weight, scale, site), fold_math.fold_bias(bias, scale, shift)


class InputChannelRule(FoldRule):
    """The BN acts on the op's input channels: scale the weight columns that read each channel and
    push the shift through the weight into the bias."""

    position = "before"

    def fold(self, weight, bias, scale, shift, site):
        return fold_math.fold_into_input_channels(weight, bias, scale, shift, int(site.args.get("groups", 1)))
