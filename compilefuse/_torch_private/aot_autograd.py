"""AOTAutograd: what it knows of the compile in progress (lifted parameters, written inputs), the
subgraphs it traced there, and the tag its partitioner reads to recompute a value in the backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._functorch._aot_autograd.schemas import MutationType

from . import gates


def aot_parameters() -> tuple[list[Any], set[int]] | None:
    """Inside a freezing compile: the real values AOTAutograd lifted as the graph's leading inputs
    (the graph module's attributes, in order), and the indices of those freezing will *not* turn
    into constants (mutated in the graph, or returned aliased). None outside such a compile."""
    context = torch._guards.TracingContext.try_get()
    if context is None or context.params_flat is None or context.fw_metadata is None:
        return None
    params = list(context.params_flat_unwrap_subclasses or context.params_flat)
    written, aliased = aot_input_writes()
    return params, {i for i in written | aliased if i < len(params)}


def is_region_body(graph: torch.fx.Graph) -> bool | None:
    """Whether AOTAutograd traced ``graph`` as a higher-order op's body (its inputs are the op's
    operands) rather than at top level (the module state, then the user's inputs). Inductor runs
    the joint-graph passes on the bodies first, then on the graph that calls them. The graph traced
    at top level describes each input it takes; a body, none. None where this torch describes none."""
    if not gates.AOT_DESCRIBES_INPUTS:
        return None
    placeholders = list(graph.find_nodes(op="placeholder"))
    return bool(placeholders) and all(node.meta.get("desc") is None for node in placeholders)


def forget_traced_subgraphs() -> None:
    """Drop what tracing higher-order ops' bodies cached in the compile in progress (an
    ``invoke_subgraph`` body is traced once per name and reused), so that compiling the same graph
    again traces them afresh. A body traced under bnfuse's decompositions (inference BN kept as an
    op) and reused by the plain Inductor compile after a failure reached Inductor's lowering with an
    op plain Inductor decomposes, and that compile failed too. No-op outside a compile."""
    context = torch._guards.TracingContext.try_get()
    cache = getattr(context, "hop_dispatch_set_cache", None)
    if cache is not None:
        context.hop_dispatch_set_cache = type(cache)()


def aot_input_writes() -> tuple[set[int], set[int]]:
    """Inside an AOTAutograd compile: the positions of the inputs (AOTAutograd's order: the lifted
    attributes, then the graph's own inputs) that the graph writes, data or metadata, and of those
    an output is a view of. Empty outside a compile."""
    context = torch._guards.TracingContext.try_get()
    meta = None if context is None else context.fw_metadata
    if meta is None:
        return set(), set()
    written = {i for i, info in enumerate(meta.input_info) if info.mutation_type != MutationType.NOT_MUTATED}
    aliased = {out.base_idx for out in meta.output_info if out.base_idx is not None}
    return written, aliased


def recompute_in_backward(node: torch.fx.Node) -> None:
    """Ask AOTAutograd's partitioner to recompute ``node`` in the backward rather than save it
    (the tag selective activation checkpointing uses; the tracing keeps it on what the node
    becomes). A per-step fold's weight is elementwise arithmetic on the weight itself, which
    the backward has anyway: saving the folded copy would cost a weight-sized tensor per conv."""
    from torch.utils.checkpoint import CheckpointPolicy

    node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
    node.meta["ac_graph_id"] = 0
