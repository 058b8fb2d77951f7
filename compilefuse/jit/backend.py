"""The ``bnfuse`` torch.compile backend: options in, an Inductor-compiled callable out.

Inference graphs (grad disabled, or nothing requiring grad) are compiled with Inductor's freezing,
module state lifted to frozen constants and the BN passes installed; ``CompiledGraph`` owns the
result's life. Graphs that need autograd are traced to aten ops before autograd, the rules fold
there per step (arithmetic on the live tensors, differentiated by AOTAutograd), and Inductor
compiles the result; nothing is frozen, so nothing can go stale. With ``training=False`` they go
to plain Inductor untouched, and bnfuse says so once.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from .. import aliasing, fold_prologue, freezing, versions, weight_packing
from .._torch_private import aot_autograd, dynamo, fake_tensors, gates, inductor, onednn, ops, pre_dispatch
from ..config import BnfuseConfig
from ..decisions import FoldRecord, name_from_root, renamed, sort_in_program_order, source_path, traced_decisions
from ..passes import (
    BnFoldPass,
    PostGradPass,
    SavedInputsPass,
    fold_graph_as_data,
    fold_graph_per_step,
    fold_regions_per_step,
    folded_graph_patches,
    merges_read_values,
    merges_when_frozen,
)
from ..report import RERUNS_WANTED, FoldReport, publish
from ..runtime.prologue import RefitRefused
from . import compiled_graph, fold_cache, graph_cache

log = logging.getLogger("compilefuse")

#: Fold records of the most recent compiled graphs, newest last.
RECORDS: collections.deque[FoldRecord] = collections.deque(maxlen=64)

_AUTOGRAD_MESSAGE = (
    "bnfuse: this graph needs autograd (grad is enabled and %s requires grad), so BatchNorm is not "
    "folded and gradients stay exact. To fold, run the model under torch.inference_mode() or "
    "torch.no_grad(), or call requires_grad_(False) on it."
)
_autograd_logged = False


def bnfuse(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """torch.compile backend folding inference BatchNorm into conv / conv-transpose / linear."""
    config = BnfuseConfig.from_options(options, mode)  # the user's errors: raised, never swallowed
    compiler = GraphCompiler(gm, config)
    try:
        versions.warn_once_if_untested()
        compiler.name(example_inputs)
        needing_grad = _first_requiring_grad(gm, example_inputs)
        if needing_grad is not None:
            if config.training:
                return compiler.per_step(list(example_inputs))
            _log_autograd_once(needing_grad)
            return compiler.plain(list(example_inputs), lambda: FoldRecord(traced_decisions(gm, autograd=True)))
        placeholders = gm.graph.find_nodes(op="placeholder")
        key = (gm.code, repr(config), dynamo.traced_global_state(), tuple(
            compiled_graph.input_key(value, frozen=dynamo.is_module_state(node))
            for node, value in zip(placeholders, example_inputs, strict=True)
        ))
        fake_mode, dynamic = fake_tensors.current_fake_mode(), dynamo.has_symbolic_shapes(gm)
        return compiled_graph.shared(key, lambda: compiled_graph.CompiledGraph(
            compiler,
            example_inputs,
            strict=config.strict,
            # A dynamic graph's symbolic sizes live in Dynamo's fake mode, so a recompile reuses it.
            # A static one gets a fresh mode: in Dynamo's, tensors it has not seen (another instance's
            # weights) would get fresh symbolic sizes and the recompile would turn dynamic.
            recompile_context=lambda: fake_tensors.tracing(fake_mode if dynamic else None),
            input_names=[source_path(node) for node in placeholders],
        ))
    except Exception as error:  # noqa: BLE001 - bnfuse's own set-up failed: never the user's problem
        compiled_graph.give_up_or_raise(error, strict=config.strict)
        return compiler.fall_back(list(example_inputs), error).call


class GraphCompiler:
    """How one Dynamo graph is compiled: folded (freezing + the BN passes) or, after a failure of
    bnfuse, with plain Inductor. Each compile publishes its fold record."""

    def __init__(self, gm: torch.fx.GraphModule, config: BnfuseConfig) -> None:
        self.gm, self.config = gm, config
        #: The module state this graph writes (or that is written before every call), once found: a
        #: refold starts from them and does not trace the graph twice again.
        self._live: set[int] = set()
        #: Whether Inductor's oneDNN weight packing is off for this graph (see ``folded``).
        self._no_packing = False
        #: Whether folding with the weights as data failed on this graph (it folds frozen from then on).
        self._as_data_failed = False
        #: The frame prefixes the graph was last named with for a compile (``name``).
        self._prefixes: dict[str, str] = {}

    def keep_live(self, indices: set[int]) -> None:
        self._live |= set(indices)

    def name(self, inputs: Sequence[Any]) -> dict[str, str]:
        """Name the graph's modules by their path in the model the user compiled, for ``inputs``
        (names only: a failure leaves Dynamo's names, and is never a reason to fall back); the
        prefix of each frame local (``decisions.name_from_root``)."""
        try:
            root = dynamo.compiled_root()
            if root is not None:
                return name_from_root(root, self.gm, inputs)
        except Exception as error:  # noqa: BLE001 - see the docstring
            log.debug("bnfuse: graph named as Dynamo traced it (%s: %s)", type(error).__name__, error)
        return {}

    def fold(self, inputs: list[Any]) -> compiled_graph.Executable:
        """The graph folded for ``inputs``: weights as data where it can, frozen otherwise."""
        self._prefixes = self.name(inputs)
        try:
            try:
                return self.as_data(inputs) if self._as_data_allowed() else self.folded(inputs)
            except Exception as error:
                if self._no_packing or not inductor.is_inductor_error(error):
                    raise
                # Inductor's oneDNN packing under freezing fails on some graphs (a circular-padded
                # conv at batch >= 2, torchvision's detection transforms): fold without it.
                log.info("bnfuse: Inductor failed on the folded graph (%s); folding again without "
                         "oneDNN weight packing", type(error).__name__)
                self._no_packing = True
                return self.folded(inputs)
        except freezing.UnprovableWrite as refusal:  # a decision, not a failure: strict too
            reason = (f"not folded: {self._input_name(refusal.written)} and {self._input_name(refusal.frozen)} "
                      "share memory and the graph writes to it; compiled by plain Inductor")
            log.warning("bnfuse: %s", reason)
            return self._unfolded(inputs, reason)

    def fall_back(self, inputs: list[Any], failure: Exception) -> compiled_graph.Executable:
        """After a failure of bnfuse: the graph by plain Inductor, reported with the failure, its
        higher-order ops' bodies traced afresh (not as the failed attempt traced them)."""
        aot_autograd.forget_traced_subgraphs()
        self._prefixes = self.name(inputs)
        return self._unfolded(inputs, f"bnfuse failed, compiled by plain Inductor: {type(failure).__name__}")

    def _unfolded(self, inputs: list[Any], reason: str) -> compiled_graph.Executable:
        record = lambda: FoldRecord(traced_decisions(self.gm, autograd=False, reason=reason))  # noqa: E731
        return compiled_graph.Executable(self.plain(inputs, record), tuple(range(len(inputs))))

    def _as_data_allowed(self) -> bool:
        return not (self.config.cache or self.config.freeze or self._as_data_failed) and \
            pre_dispatch.unsupported_before_autograd(self.gm) is None and _autocast_around() is None

    def as_data(self, inputs: list[Any]) -> compiled_graph.Executable:
        """Fold with the module state as data (``fold_prologue``): the folds traced into the graph and
        split out into a prologue that runs once per set of weights, the rest compiled by Inductor
        without freezing. A new set of weights then refits the compiled code instead of
        recompiling it. Weights a fold's check refuses, and any failure of this route, fold frozen
        instead (``folded``)."""
        try:
            return self._as_data(inputs)
        except RefitRefused as refusal:
            log.warning("bnfuse: these weights fail a fold's check (%s); compiled frozen, that BatchNorm kept", refusal)
        except _MergesWhenFrozen:
            log.debug("bnfuse: branches merge with the weights as constants; folded frozen")
        except freezing.UnprovableWrite:
            raise
        except Exception as error:
            if dynamo.is_dynamo_restart(error) or self.config.strict:
                raise
            log.info("bnfuse: folding with the weights as data failed (%s: %s); folding them frozen instead",
                     type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self._as_data_failed = True
        return self.folded(inputs)

    def _as_data(self, inputs: list[Any]) -> compiled_graph.Executable:
        start = time.perf_counter()
        cache_key = fold_cache.key(self.gm, inputs, self._live, self._no_packing, self.config)
        folded = fold_cache.load(cache_key) if cache_key is not None else None
        state = freezing.module_state(self.gm, inputs)
        if folded is None:
            folded = self._fold_as_data(inputs, state)
            if cache_key is not None and folded.cacheable:
                fold_cache.store(cache_key, folded)
        written, record, parts = folded.written, folded.record, folded.split
        live = self._live | (written & set(state))
        freezing.check_written_state_apart(live, state, inputs)
        if tuple(freezing.read_only_state(self.gm, inputs, live | written)) != folded.readable:
            raise RuntimeError("bnfuse: the fold read other state than these inputs are")  # a key incomplete
        freezing.check_writes_spare_frozen(sorted(written), parts.prologue.reads, inputs)
        prepared = parts.prologue(inputs)
        record.seconds = time.perf_counter() - start
        sort_in_program_order(record, self.gm.graph)
        named = dict(self._prefixes)

        def report_for(new_inputs: Sequence[Any]) -> tuple[Callable[[], None], Callable[[], None]]:
            """Publishing the record for a refit (another instance of a graph-broken block names its rows anew)."""
            again = renamed(record, named, self.name(new_inputs))
            return lambda: self._publish(again, sort=False), lambda: publish(again, reused=True)

        examples = [*prepared, *[inputs[i] for i in parts.inputs_taken]]
        patches = {**self.config.inductor_patches, "post_grad_custom_pre_pass": PostGradPass()}
        wrapper = self._wrapper(inputs, written)
        try:
            call = self._compile_main(parts.main, examples, len(prepared), {**patches, **wrapper})
        except Exception as error:
            if not wrapper or dynamo.is_dynamo_restart(error):
                raise
            log.info("bnfuse: Inductor's C++ wrapper failed on this graph (%s); compiled with its Python wrapper",
                     type(error).__name__)
            call, wrapper = self._compile_main(parts.main, examples, len(prepared), patches), {}
        if wrapper:
            call = _PythonWrapperIfTheFirstCallFails(
                call, lambda: self._compile_main(parts.main, examples, len(prepared), patches))
        return compiled_graph.Executable(
            call,
            parts.inputs_taken,
            on_first_answer=lambda: self._publish(record, sort=False),
            on_rerun=lambda: publish(record, reused=True),
            side_effects=bool(written) or folded.draws_random_numbers,
            live=tuple(sorted(live)),
            refit=parts.prologue,
            prepared=tuple(prepared),
            watched=parts.prologue.reads,
            report_for=report_for,
        )

    def _wrapper(self, inputs: Sequence[Any], written: Collection[int]) -> dict[str, Any]:
        """Inductor's C++ wrapper for an inference graph of static shapes that writes no input and
        whose tensors are all on the CPU, unless the options choose a wrapper: at batch 1 the Python
        wrapper's per-call work (allocations, size checks, one Python call per kernel) is a large
        part of a small model's call, and the C++ wrapper's compile is no slower
        (docs/benchmarks.md). Its first call failed with symbolic sizes ("expected ndim 4 but got
        0") and with a written input that is a view of the model's weight ("expected ndim 1 but got
        2"; torch 2.14.1)."""
        tensors = [value for value in inputs if isinstance(value, torch.Tensor)]
        if "cpp_wrapper" in self.config.inductor_patches or not gates.CPP_WRAPPER_FOR_CPU_INFERENCE or \
                not tensors or any(value.device.type != "cpu" for value in tensors) or \
                dynamo.has_symbolic_shapes(self.gm) or written:
            return {}
        return {"cpp_wrapper": True}

    def _compile_main(self, main: torch.fx.GraphModule, examples: list[Any], prepared: int,
                      patches: dict[str, Any]) -> Callable[..., Any]:
        """Inductor on the main graph: the first ``prepared`` examples are the prologue's outputs.
        Those are tensors Dynamo has not seen: in its fake mode a recompile would give them
        symbolic sizes no guard can name. A static graph compiles in a fresh mode; a dynamic one
        (whose sizes live in Dynamo's mode) gets them as static fakes there."""
        patches = {**patches, **onednn.size_asserts_for_packed_inputs(patches, examples[:prepared])}
        with torch.no_grad():
            if dynamo.has_symbolic_shapes(self.gm):
                examples = [*(fake_tensors.static_fake(value) for value in examples[:prepared]), *examples[prepared:]]
                return inductor.compile_with_inductor(main, examples, patches, keep_bn=False)
            with fake_tensors.static_tracing() as fake:
                return inductor.compile_with_inductor(main, [fake(value) for value in examples], patches, keep_bn=False)

    def _fold_as_data(self, inputs: list[Any], state: Sequence[int]) -> fold_cache.Folded:
        """Trace the graph before autograd, fold it (each fold one call) and split out the
        prologue: everything the weights' values do not change (``fold_cache`` keeps it)."""
        traced = pre_dispatch.forward_before_autograd(self.gm)
        placeholders = traced.graph.find_nodes(op="placeholder")
        written_nodes = aliasing.written_placeholders(traced.graph)
        written = {i for i, node in enumerate(placeholders) if node in written_nodes}
        readable = freezing.read_only_state(self.gm, inputs, self._live | written)
        if merges_when_frozen(traced, {placeholders[i]: inputs[i] for i in readable}, self.config.rules):
            raise _MergesWhenFrozen
        record = FoldRecord(traced_decisions(self.gm, autograd=False))
        fold_graph_as_data(traced.graph, {placeholders[i]: placeholders[i].meta["val"] for i in readable},
                           self.config.rules, record)
        traced.recompile()
        # Inductor drops a write to a graph input that a oneDNN convolution read first (as under
        # freezing, see ``folded``): a graph that writes an input of its own reads no packed weight.
        no_packing = self._no_packing or bool(written - set(state))
        pack = fold_prologue.NO_PACKING if no_packing else \
            fold_prologue.packing_choice({**self.config.inductor_patches, **self._wrapper(inputs, written)})
        parts = fold_prologue.split(traced, readable, pack)
        return fold_cache.Folded(frozenset(written), tuple(readable), record, parts,
                                 ops.draws_random_numbers(traced.graph), cacheable=not merges_read_values(traced))

    def _from_cache(self, inputs: list[Any]) -> compiled_graph.Executable | None:
        """The graph loaded from the compile cache, or built into it (``graph_cache``); None where
        it cannot be cached."""
        cached = graph_cache.compiled(self.gm, inputs, self.config)
        if cached is None:
            return None
        model, taken, record = cached
        return compiled_graph.Executable(model, tuple(taken), on_first_answer=lambda: self._publish(record),
                                         on_rerun=lambda: publish(record, reused=True))

    def folded(self, inputs: list[Any]) -> compiled_graph.Executable:
        """Freeze every parameter and buffer except those the graph writes. Which those are,
        AOTAutograd tells inside the compile; the first compile that finds one stops there (before
        folding) and the next keeps it live. A graph that writes no state compiles once. With the
        ``cache`` option, a graph that can be cached is loaded from (or built into) the compile
        cache instead (``graph_cache``)."""
        cached = self._from_cache(inputs) if self.config.cache and not self._live else None
        if cached is not None:
            return cached
        live = set(self._live)
        while True:
            freezing.check_written_state_apart(live, freezing.module_state(self.gm, inputs), inputs)
            lifted, taken = freezing.lift_module_state(self.gm, inputs, live)
            record = FoldRecord(traced_decisions(self.gm, autograd=False))
            effects = freezing.GraphEffects()
            state = freezing.state_in_aot_order(lifted)
            patches = {
                **folded_graph_patches(inputs),
                **self.config.inductor_patches,
                "freezing": True,
                "joint_custom_pre_pass": BnFoldPass(self.config.rules, record, state, effects),
                **({"cpp.weight_prepack": False} if self._no_packing else {}),
            }
            try:
                with torch.no_grad(), weight_packing.packing(patches):
                    call = inductor.compile_with_inductor(lifted, [inputs[i] for i in taken], patches, keep_bn=True)
                break
            except freezing.FrozenStateWritten as written:
                found = {i for i, value in enumerate(inputs) if any(value is t for t in written.tensors)}
                if not found or found <= live:  # the same state again: never loop
                    raise RuntimeError("bnfuse: lifted state the graph writes could not be kept live") from written
                live |= found
        self._live = live
        # Lifted state the graph writes stops the compile (FrozenStateWritten), so what it writes
        # here are its own inputs, which AOTAutograd places after the lifted state.
        written = [taken[j - len(state)] for j in effects.written if j >= len(state)]
        if len(written) != len(effects.written):
            raise RuntimeError("bnfuse: the graph writes lifted state that was frozen")
        freezing.check_writes_spare_frozen(written, sorted(set(range(len(inputs))) - set(taken)), inputs)
        if not self._no_packing and set(written) - set(freezing.module_state(self.gm, inputs)):
            # With oneDNN packing, Inductor's freezing drops a write to a graph input that a convolution
            # read first (``x.mul_(0.5)`` after ``conv(x)``): such a graph is folded without packing.
            self._no_packing = True
            return self.folded(inputs)
        # Published once the graph has answered: Dynamo may restart a compile that raised midway,
        # and a graph that fails its first run falls back and is reported as that.
        return compiled_graph.Executable(
            call,
            tuple(taken),
            on_first_answer=lambda: self._publish(record),
            on_rerun=lambda: publish(record, reused=True),
            side_effects=effects.any,
            live=tuple(sorted(live)),
        )

    def per_step(self, inputs: list[Any]) -> Callable[..., Any]:
        """A graph that needs autograd: folded per step in its aten ops before autograd, then
        compiled by Inductor (AOTAutograd derives the backward of the folds). A fold reads only
        module state the graph does not write; state that requires grad is read as it is."""
        unsupported = pre_dispatch.unsupported_before_autograd(self.gm, checkpoint=True, autocast=True, regions=True) or (
            None if gates.AUTOCAST_TRACES_BEFORE_AUTOGRAD else _autocast_around())
        if unsupported is not None:
            reason = f"not folded per step: the training graph has {unsupported}; compiled by plain Inductor"
            _log_unsupported_once(reason)
            return self.plain(inputs, lambda: FoldRecord(traced_decisions(self.gm, autograd=False, reason=reason)))
        record = FoldRecord(traced_decisions(self.gm, autograd=False))
        traced = pre_dispatch.forward_before_autograd(self.gm)
        placeholders = traced.graph.find_nodes(op="placeholder")
        written_nodes = aliasing.written_placeholders(traced.graph)
        written = [i for i, node in enumerate(placeholders) if node in written_nodes]
        readable = freezing.read_only_state(self.gm, inputs, written)
        start = time.perf_counter()
        fold_graph_per_step(traced.graph, {placeholders[i]: placeholders[i].meta["val"] for i in readable},
                            {placeholders[i]: inputs[i] for i in readable}, self.config.rules, record)
        real = {placeholders[i]: inputs[i] for i in readable}
        for body, arguments in pre_dispatch.checkpoint_regions(traced):  # inside each region, on what it is passed
            passed = [(p, a) for p, a in zip(body.graph.find_nodes(op="placeholder"), arguments, strict=True) if a in real]
            fold_graph_per_step(body.graph, {p: p.meta["val"] for p, _ in passed}, {p: real[a] for p, a in passed},
                                self.config.rules, record)
            body.recompile()
        fold_regions_per_step(traced.graph, {placeholders[i]: placeholders[i].meta["val"] for i in readable}, real,
                              self.config.rules, record)
        record.seconds += time.perf_counter() - start
        pre_dispatch.shared_regions_ready_for_autograd(traced)
        traced.recompile()
        patches = {**self.config.inductor_patches, "post_grad_custom_post_pass": SavedInputsPass()}
        call = inductor.compile_with_inductor(traced, inputs, patches, keep_bn=False)
        self._publish(record)
        return _ReportedAgain(call, record)

    def _input_name(self, index: int) -> str:
        return source_path(self.gm.graph.find_nodes(op="placeholder")[index])

    def plain(self, inputs: list[Any], record: Callable[[], FoldRecord]) -> Callable[..., Any]:
        """Plain Inductor, nothing frozen or folded; ``record()`` says why. This is the fallback, so
        a failure to report never fails it (the report then lacks this graph, and the log says so)."""
        call = inductor.compile_with_inductor(self.gm, inputs, dict(self.config.inductor_patches), keep_bn=False)
        try:
            made = record()
            self._publish(made)
        except Exception as error:  # noqa: BLE001 - see the docstring
            log.debug("bnfuse: could not report a graph compiled by plain Inductor (%s: %s)", type(error).__name__, error)
            return call
        return _ReportedAgain(call, made)

    def _publish(self, record: FoldRecord, *, sort: bool = True) -> None:
        """Put the decisions in program order (unless they are) and publish the record of a compiled graph."""
        if sort:
            sort_in_program_order(record, self.gm.graph)
        RECORDS.append(record)
        publish(record)
        for decision in record.decisions:
            log.debug("bnfuse: %s", decision)
        if self.config.report:
            log.info("bnfuse fold report:\n%s", FoldReport.from_records([record]))


class _MergesWhenFrozen(Exception):
    """The graph has parallel branches that merge only with the weights as constants."""


class _ReportedAgain:
    """A graph compiled without a ``CompiledGraph`` (per step, or by plain Inductor): reported at
    its compile, and again at each later call while ``compilefuse.explain`` collects."""

    def __init__(self, call: Callable[..., Any], record: FoldRecord) -> None:
        self._call, self._record, self._answered = call, record, False

    def __call__(self, *args: Any) -> Any:
        if RERUNS_WANTED and self._answered:
            publish(self._record, reused=True)
        self._answered = True
        return self._call(*args)


class _PythonWrapperIfTheFirstCallFails:
    """A C++-wrapper compile whose first call fails gives way to the same graph compiled with the
    Python wrapper, which answers that call: such a failure shows only when the code runs (an input
    check of the wrapper's), and it is no reason to lose the folds. The graphs it is chosen for write
    nothing, so the failed run changed nothing. After a first answer, one check a call."""

    def __init__(self, call: Callable[..., Any], python_wrapper: Callable[[], Callable[..., Any]]) -> None:
        self._call: Callable[..., Any] = call
        self._python_wrapper: Callable[[], Callable[..., Any]] | None = python_wrapper

    def __call__(self, *args: Any) -> Any:
        if self._python_wrapper is None:
            return self._call(*args)
        try:
            out = self._call(*args)
        except Exception as error:
            if dynamo.is_dynamo_restart(error):
                raise
            log.info("bnfuse: the C++ wrapper's first call failed (%s: %s); compiled with the Python wrapper",
                     type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self._call = self._python_wrapper()
            out = self._call(*args)
        self._python_wrapper = None  # the examples it holds go with it
        return out


def _first_requiring_grad(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    if not torch.is_grad_enabled():
        return None
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, value in zip(placeholders, example_inputs, strict=True):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return node.target
    return None


def _autocast_around() -> str | None:
    """Autocast entered around the compiled call: the per-step trace would lose its casts (the
    convolutions would run in float32), so such a graph is not folded per step."""
    on = [device for device in dynamo.AUTOCAST_DEVICES if dynamo.autocast_on(device)]
    return f"autocast ({', '.join(on)}) around the compiled call" if on else None


_unsupported_logged = False


def _log_unsupported_once(reason: str) -> None:
    global _unsupported_logged
    if not _unsupported_logged:
        _unsupported_logged = True
        log.warning("bnfuse: BatchNorm %s (the fold report names each BN; this warning is not repeated)", reason)


def _log_autograd_once(name: str) -> None:
    global _autograd_logged
    if not _autograd_logged:
        _autograd_logged = True
        log.warning(_AUTOGRAD_MESSAGE, name)
