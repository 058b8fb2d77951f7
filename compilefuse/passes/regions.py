"""A shared region's body (or ``cond``'s two), copied for one call site so that the BNs in it can fold there.

An ``invoke_subgraph`` region (``torch.compiler.nested_compile_region``) is one body that each call
site runs on its own operands: the module state of the block that call stands for. A fold bakes in
one call site's values, so the call site gets a private copy of the body. The frozen values the copy
reads are that call's operands. Each constant a fold adds becomes a new operand (a constant of the
graph around it). The call then runs the copy under an identifier of its own, so Inductor compiles
it apart. A call site where nothing folds keeps the shared body. A ``cond`` call is one call site
with two bodies on the same operands: a constant either branch's fold adds is passed to both.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Any

import torch
import torch.fx

from .._torch_private import fake_tensors, inductor, ops

#: The name (plus a number) of each call site's copy of a region body.
COPY_PREFIX = "_bnfuse_region"


class CallSite:
    """One call of a shared region or a ``cond``, with a copy of each body it may run to fold into
    (``cond``: two, on the same operands)."""

    def __init__(self, call: torch.fx.Node, frozen: dict[torch.fx.Node, torch.Tensor]) -> None:
        """``frozen``: the values of the frozen nodes of the graph around ``call`` (real ones; fake
        ones for a per-step fold)."""
        self.call, self.outer = call, call.graph
        if ops.is_cond_call(call):
            self.old_bodies, operands = ops.cond_parts(call)
            self.identifier = None
        else:
            body, self.identifier, operands = ops.shared_region_parts(call)
            self.old_bodies = [body]
        self.bodies = [_copy(getattr(self.outer.owning_module, body.target)) for body in self.old_bodies]
        if self.identifier is not None:
            _reroot(self.bodies[0].graph, call)
        self.operands: list[Any] = list(operands)
        self.placeholders = [list(body.graph.find_nodes(op="placeholder")) for body in self.bodies]
        self.frozen = [self.passed(frozen, i) for i in range(len(self.bodies))]

    def passed(self, values: dict[torch.fx.Node, Any], body: int = 0) -> dict[torch.fx.Node, Any]:
        """``values`` (nodes of the graph around the call) as the placeholders of the ``body``-th
        copy they are passed to."""
        return {node: values[operand] for node, operand in zip(self.placeholders[body], self.operands, strict=False)
                if isinstance(operand, torch.fx.Node) and operand in values}

    def add_constant(self, value: torch.Tensor, like: torch.fx.Node, name: str) -> torch.fx.Node:
        """``value`` as a constant ``name`` of the graph around the call, passed into every copy:
        the placeholder for it in ``like``'s copy (with ``like``'s fake mode)."""
        inductor.mark_frozen(value)
        self.outer.owning_module.register_buffer(name, value)
        fake = fake_tensors.fake_tensor_of(like, value)
        with self.outer.inserting_before(self.call):
            constant = self.outer.get_attr(name)
        constant.meta["val"] = fake
        found = None
        for body, placeholders, frozen in zip(self.bodies, self.placeholders, self.frozen, strict=True):
            with body.graph.inserting_after(placeholders[-1]):
                # numbered within the copy: the same in every call's copy that folds the same
                placeholder = body.graph.placeholder(f"bnfuse_folded_{len(placeholders)}")
            placeholder.meta["val"] = fake
            placeholders.append(placeholder)
            frozen[placeholder] = value
            found = placeholder if body.graph is like.graph else found
        self.operands.append(constant)
        if found is None:
            raise RuntimeError("bnfuse: a fold in a region's body is in none of the call's copies")
        return found

    def install(self, copies: dict[Hashable, str]) -> None:
        """Make the call run the folded copies, without the operands none of them reads. ``copies``:
        the copies installed so far, by what their code and inputs are; a call site whose copy is
        the same as one of them (the same folds, its own constants) calls that one, so that
        Inductor compiles a repeated block's folded body once, as it compiled the shared one."""
        read = [any(placeholders[i].users for placeholders in self.placeholders) for i in range(len(self.operands))]
        for body, placeholders in zip(self.bodies, self.placeholders, strict=True):
            for node, kept in zip(placeholders, read, strict=True):
                if not kept:
                    body.graph.erase_node(node)
            body.recompile()
        gm = self.outer.owning_module
        attrs = []
        for body, old in zip(self.bodies, self.old_bodies, strict=True):
            key = (body.code, tuple(_layout(node.meta.get("val"))
                                    for node in body.graph.find_nodes(op="placeholder")))
            if key not in copies:
                copies[key] = free_name(gm, COPY_PREFIX)
                gm.register_module(copies[key], body)
            with self.outer.inserting_before(self.call):
                attrs.append(self.outer.get_attr(copies[key]))
            attrs[-1].meta.update(old.meta)
        operands = [operand for operand, kept in zip(self.operands, read, strict=True) if kept]
        if self.identifier is None:
            ops.set_cond_parts(self.call, attrs, operands)
        else:
            ops.set_shared_region_parts(self.call, attrs[0], f"{self.identifier}{attrs[0].target}", operands)
        for node in (*self.old_bodies, *self.operands):
            if isinstance(node, torch.fx.Node) and not node.users and node.op == "get_attr":
                self.outer.erase_node(node)


def _layout(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.stride(), value.dtype, value.device
    return repr(value)


def free_name(gm: torch.nn.Module, prefix: str) -> str:
    """``prefix`` and the first number no attribute of ``gm`` has taken."""
    return next(f"{prefix}{i}" for i in itertools.count() if not hasattr(gm, f"{prefix}{i}"))


def _copy(body: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    nodes: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(body.graph, nodes)
    old_output = next(iter(body.graph.find_nodes(op="output")))
    graph.output(output).meta.update(old_output.meta)
    return torch.fx.GraphModule(body, graph)


def _reroot(graph: torch.fx.Graph, call: torch.fx.Node) -> None:
    """Name the copy's nodes after the call's module: the body was traced in the first call's (its
    ``nn_module_stack`` entries start there), and reports name each BN by its module."""
    call_stack = call.meta.get("nn_module_stack")
    stacks = [node.meta["nn_module_stack"] for node in graph.nodes if node.meta.get("nn_module_stack")]
    if not call_stack or not stacks:
        return
    call_path, call_type = list(call_stack.values())[-1]
    root_path, root_type = next(iter(stacks[0].values()))
    if root_type != call_type:  # a region that is not a module's forward: named as traced
        return
    for node in graph.nodes:
        if stack := node.meta.get("nn_module_stack"):
            node.meta["nn_module_stack"] = {
                key: (call_path + path[len(root_path):] if path.startswith(root_path) else path, kind)
                for key, (path, kind) in stack.items()
            }
