"""A BatchNorm site: a BN (or a frozen per-channel affine map) next to the op it may fold into.

``BnSite`` is what a match describes. A rule's *place* says where it looks for the BN and how it
finds it: ``AFTER`` the op (a pattern: the BN right after it), ``BEFORE`` it (a walk back through
channel-local moves, possibly reflect / replicate / circular padding), or either through shape-only
ops (``AFTER_THROUGH_SHAPES``, ``BEFORE_THROUGH_SHAPES``: tokens), each with the one check its shape
of site needs. ``BatchNormStats`` and ``FrozenAffine`` give a site's per-channel scale and shift,
in float64, from the real frozen tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Collection
from typing import Any, Protocol

import torch
import torch.fx

from .. import fold_math
from .._torch_private.patterns import MULTIPLE, CallFunction, KeywordArg, Match
from ..graph_ops import BN_INFERENCE_OP
from . import _channel_local, _constants, _tokens


class SiteOp(Protocol):
    """What finding a site needs of the op a BN folds into (``rule.Producer`` is one)."""

    targets: Collection[Any]
    patterns: tuple[Any, ...]

    def claims(self, match: Match) -> bool: ...
    def operands(self, node: torch.fx.Node) -> dict[str, Any] | None: ...


Frozen = dict[torch.fx.Node, torch.Tensor]


class Side(enum.Enum):
    """Which channels of the producer the BN normalises."""

    OUTPUT = "output"  # op -> BN: scale the weight slices feeding each output channel
    INPUT = "input"  # BN -> op: scale the weight columns reading each input channel


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

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> BatchNormStats:
        """From a BN's arguments by name (a match's keyword arguments, or ``of_op``'s)."""
        return cls({k: arguments[k] for k in BN_TENSORS}, arguments["eps"])

    @classmethod
    def of_op(cls, bn_op: torch.fx.Node) -> BatchNormStats:
        """From an inference BN op node (``graph_ops.BN_INFERENCE_OP``)."""
        return cls.of(dict(zip(("input", *BN_ARGS), bn_op.args, strict=True)))

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
            norm: BatchNormStats | FrozenAffine = BatchNormStats.of(kw)
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
        norm = BatchNormStats.of_op(before.bn.args[0])
        private = [before.bn, *before.moves]
        # Other ops reading the BN directly may each take a fold of their own (inception-style branches).
        siblings = [u for u in before.bn.users if u not in private and u is not consumer and _takes_input_fold(u, before.bn)]
        return cls(
            Side.INPUT, before.bn, consumer, kw["input"], kw["weight"], kw.get("bias"), norm, kw, private,
            readers={*private, consumer, *siblings},
        )

    @classmethod
    def after_shape_ops(cls, match: Match, producer: SiteOp) -> BnSite | None:
        """A BN after a Linear on token sequences, shape-only ops between them (None: no such site)."""
        output = match.output_node()
        source, chain = _tokens.chain_back(match.kwargs["input"])
        operands = producer.operands(source)
        if not chain or operands is None:
            return None
        private, readers = [source, *chain], {*chain, output.args[0]}
        return cls(Side.OUTPUT, output, source, operands["input"], operands["weight"], operands["bias"],
                   BatchNormStats.of(match.kwargs), operands, private, readers, chain)

    @classmethod
    def before_shape_ops(cls, match: Match, producer: SiteOp) -> BnSite | None:
        """A BN before a Linear on token sequences, shape-only ops between them (None: no such site)."""
        consumer = next(n for n in match.nodes if n.target in producer.targets)
        source, chain = _tokens.chain_back(match.kwargs["input"])
        if not chain or not _channel_local.is_bn_output(source):
            return None
        private = [source, *chain]
        return cls(Side.INPUT, source, consumer, match.kwargs["input"], match.kwargs["weight"], match.kwargs.get("bias"),
                   BatchNormStats.of_op(source.args[0]), match.kwargs, private,
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



class Place(Protocol):
    """Where a rule looks for its BN, relative to its op: the patterns it registers, which matches it
    takes (the matcher's ``extra_check``), the site a match describes, and why that shape of site
    cannot take a fold (its own check, beside the rule's shared ones)."""

    side: Side

    def patterns(self, op: SiteOp) -> tuple[Any, ...]: ...
    def claims(self, match: Match, op: SiteOp) -> bool: ...
    def find(self, match: Match, op: SiteOp) -> BnSite | None: ...
    def refusal(self, site: BnSite) -> str | None: ...


class _Place:
    """The defaults of a place: the op's own patterns and claims, no check of its own."""

    side: Side

    def patterns(self, op: SiteOp) -> tuple[Any, ...]:
        return op.patterns

    def claims(self, match: Match, op: SiteOp) -> bool:
        return op.claims(match)

    def find(self, match: Match, op: SiteOp) -> BnSite | None:
        raise NotImplementedError

    def refusal(self, site: BnSite) -> str | None:
        return None


class _After(_Place):
    """The BN (or a frozen affine map) right after the op: part of the pattern."""

    side = Side.OUTPUT

    def patterns(self, op: SiteOp) -> tuple[Any, ...]:
        return tuple(p for pattern in op.patterns for p in (bn_of(pattern), *affine_of(pattern)))

    def find(self, match: Match, op: SiteOp) -> BnSite | None:
        return BnSite.on_output(match, tuple(op.targets))


class _Before(_Place):
    """The BN before the op, found by walking back from the op's input (it may reach the op through
    channel-local moves, which no fixed pattern spells)."""

    side = Side.INPUT

    def find(self, match: Match, op: SiteOp) -> BnSite | None:
        return BnSite.on_input(match, tuple(op.targets))


class _AfterThroughShapes(_Place):
    """A BN after the op, shape-only ops between them: any BN matches, and the site walks back
    through the shape ops to the op."""

    side = Side.OUTPUT

    def patterns(self, op: SiteOp) -> tuple[Any, ...]:
        return (bn_of(KeywordArg("input")),)

    def claims(self, match: Match, op: SiteOp) -> bool:
        return True

    def find(self, match: Match, op: SiteOp) -> BnSite | None:
        return BnSite.after_shape_ops(match, op)

    def refusal(self, site: BnSite) -> str | None:
        return _tokens.refusal(site.producer, site.chain)


class _BeforeThroughShapes(_Place):
    """A BN before the op, shape-only ops between them."""

    side = Side.INPUT

    def find(self, match: Match, op: SiteOp) -> BnSite | None:
        return BnSite.before_shape_ops(match, op)

    def refusal(self, site: BnSite) -> str | None:
        return _tokens.refusal(site.bn, site.chain)


AFTER: Place = _After()
BEFORE: Place = _Before()
AFTER_THROUGH_SHAPES: Place = _AfterThroughShapes()
BEFORE_THROUGH_SHAPES: Place = _BeforeThroughShapes()


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


