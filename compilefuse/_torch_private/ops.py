"""What an operator is and does: an operator rather than a Python function, one that writes
nothing, one that draws random numbers."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx


def is_operator(target: Any) -> bool:
    """An operator (ATen or custom, an overload or its packet), as opposed to a Python function."""
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def is_pure_operator(target: Any) -> bool:
    """An aten operator that writes none of its inputs and draws no random numbers (its output is a
    function of its inputs alone)."""
    return (isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags)


def draws_random_numbers(graph: torch.fx.Graph) -> bool:
    """Whether an aten graph calls an op that draws from the random number generator."""
    return any(
        isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
        for node in graph.nodes
        if node.op == "call_function"
    )
