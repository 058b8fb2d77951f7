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
    Refused,
    RewriteContext,
    Side,
    bn_of,
    disabled,
    erase_bn,
)

aten = torch.ops.aten

RULE_ID = "cat_bn"

#: What each slice is: conv_bn's fold and checks, on the BN's channels that conv computes.
_SLICE_RULE = FoldRule(RULE_ID, Convolution(transposed=None), AFTER)


class CatBn:
    id = RULE_ID
    stage = 0
    per_step = True
    patterns = (bn_of(KeywordArg("input")),)

    def claims(self, match: Match) -> bool:
        cat = match.kwargs["input"]
        return cat.op == "call_function" and cat.target is aten.cat.default

    def rewrite(self, match: Match, run: RewriteContext) -> None:
        bn, cat = match.output_node(), match.kwargs["input"]
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        producers = ", ".join(module_path(p) for p in parts)
        kinds = sorted({conv_kind(p) for p in parts if _is_conv(p)})

        def decision(reason: str | None) -> FoldDecision:
            return FoldDecision(module_path(bn), reason is None, self.id, producers, "cat of " + "/".join(kinds), reason)

        if dim % cat.meta["val"].dim() != 1:
            return  # a cat along another dimension is no channel slicing: not this rule's
        if not run.enabled(self.id):
            run.refuse(bn, decision(disabled(self.id)))
            return
        if len(cat.users) != 1:
            run.refuse(bn, decision(f"output also used by {module_path(next(u for u in cat.users if u is not bn.args[0]))}"))
            return
        norm = BatchNormStats.of(match.kwargs)
        folds: list[tuple[torch.fx.Node, Compute, Folded]] = []
        offset = 0
        for part in parts:
            channels = part.meta["val"].shape[1]
            where = f"channels {offset}:{offset + channels} ({module_path(part)})"
            if not _is_conv(part):
                run.refuse(bn, decision(f"{where} do not come from a conv"))
                return
            site = _slice_site(bn, part, norm, offset)
            compute: Compute = lambda frozen, site=site: _SLICE_RULE.fold(site, frozen)  # noqa: E731
            reason = _SLICE_RULE.refusal(site, run.frozen)
            result = Refused(reason) if reason else run.evaluate(compute)
            if isinstance(result, Refused):
                run.refuse(bn, decision(f"{where}: {result.reason}"))
                return
            folds.append((part, compute, result))
            offset += channels
        graph = cat.graph
        for part, compute, folded in folds:
            weight, bias = run.operands(compute, folded, like=part)
            with graph.inserting_before(part):
                rebuilt = graph.call_function(aten.convolution.default, (part.args[0], weight, bias, *part.args[3:]))
            rebuilt.meta = dict(part.meta)  # same shape, dtype and layout: only its constants changed
            part.replace_all_uses_with(rebuilt)
            graph.erase_node(part)
        bn.replace_all_uses_with(cat)
        erase_bn(bn)
        run.fold(bn, decision(None))


CAT_BN = CatBn()


def _is_conv(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.convolution.default


class _Slice(BatchNormStats):
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
    return BnSite(Side.OUTPUT, bn, conv, conv.args[0], conv.args[1], conv.args[2], _Slice(norm, offset), args,
                  private=[conv], readers={cat})
