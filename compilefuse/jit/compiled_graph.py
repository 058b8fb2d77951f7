"""The life of one graph bnfuse compiles for inference: shared, fresh, and never the reason a model fails.

Freezing bakes parameter and buffer values into the compiled code, yet Dynamo still passes those
tensors on every call. ``CompiledGraph`` owns everything that follows from that, in one place:

- **Sharing.** Threads racing through their first call make Dynamo compile once per thread;
  ``shared`` hands them all one ``CompiledGraph`` for the same graph, options and inputs.
- **Freshness.** Each call checks that every frozen tensor is the object it was at compile time,
  unchanged (``freshness.FrozenTensors``). A change refolds: the graph is compiled again with the current
  tensors before the call is answered, and the old code and constants are released. State the
  graph writes is never frozen (it is a live input), so a graph's own writes are no change.
- **Exactly once.** A pure graph runs first and is checked after (on CUDA the check overlaps the
  kernels; on a change the call is answered again). A graph with side effects (it writes inputs or
  module state, or draws random numbers) is checked first, so each call runs it once.
- **Variants.** Dynamo shares one graph between instances of a model class (their parameters are
  its inputs), so each set of frozen tensors gets its own compiled *variant*: kept while its
  tensors live, at most ``MAX_VARIANTS``, least recently used dropped.
- **Fallback.** Any exception from bnfuse's own work (compiling, the first run of a fresh compile,
  the per-call check) makes the graph plain Inductor instead, with one warning naming the cause;
  ``strict`` raises instead. Inductor's own errors included: only Dynamo's restarts pass through.
- **Written from outside.** A frozen tensor changed before every call is made a live input after
  two refolds, with one warning.

How a graph is compiled is not this module's business: a ``Compiler`` folds it (``fold``) or,
after a failure, compiles it with plain Inductor and records why (``fall_back``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch

from .._torch_private import code_cache, dynamo
from ..report import RERUNS_WANTED
from ..runtime import _torch_runtime
from ..runtime.prologue import RefitRefused
from . import freshness
from .freshness import FrozenTensors

log = logging.getLogger("compilefuse")

#: Weight sets (e.g. model instances of one architecture) compiled side by side per graph.
MAX_VARIANTS = 8


@dataclasses.dataclass
class Executable:
    """What one compile of a graph made: the call, and the indices of the graph inputs it takes
    (after ``prepared``); every other tensor input is frozen or prepared."""

    call: Callable[..., Any]
    inputs_taken: tuple[int, ...]
    #: Called once the graph has answered its first call (a graph that fails then is never reported).
    on_first_answer: Callable[[], None] = lambda: None
    #: Called when a call inside ``compilefuse.explain`` is answered by this compile (its report again).
    on_rerun: Callable[[], None] = lambda: None
    #: Whether a call writes inputs or draws random numbers: then it must run exactly once per call.
    side_effects: bool = False
    #: Inputs taken that are module state the graph writes: live, read afresh on every call.
    live: tuple[int, ...] = ()
    #: A graph whose module state is data: what it computes from a set of module tensors (the
    #: graph inputs), passed before the inputs taken; ``RefitRefused`` if the folds cannot take
    #: them (``prologue.Prologue``). None: the weights are in the code.
    refit: Callable[[Sequence[Any]], list[torch.Tensor]] | None = None
    #: What ``refit`` computed from the inputs the graph was compiled with.
    prepared: tuple[Any, ...] = ()
    #: The inputs a call is stale without (default: every tensor input not taken).
    watched: tuple[int, ...] | None = None
    #: For a refit: ``on_first_answer`` and ``on_rerun`` of the variant for these inputs.
    report_for: Callable[[Sequence[Any]], tuple[Callable[[], None], Callable[[], None]]] | None = None


class Compiler(Protocol):
    """How a ``CompiledGraph`` has its graph compiled."""

    def fold(self, inputs: list[Any]) -> Executable:
        """The graph folded for these inputs (raises where bnfuse fails)."""

    def fall_back(self, inputs: list[Any], failure: Exception) -> Executable:
        """The graph compiled by plain Inductor, every BN kept, ``failure`` recorded as the reason."""

    def keep_live(self, indices: set[int]) -> None:
        """Compile these module-state inputs as live graph inputs from now on (never frozen)."""


@dataclasses.dataclass
class _Variant:
    compiled: Executable
    frozen: FrozenTensors
    modules: list[Any]  # the generated-code modules holding this variant's constants
    proven: bool = False  # whether it has answered a call yet
    born: int = 0  # the graph's call count when it was compiled
    prepared: tuple[Any, ...] = ()  # its weights, where they are data (``Executable.refit``)
    #: A refit's own report (its rows named for its instance): (on first answer, on rerun).
    reports: tuple[Callable[[], None], Callable[[], None]] | None = None

    def run(self, args: Sequence[Any]) -> Any:
        return self.compiled.call(*self.prepared, *[args[i] for i in self.compiled.inputs_taken])

    def on_first_answer(self) -> None:
        (self.reports[0] if self.reports else self.compiled.on_first_answer)()

    def on_rerun(self) -> None:
        (self.reports[1] if self.reports else self.compiled.on_rerun)()


class CompiledGraph:
    def __init__(
        self,
        compiler: Compiler,
        example_inputs: Sequence[Any],
        *,
        strict: bool,
        recompile_context: Callable[[], Any],
        input_names: Sequence[str],
    ) -> None:
        self._compiler = compiler
        self._strict = strict
        self._recompile_context = recompile_context
        self._input_names = list(input_names)
        #: Refolds run at call time, outside Dynamo's compile lock, possibly in several threads.
        self._lock = threading.Lock()
        self._first_answer_lock = threading.Lock()
        self._plain: Executable | None = None  # set once bnfuse has failed on this graph
        self._calls = 0
        #: Per frozen input of one variant (its key): how many refolds in a row found it changed at
        #: the first call after a compile.
        self._changed_in_a_row: tuple[Hashable, dict[int, int]] = ((), {})
        inputs = list(example_inputs)
        first = self._compile(inputs)
        first.born = 1  # Dynamo compiles it inside the first call
        #: The compile whose weights are data: a new set of weights refits it (None: recompile).
        self._refittable: Executable | None = first.compiled if first.compiled.refit is not None else None
        self._frozen_indices = first.frozen.indices
        # Keep only the graph's other example inputs: holding the frozen ones would keep old weights alive.
        frozen = set(self._frozen_indices)
        self._example_inputs = [None if i in frozen else v for i, v in enumerate(inputs)]
        self._variants: collections.OrderedDict[tuple[int, ...], _Variant] = collections.OrderedDict(
            [(self._ids(inputs), first)]
        )
        self._last = first

    # -- compiling -------------------------------------------------------------------------------

    def _compile(self, inputs: list[Any]) -> _Variant:
        """A folded compile of ``inputs``; plain Inductor if bnfuse fails (strict: raise). What the
        freshness check compares against is recorded before the compile reads any value."""
        recorded = freshness.Recorded(inputs)
        try:
            try:
                with code_cache.loaded_code_modules() as modules:
                    compiled = self._compiler.fold(inputs)
            except Exception as error:  # noqa: BLE001 - any failure of bnfuse falls back (or raises, strict)
                self._give_up_or_raise(error)
                compiled, modules = self._compiler.fall_back(inputs, error), []
        except BaseException:
            recorded.reloads.remove()
            raise
        taken = set(compiled.inputs_taken)
        frozen = list(compiled.watched) if compiled.watched is not None else [
            i for i, v in enumerate(inputs) if i not in taken and isinstance(v, torch.Tensor)]
        return _Variant(compiled, freshness.FrozenTensors(frozen, recorded), modules, born=self._calls,
                        prepared=compiled.prepared)

    def _refit(self, inputs: list[Any]) -> _Variant | None:
        """A variant for a new set of weights that reuses the compiled code: the prologue run on
        them. None if a fold's check refuses them (they get a compile of their own)."""
        compiled = self._refittable
        assert compiled is not None and compiled.refit is not None and compiled.watched is not None
        recorded = freshness.Recorded(inputs)
        try:
            prepared = compiled.refit(inputs)
        except RefitRefused as refusal:
            recorded.reloads.remove()
            log.warning("bnfuse: the new weights fail a fold's check (%s); compiling them with that BatchNorm kept",
                        refusal)
            return None
        except BaseException:
            recorded.reloads.remove()
            raise
        # Unproven: its first answer publishes the fold record again, as a refold's compile does.
        reports = compiled.report_for(inputs) if compiled.report_for is not None else None
        return _Variant(compiled, freshness.FrozenTensors(compiled.watched, recorded), [], born=self._calls,
                        prepared=tuple(prepared), reports=reports)

    def _give_up_or_raise(self, error: Exception) -> None:
        give_up_or_raise(error, strict=self._strict)

    def _fall_back(self, args: Sequence[Any], error: Exception) -> Executable:
        """From now on this graph is plain Inductor: it takes every input, so nothing can go stale."""
        self._give_up_or_raise(error)
        with self._lock, self._recompile_context():
            if self._plain is None:
                self._plain = self._compiler.fall_back(list(args), error)
            self._refittable = None
            for key in list(self._variants):
                self._drop(key)
        return self._plain

    # -- calling ---------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        if RERUNS_WANTED:  # ``compilefuse.explain`` is running: report what answers
            return self._call_reporting_rerun(args)
        return self._answer(args)

    def _answer(self, args: Sequence[Any]) -> Any:
        if self._plain is not None:
            return self._plain.call(*args)
        self._calls += 1
        try:
            variant = self._last
            if not variant.frozen.probably_for(args):  # another instance's weights: find its variant
                variant = self._variant_for(args)
        except Exception as error:  # noqa: BLE001 - a refold failed: fall back, never crash
            return self._fall_back(args, error).call(*args)
        # A pure graph launches first and is checked after: on CUDA the check then runs while the
        # kernels do. A stale answer is never returned: on a change the call is answered again,
        # refolded. A graph with side effects is checked first, and so runs once. (An error of the
        # run itself, an out-of-memory say, is the user's to see, not a reason to stop folding.)
        launched = variant.proven and not variant.compiled.side_effects
        if launched:
            out = variant.run(args)
        try:
            fresh = variant.frozen.match(args)
            if fresh and launched:
                return out
            if not fresh:
                variant = self._variant_for(args)
        except Exception as error:  # noqa: BLE001 - the check or a refold failed: fall back, never crash
            return self._fall_back(args, error).call(*args)
        if variant.proven:  # checked before the run: a graph with side effects
            return variant.run(args)
        return self._first_call(variant, args)

    def _call_reporting_rerun(self, args: Sequence[Any]) -> Any:
        """A call while ``compilefuse.explain`` collects: the variant that answers is reported again
        if it was compiled before this call (a fresh one reports itself)."""
        if self._plain is not None:
            return self._plain.call(*args)
        calls = self._calls
        out = self._answer(args)
        variant = self._last
        if self._plain is None and variant.proven and variant.born <= calls:
            variant.on_rerun()
        return out

    def _first_call(self, variant: _Variant, args: Sequence[Any]) -> Any:
        """A fresh compile's first run. Inductor can miscompile in a way only running shows (a
        layout assertion in the generated code, say); then the graph falls back. Threads racing
        through the same first run report it once."""
        try:
            out = variant.run(args)
        except Exception as error:  # noqa: BLE001 - a miscompile shows at the first run: fall back
            return self._fall_back(args, error).call(*args)
        with self._first_answer_lock:
            first, variant.proven = not variant.proven, True
        if first:
            try:
                variant.on_first_answer()
            except Exception as error:  # noqa: BLE001 - reporting is bnfuse's own work too: fall back
                return self._fall_back(args, error).call(*args)
        return out

    def _ids(self, args: Sequence[Any]) -> tuple[int, ...]:
        return tuple(id(args[i]) for i in self._frozen_indices)

    def _variant_for(self, args: Sequence[Any]) -> _Variant:
        with self._lock:  # one thread compiles; the others then find the new variant
            key = self._ids(args)
            variant = self._variants.get(key)
            if variant is not None and variant.frozen.match(args):
                self._variants.move_to_end(key)
                self._last = variant
                return variant
            stale = [k for k, v in self._variants.items() if v.frozen.dead]
            changed_key = key if variant is not None else next(  # some tensors replaced: the variant
                (k for k, v in self._variants.items() if not v.frozen.dead and v.frozen.shares_any(args)), None
            )  # sharing the others is the one that changed
            if changed_key is not None:
                changed = self._variants[changed_key]
                changes = changed.frozen.changes(args, self._input_names)
                words = [text for _, text in changes]
                log.warning(
                    "bnfuse: frozen tensors changed since compilation (%s); refolding%s",
                    ", ".join(words[:3]) + (f", ... ({len(words)} in all)" if len(words) > 3 else ""),
                    "" if self._refittable is not None else " and recompiling",
                )
                self._keep_live_what_changes_every_call(changed_key, changed, [i for i, _ in changes if i is not None])
                stale.append(changed_key)
            else:  # no tensor in common with any variant: another instance of the architecture
                log.info(
                    "bnfuse: a new set of frozen tensors (%s, ...: another model instance, or replaced "
                    "parameters); folding them into variant %d of this graph",
                    self._input_names[self._frozen_indices[0]] if self._frozen_indices else "none",
                    len(self._variants) + 1,
                )
            refitted = self._refit(list(args)) if self._refittable is not None else None
            if refitted is not None:
                variant = refitted
            else:
                inputs = list(self._example_inputs)
                for i in (*self._frozen_indices, *self._last.compiled.live):
                    inputs[i] = args[i]
                with self._recompile_context():
                    variant = self._compile(inputs)
                if variant.compiled.refit is not None:
                    self._refittable = variant.compiled
            for old in stale:
                self._drop(old)
            self._variants[key] = variant
            compiled_apart = [k for k, v in self._variants.items() if v.modules]  # refits share their code
            for old in compiled_apart[:max(0, len(compiled_apart) - MAX_VARIANTS)]:
                self._drop(old)
            self._last = variant
            return variant

    def _keep_live_what_changes_every_call(self, key: Hashable, changed: _Variant, indices: list[int]) -> None:
        """A tensor written outside the graph before every call (a ``torch._dynamo.disable``d helper
        updating a buffer) would refold every call: one found changed at the first call after two
        compiles in a row is compiled live from then on, as state the graph writes is. A change of
        every frozen tensor at once is new weights (a ``load_state_dict`` before each call), not a
        helper: those are folded each time."""
        if self._calls - changed.born > 1 or len(set(indices)) >= len(changed.frozen.indices):
            # answered calls in between: an occasional change; or all of them: new weights
            self._changed_in_a_row = ((), {})
            return
        last_key, counts = self._changed_in_a_row
        counts = {i: (counts.get(i, 0) if key == last_key else 0) + 1 for i in indices}
        self._changed_in_a_row = (key, counts)
        every_call = {i for i, n in counts.items() if n >= 2}
        if every_call:
            log.warning(
                "bnfuse: %s changed before each of the last calls (written outside the compiled graph); "
                "kept live from now on, read on every call instead of folded",
                ", ".join(self._input_names[i] for i in sorted(every_call)),
            )
            self._compiler.keep_live(every_call)
            self._refittable = None  # the next set of weights compiles, with these live
            self._changed_in_a_row = ((), {})

    def _drop(self, key: tuple[int, ...]) -> None:
        old = self._variants.pop(key, None)
        if old is not None:
            old.frozen.release()
            if old.compiled is self._refittable or any(v.compiled is old.compiled for v in self._variants.values()):
                return  # its code serves other sets of weights
            try:
                code_cache.release_code_modules(old.modules)  # its constants go with its graph
            except Exception as error:  # noqa: BLE001 - releasing is an optimisation, never a reason to fail
                log.debug("bnfuse: could not release generated code: %r", error)


