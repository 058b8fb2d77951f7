"""A folding rule: the op a BatchNorm folds into (its *producer*) and the side of it the BN is on.

Every rule is ``FoldRule(id, producer, side)``. The producer (``Convolution``, ``Linear``) says
which aten ops it is, how its weight feeds its channels, when it cannot take a fold, and how to
rebuild it; the side says whether the BN normalises the op's output channels (``op -> BN``) or its
input channels (``BN -> op``). Everything that decides *whether* a fold is exact and is common to
all rules lives here, once, beside the fold it guards, so it cannot drift between rules.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.fx

from .. import fold_math
from .._torch_private import BN_INFERENCE_OP, MULTIPLE, CallFunction, KeywordArg, Match, real_tensor_math
from ..decisions import FoldDecision, MergeDecision, module_path
from . import _channel_local, _constants, _tokens

Frozen = dict[torch.fx.Node, torch.Tensor]


class RewriteContext(Protocol):
    """What a rule's rewrite gets from the pass running it (``passes/fold.py``)."""

    frozen: Frozen  # the real value of every frozen node, folded constants included

    def enabled(self, rule_id: str) -> bool: ...
    def add_constant(self, value: torch.Tensor, like: torch.fx.Node) -> torch.fx.Node: ...
    def fold(self, bn: torch.fx.Node, decision: FoldDecision) -> None: ...
    def refuse(self, bn: torch.fx.Node, decision: FoldDecision) -> None: ...
    def merge(self, merge: MergeDecision) -> None: ...
    def progress(self) -> None: ...  # a rewrite that is a step of a fold (more steps follow)


class Rule(Protocol):
    """Every rule: an id, the stage it runs in, its patterns, the check that picks its matches
    (the matcher's ``extra_check``), and the rewrite of one match."""

    id: str
    stage: int
    patterns: tuple[Any, ...]

    def claims(self, match: Match) -> bool: ...
    def rewrite(self, match: Match, run: RewriteContext) -> None: ...


class Side(enum.Enum):
    """Which channels of the producer the BN normalises."""

    OUTPUT = "output"  # op -> BN: scale the weight slices feeding each output channel
    INPUT = "input"  # BN -> op: scale the weight columns reading each input channel


@dataclasses.dataclass(frozen=True)
class Folded:
    """The folded weight and bias, in the dtype the op reads its weight in."""

    weight: torch.Tensor
    bias: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Refused:
    reason: str

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

    def inputs(self, frozen: Frozen) -> dict[str, torch.fx.Node | None]:
        return dict(self.tensors)

    def check(self) -> str | None:
        return None if isinstance(self.eps, (int, float)) else "eps is not a compile-time number"

    def scale_shift(self, frozen: Frozen, output: torch.Tensor):
        value = {k: None if v is None else frozen[v] for k, v in self.tensors.items()}
        return fold_math.bn_scale_shift(
            value["running_mean"], value["running_var"], value["bn_weight"], value["bn_bias"], float(self.eps)
        )


@dataclasses.dataclass
class FrozenAffine:
    """``x * scale + shift`` with scale and shift computed from frozen tensors in ``forward``."""

    scale: Any
    shift: Any

    def inputs(self, frozen: Frozen) -> dict[str, torch.fx.Node | None]:
        leaves = [*(_constants.expression_leaves(self.scale, frozen) or []),
                  *(_constants.expression_leaves(self.shift, frozen) or [])]
        return {f"affine input {leaf.name}": leaf for leaf in leaves}

    def check(self) -> str | None:
        return None

    def recognised(self, output: torch.fx.Node, frozen: Frozen) -> bool:
        """Whether this mul-add is a frozen per-channel affine map at all (if not, it is none of
        bnfuse's business and gets no report row)."""
        for operand in (self.scale, self.shift):
            if _constants.expression_leaves(operand, frozen) is None:
                return False
            shape = operand.meta["val"].shape if isinstance(operand, torch.fx.Node) else ()
            if not _constants.is_per_channel(shape, output.meta["val"].shape):
                return False
        return True

    def scale_shift(self, frozen: Frozen, output: torch.Tensor):
        scale = _constants.per_channel(_constants.evaluate_float64(self.scale, frozen), output)
        shift = _constants.per_channel(_constants.evaluate_float64(self.shift, frozen), output)
        return scale, shift


