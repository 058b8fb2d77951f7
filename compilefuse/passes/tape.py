"""A fold's arithmetic recorded as the aten calls it makes on fake values, replayed on real ones.

With the module state as data, a fold runs once per set of weights, in a prologue, eagerly. Tracing
its arithmetic into the graph with ``make_fx`` cost about 20 ms a fold in every compile (warm starts
included) for ops that run once; and rerunning the rule's Python later would read graph nodes
the rewrite has since erased. The tape is taken during the fold's evaluation on fake values, which
the rewrite needs anyway, and holds only aten calls, constants and which value each reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _torch_private as tp


class Tape(TorchDispatchMode):
    """While active, records every aten call; ``add_input`` names the values the calls may read."""

    def __init__(self) -> None:
        super().__init__()
        self._slot: dict[int, int] = {}  # id of a value seen: its slot
        self._alive: list[torch.Tensor] = []  # every value seen, so no id is reused meanwhile
        #: (op, flattened arguments: ("slot", i) or ("value", x), their spec, output slots (None: not a tensor))
        self.calls: list[tuple[Any, list[tuple[str, Any]], Any, list[int | None]]] = []

    def add_input(self, value: torch.Tensor) -> int:
        """The slot of a value the calls may read, given at replay."""
        return self._slot[id(value)] if id(value) in self._slot else self._new_slot(value)

    def slot(self, value: torch.Tensor) -> int:
        if id(value) not in self._slot:
            raise RuntimeError("bnfuse: a fold computed with a tensor that is neither its input nor its own result")
        return self._slot[id(value)]

    def _new_slot(self, value: torch.Tensor) -> int:
        self._slot[id(value)] = len(self._alive)
        self._alive.append(value)
        return len(self._alive) - 1

    def _read(self, value: Any) -> tuple[str, Any]:
        if not isinstance(value, torch.Tensor):
            return ("value", value)
        if id(value) in self._slot or isinstance(value, torch._subclasses.FakeTensor):
            return ("slot", self.slot(value))
        with tp.real_tensor_math():  # a real constant (a graph's constant, a Python number as a tensor)
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
        values: dict[int, Any] = dict(inputs)
        with tp.real_tensor_math(), torch.no_grad():
            for func, reads, spec, outputs in self.calls:
                args, kwargs = pytree.tree_unflatten([values[x] if kind == "slot" else x for kind, x in reads], spec)
                for slot, value in zip(outputs, pytree.tree_leaves(func(*args, **kwargs)), strict=True):
                    if slot is not None:
                        values[slot] = value
        return [values[slot] for slot in wanted]

    def release(self) -> None:
        """Drop the fake values recorded (the tape keeps only their slots)."""
        self._alive.clear()
        self._slot.clear()
