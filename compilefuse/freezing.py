"""Module state as compile-time constants: lifting it for Inductor's freezing, and reading its values.

Dynamo hands a custom backend parameters and buffers as graph inputs; Inductor's freezing only
freezes graph attributes. ``lift_module_state`` turns one into the other, except the state the graph
itself writes (or returns a view of): that stays a live input, read afresh on every call. Which
state that is, AOTAutograd says inside the compile: ``frozen_values`` raises ``FrozenStateWritten``
when lifted state is written, and the compile starts again with it live. ``frozen_values`` also
pairs each placeholder freezing will turn into a constant with its real tensor, and checks the
pairing before any rule reads a value from it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx

from ._torch_private import aot_autograd, dynamo, inductor, ops, pre_dispatch
from .runtime import _torch_runtime


def constants_as_buffers() -> dict[str, Any]:
    """Inductor patches that keep every frozen constant a buffer. Inductor inlines a 1-D constant of
    at most 8 elements into the kernels that read it; a folded bias that an extern convolution reads
    is then rebuilt into a buffer on every call, a kernel and an allocation each (mixnet_style's
    8-channel depthwise splits, any folded conv of at most 8 channels). As buffers, folded constants
    cost nothing per call."""
    return {"always_keep_tensor_constants": True} if "always_keep_tensor_constants" in inductor.inductor_config_keys() else {}


class FrozenValuesMismatch(RuntimeError):
    """The real values torch hands the pass do not line up with the graph's placeholders."""


class FrozenStateWritten(Exception):
    """The graph writes lifted state, or returns a view of it: that state must be a live input.
    Raised inside the compile, before anything is folded; ``tensors`` are the lifted tensors."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__(f"the graph writes {len(tensors)} lifted tensor(s)")
        self.tensors = list(tensors)


class UnprovableWrite(Exception):
    """A tensor the graph writes may share memory with one that would be frozen: bnfuse cannot prove
    the write leaves the frozen value alone, so the graph is not folded. Indices are graph inputs."""

    def __init__(self, written: int, frozen: int) -> None:
        super().__init__(f"graph input {written} is written and may alias frozen input {frozen}")
        self.written, self.frozen = written, frozen


def module_state(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    """The indices of the inputs that are module state (what ``lift_module_state`` may lift)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return [
        i for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True))
        if isinstance(value, torch.Tensor) and dynamo.is_module_state(node)
    ]