@dataclasses.dataclass
class BnSite:
    """A BatchNorm (or frozen per-channel affine) next to the op it can fold into."""

    side: Side
    bn: torch.fx.Node  # the node whose value the fold replaces (BN after) or removes (BN before)
    producer: torch.fx.Node  # the conv / linear the BN folds into
    input: torch.fx.Node  # the op's data input as matched
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    norm: BatchNormStats | FrozenAffine
    args: dict[str, Any]  # the matched hyper-parameters of the op (stride, groups, ...)
    #: Nodes the fold removes; any use of them outside the site makes the fold inexact.
    private: list[torch.fx.Node]
    #: The nodes that may read the private ones.
    readers: set[torch.fx.Node]
    #: Shape-only ops between the op and the BN (token sequences), in program order.
    chain: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    #: For a frozen affine map before the op: what it is applied to.
    source: torch.fx.Node | None = None

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
        return cls(Side.OUTPUT, output, producer, kw["input"], kw["weight"], kw.get("bias"), norm, kw, private, readers)

    @classmethod
    def on_input(cls, match: Match, consumer_targets: tuple[Any, ...]) -> BnSite | None:
        """A BN whose output the matched op reads, possibly through channel-local moves (None when
        the op's input is not such a BN)."""
        kw = match.kwargs
        consumer = next(n for n in match.nodes if n.target in consumer_targets)
        affine = _affine_before(kw["input"])
        if affine is not None:  # a frozen affine map (FrozenBatchNorm2d) read directly by the op
            add, product, source, norm = affine
            return cls(Side.INPUT, add, consumer, kw["input"], kw["weight"], kw.get("bias"), norm, kw, [add, product],
                       readers={add, product, consumer}, source=source)
        before = _channel_local.bn_before(kw["input"])
        if before is None:
            return None
        bn_op = before.bn.args[0]
        bn_kw = dict(zip(("input", *BN_ARGS), bn_op.args, strict=True))
        norm = BatchNormStats({k: bn_kw[k] for k in BN_TENSORS}, bn_kw["eps"])
        private = [before.bn, *before.moves]
        # Other ops reading the BN directly may each take a fold of their own (inception-style branches).
        siblings = [u for u in before.bn.users if u not in private and u is not consumer and _takes_input_fold(u, before.bn)]
        return cls(
            Side.INPUT, before.bn, consumer, kw["input"], kw["weight"], kw.get("bias"), norm, kw, private,
            readers={*private, consumer, *siblings},
        )

    @classmethod
    def through_shape_ops(cls, match: Match, producer: Producer, side: Side) -> BnSite | None:
        """A BN and a Linear on token sequences, shape-only ops between them (None: no such site)."""
        if side is Side.OUTPUT:
            output = match.output_node()
            source, chain = _tokens.chain_back(match.kwargs["input"])
            operands = producer.operands(source)
            if not chain or operands is None:
                return None
            bn_kw = match.kwargs
            private, readers = [source, *chain], {*chain, output.args[0]}
            return cls(Side.OUTPUT, output, source, operands["input"], operands["weight"], operands["bias"],
                       BatchNormStats({k: bn_kw[k] for k in BN_TENSORS}, bn_kw["eps"]), operands, private, readers, chain)
        consumer = next(n for n in match.nodes if n.target in producer.targets)
        source, chain = _tokens.chain_back(match.kwargs["input"])
        if not chain or not _channel_local.is_bn_output(source):
            return None
        bn_kw = dict(zip(("input", *BN_ARGS), source.args[0].args, strict=True))
        private = [source, *chain]
        return cls(Side.INPUT, source, consumer, match.kwargs["input"], match.kwargs["weight"], match.kwargs.get("bias"),
                   BatchNormStats({k: bn_kw[k] for k in BN_TENSORS}, bn_kw["eps"]), match.kwargs, private,
                   {*private, consumer}, chain)

    @property
    def bn_input(self) -> torch.fx.Node:
        """For a BN before the op: what the BN normalises."""
        return self.source if self.source is not None else self.bn.args[0].args[0]

    @property
    def normalised(self) -> torch.fx.Node:
        """The node the normalisation is applied to: the BN's input before the op, else the op."""
        return self.bn_input if self.side is Side.INPUT else self.producer

    def recognised(self, frozen: Frozen) -> bool:
        """Whether the match is a BN site at all: every BN op is; a mul-add only if it is a frozen
        per-channel affine map (if not, it is none of bnfuse's business and gets no report row)."""
        return not isinstance(self.norm, FrozenAffine) or self.norm.recognised(self.normalised, frozen)


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
class FoldRule:
    """Fold a BN on ``side`` of ``producer``. ``id`` names the rule in options, logs, the report,
    tests and docs."""

    id: str
    producer: Producer
    side: Side
    #: Whether shape-only ops (token reshapes) stand between the op and the BN.
    tokens: bool = False

    @property
    def stage(self) -> int:
        return 0 if self.side is Side.OUTPUT else 1

    @property
    def patterns(self) -> tuple[Any, ...]:
        """The BN after the op is part of the pattern; a BN before it is found by ``site`` (it may
        reach the op through channel-local moves, which no fixed pattern spells)."""
        if self.side is Side.INPUT:
            return self.producer.patterns
        if self.tokens:  # any BN: ``site`` walks back through the shape ops to the op
            return (bn_of(KeywordArg("input")),)
        return tuple(p for op in self.producer.patterns for p in (bn_of(op), *affine_of(op)))

    def claims(self, match: Match) -> bool:
        return (self.tokens and self.side is Side.OUTPUT) or self.producer.claims(match)

    def site(self, match: Match) -> BnSite | None:
        """The BN site the match describes (None: an op with no BN before it)."""
        if self.tokens:
            return BnSite.through_shape_ops(match, self.producer, self.side)
        if self.side is Side.INPUT:
            return BnSite.on_input(match, self.producer.targets)
        return BnSite.on_output(match, self.producer.targets)

    def refusal(self, site: BnSite, frozen: Frozen) -> str | None:
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
        reason = site.norm.check() or self.producer.refusal(site) or _tokens_refusal(site)
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

    def fold(self, site: BnSite, frozen: Frozen) -> Folded | Refused:
        """The folded weight and bias: computed in float64 from the real frozen tensors, rounded
        once to the dtype the op reads its weight in, and refused if not finite there."""
        reason = self.refusal(site, frozen)
        if reason:
            return Refused(reason)
        scale, shift = site.norm.scale_shift(frozen, site.normalised.meta["val"])
        weight = _constants.frozen_operand(site.weight, frozen)
        bias = None if site.bias is None else _constants.frozen_operand(site.bias, frozen).value
        if self.side is Side.OUTPUT:
            folded_weight = self.producer.scale_output_channels(weight.value.to(fold_math.FOLD_DTYPE), scale, site)
            folded_bias = fold_math.fold_bias(bias, scale, shift)
        else:
            folded_weight, folded_bias = fold_math.fold_into_input_channels(
                weight.value, bias, scale, shift, self.producer.groups(site)
            )
        folded = Folded(fold_math.cast_like(folded_weight, weight.value, weight.dtype), folded_bias.to(weight.dtype))
        for name in ("weight", "bias"):
            if not torch.isfinite(getattr(folded, name)).all():
                return Refused(f"folded {name} is not finite in {weight.dtype}")
        return folded

    def rewrite(self, match: Match, run: RewriteContext) -> None:
        """Fold the site ``match`` describes into new constants and rebuild the op on them, or
        tell ``run`` why not."""
        site = self.site(match)
        if site is None or not site.recognised(run.frozen):
            return
        if not run.enabled(self.id):
            run.refuse(site.bn, self.decision(site, f"rule {self.id} disabled by options"))
            return
        with real_tensor_math():
            result = self.fold(site, run.frozen)
        if isinstance(result, Refused):
            run.refuse(site.bn, self.decision(site, result.reason))
            return
        weight, bias = (run.add_constant(value, like=site.producer) for value in (result.weight, result.bias))
        data = site.input
        if site.side is Side.INPUT:  # this op (only) now reads what the BN normalised, moved the same way
            for reader in [*site.private, site.producer]:
                reader.replace_input_with(site.bn, site.bn_input)
            data = site.bn_input if data is site.bn else data
        rebuild = self.producer.rebuild(site)
        if site.side is Side.OUTPUT and site.chain:  # the BN's place: the op, then the same shape ops
            rebuild = _then(rebuild, site.chain)
        match.replace_by_example(rebuild, [data, weight, bias])
        keep_module_names(weight, site.producer)
        if site.side is Side.OUTPUT and site.chain:
            for node in [*reversed(site.chain), site.producer]:  # the unfolded op and its shape ops
                if not node.users:
                    node.graph.erase_node(node)
        if site.side is Side.INPUT:
            if site.bn.users:  # other ops still read the BN: each folds it in turn, the last removes it
                run.progress()
                return
            erase_bn(site.bn)
        run.fold(site.bn, self.decision(site))

    def decision(self, site: BnSite, reason: str | None = None) -> FoldDecision:
        """The report row of ``site``: folded (no reason) or kept for ``reason``."""
        return FoldDecision(
            bn=module_path(site.bn),
            folded=reason is None,
            rule=self.id,
            producer=module_path(site.producer),
            producer_kind=self.producer.kind(site),
            reason=reason,
        )


