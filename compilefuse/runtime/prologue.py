"""A prologue as data: what a graph compiled with the weights as data reads from module state
(folded weights and biases, oneDNN-packed convolution weights), as a list of calls run eagerly on
the real tensors of each set of weights, with every fold's value checks.

It holds aten operators, numbers and tensor constants, never a graph or a rule, and imports no
compiler: the backend builds one from a split graph (``fold_prologue``) and runs it at every
refit; a refittable package keeps it as bytes (``to_bytes``), so a replica refits without
importing Dynamo or Inductor.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..value_checks import Judge, Judged, value_refusal
from ._torch_runtime import is_operator_overload, operator_named, pack_conv_weight, pack_linear_weight, real_tensor_math
from .heap import return_freed_memory

#: The aten calls of a fold's arithmetic (``passes.tape.Tape``): (op, flattened arguments, each
#: ``("slot", i)`` or ``("value", x)``, their pytree spec, output slots (None: not a tensor)).
Calls = list[tuple[Any, list[tuple[str, Any]], Any, list["int | None"]]]


class RefitRefused(Exception):
    """A set of weights the folds cannot take exactly (a non-finite folded weight, an overflow)."""


def replay(calls: Calls, inputs: dict[int, torch.Tensor], wanted: Sequence[int]) -> list[torch.Tensor]:
    """The values in slots ``wanted``, the calls run on ``inputs`` (input slot: its real value)."""
    values: dict[int, Any] = dict(inputs)
    with real_tensor_math(), torch.no_grad():
        for func, reads, spec, outputs in calls:
            args, kwargs = pytree.tree_unflatten([values[x] if kind == "slot" else x for kind, x in reads], spec)
            for slot, value in zip(outputs, pytree.tree_leaves(func(*args, **kwargs)), strict=True):
                if slot is not None:
                    values[slot] = value
    return [values[slot] for slot in wanted]


@dataclasses.dataclass(frozen=True)
class JudgedSlots:
    """Where on a fold's tape the values its check reads are (``value_checks.Judged``)."""

    scale: int
    weight: int | None
    statistics: tuple[int, int, int | None] | None
    dtype: torch.dtype

    def flat(self) -> list[int | None]:
        return [self.scale, self.weight, *(self.statistics or (None, None, None))]

    def judged(self, values: list[torch.Tensor | None]) -> Judged:
        """The values at ``flat()``'s slots, as what the check reads."""
        scale, weight, mean, var, beta = values
        assert scale is not None
        return Judged(scale, weight, None if self.statistics is None else (mean, var, beta), self.dtype)  # type: ignore[arg-type]


class Fold:
    """One fold as a call: its arithmetic (float64, rounded once) replayed from the aten calls it
    made on fake values, on the real values of what it read, then its value checks; the folded
    weight and bias, or ``RefitRefused``. A graph holds it as a call only until the prologue is
    split out (no compiled graph holds it)."""

    __name__ = "bnfuse_fold"  # how a graph's code names it

    def __init__(self, calls: Calls, slots: Sequence[int | None], outputs: tuple[int, int],
                 judge: Judge | None = None, judged: JudgedSlots | None = None) -> None:
        self.calls, self.slots, self.outputs = calls, tuple(slots), outputs
        self.judge, self.judged = judge, judged if judge is not None else None

    def __call__(self, *values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {slot: value for slot, value in zip(self.slots, values, strict=True) if slot is not None}
        judged_slots = [] if self.judged is None else self.judged.flat()
        wanted = [*self.outputs, *(slot for slot in judged_slots if slot is not None)]
        found = iter(replay(self.calls, inputs, wanted))
        weight, bias = next(found), next(found)
        judged = None
        if self.judged is not None:
            picked = [None if slot is None else next(found) for slot in judged_slots]
            judged = self.judged.judged(picked)
        with real_tensor_math():
            reason = value_refusal(weight, bias, self.judge, judged)
        if reason is not None:
            raise RefitRefused(reason)
        return weight, bias


@dataclasses.dataclass(frozen=True)
class Ref:
    """An argument that is a value the prologue read or computed (its index)."""

    index: int


@dataclasses.dataclass(frozen=True)
class Step:
    """One call: an aten operator, ``operator.getitem`` or a ``Fold``, on ``Ref``s and constants."""

    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Packed:
    """An output that is a convolution weight (value ``source``) packed for oneDNN."""

    source: int
    #: padding, (transposed: output padding,) stride, dilation, groups, input size
    hyper: tuple[Any, ...]

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        return pack_conv_weight(value, *self.hyper)


@dataclasses.dataclass(frozen=True)
class PackedLinear:
    """An output that is a matrix product's right operand (value ``source``: a linear layer's
    weight, transposed) packed for oneDNN's linear with ``rows`` rows on the left."""

    source: int
    rows: int

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        return pack_linear_weight(value, self.rows)


class Prologue:
    """Values 0 .. len(reads)-1 are the graph inputs ``reads`` names, in that order; value
    len(reads) + k is what step k computes. The outputs are values, or values packed for oneDNN
    (``Packed``, ``PackedLinear``)."""

    def __init__(self, reads: Sequence[int], steps: Sequence[Step],
                 outputs: Sequence[int | Packed | PackedLinear]) -> None:
        self._reads, self._steps, self._outputs = tuple(reads), tuple(steps), tuple(outputs)
        needed = {o if isinstance(o, int) else o.source for o in outputs}
        #: After which step each value is read for the last time (then dropped: the float64
        #: intermediates of a large model would otherwise all be held at once).
        last: dict[int, int] = {}
        for k, step in enumerate(self._steps):
            for ref in _refs((step.args, step.kwargs)):
                last[ref.index] = k
        self._last_use: dict[int, list[int]] = {}
        for index, k in last.items():
            if index not in needed:
                self._last_use.setdefault(k, []).append(index)

    @property
    def reads(self) -> tuple[int, ...]:
        """The graph inputs (Dynamo's indices) the prologue reads: the tensors the freshness check watches."""
        return tuple(sorted(self._reads))

    @property
    def outputs(self) -> int:
        return len(self._outputs)

    def __call__(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """The main graph's prologue inputs for these graph inputs; ``RefitRefused`` if a fold's
        checks fail on them."""
        values: list[Any] = [inputs[i] for i in self._reads] + [None] * len(self._steps)
        first = len(self._reads)
        with torch.no_grad():
            for k, step in enumerate(self._steps):
                values[first + k] = step.target(*_resolved(step.args, values), **_resolved(step.kwargs, values))
                for done in self._last_use.get(k, ()):
                    values[done] = None
            outputs = [values[o] if isinstance(o, int) else o(values[o.source]) for o in self._outputs]
        values.clear()
        return_freed_memory()
        return outputs

    def to_bytes(self) -> bytes:
        """The prologue as bytes (``from_bytes``): operators by name, tensors with their data."""
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump((self._reads, self._steps, self._outputs))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Prologue:
        """A prologue ``to_bytes`` wrote (a package's: trusted as its compiled code is)."""
        reads, steps, outputs = pickle.loads(data)
        return cls(reads, steps, outputs)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if is_operator_overload(obj):
            return operator_named, (obj.name(),)
        return NotImplemented


def _refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in _refs(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in _refs(item)]
    return []


def _resolved(value: Any, values: list[Any]) -> Any:
    if isinstance(value, Ref):
        return values[value.index]
    if isinstance(value, (list, tuple)):
        return type(value)(_resolved(item, values) for item in value)
    if isinstance(value, dict):
        return {key: _resolved(item, values) for key, item in value.items()}
    return value
