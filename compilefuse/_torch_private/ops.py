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


#: Ops tagged as drawing random numbers that draw none when their ``train`` argument is False: an
#: eval-mode ``nn.Dropout`` stays in the graphs ``torch.export`` makes (a graph before decompositions),
#: in place where the module says ``inplace=True`` (torchvision's classifiers).
_RANDOM_ONLY_IN_TRAINING = frozenset(
    {f"aten::{name}{suffix}" for name in ("dropout", "alpha_dropout", "feature_dropout", "feature_alpha_dropout")
     for suffix in ("", "_")} | {"aten::native_dropout"})


def draws_random_numbers(graph: torch.fx.Graph) -> bool:
    """Whether an aten graph calls an op that draws from the random number generator."""
    return any(_draws_random_numbers(node) for node in graph.nodes if node.op == "call_function")


def _draws_random_numbers(node: torch.fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    if target._schema.name in _RANDOM_ONLY_IN_TRAINING:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        return train is not False  # a literal False only: None (native_dropout's default) trains
    return True


def region_bodies(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.GraphModule]]:
    """Each call of a higher-order op in ``graph`` that runs a body, with the bodies it runs (graph
    modules the call reads by ``get_attr``), in program order."""
    found: dict[torch.fx.Node, list[torch.fx.GraphModule]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            for arg in node.all_input_nodes:
                body = getattr(graph.owning_module, arg.target, None) if arg.op == "get_attr" else None
                if isinstance(body, torch.fx.GraphModule):
                    found.setdefault(node, []).append(body)
    return found


def _calls(node: torch.fx.Node, name: str) -> bool:
    op = getattr(torch.ops.higher_order, name, None)
    return op is not None and node.op == "call_function" and node.target is op


def is_shared_region_call(node: torch.fx.Node) -> bool:
    """A call of an ``invoke_subgraph`` region (``torch.compiler.nested_compile_region``): one body,
    traced once, that each call runs on its own operands."""
    return _calls(node, "invoke_subgraph")


def is_cond_call(node: torch.fx.Node) -> bool:
    """A call of ``torch.cond``: one of two bodies, on the same operands."""
    return _calls(node, "cond")


def shared_region_parts(call: torch.fx.Node) -> tuple[torch.fx.Node, str, list[Any]]:
    """An ``invoke_subgraph`` call's body (its ``get_attr`` node), identifier and operands."""
    body, identifier, *operands = call.args
    return body, identifier, operands


def cond_parts(call: torch.fx.Node) -> tuple[list[torch.fx.Node], list[Any]]:
    """A ``cond`` call's two bodies (their ``get_attr`` nodes) and the operands both take."""
    _, true_body, false_body, operands = call.args
    return [true_body, false_body], list(operands)


def set_cond_parts(call: torch.fx.Node, bodies: list[torch.fx.Node], operands: list[Any]) -> None:
    """Point a ``cond`` call at other bodies and operands."""
    call.args = (call.args[0], *bodies, tuple(operands))


def set_shared_region_parts(call: torch.fx.Node, body: torch.fx.Node, identifier: str, operands: list[Any]) -> None:
    """Point an ``invoke_subgraph`` call at another body, identifier and operands. The eager values
    its lowering would read first are dropped: it then reads each operand's fake value."""
    call.args = (body, identifier, *operands)
    call.meta.pop("eager_input_vals", None)


def body_and_operands(node: torch.fx.Node) -> tuple[str, list[Any]] | None:
    """For a call that runs a body once on its operands (activation checkpointing, a shared
    region): the body's attribute name and the operands, one per placeholder of the body. None
    for any other node."""
    from torch._higher_order_ops.wrap import tag_activation_checkpoint

    if node.op == "call_function" and node.target is tag_activation_checkpoint:
        return node.args[0].target, list(node.args[1:])
    if is_shared_region_call(node):
        body, _, operands = shared_region_parts(node)
        return body.target, operands
    return None
