"""A compiled inference graph that never answers with stale weights.

Freezing bakes parameter and buffer values into the compiled code. Dynamo still passes those tensors
to the compiled graph on every call, so each call can check, for every frozen tensor, that it is
the same object at the same version counter as at compile time (an in-place update,
``load_state_dict``, an optimizer step or a BN statistics update bumps the version; a replaced
parameter is a new object). When one differs the graph is refolded and recompiled from the current
values before the call is answered; the old compiled graph and its constants are dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _torch_private as tp

log = logging.getLogger("compilefuse")

#: ``build(inputs) -> (compiled, kept)``: compile the graph for these example inputs; ``kept`` are
#: the indices of the inputs the compiled graph takes, every other tensor input is frozen.
Build = Callable[[list[Any]], tuple[Callable[..., Any], list[int]]]


class FrozenGraphCall:
    def __init__(
        self,
        build: Build,
        example_inputs: Sequence[Any],
        recompile_context: Callable[[], Any],
        input_names: Sequence[str],
    ) -> None:
        self._build = build
        self._recompile_context = recompile_context
        self._input_names = list(input_names)
        self._lock = threading.Lock()
        self._example_inputs = list(example_inputs)
        self._state = self._compile(self._example_inputs)

    def _compile(self, inputs: list[Any]) -> tuple[Any, ...]:
        """State: (compiled, kept input indices, (index, tensor, version) of each frozen input,
        the generated-code modules that hold this compile's constants)."""
        with tp.loaded_code_modules() as modules:
            compiled, kept = self._build(inputs)
        kept_set = set(kept)
        frozen = tuple(
            (i, value, value._version)
            for i, value in enumerate(inputs)
            if i not in kept_set and isinstance(value, torch.Tensor)
        )
        return compiled, tuple(kept), frozen, modules

    def __call__(self, *args: Any) -> Any:
        compiled, kept, frozen, _ = self._state
        for i, tensor, version in frozen:
            if args[i] is not tensor or args[i]._version != version:
                compiled, kept, _, _ = self._refold(args)
                break
        return compiled(*[args[i] for i in kept])

    def _refold(self, args: Sequence[Any]) -> tuple[Any, ...]:
        with self._lock:  # one thread recompiles; the others then find the new state
            changes = _changes(self._state[2], args, self._input_names)
            if not changes:
                return self._state
            log.warning(
                "bnfuse: %d frozen tensor(s) changed since compilation (%s); refolding and recompiling",
                len(changes), ", ".join(changes[:3]) + (", ..." if len(changes) > 3 else ""),
            )
            inputs = list(self._example_inputs)
            for i, _, _ in self._state[2]:
                inputs[i] = args[i]
            with self._recompile_context():
                state = self._compile(inputs)
            old_modules = self._state[3]
            self._example_inputs, self._state = inputs, state
            tp.release_code_modules(old_modules)  # the old constants go with the old graph
            return state


def _changes(frozen: Sequence[tuple[int, torch.Tensor, int]], args: Sequence[Any], names: Sequence[str]) -> list[str]:
    changes = []
    for i, tensor, version in frozen:
        if args[i] is not tensor:
            changes.append(f"{names[i]} replaced")
        elif args[i]._version != version:
            changes.append(f"{names[i]} modified in place")
    return changes
