"""Whether the tensors a compiled variant froze are still the values it was compiled from.

Torch's version counter is the cheap signal, and it misses writes users make every day: ATen's
batch-norm kernel updates ``running_mean`` / ``running_var`` in a training-mode forward without a
bump, fused optimizers bump nothing, and ``param.data = x`` swaps the storage. So each frozen tensor
is watched four ways, all recorded *before* the compile reads any value (a write that lands while
a refold compiles is seen by the next call):

- **identity, version counter, data pointer** (a weak reference: old weights are never kept alive);
- **BN statistics**: the owning module's ``num_batches_tracked``, which ``nn.BatchNorm*``'s Python
  forward bumps (``add_``, versioned) in every training-mode call that updates the statistics;
- **optimizer steps**: one global post-step hook (``torch.optim``'s public
  ``register_optimizer_step_post_hook``) records the parameters each step had gradients for, fused,
  ``foreach`` and for-loop implementations alike;
- **inference tensors** (no version counter): ``load_state_dict`` on a module owning one, through a
  load-state-dict post hook.

What none of them sees is listed in docs/guarantees.md.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..runtime._torch_runtime import version_of


class _OptimizerSteps:
    """Every optimizer step of the process, as a generation number and, per parameter stepped, the
    generation of its last step. Installed at the first frozen compile; one int compare per call
    while no optimizer steps."""

    def __init__(self) -> None:
        self.generation = 0
        self._last: dict[int, int] = {}  # id(parameter) -> generation of its last step
        self._lock = threading.Lock()
        self._handle: Any = None

    def watch(self) -> None:
        with self._lock:
            if self._handle is None:
                self._handle = register_optimizer_step_post_hook(self._stepped)

    def _stepped(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        with self._lock:
            generation = self.generation + 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:  # torch's optimizers leave a parameter without a gradient alone
                        self._last[id(p)] = generation
            self.generation = generation

    def stepped_after(self, generation: int, ids: Iterable[int]) -> list[int]:
        """Which of ``ids`` a step after ``generation`` changed."""
        return [i for i in ids if self._last.get(i, -1) > generation]


STEPS = _OptimizerSteps()


class Recorded:
    """The state of a compile's tensor inputs, read before the compile reads their values."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        STEPS.watch()
        self.steps = STEPS.generation
        self.tensors = {i: v for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)}
        self.state = {i: (None if t.is_inference() else version_of(t), t.data_ptr()) for i, t in self.tensors.items()}
        owners = _owners(self.tensors.values())
        #: BN statistics -> their module's ``num_batches_tracked`` and its version now.
        self.witnesses: dict[int, tuple[torch.Tensor, int]] = {}
        inference: set[int] = set()
        for i, t in self.tensors.items():
            for module in owners.get(id(t), ()):
                counter = getattr(module, "num_batches_tracked", None)
                is_statistic = t is getattr(module, "running_mean", None) or t is getattr(module, "running_var", None)
                if is_statistic and isinstance(counter, torch.Tensor) and not counter.is_inference():
                    self.witnesses[i] = (counter, version_of(counter))
                if t.is_inference():
                    inference.add(id(module))
        unique = {id(m): m for ms in owners.values() for m in ms if id(m) in inference}
        self.reloads = _ReloadWatch(list(unique.values()))


