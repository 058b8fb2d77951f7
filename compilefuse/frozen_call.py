"""A compiled inference graph that never answers with stale weights.

Freezing bakes parameter and buffer values into the compiled code. Dynamo still passes those tensors
to the compiled graph on every call, so each call can check, for every frozen tensor, that it is
the same object at the same version counter as at compile time (an in-place update,
``load_state_dict``, an optimizer step or a BN statistics update bumps the version; a replaced
parameter is a new object).

Dynamo shares one compiled graph between instances of the same model class (it passes their
parameters as inputs), so two models of one architecture served from one process call the same
``FrozenGraphCall`` with different tensors. Each set of frozen tensors (by identity) therefore gets
its own *variant*: compiled once, kept while its tensors live (weak references), at most
``MAX_VARIANTS`` of them (least recently used dropped). A variant whose tensors changed in place is
refolded and recompiled before the call is answered; a dropped or replaced variant's generated code
and constants are released.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _torch_private as tp

log = logging.getLogger("compilefuse")

#: ``build(inputs) -> (compiled, kept)``: compile the graph for these example inputs; ``kept`` are
#: the indices of the inputs the compiled graph takes, every other tensor input is frozen.
Build = Callable[[list[Any]], tuple[Callable[..., Any], list[int]]]

#: Weight sets (e.g. model instances of one architecture) compiled side by side per graph.
MAX_VARIANTS = 8


@dataclasses.dataclass
class _Variant:
    compiled: Callable[..., Any]
    kept: tuple[int, ...]
    frozen: tuple[tuple[int, weakref.ref, int], ...]  # (input index, tensor, version at compile)
    modules: list[Any]  # the generated-code modules holding this variant's constants
    proven: bool = False  # whether it has answered a call yet

    def matches(self, args: Sequence[Any]) -> bool:
        return all(args[i] is ref() and args[i]._version == version for i, ref, version in self.frozen)

    def alive(self) -> bool:
        return all(ref() is not None for _, ref, _ in self.frozen)


class FrozenGraphCall:
    def __init__(
        self,
        build: Build,
        example_inputs: Sequence[Any],
        recompile_context: Callable[[], Any],
        input_names: Sequence[str],
        fallback: Callable[[list[Any], Exception], tuple[Callable[..., Any], list[int]]] | None = None,
    ) -> None:
        self._build = build
        self._fallback = fallback
        self._recompile_context = recompile_context
        self._input_names = list(input_names)
        self._lock = threading.Lock()
        self._example_inputs = list(example_inputs)
        first = self._compile(self._example_inputs)
        self._frozen_indices = tuple(i for i, _, _ in first.frozen)
        key = self._key(self._example_inputs)
        # Keep only the graph's other example inputs: holding the frozen ones would keep old weights alive.
        frozen_set = set(self._frozen_indices)
        self._example_inputs = [None if i in frozen_set else v for i, v in enumerate(self._example_inputs)]
        self._variants: collections.OrderedDict[tuple[int, ...], _Variant] = collections.OrderedDict(
            [(key, first)]
        )
        self._last = first

    def _compile(self, inputs: list[Any]) -> _Variant:
        with tp.loaded_code_modules() as modules:
            compiled, kept = self._build(inputs)
        kept_set = set(kept)
        frozen = tuple(
            (i, weakref.ref(value), value._version)
            for i, value in enumerate(inputs)
            if i not in kept_set and isinstance(value, torch.Tensor)
        )
        return _Variant(compiled, tuple(kept), frozen, modules)

    def _key(self, args: Sequence[Any]) -> tuple[int, ...]:
        return tuple(id(args[i]) for i in self._frozen_indices)

    def __call__(self, *args: Any) -> Any:
        variant = self._last
        if not variant.matches(args):
            variant = self._variant_for(args)
        if not variant.proven:
            return self._first_call(variant, args)
        return variant.compiled(*[args[i] for i in variant.kept])

    def _first_call(self, variant: _Variant, args: Sequence[Any]) -> Any:
        """A freshly compiled graph's first run. Inductor can miscompile (a layout assertion in the
        generated code, say) in a way only running shows; then, unless strict, this variant becomes
        plain Inductor (it takes every input, so it has nothing frozen to check)."""
        try:
            out = variant.compiled(*[args[i] for i in variant.kept])
        except Exception as error:
            if self._fallback is None or tp.is_dynamo_control_flow(error):
                raise
            with self._lock, self._recompile_context():
                variant.compiled, kept = self._fallback(list(args), error)
            variant.kept, variant.frozen = tuple(kept), ()
            tp.release_code_modules(variant.modules)
            variant.modules = []
            out = variant.compiled(*[args[i] for i in variant.kept])
        variant.proven = True
        return out

    def _variant_for(self, args: Sequence[Any]) -> _Variant:
        with self._lock:  # one thread compiles; the others then find the new variant
            key = self._key(args)
            variant = self._variants.get(key)
            if variant is not None and variant.matches(args):
                self._variants.move_to_end(key)
                self._last = variant
                return variant
            stale = [k for k, v in self._variants.items() if not v.alive()]
            changed_key = key if variant is not None else next(  # some tensors replaced: the variant
                (k for k, v in self._variants.items() if v.alive() and _shares_tensors(v, args)), None
            )  # sharing the others is the one that changed
            if changed_key is not None:
                changes = _changes(self._variants[changed_key].frozen, args, self._input_names)
                log.warning(
                    "bnfuse: %d frozen tensor(s) changed since compilation (%s); refolding and recompiling",
                    len(changes), ", ".join(changes[:3]) + (", ..." if len(changes) > 3 else ""),
                )
                stale.append(changed_key)
            else:  # no tensor in common with any variant: another instance of the architecture
                log.info(
                    "bnfuse: a new set of frozen tensors (%s, ...: another model instance, or replaced "
                    "parameters); folding them into variant %d of this graph",
                    self._input_names[self._frozen_indices[0]] if self._frozen_indices else "none",
                    len(self._variants) + 1,
                )
            inputs = list(self._example_inputs)
            for i in self._frozen_indices:
                inputs[i] = args[i]
            with self._recompile_context():
                variant = self._compile(inputs)
            for old in stale:
                self._drop(old)
            self._variants[key] = variant
            while len(self._variants) > MAX_VARIANTS:
                self._drop(next(iter(self._variants)))
            self._last = variant
            return variant

    def _drop(self, key: tuple[int, ...]) -> None:
        old = self._variants.pop(key, None)
        if old is not None:
            tp.release_code_modules(old.modules)  # its constants go with its graph


def _shares_tensors(variant: _Variant, args: Sequence[Any]) -> bool:
    return any(args[i] is ref() for i, ref, _ in variant.frozen)


def _changes(frozen: Sequence[tuple[int, weakref.ref, int]], args: Sequence[Any], names: Sequence[str]) -> list[str]:
    changes = []
    for i, ref, version in frozen:
        if args[i] is not ref():
            changes.append(f"{names[i]} replaced")
        elif args[i]._version != version:
            changes.append(f"{names[i]} modified in place")
    return changes
