"""cat_bn: inference BatchNorm after a concatenation of conv / conv-transpose outputs along channels.

Mixed-kernel and grouped convolutions are often written as ``split -> several convs -> cat -> BN``
(MixNet, and grouped pointwise convs in general). BN channel ``c`` of the concatenation is output
channel ``c - offset_i`` of the ``i``-th conv, so each conv takes its own slice of the BN::

    W_i'[c] = W_i[c] * scale[offset_i + c]          (conv_transpose: its output-channel layout)
    b_i'    = b_i * scale[offset_i : offset_i + C_i] + shift[offset_i : offset_i + C_i]

and the cat then reads the folded outputs. Exact for the same reasons as conv_bn, slice by slice.
Refused (naming the slice) when any input of the cat is not a conv read only by the cat, or one
slice's fold is refused for a reason of its own; then the whole BN is kept.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from .._torch_private.patterns import KeywordArg, Match
from ..decisions import FoldDecision, module_path
from .convolution import Convolution, conv_hyper, conv_kind
from .rule import (
    AFTER,
    BatchNormStats,
    BnSite,
    Compute,
    Folded,
    FoldRule,
    Frozen,
    Refused,
    RewriteContext,
    Rule,
    Side,
    bn_of,
    erase_bn,
)

aten = torch.ops.aten

RULE_ID = "cat_bn"

#: What each slice is: conv_bn's fold and checks, on the BN's channels that conv computes.
_SLICE_RULE = FoldRule(RULE_ID, Convolution(transposed=None), AFTER)


@dataclasses.dataclass
class _Slice:
    """One input of the cat: ``part``, the BN's channels it computes (``where``, in words), and its
    site as conv_bn sees it (None: the part is no conv)."""

    part: torch.fx.Node
    where: str
    site: BnSite | None


@dataclasses.dataclass
class _CatSite:
    bn: torch.fx.Node
    cat: torch.fx.Node
    slices: list[_Slice]


class CatBn(Rule):
    id = RULE_ID
    stage = 0
    per_step = True
    patterns = (bn_of(KeywordArg("input")),)

    def claims(self, match: Match) -> bool:
        cat = match.kwargs["input"]
        return cat.op == "call_function" and cat.target is aten.cat.default

    def find(self, match: Match, run: RewriteContext) -> _CatSite | None:
        bn, cat = match.output_node(), match.kwargs["input"]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim % cat.meta["val"].dim() != 1:
            return None  # a cat along another dimension is no channel slicing: not this rule's
        norm = BatchNormStats.of(match.kwargs)
        slices, offset = [], 0
        for part in cat.args[0]:
            channels = part.meta["val"].shape[1]
            where = f"channels {offset}:{offset + channels} ({module_path(part)})"
            slices.append(_Slice(part, where, _slice_site(bn, part, norm, offset) if _is_conv(part) else None))
            offset += channels
        return _CatSite(bn, cat, slices)

    def reported(self, site: _CatSite, run: RewriteContext) -> list[torch.fx.Node]:
        return [site.bn]

    def refusal(self, site: _CatSite, frozen: Frozen) -> str | None:
        """The cat read by the BN alone, then each slice, in order: a conv, and foldable as conv_bn."""
        if len(site.cat.users) != 1:
            return f"output also used by {module_path(next(u for u in site.cat.users if u is not site.bn.args[0]))}"
        for piece in site.slices:
            if piece.site is None:
                return f"{piece.where} do not come from a conv"
            reason = _SLICE_RULE.refusal(piece.site, frozen)
            if reason:
                return f"{piece.where}: {reason}"
        return None

    def compute(self, site: _CatSite, run: RewriteContext) -> list[tuple[torch.fx.Node, Compute, Folded]] | Refused:
        """Each slice's fold (conv_bn's arithmetic), refused for the first slice whose values are."""
        folds = []
        for piece in site.slices:
            compute: Compute = lambda frozen, site=piece.site: _SLICE_RULE.fold(site, frozen)  # noqa: E731
            result = run.evaluate(compute)
            if isinstance(result, Refused):
                return Refused(f"{piece.where}: {result.reason}")
            folds.append((piece.part, compute, result))
        return folds

    def replace(self, match: Match, site: _CatSite, values: list[tuple[torch.fx.Node, Compute, Folded]],
                run: RewriteContext) -> bool:
        """Each conv rebuilt on its folded slice; the cat then reads them in the BN's place."""
        graph = site.cat.graph
        for part, compute, folded in values:
            weight, bias = run.operands(compute, folded, like=part)
            with graph.inserting_before(part):
                rebuilt = graph.call_function(aten.convolution.default, (part.args[0], weight, bias, *part.args[3:]))
            rebuilt.meta = dict(part.meta)  # same shape, dtype and layout: only its constants changed
            part.replace_all_uses_with(rebuilt)
            graph.erase_node(part)
        site.bn.replace_all_uses_with(site.cat)
        erase_bn(site.bn)
        return True

    def decision(self, site: _CatSite, bn: torch.fx.Node, reason: str | None = None) -> FoldDecision:
        parts = [piece.part for piece in site.slices]
        kinds = sorted({conv_kind(p) for p in parts if _is_conv(p)})
        return FoldDecision(module_path(bn), reason is None, self.id, ", ".join(module_path(p) for p in parts),
                            "cat of " + "/".join(kinds), reason)


CAT_BN = CatBn()


def _is_conv(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.convolution.default


class _SliceOfBn(BatchNormStats):
    """Channels ``offset : offset + n`` of a BatchNorm."""

    def __init__(self, norm: BatchNormStats, offset: int) -> None:
        super().__init__(norm.tensors, norm.eps)
        self.offset = offset

    def scale_shift(self, frozen, output):
        scale, shift = super().scale_shift(frozen, output)
        width = output.shape[1]
        return scale[self.offset:self.offset + width], shift[self.offset:self.offset + width]


def _slice_site(bn: torch.fx.Node, conv: torch.fx.Node, norm: BatchNormStats, offset: int) -> BnSite:
    args = conv_hyper(conv)
    cat = bn.args[0].args[0]
    return BnSite(Side.OUTPUT, bn, conv, conv.args[0], conv.args[1], conv.args[2], _SliceOfBn(norm, offset), args,
                  private=[conv], readers={cat})