def attribute(gm: torch.fx.GraphModule, target: str) -> Any:
    """The value a ``get_attr`` node of ``gm`` reads (``target``: a dotted path under it)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def read_only_state(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], written: Collection[int]) -> list[int]:
    """The module state a training graph's per-step folds may read: every parameter and buffer it
    does not write. Nothing there is a constant (state that requires grad changes every step, and
    running statistics with ``load_state_dict``), so each fold reads it at every step; state the
    graph writes would be read at the wrong point of the step, so no fold reads it."""
    written = set(written)
    return [i for i in module_state(gm, example_inputs) if i not in written]


def check_written_state_apart(written: Collection[int], state: Collection[int], inputs: Sequence[Any]) -> None:
    """Raise ``UnprovableWrite`` if state the graph writes shares memory with other module state
    (a buffer that is a view of a weight, say). AOTAutograd then reports both as written, so both
    would stay live and fold nothing wrong; but which tensor a write really meant is no longer
    visible in the report, so the graph is left to plain Inductor, named in one warning."""
    for w in sorted(written):
        check_writes_spare_frozen([w], [s for s in state if s != w], inputs)


def check_writes_spare_frozen(written: Collection[int], frozen: Collection[int], inputs: Sequence[Any]) -> None:
    """Raise ``UnprovableWrite`` unless every written input (Dynamo's indices) is memory apart from
    every frozen one. Views share storage without sharing identity, so this compares the bytes each
    tensor spans."""
    for w in sorted(written):
        for f in frozen:
            if _may_overlap(inputs[w], inputs[f]):
                raise UnprovableWrite(w, f)


def _may_overlap(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.device != b.device:
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


@dataclasses.dataclass
class GraphEffects:
    """What a compiled graph does besides computing its outputs, as AOTAutograd and the aten graph
    show it: the positions (AOTAutograd's order) of the inputs it writes, and whether it draws
    random numbers. A graph with either must run exactly once per call."""

    written: set[int] = dataclasses.field(default_factory=set)
    draws_random: bool = False

    @property
    def any(self) -> bool:
        return bool(self.written) or self.draws_random

    def observe(self, graph: torch.fx.Graph) -> None:
        self.written, _ = aot_autograd.aot_input_writes()
        self.draws_random = ops.draws_random_numbers(graph)


def lift_module_state(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], live: Collection[int] = ()
) -> tuple[torch.fx.GraphModule, list[int]]:
    """A copy of ``gm`` in which every parameter and buffer, except the inputs at ``live``, is a
    graph attribute (registered with its Dynamo source, as AOTAutograd requires), and the indices
    of the inputs the copy still takes. The caller's graph is left untouched: Dynamo derives the
    compiled call's arguments from it.
    """
    graph = torch.fx.Graph()
    old_to_new: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, old_to_new))
    for old, new in old_to_new.items():
        if old.op == "placeholder":
            dynamo.set_dynamo_source(new, _torch_runtime.dynamo_source(old))
    lifted = torch.fx.GraphModule(gm, graph)
    lifted.meta = copy.copy(gm.meta)
    sources = dynamo.param_sources(gm)

    taken: list[int] = []
    lifts = set(module_state(gm, example_inputs)) - set(live)
    placeholders = list(graph.find_nodes(op="placeholder"))
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if index not in lifts:
            taken.append(index)
            continue
        name = f"_bnfuse_state_{index}"
        if isinstance(value, torch.nn.Parameter):
            lifted.register_parameter(name, value)
        else:
            lifted.register_buffer(name, value)
        sources[name] = _torch_runtime.dynamo_source(node)
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    dynamo.set_param_sources(lifted, sources)
    lifted.recompile()
    return lifted, taken


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
    paired with the wrong node would fold silently wrong, so the pass then folds nothing. Lifted
    state the graph writes or returns a view of raises ``FrozenStateWritten``: it must not be frozen.
    """
    found = aot_autograd.aot_parameters()
    if found is None:
        return {}
    params, not_frozen = found
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(params) != len(expected) or len(params) > len(placeholders):
        counts = f"{len(params)} frozen values for {len(expected)} lifted tensors and {len(placeholders)} graph inputs"
        raise _mismatch_error(graph, expected, counts)
    moved = next((i for i, (a, b) in enumerate(zip(params, expected, strict=True)) if a is not b), None)
    if moved is not None:
        raise _mismatch_error(graph, expected, f"frozen value {moved} is not the tensor bnfuse lifted at that position")
    if not_frozen:
        raise FrozenStateWritten([params[i] for i in sorted(not_frozen)])
    values = {}
    for index, (node, value) in enumerate(zip(placeholders, params, strict=False)):  # params lead
        if not isinstance(value, torch.Tensor):
            continue
        mismatch = _mismatch(node, value)
        if mismatch:
            raise _mismatch_error(graph, expected, f"frozen value {index} does not match graph input {node.name}: {mismatch}")
        values[node] = value
    return values


def _mismatch_error(graph: torch.fx.Graph, expected: Sequence[torch.Tensor], detail: str) -> FrozenValuesMismatch:
    """The mismatch, said in words where a higher-order op explains it (the detail alone says why
    only to bnfuse). On a torch that does not tell a region's body from the graph that calls it
    (``aot_autograd.is_region_body``), the body comes first and takes the state: it pairs with
    none of it, and the graph after it then has no state left to pair."""
    if aot_autograd.is_region_body(graph) is None:
        hops = pre_dispatch.higher_order_ops_in(graph)
        if hops:
            return FrozenValuesMismatch(f"the graph calls higher-order op {hops[0]}, whose operands freezing does not "
                                        f"pair with the module state ({detail})")
        if len(expected) > len(graph.find_nodes(op="placeholder")):
            return FrozenValuesMismatch(f"in the body of a higher-order op, compiled apart from the module state ({detail})")
    return FrozenValuesMismatch(detail)


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