#: Compiled graphs by what determines them. No lock: Dynamo calls backends under its own
#: process-wide compile lock, so only refolds (at call time, ``CompiledGraph._lock``) need one.
_SHARED: weakref.WeakValueDictionary[Hashable, CompiledGraph] = weakref.WeakValueDictionary()


def shared(key: Hashable, create: Callable[[], CompiledGraph]) -> CompiledGraph:
    """The ``CompiledGraph`` for ``key``, created on first use."""
    graph = _SHARED.get(key)
    if graph is None:
        graph = _SHARED[key] = create()
    return graph


def input_key(value: Any, frozen: bool) -> Hashable:
    """What of an input a compiled graph depends on: the identity and state of a tensor it
    freezes, the metadata of the others."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    meta = (tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    return (id(value), _torch_runtime.version_counter(value), value.data_ptr(), meta) if frozen else meta


_fallback_warned = False


def give_up_or_raise(error: Exception, *, strict: bool) -> None:
    """bnfuse failed on a graph: a Dynamo restart passes, ``strict`` raises (to the caller, never
    an eager run), else the one warning, and the caller falls back to plain Inductor."""
    if dynamo.is_dynamo_restart(error):
        raise error
    if strict:
        dynamo.raise_as_failure(error)
    warn_fallback_once(error)


def warn_fallback_once(error: Exception) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        log.warning(
            "bnfuse failed on a graph (%s: %s); it is compiled by plain Inductor instead, unfolded. "
            "options={'strict': True} raises instead.",
            type(error).__name__, str(error).splitlines()[0] if str(error) else "",
        )