def erase_bn(bn: torch.fx.Node) -> None:
    """Remove a BN output no one reads any more (a BN op's output, or a frozen affine map's add),
    and what computed it once nothing else reads that."""
    graph, inputs = bn.graph, [n for n in bn.all_input_nodes if n.op == "call_function"]
    graph.erase_node(bn)
    for node in inputs:
        if not node.users and (node.target is BN_INFERENCE_OP or node.target is aten.mul.Tensor):
            graph.erase_node(node)


def _takes_input_fold(node: torch.fx.Node, bn: torch.fx.Node) -> bool:
    """Whether ``node`` is a conv without zero padding or a linear whose data input is ``bn``."""
    if node.op != "call_function":
        return False
    if node.target is aten.convolution.default:
        return node.args[0] is bn and not node.args[6] and not any(node.args[4])
    if node.target in (aten.addmm.default, aten.mm.default):
        x = node.args[1] if node.target is aten.addmm.default else node.args[0]
        transposed = node.args[-1]
        return x is bn and isinstance(transposed, torch.fx.Node) and transposed.target is aten.permute.default
    return False


def _affine_before(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node, FrozenAffine] | None:
    """``add(mul(x, scale), shift)`` in any argument order: (add, mul, x, the affine), or None.
    Whether scale and shift are frozen and per channel is ``FrozenAffine.recognised``'s to say."""
    if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs:
        return None
    for product, shift in (node.args, node.args[::-1]):
        if isinstance(product, torch.fx.Node) and product.target is aten.mul.Tensor and len(product.users) == 1:
            for x, scale in (product.args, product.args[::-1]):
                if isinstance(x, torch.fx.Node) and isinstance(scale, torch.fx.Node):
                    return node, product, x, FrozenAffine(scale, shift)
    return None


def keep_module_names(constant: torch.fx.Node, op: torch.fx.Node) -> None:
    """Name the op rebuilt on ``constant`` (its only reader) after the user's module ``op`` came
    from, as the report and any later rule see it (the matcher names it after what it replaced)."""
    for rebuilt in constant.users:
        for key in ("nn_module_stack", "source_fn_stack"):
            if key in op.meta:
                rebuilt.meta[key] = op.meta[key]


def _tokens_refusal(site: BnSite) -> str | None:
    if not site.chain:
        return None
    if not _tokens.static(site.chain):
        return "dynamic sizes in the reshapes between the BN and the linear"
    source = site.producer if site.side is Side.OUTPUT else site.bn
    if not _tokens.channels_line_up(source, site.chain):
        return "the BN's channels are not the linear's features (the reshapes between them move the channel axis)"
    return None


def _then(op: Callable[..., torch.Tensor], chain: list[torch.fx.Node]) -> Callable[..., torch.Tensor]:
    def op_then_chain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _tokens.replay(chain, op(x, weight, bias))

    return op_then_chain