class FrozenTensors:
    """The frozen inputs of one variant (``indices``), and the check, on every call, that each is
    unchanged since ``recorded``."""

    def __init__(self, indices: Sequence[int], recorded: Recorded) -> None:
        self.indices = tuple(indices)
        self.dead = False
        tensors = recorded.tensors
        refs = {i: weakref.ref(tensors[i], self._on_free) for i in self.indices}
        self._first = (self.indices[0], refs[self.indices[0]]) if self.indices else None
        self._versioned = [(i, refs[i], *recorded.state[i]) for i in self.indices if recorded.state[i][0] is not None]
        self._unversioned = [(i, refs[i], recorded.state[i][1]) for i in self.indices if recorded.state[i][0] is None]
        self._witnesses = [(i, weakref.ref(c), v) for i in self.indices if i in recorded.witnesses
                           for c, v in [recorded.witnesses[i]]]
        # What ``match`` reads on every call, as few objects as will do: a tensor by its id (the id
        # of a live object is its own; a frozen tensor freed, even by another thread during the
        # check, sets ``dead``, read after the ids), and each counter
        # once (a BN's running mean and variance share one). Right after the graph has run, each
        # object read is a cache miss (the check's cost: docs/benchmarks.md).
        self._checked = [(i, id(tensors[i]), *recorded.state[i]) for i in self.indices if recorded.state[i][0] is not None]
        self._checked_unversioned = [(i, id(tensors[i]), recorded.state[i][1]) for i in self.indices
                                     if recorded.state[i][0] is None]
        self._counters = list({id(c): (weakref.ref(c), v) for i in self.indices if i in recorded.witnesses
                               for c, v in [recorded.witnesses[i]]}.values())
        self._ids = {id(tensors[i]): i for i in self.indices}
        self._steps = recorded.steps
        self._reloads = recorded.reloads
        if not any(recorded.state[i][0] is None for i in self.indices):  # no frozen inference tensor
            self._reloads.remove()

    def _on_free(self, _ref: weakref.ref) -> None:
        self.dead = True

    def match(self, args: Sequence[Any]) -> bool:
        if self.dead or self._reloads.seen:
            return False
        if STEPS.generation != self._steps and not self._spared_by_steps():
            return False
        for i, ident, version, pointer in self._checked:
            tensor = args[i]
            if id(tensor) != ident or tensor._version != version or tensor.data_ptr() != pointer:
                return False
        for i, ident, pointer in self._checked_unversioned:
            tensor = args[i]
            if id(tensor) != ident or tensor.data_ptr() != pointer:
                return False
        for ref, version in self._counters:
            counter = ref()
            if counter is None or counter._version != version:
                return False
        return not self.dead  # read last: a tensor freed meanwhile (its id reused by another) sets it

    def _spared_by_steps(self) -> bool:
        """Optimizer steps happened since the last look: whether none of them changed a frozen tensor."""
        generation = STEPS.generation
        if STEPS.stepped_after(self._steps, self._ids):
            return False
        self._steps = generation
        return True

    def probably_for(self, args: Sequence[Any]) -> bool:
        """Whether ``args`` are likely this variant's (its first frozen tensor is there): a cheap
        guess that picks the variant to run before the full check."""
        return self._first is None or args[self._first[0]] is self._first[1]()

    def shares_any(self, args: Sequence[Any]) -> bool:
        return any(args[i] is ref() for i, ref, *_ in (*self._versioned, *self._unversioned))

    def changes(self, args: Sequence[Any], names: Sequence[str]) -> list[tuple[int | None, str]]:
        """What changed: (input index or None, the change in the user's words)."""
        if self._reloads.seen:
            return [(None, "load_state_dict on " + ", ".join(self._reloads.seen))]
        found: dict[int, str] = {}
        for i in STEPS.stepped_after(self._steps, self._ids):
            found[self._ids[i]] = f"{names[self._ids[i]]} changed by an optimizer step"
        for i, ref, *state in (*self._versioned, *self._unversioned):
            tensor = args[i]
            now = (tensor.data_ptr(),) if tensor.is_inference() else (version_of(tensor), tensor.data_ptr())
            if tensor is not ref():
                found[i] = f"{names[i]} replaced"
            elif tuple(state) != now:
                found.setdefault(i, f"{names[i]} modified in place")
        for i, ref, version in self._witnesses:
            counter = ref()
            if counter is None or counter._version != version:
                found.setdefault(i, f"{names[i]} updated by a training-mode forward of its BatchNorm")
        return sorted(found.items())

    def release(self) -> None:
        self._reloads.remove()


class _ReloadWatch:
    """``load_state_dict`` on the modules that own some inference tensors (which have no version
    counter): a post hook on each owner records it."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.seen: list[str] = []
        self._handles = [module.register_load_state_dict_post_hook(self._loaded) for module in modules]

    def _loaded(self, module: torch.nn.Module, _incompatible_keys: Any) -> None:
        self.seen.append(type(module).__name__)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _owners(tensors: Iterable[torch.Tensor]) -> dict[int, list[torch.nn.Module]]:
    """The modules owning each tensor (by id) as a direct parameter or buffer: one scan of the
    objects the garbage collector tracks, at compile time only."""
    wanted = {id(t) for t in tensors}
    owners: dict[int, list[torch.nn.Module]] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.nn.Module):  # type(), not isinstance: no proxy is asked
            continue
        for t in (*getattr(obj, "_parameters", {}).values(), *getattr(obj, "_buffers", {}).values()):
            if t is not None and id(t) in wanted:
                owners.setdefault(id(t), []).append(obj)
    return owners
