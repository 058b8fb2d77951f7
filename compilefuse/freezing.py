"""Module state as compile-time constants: lifting it for Inductor's freezing, and reading its values.

Dynamo hands a custom backend parameters and buffers as graph inputs; Inductor's freezing only
freezes graph attributes. ``lift_module_state`` turns one into the other. Inside the freezing
compile, ``frozen_values`` pairs each placeholder freezing will turn into a constant with its real
tensor, and checks the pairing before any rule reads a value from it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from . import _torch_private as tp


def constants_as_buffers() -> dict[str, Any]:
    """Inductor patches that keep every frozen constant a buffer. Inductor inlines a 1-D constant of
    at most 8 elements into the kernels that read it; a folded bias that an extern convolution reads
    is then rebuilt into a buffer on every call, a kernel and an allocation each (mixnet_style's
    8-channel depthwise splits, any folded conv of at most 8 channels). As buffers, folded constants
    cost nothing per call."""
    return {"always_keep_tensor_constants": True} if "always_keep_tensor_constants" in tp.inductor_config_keys() else {}


class FrozenValuesMismatch(RuntimeError):
    """The real values torch hands the pass do not line up with the graph's placeholders."""


def lift_module_state(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[torch.fx.GraphModule, list[int]]:
    """A copy of ``gm`` in which every parameter and buffer is a graph attribute (registered with
    its Dynamo source, as AOTAutograd requires), and the indices of the inputs the copy still
    takes. The caller's graph is left untouched: Dynamo derives the compiled call's arguments from it.
    """
    graph = torch.fx.Graph()
    old_to_new: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, old_to_new))
    for old, new in old_to_new.items():
        if old.op == "placeholder":
            tp.set_dynamo_source(new, tp.dynamo_source(old))
    lifted = torch.fx.GraphModule(gm, graph)
    lifted.meta = copy.copy(gm.meta)
    sources = tp.param_sources(gm)

    kept: list[int] = []
    placeholders = list(graph.find_nodes(op="placeholder"))
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if not (isinstance(value, torch.Tensor) and tp.is_module_state(node)):
            kept.append(index)
            continue
        name = f"_bnfuse_state_{index}"
        if isinstance(value, torch.nn.Parameter):
            lifted.register_parameter(name, value)
        else:
            lifted.register_buffer(name, value)
        sources[name] = tp.dynamo_source(node)
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    tp.set_param_sources(lifted, sources)
    lifted.recompile()
    return lifted, kept


def state_in_aot_order(lifted: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The lifted module's state in the order AOTAutograd lifts it: parameters, then buffers."""
    return [
        *dict(lifted.named_parameters(remove_duplicate=False)).values(),
        *dict(lifted.named_buffers(remove_duplicate=False)).values(),
    ]


def frozen_values(graph: torch.fx.Graph, expected: Sequence[torch.Tensor]) -> dict[torch.fx.Node, torch.Tensor]:
    """Real values of the placeholders that freezing will turn into constants (empty outside a
    freezing compile).

    AOTAutograd puts the module state first among the placeholders, in the order of the values it
    keeps in its tracing context. Nothing checks that pairing upstream, so it is checked here: the
    values are exactly ``expected`` (the state bnfuse lifted, in AOTAutograd's order: identity, so
    two same-shaped statistics swapped are caught), one per leading placeholder, each with its
    fake tensor's shape, dtype and device. A mismatch raises ``FrozenValuesMismatch``: a value
    paired with the wrong node would fold silently wrong, so the pass then folds nothing.
    """
    found = tp.aot_parameters()
    if found is None:
        return {}
    params, not_frozen = found
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(params) != len(expected) or len(params) > len(placeholders):
        raise FrozenValuesMismatch(
            f"{len(params)} frozen values for {len(expected)} lifted tensors and {len(placeholders)} graph inputs"
        )
    moved = next((i for i, (a, b) in enumerate(zip(params, expected, strict=True)) if a is not b), None)
    if moved is not None:
        raise FrozenValuesMismatch(f"frozen value {moved} is not the tensor bnfuse lifted at that position")
    values = {}
    for index, (node, value) in enumerate(zip(placeholders, params, strict=False)):  # params lead
        if not isinstance(value, torch.Tensor):
            continue
        mismatch = _mismatch(node, value)
        if mismatch:
            raise FrozenValuesMismatch(f"frozen value {index} does not match graph input {node.name}: {mismatch}")
        if index not in not_frozen:
            values[node] = value
    return values


def _mismatch(node: torch.fx.Node, value: torch.Tensor) -> str | None:
    fake = node.meta.get("val")
    if not isinstance(fake, torch.Tensor):
        return "the graph input is not a tensor"
    shape_differs = fake.dim() != value.dim() or any(
        isinstance(e, int) and e != a for e, a in zip(fake.shape, value.shape, strict=True)  # symbolic sizes pass
    )
    if shape_differs:
        return f"shape {tuple(value.shape)} where the graph has {tuple(fake.shape)}"
    for what in ("dtype", "device"):
        if getattr(fake, what) != getattr(value, what):
            return f"{what} {getattr(value, what)} where the graph has {getattr(fake, what)}"
    return None
