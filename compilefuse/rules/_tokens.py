"""Shape-only ops between a Linear and a BatchNorm on token sequences, and the proof that they keep
every element's channel.

LeViT-style blocks apply a Linear to tokens ``(N, L, C)`` (aten: a view to ``(N*L, C)``, ``addmm``, a
view back), then a BatchNorm1d on ``(N*L, C)`` or ``(N, C, L)``, with views, transposes and permutes
in between. A per-channel affine map commutes with those ops exactly when every element keeps its
channel: the element the BN normalises as channel ``c`` is the one the Linear computed as feature
``c``. That is checked element by element, not assumed from the op names: a tensor holding each
element's channel index is pushed through the very same ops, and must arrive with index ``c`` at
every position of channel ``c``. (BatchNorm1d over ``(N, C, L)`` after a Linear on the last dimension
of ``(N, C, L)`` fails it: its channels are not the Linear's features.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from ..runtime._torch_runtime import real_tensor_math

aten = torch.ops.aten

SHAPE_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.clone.default, aten.alias.default, aten.flatten.using_ints,
})


def chain_back(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Walk back from ``node`` through shape-only ops: the node they start from, and the ops in
    program order (empty when ``node`` is no shape op)."""
    chain: list[torch.fx.Node] = []
    while node.op == "call_function" and node.target in SHAPE_OPS and isinstance(node.args[0], torch.fx.Node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def replay(chain: Sequence[torch.fx.Node], value: torch.Tensor) -> torch.Tensor:
    """The ops of ``chain`` applied to ``value`` (with their own size and dimension arguments)."""
    for node in chain:
        value = node.target(value, *node.args[1:], **node.kwargs)
    return value


def refusal(source: torch.fx.Node, chain: Sequence[torch.fx.Node]) -> str | None:
    """Why a BN cannot move across ``chain`` from ``source`` (the Linear after it, or the BN before it)."""
    if not static(chain):
        return "dynamic sizes in the reshapes between the BN and the linear"
    if not channels_line_up(source, chain):
        return "the BN's channels are not the linear's features (the reshapes between them move the channel axis)"
    return None


def static(chain: Sequence[torch.fx.Node]) -> bool:
    """Whether every size the chain uses is a plain number (not a symbolic, dynamic size)."""
    return not any(isinstance(a, (torch.fx.Node, torch.SymInt)) for n in chain for a in _flat((n.args[1:], n.kwargs)))


def _flat(value: object) -> list[object]:
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flat(v)]
    if isinstance(value, dict):
        return [item for v in value.values() for item in _flat(v)]
    return [value]


def channels_line_up(source: torch.fx.Node, chain: Sequence[torch.fx.Node]) -> bool:
    """Whether every element at channel (dimension 1) ``c`` of the chain's result is the element at
    channel ``c`` of ``source``. (Real tensors, whatever mode the caller traces in.)"""
    fake = source.meta["val"]
    channels = fake.shape[1]
    with real_tensor_math():
        index = torch.empty_strided(tuple(fake.shape), tuple(fake.stride()), dtype=torch.int32)
        index.copy_(torch.arange(channels, dtype=torch.int32).reshape(1, channels, *([1] * (fake.dim() - 2))).expand(fake.shape))
        moved = replay(chain, index)
        if moved.dim() < 2 or moved.shape[1] != channels:
            return False
        expected = torch.arange(channels, dtype=torch.int32).reshape(1, channels, *([1] * (moved.dim() - 2)))
        return bool((moved == expected).all())
