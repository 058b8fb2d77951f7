"""A fold's arithmetic recorded as the aten calls it makes on fake values, replayed on real ones.

With the module state as data, a fold runs once per set of weights, in a prologue, eagerly. Tracing
its arithmetic into the graph with ``make_fx`` cost a trace per fold in every compile (warm starts
included) for ops that run once; and rerunning the rule's Python later would read graph nodes
the rewrite has since erased. The tape is taken during the fold's evaluation on fake values, which
the rewrite needs anyway, and holds only aten calls, constants and which value each reads.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .._torch_private import fake_tensors
from ..runtime import _torch_runtime, prologue


class NotRecordable(RuntimeError):
    """A function ``traced`` cannot turn into a graph (it reads a tensor constant)."""


class Tape(TorchDispatchMode):
    """While active, records every aten call; ``add_input`` names the values the calls may read."""

    def __init__(self) -> None:
        super().__init__()
        self._slot: dict[int, int] = {}  # id of a value seen: its slot
        self._alive: list[torch.Tensor] = []  # every value seen, so no id is reused meanwhile
        self.calls: prologue.Calls = []

    def add_input(self, value: torch.Tensor) -> int:
        """The slot of a value the calls may read, given at replay."""
        return self._slot[id(value)] if id(value) in self._slot else self._new_slot(value)

    def slot(self, value: torch.Tensor) -> int:
        if id(value) not in self._slot:
            raise RuntimeError("bnfuse: a fold computed with a tensor that is neither its input nor its own result")
        return self._slot[id(value)]

    def value(self, slot: int) -> torch.Tensor:
        """The fake value a slot held while recording (before ``release``)."""
        return self._alive[slot]

    def _new_slot(self, value: torch.Tensor) -> int:
        self._slot[id(value)] = len(self._alive)
        self._alive.append(value)
        return len(self._alive) - 1

    def _read(self, value: Any) -> tuple[str, Any]:
        if not isinstance(value, torch.Tensor):
            return ("value", value)
        if id(value) in self._slot or isinstance(value, torch._subclasses.FakeTensor):
            return ("slot", self.slot(value))
        with _torch_runtime.real_tensor_math():  # a real constant (a graph's constant, a Python number as a tensor)
            return ("value", value.detach().clone())

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        reads = [self._read(leaf) for leaf in leaves]
        outputs = [self._new_slot(value) if isinstance(value, torch.Tensor) else None for value in pytree.tree_leaves(result)]
        self.calls.append((func, reads, spec, outputs))
        return result

    def replay(self, inputs: dict[int, torch.Tensor], wanted: Sequence[int]) -> list[torch.Tensor]:
        """The values in slots ``wanted``, the calls run on ``inputs`` (input slot: its real value)."""
        return prologue.replay(self.calls, inputs, wanted)

    def release(self) -> None:
        """Drop the fake values recorded (the tape keeps only their slots)."""
        self._alive.clear()
        self._slot.clear()


def traced(fn: Callable[..., Any], args: Sequence[Any]) -> torch.fx.GraphModule:
    """``fn`` run on fake ``args``, as a graph of the aten calls it made (each with its fake value):
    a cheap ``trace_fn`` for a rule's replacement in an inference graph whose state stays data,
    where AOTAutograd traces the whole graph again and no pre-dispatch form is needed."""
    graph, tape = torch.fx.Graph(), Tape()
    nodes: dict[int, torch.fx.Node] = {}
    placeholders = []
    for i, value in enumerate(args):
        placeholders.append(graph.placeholder(f"arg{i}"))
        fake_tensors.set_value(placeholders[-1], value)
        if isinstance(value, torch.Tensor):
            nodes[tape.add_input(value)] = placeholders[-1]
    fake_mode = next((a.fake_mode for a in args if isinstance(a, torch._subclasses.FakeTensor)), None)
    with fake_mode or contextlib.nullcontext(), tape:
        result = fn(*args)
    for func, reads, spec, outputs in tape.calls:
        if any(kind == "value" and isinstance(x, torch.Tensor) for kind, x in reads):
            raise NotRecordable("a replacement reads a tensor constant")
        call_args, call_kwargs = pytree.tree_unflatten([nodes[x] if kind == "slot" else x for kind, x in reads], spec)
        node = graph.call_function(func, tuple(call_args), call_kwargs)
        if len(outputs) == 1 and outputs[0] is not None and isinstance(tape.value(outputs[0]), torch.Tensor) \
                and not isinstance(func._schema.returns[0].type, torch.ListType) and len(func._schema.returns) == 1:
            fake_tensors.set_value(node, tape.value(outputs[0]))
            nodes[outputs[0]] = node
            continue
        node.meta["val"] = [None if slot is None else tape.value(slot) for slot in outputs]
        for index, slot in enumerate(outputs):
            if slot is not None:
                nodes[slot] = graph.call_function(operator.getitem, (node, index))
                fake_tensors.set_value(nodes[slot], tape.value(slot))
    graph.output(pytree.tree_map(lambda v: nodes[tape.slot(v)] if isinstance(v, torch.Tensor) else v, result))
    tape.release()
    return torch.fx.GraphModule(torch.nn.Module(), graph)
