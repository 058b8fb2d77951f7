"""Channel-local data movement between a BatchNorm and the op after it.

A per-channel affine map commutes with any op that only moves or copies values *within* a channel
(dimensions 0 and 1 untouched, no new values made up): ``move(x * s + t) == move(x) * s + t``.
Reflect, replicate and circular padding lower to exactly such ops (``_unsafe_index`` with clamped
or reflected spatial indices; slices and slice-scatters into a fresh buffer; before autograd, one
``aten.pad`` naming its mode), which is why a BN before a conv that pads that way still folds.
Zero padding makes up values, so it never passes.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from ..graph_ops import BN_INFERENCE_OP, CASTS

aten = torch.ops.aten

_PADS = {
    aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default,
    aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default,
}
#: Fresh buffers whose every value the padding then overwrites (circular padding builds one).
_FRESH = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default}
#: Casts (``graph_ops.CASTS``) on the way are allowed only to dtypes that hold every value of the
#: BN's dtype exactly (a low-precision pad computes in float32 and casts back), and the op must read
#: the BN's dtype.
_EXACT_HOLDERS = {
    torch.float16: {torch.float16, torch.float32, torch.float64},
    torch.bfloat16: {torch.bfloat16, torch.float32, torch.float64},
    torch.float32: {torch.float32, torch.float64},
    torch.float64: {torch.float64},
}


@dataclasses.dataclass
class BnBefore:
    """A BN output reaching an op's input through channel-local moves only."""

    bn: torch.fx.Node  # getitem(_native_batch_norm_legit_no_training(...), 0)
    moves: list[torch.fx.Node]  # the movement ops in between, any order


def is_bn_output(node: object) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.target is operator.getitem
        and node.args[1] == 0
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0].target is BN_INFERENCE_OP
    )


def bn_before(node: torch.fx.Node) -> BnBefore | None:
    """The BN whose output ``node`` is, moved channel-locally; None if it is anything else."""
    found: set[torch.fx.Node] = set()
    moves: list[torch.fx.Node] = []
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if is_bn_output(current):
            found.add(current)
            continue
        if current.op == "call_function" and current.target in _FRESH:
            continue
        data = _moved_inputs(current)
        if data is None:
            return None
        moves.append(current)
        stack.extend(data)
    if len(found) != 1:
        return None
    bn = found.pop()
    dtype = bn.meta["val"].dtype
    if node.meta["val"].dtype != dtype or any(move.meta["val"].dtype not in _EXACT_HOLDERS.get(dtype, {dtype}) for move in moves):
        return None
    return BnBefore(bn, moves)


def _moved_inputs(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The inputs whose values ``node`` moves, if it only moves values within channels."""
    if node.op != "call_function":
        return None
    target, args = node.target, node.args
    if target in (aten._unsafe_index.Tensor, aten.index.Tensor):
        indices = list(args[1])
        return [args[0]] if len(indices) >= 2 and indices[0] is None and indices[1] is None else None
    if target is aten.slice.Tensor:
        return [args[0]] if _spatial(node, args[1] if len(args) > 1 else 0) else None
    if target is aten.slice_scatter.default:
        return [args[0], args[1]] if _spatial(node, args[2] if len(args) > 2 else 0) else None
    if target is aten.cat.default:
        return list(args[0]) if _spatial(node, args[1] if len(args) > 1 else 0) else None
    if target is aten.copy.default:
        source, result = args[1].meta["val"], node.meta["val"]
        same_channels = source.dim() == result.dim() and tuple(source.shape[:2]) == tuple(result.shape[:2])
        return [args[0], args[1]] if same_channels else None
    if target in CASTS and not set(node.kwargs) - {"dtype"}:
        return [args[0]]
    if target in _PADS or target is aten.clone.default:
        return [args[0]]
    if target is aten.pad.default:  # before autograd (a training graph), padding is still one op
        mode = node.kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        spatial = len(args[1]) <= 2 * (node.meta["val"].dim() - 2)
        return [args[0]] if mode in ("reflect", "replicate", "circular") and spatial else None
    return None


def _spatial(node: torch.fx.Node, dim: int) -> bool:
    """Whether ``dim`` of ``node``'s result is past the batch and channel dimensions."""
    return dim % node.meta["val"].dim() >= 2
