"""Which inputs an aten graph writes, and whether its outputs alias its inputs: read off operator
schemas and fake values, through views, checkpointed regions and shared regions. The per-step fold never reads
state a graph writes, and a graph whose outputs alias its inputs is not compiled as data."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from ._torch_private import ops


def written_placeholders(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The inputs an aten graph that is not functionalised writes, data or metadata, directly or
    through a view: each argument an op's schema marks as written, followed back through views."""
    written = set()
    for node in graph.nodes:
        if (region := ops.body_and_operands(node)) is not None:  # what its body writes
            body = graph.owning_module.get_submodule(region[0])
            inner = written_placeholders(body.graph)
            for placeholder, arg in zip(body.graph.find_nodes(op="placeholder"), region[1], strict=True):
                base = _view_base(arg)
                if placeholder in inner and isinstance(base, torch.fx.Node) and base.op == "placeholder":
                    written.add(base)
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for position, argument in enumerate(node.target._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.kwargs[argument.name] if argument.name in node.kwargs else (
                node.args[position] if position < len(node.args) else None)
            for arg in value if isinstance(value, (list, tuple)) else [value]:
                base = _view_base(arg)
                if isinstance(base, torch.fx.Node) and base.op == "placeholder":
                    written.add(base)
    # An input that shares memory with a written one (a buffer that is a view of a weight) is
    # written too, as far as anything reading it knows.
    storages = {_storage_of(node) for node in written} - {None}
    return written | {node for node in graph.find_nodes(op="placeholder") if _storage_of(node) in storages}


def outputs_alias_inputs(graph: torch.fx.Graph) -> bool:
    """Whether a functional aten graph returns an input, a view of one, or memory an input shares."""
    inputs = {_storage_of(node) for node in graph.find_nodes(op="placeholder")} - {None}
    outputs = [arg for arg in pytree.tree_leaves(graph.find_nodes(op="output")[0].args) if isinstance(arg, torch.fx.Node)]
    return any(_view_base(arg).op == "placeholder" or _storage_of(arg) in inputs for arg in outputs)


def _storage_of(node: torch.fx.Node) -> Any:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(value.untyped_storage())


def _view_base(value: Any) -> Any:
    """What a chain of view ops (outputs aliasing their first argument) starts from."""
    while isinstance(value, torch.fx.Node) and value.op == "call_function" and isinstance(value.target, torch._ops.OpOverload):
        returns = value.target._schema.returns
        if not returns or returns[0].alias_info is None or not value.args:
            break
        value = value.args[0]
    return value
