"""A thin shim over torch's private compiler internals: the one file a torch upgrade should touch.

``torch._dynamo``, ``torch._functorch`` and ``torch._inductor`` move between releases. Every access
the backend makes to them goes through a small function here that does one thing and, where a
layout has changed before, checks it instead of assuming it. No logic of bnfuse lives here.
(The benchmark's own private helpers are in ``compilefuse/bench/_torch_private.py``.)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import operator
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._dynamo.source import is_from_unspecialized_param_buffer_source
from torch._functorch._aot_autograd.schemas import MutationType
from torch._higher_order_ops.wrap import tag_activation_checkpoint
from torch._inductor import config as inductor_config
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.pattern_matcher import (  # noqa: F401  (re-exported for the rules and passes)
    MULTIPLE,
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

from ._torch_runtime import (  # noqa: F401  (re-exported: the compiler's callers)
    dynamo_source,
    pack_conv_weight,
    real_tensor_math,
    return_freed_memory,
    source_name,
)

log = logging.getLogger("compilefuse")
aten = torch.ops.aten


#: The inference BatchNorm op that Inductor normally decomposes before any custom pass runs.
BN_INFERENCE_OP = aten._native_batch_norm_legit_no_training.default


@functools.cache
def max_pool_ops() -> tuple[Any, ...]:
    """Max-pool ops as a post-grad pass sees them: Inductor's decomposition into values and
    offsets, or the ATen op where Inductor falls back. Output 0 is the pooled values in each. (A
    function, not a constant: importing this module registers no prims.)"""
    import torch._inductor.inductor_prims  # registers the prims below

    decomposed = ("_low_memory_max_pool_with_offsets", "_low_memory_max_pool2d_with_offsets")  # torch >= 2.7, 2.6
    return (
        *(getattr(torch.ops.prims, name).default for name in decomposed if hasattr(torch.ops.prims, name)),
        aten.max_pool2d_with_indices.default,
        aten.max_pool3d_with_indices.default,
    )


__all__ = ["BN_INFERENCE_OP", "CustomGraphPass", "Match", "PatternMatcherPass"]


# --- Inductor: config, modes, the compile entry point ----------------------------------------------


def inductor_mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor config patches for a ``torch.compile`` mode (``RuntimeError`` for an unknown mode;
    torch up to about 2.7 raised ``KeyError``)."""
    try:
        return dict(list_mode_options(mode)) if mode else {}
    except KeyError:
        raise RuntimeError(f"Unrecognized mode={mode}, should be one of: default, reduce-overhead, "
                           "max-autotune, max-autotune-no-cudagraphs") from None


def inductor_config_keys() -> frozenset[str]:
    return frozenset(inductor_config.get_config_copy())


def inductor_settings() -> list[tuple[str, Any]]:
    """The user's Inductor settings as Inductor's own FX graph cache keys them (without paths,
    trace options and custom passes), sorted."""
    return sorted(inductor_config.save_config_portable().items())


def file_hash(paths: Sequence[str], extra: str) -> bytes:
    return get_hash_for_files(tuple(paths), extra)


class _DecompositionTable(dict):  # type: ignore[type-arg]
    """Pickles as a call to the function that builds it.

    Inductor puts a custom decomposition table into its FX graph cache key; the table's values
    include pybind functions, which cannot be pickled and make Inductor bypass the cache.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (decompositions_keeping_inference_bn, ())


def decompositions_keeping_inference_bn() -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table minus inference BatchNorm, so the passes see BN as one op, and
    minus its CPU rewrite of a tiny ``addmm`` / ``mm`` (one row, at most 16 features) into multiply
    and sum, which would hide a Linear from the rules at batch 1."""
    table = _DecompositionTable(select_decomp_table())
    for op in (BN_INFERENCE_OP, aten._batch_norm_no_update.default, aten.addmm.default, aten.mm.default):
        table.pop(op, None)
    return table


def compile_with_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config_patches: dict[str, Any],
    *,
    keep_bn: bool,
) -> Callable[..., Any]:
    """Run Inductor (AOTAutograd included) on a Dynamo graph; ``keep_bn`` keeps inference BN whole."""
    decompositions = decompositions_keeping_inference_bn() if keep_bn else None
    return compile_fx(
        gm, list(example_inputs), config_patches=config_patches, decompositions=decompositions
    )


#: The packing choice of the compile running in this thread (None: Inductor's own), read by the
#: check bnfuse adds to Inductor's packing patterns. A context variable, not a patch per compile:
#: refolds of different graphs may compile in several threads at once.
_conv_packing: contextvars.ContextVar[Callable[[torch.fx.Node], bool] | None] = contextvars.ContextVar(
    "bnfuse_conv_packing", default=None
)
_conv_packing_install = threading.Lock()


def _packing_allowed(node: torch.fx.Node) -> bool:
    keep = _conv_packing.get()
    return keep is None or keep(node)


def _narrow_conv_packing_patterns() -> None:
    """Add ``_packing_allowed`` to the check of each of Inductor's convolution packing patterns that
    lacks it (Inductor registers them once per process, at its first freezing compile)."""
    from torch._inductor.fx_passes import freezing_patterns

    freezing_patterns.lazy_init()
    key = ("call_function", aten.convolution.default)
    with _conv_packing_install:
        for passes in freezing_patterns.pass_patterns:
            for entry in passes.patterns.get(key, []):
                if not getattr(entry.extra_check, "bnfuse_narrowed", False):
                    check = entry.extra_check
                    narrowed = lambda match, check=check: check(match) and _packing_allowed(match.output_node())  # noqa: E731
                    narrowed.bnfuse_narrowed = True  # type: ignore[attr-defined]
                    entry.extra_check = narrowed


@contextlib.contextmanager
def cpu_conv_weight_packing(keep: Callable[[torch.fx.Node], bool]) -> Iterator[None]:
    """Under this, Inductor's freezing packs a CPU convolution's weight for oneDNN only where
    ``keep(convolution node)`` says so (and Inductor would). Inductor registers its packing
    patterns once per process and then applies them to every eligible convolution whatever
    ``cpp.weight_prepack`` says; bnfuse adds a check to them that consults ``keep`` for the compiles
    under this in this thread. With a pattern layout this file does not know, Inductor's own choice
    stands."""
    try:
        _narrow_conv_packing_patterns()
    except Exception as error:  # noqa: BLE001 - only a speed choice is lost
        log.debug("bnfuse: unknown layout of Inductor's freezing patterns (%r); weight packing left to Inductor", error)
    token = _conv_packing.set(keep)
    try:
        yield
    finally:
        _conv_packing.reset(token)


# --- Dynamo: graph inputs, sources, exceptions --------------------------------------------------


def set_dynamo_source(node: torch.fx.Node, source: Any) -> None:
    node._dynamo_source = source  # type: ignore[attr-defined]


def is_module_state(node: torch.fx.Node) -> bool:
    """A placeholder that Dynamo lifted from a module's parameters or buffers."""
    source = dynamo_source(node)
    return source is not None and is_from_unspecialized_param_buffer_source(source)


def param_sources(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """The ``attribute name -> Dynamo source`` map AOTAutograd reads off a Dynamo graph module."""
    return dict(getattr(gm, "_param_name_to_source", None) or {})


def set_param_sources(gm: torch.fx.GraphModule, sources: dict[str, Any]) -> None:
    gm._param_name_to_source = sources  # type: ignore[assignment]


def compile_time_error(message: str) -> Exception:
    """A ``ValueError`` that Dynamo lets through to the user instead of wrapping it.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed``, except its own
    ``ShortenTraceback``; an error that is both reaches ``except ValueError`` in user code.
    """
    shorten = getattr(torch._dynamo.exc, "ShortenTraceback", None)
    if shorten is None:
        return ValueError(message)

    class BnfuseOptionError(ValueError, shorten):  # type: ignore[misc, valid-type]
        def __init__(self, text: str) -> None:
            ValueError.__init__(self, text)
            self.first_useful_frame = None

    return BnfuseOptionError(message)


#: Dynamo's exceptions that restart or skip a frame's compile; a backend must let them through.
#: Not every ``TorchDynamoException``: Inductor's own ``InductorError`` is one too (a
#: ``BackendCompilerFailed``), and it is a failure to fall back from. (Both names exist in torch 2.6-2.14.)
_DYNAMO_RESTARTS: tuple[type[BaseException], ...] = tuple(
    getattr(torch._dynamo.exc, name) for name in ("RestartAnalysis", "SkipFrame") if hasattr(torch._dynamo.exc, name)
)


def is_dynamo_restart(error: BaseException) -> bool:
    """Whether ``error`` is Dynamo restarting or skipping the compile (not a failure of it)."""
    return isinstance(error, _DYNAMO_RESTARTS)


def is_inductor_error(error: BaseException) -> bool:
    """Whether ``error`` was raised by Inductor's lowering or code generation."""
    return any(type(e).__name__ in ("InductorError", "LoweringException") for e in _causes(error))


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced this graph with symbolic (dynamic) sizes."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return True
    return False


# --- The tracing context of a compile in progress -----------------------------------------------


def current_fake_mode() -> Any:
    """The fake-tensor mode of the Dynamo compile in progress (None outside one)."""
    context = torch._guards.TracingContext.try_get()
    return None if context is None else context.fake_mode


def tracing(fake_mode: Any | None) -> contextlib.AbstractContextManager:
    """A tracing context for compiling a Dynamo graph again, in ``fake_mode`` (None: a fresh mode)."""
    mode = fake_mode if fake_mode is not None else torch._subclasses.fake_tensor.FakeTensorMode()
    return torch._guards.tracing(torch._guards.TracingContext(mode))


@contextlib.contextmanager
def static_tracing() -> Iterator[Callable[[Any], Any]]:
    """A fresh tracing context for a compile of static sizes, yielding the conversion of its
    example inputs to fake tensors of that mode. Unlike ``tracing(None)`` it has a shape
    environment (with none, AOTAutograd's and the FX graph cache both bypass: "No shape env"),
    and the inputs are fake already, so none gets a symbolic size."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = torch._subclasses.fake_tensor.FakeTensorMode(shape_env=ShapeEnv())
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        yield lambda value: _fake(mode, value) if isinstance(value, torch.Tensor) else value


try:  # torch >= 2.7 (AOTAutograd's and Inductor's own caches pickle graphs with it)
    from torch.fx._graph_pickler import GraphPickler as _GraphPickler
    from torch.fx._graph_pickler import Options as _GraphPicklerOptions
except ImportError:  # torch 2.6
    _GraphPickler = _GraphPicklerOptions = None

#: Whether this torch pickles a graph exactly (its code, node names and fake values): bnfuse's fold
#: cache needs that for Inductor's caches to hit on the graph it loads.
PICKLES_GRAPHS = _GraphPickler is not None


def graph_to_bytes(gm: torch.fx.GraphModule) -> bytes:
    """``gm`` with its fake values, every operator allowed (the default refuses oneDNN's)."""
    assert _GraphPickler is not None and _GraphPicklerOptions is not None
    return _GraphPickler.dumps(gm, _GraphPicklerOptions(ops_filter=None))


def graph_from_bytes(data: bytes) -> torch.fx.GraphModule:
    """A graph ``graph_to_bytes`` wrote, its fake values in a fresh fake mode of static sizes."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    assert _GraphPickler is not None
    gm = _GraphPickler.loads(data, torch._subclasses.fake_tensor.FakeTensorMode(shape_env=ShapeEnv()))
    assert isinstance(gm, torch.fx.GraphModule)
    return gm


def caches_disabled() -> bool:
    """Inductor's caches are off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES``): so is bnfuse's fold cache."""
    return bool(inductor_config.force_disable_caches)


def static_fake(value: torch.Tensor) -> Any:
    """``value`` as a fake tensor of static sizes in the fake mode of the compile under way."""
    return _fake(torch._guards.detect_fake_mode(), value)


def set_value(node: torch.fx.Node, value: Any) -> None:
    """A node's fake value, with the ``tensor_meta`` the pattern matcher of torch 2.6 asserts on
    beside a tensor's (newer releases read ``val`` alone)."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    node.meta["val"] = value
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)


def _fake(mode: Any, value: torch.Tensor) -> Any:
    """A fake of ``value`` with static sizes. A oneDNN-packed weight becomes a strided fake of its
    sizes and ``_packed_fake_stride``: Inductor compiles the same code for either (it reads an
    input's sizes and strides, never its layout), and both its caches refuse a graph with an input
    of oneDNN's layout ("mkldnn tensors unpickleable")."""
    if not value.is_mkldnn:
        return mode.from_tensor(value, static_shapes=True)
    with mode:
        return torch.empty_strided(value.shape, _packed_fake_stride(value), dtype=value.dtype, device=value.device)


def _packed_fake_stride(value: torch.Tensor) -> tuple[int, ...]:
    """The strides a packed weight's fake gets: a convolution's those its own fake reports,
    ``(1, 0, ...)``; a linear layer's (2-D) contiguous ones, which Inductor's lowering of oneDNN's
    linear asks for (it would copy the input otherwise)."""
    return (value.shape[1], 1) if value.dim() == 2 else (1,) + (0,) * (value.dim() - 1)


def size_asserts_for_packed_inputs(patches: dict[str, Any], inputs: Sequence[Any]) -> dict[str, Any]:
    """The size-assert setting for a graph with these inputs. A oneDNN-packed one fails a size
    assert where its fake's strides are not what the check reads: Inductor's C++ wrapper reads them
    from ATen's C API, which for a packed tensor are never its fake's; the Python wrapper from
    ``stride()``, which is ``(1, 0, ...)``. Such a graph compiles without asserts: Dynamo's guards
    check the user's inputs, and bnfuse's prologue makes the packed ones."""
    packed = [value for value in inputs if getattr(value, "is_mkldnn", False)]
    if not packed:
        return {}
    if patches.get("cpp_wrapper", inductor_config.cpp_wrapper) or \
            any(_packed_fake_stride(value) != tuple(value.stride()) for value in packed):
        return {"size_asserts": False}
    return {}


def compiled_root() -> torch.nn.Module | None:
    """The model whose compiled call is running (``torch.compile(model)``'s ``OptimizedModule``, or
    a module after ``model.compile()``), found on the Python stack while Dynamo compiles one of its
    frames: the outermost, so a graph break's frames are named from the model the user compiled.
    None for a compiled function."""
    from torch._dynamo.eval_frame import OptimizedModule

    root = None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, OptimizedModule):
            root = owner._orig_mod
        elif isinstance(owner, torch.nn.Module) and getattr(owner, "_compiled_call_impl", None) is not None:
            root = owner
        frame = frame.f_back
    return root


def outside_dynamo_tracing() -> contextlib.AbstractContextManager:
    """No tracing context: a compile started from inside Dynamo's (``torch.export`` and
    AOTInductor of a graph a backend received) as if it ran on its own."""
    return torch._guards.tracing(None)


def aot_parameters() -> tuple[list[Any], set[int]] | None:
    """Inside a freezing compile: the real values AOTAutograd lifted as the graph's leading inputs
    (the graph module's attributes, in order), and the indices of those freezing will *not* turn
    into constants (mutated in the graph, or returned aliased). None outside such a compile."""
    context = torch._guards.TracingContext.try_get()
    if context is None or context.params_flat is None or context.fw_metadata is None:
        return None
    params = list(context.params_flat_unwrap_subclasses or context.params_flat)
    written, aliased = aot_input_writes()
    return params, {i for i in written | aliased if i < len(params)}


def aot_input_writes() -> tuple[set[int], set[int]]:
    """Inside an AOTAutograd compile: the positions of the inputs (AOTAutograd's order: the lifted
    attributes, then the graph's own inputs) that the graph writes, data or metadata, and of those
    an output is a view of. Empty outside a compile."""
    context = torch._guards.TracingContext.try_get()
    meta = None if context is None else context.fw_metadata
    if meta is None:
        return set(), set()
    written = {i for i, info in enumerate(meta.input_info) if info.mutation_type != MutationType.NOT_MUTATED}
    aliased = {out.base_idx for out in meta.output_info if out.base_idx is not None}
    return written, aliased


def is_operator(target: Any) -> bool:
    """An operator (ATen or custom, an overload or its packet), as opposed to a Python function."""
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def is_pure_operator(target: Any) -> bool:
    """An aten operator that writes none of its inputs and draws no random numbers (its output is a
    function of its inputs alone)."""
    return (isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags)


def draws_random_numbers(graph: torch.fx.Graph) -> bool:
    """Whether an aten graph calls an op that draws from the random number generator."""
    return any(
        isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
        for node in graph.nodes
        if node.op == "call_function"
    )


def fake_tensor_of(node: torch.fx.Node, value: torch.Tensor) -> Any:
    """A fake tensor for a new constant, in the fake mode of the graph around ``node``."""
    fake = node.meta["val"]
    return fake.fake_mode.from_tensor(value, static_shapes=True)


def mark_frozen(value: torch.Tensor) -> None:
    """Tag a folded constant as a frozen parameter: the FX graph cache then keys on its metadata
    and reloads the value from the graph, as it does for Inductor's own frozen constants."""
    value._is_frozen_param = True  # type: ignore[attr-defined]


# --- oneDNN: convolution weights packed ahead, read as data ------------------------------------

#: The oneDNN convolution Inductor's freezing rewrites a packed convolution to (and fuses unary and
#: binary ops into, in its post-grad passes, frozen or not).
MKLDNN_CONV_POINTWISE = torch.ops.mkldnn._convolution_pointwise.default
MKLDNN_CONV_TRANSPOSE_POINTWISE = torch.ops.mkldnn._convolution_transpose_pointwise.default


@functools.cache
def packed_linear_op() -> Any:
    """``compilefuse::packed_linear(input, weight, bias)``: oneDNN's linear on a weight packed ahead
    (``mkldnn._linear_pointwise``), as an op Inductor calls rather than lowers. Inductor's lowering
    of oneDNN's linear takes the weight from the graph's constants only ("weight must be a graph
    constant"), and a graph compiled with the weights as data reads it as an input. Registered on
    first use (importing this module registers no op); a fold loaded from the fold cache names it."""
    library = torch.library.Library("compilefuse", "DEF")
    library.define("packed_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor")
    linear = torch.ops.mkldnn._linear_pointwise.default

    def packed_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(input, weight, bias, "none", [], "")

    def fake(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return input.new_empty((*input.shape[:-1], weight.shape[0]))

    library.impl("packed_linear", packed_linear, "CompositeExplicitAutograd")  # a packed weight is MkldnnCPU
    torch.library.register_fake("compilefuse::packed_linear", fake, lib=library)
    _LIBRARIES.append(library)  # an op lives as long as its library
    return torch.ops.compilefuse.packed_linear.default


_LIBRARIES: list[Any] = []


def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether oneDNN convolves in ``dtype`` on this CPU."""
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


# --- Training graphs: the forward in aten ops, before autograd ---------------------------------


def _inference_batch_norm(
    input: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, training: bool, momentum: float,
    eps: float, cudnn_enabled: bool,
) -> Any:
    """``aten.batch_norm`` in inference mode as the op the rules know; anything else left alone."""
    if training or running_mean is None or running_var is None:
        return NotImplemented
    return BN_INFERENCE_OP(input, weight, bias, running_mean, running_var, momentum, eps)[0]


def _transpose_2d(x: Any) -> Any:
    return aten.permute.default(x, [1, 0]) if x.dim() == 2 else NotImplemented


#: CompositeImplicitAutograd ops decomposed in a training graph before autograd, so that the rules
#: see the ops of an inference graph (``convolution``, ``addmm`` or ``mm`` of a permuted weight).
#: Autograd differentiates their decompositions anyway.
_COMPOSITE_OPS = tuple(
    getattr(getattr(aten, name), overload)
    for name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                 "linear", "matmul", "reshape_as", "view_as", "expand_as")
    for overload in ("default", "padding", "input")
    if hasattr(getattr(aten, name), overload)
)


#: The convolutions autocast casts as composites (``conv2d``, not the ``convolution`` they
#: decompose into, which it leaves alone): decomposed before autograd, they get autocast's casts
#: written out, or a training graph under autocast would convolve in float32.
_AUTOCAST_CONVOLUTIONS = tuple(op for op in _COMPOSITE_OPS if op.name().split("::")[1].split(".")[0]
                               in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))


def _convolution_as_autocast_runs_it(op: Any, *args: Any, **kwargs: Any) -> Any:
    """``op`` decomposed, its floating-point tensors (not float64) first cast to the autocast dtype
    of their device where autocast is on there, as autocast's kernel for ``op`` casts them."""
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    if autocast_on(device):
        dtype = torch.get_autocast_dtype(device)

        def cast(value: Any) -> Any:
            eligible = isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                and value.device.type == device and value.dtype != dtype
            return aten._to_copy.default(value, dtype=dtype) if eligible else value

        args, kwargs = pytree.tree_map(cast, (args, kwargs))
    return op.decompose(*args, **kwargs)


def autocast_on(device: str) -> bool:
    """Whether autocast is on for a device type (False for one this torch has no autocast for)."""
    try:
        return torch.is_autocast_enabled(device)
    except (RuntimeError, ValueError):  # a device autocast does not know (meta on torch 2.6)
        return False


#: The device types ``traced_global_state`` reads autocast's state of.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def traced_global_state() -> tuple[Any, ...]:
    """The process state a trace of a Dynamo graph depends on beyond its code and inputs, as
    Dynamo's global-state guard sees it: autocast (per device type: on, dtype), grad mode, the
    default dtype, deterministic algorithms."""
    autocast = tuple((device, torch.get_autocast_dtype(device)) for device in AUTOCAST_DEVICES if autocast_on(device))
    return autocast, torch.is_grad_enabled(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()


def _before_autograd_decompositions() -> dict[Any, Callable[..., Any]]:
    """Only decompositions autograd is blind to: those of ``_COMPOSITE_OPS``, inference
    ``batch_norm`` as the inference BN op, and a matrix ``t`` as the ``permute`` it is. Not
    Inductor's table: some of its decompositions (max-pool's, into prims) have no derivative."""
    table: dict[Any, Callable[..., Any]] = {op: op.decompose for op in _COMPOSITE_OPS}
    for op in _AUTOCAST_CONVOLUTIONS:
        table[op] = functools.partial(_convolution_as_autocast_runs_it, op)
    table[aten.batch_norm.default] = _inference_batch_norm
    table[aten.t.default] = _transpose_2d
    return table


def trace_before_autograd(fn: Callable[..., Any], args: Sequence[Any]) -> torch.fx.GraphModule:
    """``fn`` traced on ``args`` (fake tensors) to aten ops autograd has not seen yet, with the
    decompositions above: how ``forward_before_autograd`` traces a graph, and the pattern
    matcher's ``trace_fn`` for a replacement in such a graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = next((a.fake_mode for a in args if isinstance(a, torch._subclasses.FakeTensor)), None)
    with fake_mode or contextlib.nullcontext(), torch.fx.traceback.preserve_node_meta():
        return make_fx(fn, decomposition_table=_before_autograd_decompositions(), pre_dispatch=True)(*args)


#: Activation checkpointing (``torch.utils.checkpoint`` under ``torch.compile``) as Dynamo emits it.
CHECKPOINT_OP = tag_activation_checkpoint
#: Whether this torch's pre-dispatch tracing keeps a checkpointed region as the higher-order op with
#: its body traced to aten ops (its ``ProxyTorchDispatchMode`` rule, in torch 2.14; older releases
#: cannot trace the op there, and a graph with one is not folded per step).
CHECKPOINT_TRACES_BEFORE_AUTOGRAD = any(
    getattr(key, "__name__", "") == "ProxyTorchDispatchMode" for key in CHECKPOINT_OP.python_key_table)


#: Whether a graph under autocast folds per step on this torch: tested on 2.14 (and CI's 2.6, where
#: a linear's ``mm`` came out of AOTAutograd with one operand cast and one not, so not there).
AUTOCAST_TRACES_BEFORE_AUTOGRAD = torch.torch_version.TorchVersion(torch.__version__.split("+")[0]) >= "2.14"


def unsupported_before_autograd(gm: torch.fx.GraphModule, *, checkpoint: bool = False, autocast: bool = False) -> str | None:
    """Why ``forward_before_autograd`` cannot trace this Dynamo graph faithfully for a caller
    (None: it can). Higher-order ops (``wrap``, activation checkpointing unless ``checkpoint`` and
    this torch traces it) do not trace there; an autocast region traces with autocast's casts made
    explicit only for what the rules rewrite (``autocast``: a caller that folds per step)."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            if node.target is CHECKPOINT_OP and checkpoint and CHECKPOINT_TRACES_BEFORE_AUTOGRAD:
                continue
            return f"higher-order op {node.target.name()}"
        if getattr(node.target, "__name__", "") in ("_enter_autocast", "_exit_autocast") and not (
                autocast and AUTOCAST_TRACES_BEFORE_AUTOGRAD):
            return "an autocast region"
    return None


def forward_before_autograd(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A Dynamo graph as aten ops that autograd has not seen yet (``make_fx``'s pre-dispatch
    tracing): AOTAutograd, compiling it, derives the backward of whatever a pass made of it. Traced
    on Dynamo's own example values, so sizes Dynamo keeps symbolic stay symbolic; grad-mode changes
    are kept as calls; each op keeps the metadata (module path) of the node it came from; a
    checkpointed region stays one (``checkpoint_regions``)."""
    values = [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")]
    with _plain_checkpoint_traceable(gm) as untagged:
        traced = trace_before_autograd(_AutocastEntered(gm).run, values)
        untagged(traced)
    for module in traced.modules():  # the graph, and each checkpointed region's body
        if isinstance(module, torch.fx.GraphModule):
            for node in reversed(module.graph.find_nodes(op="call_function", target=operator.getitem)):
                if not node.users:  # a BN's unused statistics: the rules match a BN read once
                    module.graph.erase_node(node)
            module.recompile()
    return traced


class _AutocastEntered(torch.fx.Interpreter):
    """Runs a Dynamo graph's autocast regions as ``with torch.autocast(...)`` does: pre-dispatch
    tracing records a bare ``_enter_autocast`` call without entering autocast, so the ops inside
    would be traced (and their fake values computed) in float32; entered through ``torch.autocast``,
    the region is recorded the same and autocast is on while its ops are traced."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is torch.amp.autocast_mode._enter_autocast:
            region = torch.autocast(*args, **kwargs)
            region.__enter__()
            return region
        if target is torch.amp.autocast_mode._exit_autocast:
            args[0].__exit__(None, None, None)
            return None
        return super().call_function(target, args, kwargs)


_CONTEXT_FN = "_checkpoint_context_fn"


@contextlib.contextmanager
def _plain_checkpoint_traceable(gm: torch.fx.GraphModule) -> Iterator[Callable[[torch.fx.GraphModule], None]]:
    """torch 2.14's pre-dispatch rule for the checkpoint op copies ``meta["_checkpoint_context_fn"]``
    from the region's body, which only a checkpoint given a ``context_fn`` (selective
    checkpointing) has: a plain one raises KeyError. While tracing, a plain region's body gets the
    policy the op uses for it anyway (recompute everything); the mark is taken off afterwards, from
    the Dynamo graph and from the traced bodies (``untagged(traced)``), so the op runs them as the
    plain regions they are."""
    bodies = [gm.get_submodule(node.args[0].target) for node in gm.graph.find_nodes(op="call_function", target=CHECKPOINT_OP)
              if node.args and getattr(node.args[0], "op", None) == "get_attr"]
    plain = [body for body in bodies if _CONTEXT_FN not in body.meta]
    if not plain:
        yield lambda _traced: None
        return

    from torch._higher_order_ops.wrap import _always_prefer_recompute
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    mark = functools.partial(create_selective_checkpoint_contexts, _always_prefer_recompute)

    class PlainRegion(dict):  # type: ignore[type-arg]
        """A body's meta that gives the rule its copy, while ``in`` still finds no context_fn (so
        the op runs the region as a plain one, without its warning about a context_fn)."""

        def __missing__(self, key: str) -> Any:
            if key == _CONTEXT_FN:
                return mark
            raise KeyError(key)

    def untagged(traced: torch.fx.GraphModule) -> None:
        for module in traced.modules():
            if isinstance(module, torch.fx.GraphModule) and module.meta.get(_CONTEXT_FN) is mark:
                del module.meta[_CONTEXT_FN]

    originals = [body.meta for body in plain]
    for body in plain:
        body.meta = PlainRegion(body.meta)
    try:
        yield untagged
    finally:
        for body, meta in zip(plain, originals, strict=True):
            body.meta = meta


def checkpoint_regions(traced: torch.fx.GraphModule) -> list[tuple[torch.fx.GraphModule, list[Any]]]:
    """Each checkpointed region of a graph ``forward_before_autograd`` traced: its body (aten ops)
    and the arguments of the call, one per placeholder of the body."""
    regions = []
    for node in traced.graph.find_nodes(op="call_function", target=CHECKPOINT_OP):
        body = traced.get_submodule(node.args[0].target)
        regions.append((body, list(node.args[1:])))
    return regions


def recompute_in_backward(node: torch.fx.Node) -> None:
    """Ask AOTAutograd's partitioner to recompute ``node`` in the backward rather than save it
    (the tag selective activation checkpointing uses; the tracing keeps it on what the node
    becomes). A per-step fold's weight is elementwise arithmetic on the weight itself, which
    the backward has anyway: saving the folded copy would cost a weight-sized tensor per conv."""
    from torch.utils.checkpoint import CheckpointPolicy

    node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
    node.meta["ac_graph_id"] = 0


def outputs_for_backward(graph: torch.fx.Graph) -> list[int]:
    """The outputs of a forward graph Inductor compiles that its user does not see (what AOTAutograd
    saves for the backward, and mutated inputs' values), by ``compile_fx``'s mark on the output node.
    Empty without the mark (``keep_output_stride=False``): then no output is known to be unseen. An
    inference or backward graph marks all its outputs as seen."""
    output = graph.find_nodes(op="output")[0]
    seen = output.meta.get("user_visible_output_idxs")
    if seen is None:
        return []
    seen = set(seen)
    return [i for i in range(len(output.args[0])) if i not in seen]


def keep_layout(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """``node`` through two aliases (to be inserted after the graph's last convolution): returned
    from the graph, it keeps its own strides. Inductor gives a channels-last copy to an output that
    lies on the way to a convolution (``GraphLowering.find_nodes_prefer_channels_last``), which is
    every user of such a node, the first alias included; it propagates only up to the last
    convolution, so the second alias is not on the way. (Torch 2.6 propagates through the whole
    graph: there the copy stays, as without this.)"""
    alias = node
    for _ in range(2):
        alias = graph.call_function(aten.alias.default, (alias,))
        alias.meta["val"] = aten.alias.default(node.meta["val"])
    return alias


def written_placeholders(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The inputs an aten graph that is not functionalised writes, data or metadata, directly or
    through a view: each argument an op's schema marks as written, followed back through views."""
    written = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is CHECKPOINT_OP:  # what its body writes
            body = graph.owning_module.get_submodule(node.args[0].target)
            inner = written_placeholders(body.graph)
            for placeholder, arg in zip(body.graph.find_nodes(op="placeholder"), node.args[1:], strict=True):
                base = _view_base(arg)
                if placeholder in inner and isinstance(base, torch.fx.Node) and base.op == "placeholder":
                    written.add(base)
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for position, argument in enumerate(node.target._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.kwargs[argument.name] if argument.name in node.kwargs else (
                node.args[position] if position < len(node.args) else None)
            for arg in value if isinstance(value, (list, tuple)) else [value]:
                base = _view_base(arg)
                if isinstance(base, torch.fx.Node) and base.op == "placeholder":
                    written.add(base)
    # An input that shares memory with a written one (a buffer that is a view of a weight) is
    # written too, as far as anything reading it knows.
    storages = {_storage_of(node) for node in written} - {None}
    return written | {node for node in graph.find_nodes(op="placeholder") if _storage_of(node) in storages}


def outputs_alias_inputs(graph: torch.fx.Graph) -> bool:
    """Whether a functional aten graph returns an input, a view of one, or memory an input shares."""
    inputs = {_storage_of(node) for node in graph.find_nodes(op="placeholder")} - {None}
    outputs = [arg for arg in pytree.tree_leaves(graph.find_nodes(op="output")[0].args) if isinstance(arg, torch.fx.Node)]
    return any(_view_base(arg).op == "placeholder" or _storage_of(arg) in inputs for arg in outputs)


def _storage_of(node: torch.fx.Node) -> Any:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(value.untyped_storage())


def _view_base(value: Any) -> Any:
    """What a chain of view ops (outputs aliasing their first argument) starts from."""
    while isinstance(value, torch.fx.Node) and value.op == "call_function" and isinstance(value.target, torch._ops.OpOverload):
        returns = value.target._schema.returns
        if not returns or returns[0].alias_info is None or not value.args:
            break
        value = value.args[0]
    return value


# --- Tensors ------------------------------------------------------------------------------------


#: ``version_of(tensor)``: the version counter, read by the C getter itself (no attribute lookup:
#: the per-call freshness check maps it over hundreds of tensors). Raises for inference tensors.
version_of = torch.Tensor._version.__get__  # type: ignore[attr-defined]


def version_counter(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for an inference tensor, which has none."""
    if tensor.is_inference():
        return None
    return version_of(tensor)


# --- Generated code -----------------------------------------------------------------------------


def _code_cache() -> Any | None:
    """Inductor's ``PyCodeCache`` if its layout is one ``release_code_modules`` knows: a ``modules``
    list (torch 2.6 on), and, from about 2.8, a ``modules_no_attr`` dict beside it."""
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        return None
    if not isinstance(getattr(PyCodeCache, "modules", None), list):
        return None
    if not isinstance(getattr(PyCodeCache, "modules_no_attr", {}), dict):
        return None
    return PyCodeCache


@contextlib.contextmanager
def loaded_code_modules() -> Iterator[list[Any]]:
    """Collect the generated-code modules Inductor loads inside the block (none if the code
    cache's layout is unknown)."""
    cache = _code_cache()
    before = len(cache.modules) if cache is not None else 0
    loaded: list[Any] = []
    try:
        yield loaded
    finally:
        if cache is not None:
            loaded.extend(cache.modules[before:])


def release_code_modules(modules: Sequence[Any]) -> None:
    """Drop Inductor's cache references to generated-code modules no longer used.

    Inductor keeps every module it loads (in its cache and in ``sys.modules``) for the life of the
    process, and a frozen graph's module holds the graph's constants. Compiled callables hold their
    own module, so only dead graphs are freed. With a cache layout this file does not know, nothing
    is released and the garbage collector keeps what the cache keeps.
    """
    cache = _code_cache()
    if cache is None:
        if modules:
            log.debug("bnfuse: unknown PyCodeCache layout; %d generated module(s) not released", len(modules))
        return
    dead = {id(m) for m in modules}
    cache.modules[:] = [m for m in cache.modules if id(m) not in dead]
    by_key = getattr(cache, "modules_no_attr", {})
    for key, module in list(by_key.items()):
        if id(module) in dead:
            del by_key[key]
    for module in modules:  # Inductor also registers them in sys.modules
        name = getattr(module, "__name__", None)
        if name is not None and sys.modules.get(name) is module:
            del sys.modules[name]


# --- AOTInductor packages (compilefuse.export / load) ---------------------------------------------


def unlifted_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The exported program as a graph module whose weights are attributes (``get_attr`` nodes),
    without the input guards AOTInductor does not compile (``check_guards`` is new in about 2.9)."""
    try:
        return program.module(check_guards=False)
    except TypeError:
        return program.module()


def aoti_compile(gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], patches: dict[str, Any]) -> list[Any]:
    """AOTInductor on an unlifted exported module, as ``aoti_compile_and_package`` runs it: the
    files a package is made of."""
    # (AOTInductor writes the device's metadata into the dict of its setting: a copy, or the global
    # setting would change with the first build, and with it every later cache key.)
    options = {**patches, "aot_inductor.package": True}
    metadata = patches.get("aot_inductor.metadata", getattr(inductor_config.aot_inductor, "metadata", None))
    if metadata is not None:
        options["aot_inductor.metadata"] = dict(metadata)
    files = torch._inductor.aot_compile(gm, args, kwargs, options=options)
    if not isinstance(files, list):
        raise RuntimeError(f"AOTInductor returned {type(files).__name__}, not the list of a package's files")
    return files


def _pt2_archive() -> Any:
    try:
        from torch.export.pt2_archive import _package, constants
    except ImportError:
        raise RuntimeError(
            f"compilefuse.export needs torch's PT2 archive format (torch.export.pt2_archive), which torch "
            f"{torch.__version__} lacks; it is tested on the newest torch of docs/compatibility.md"
        ) from None
    return _package, constants


def write_package(path: str, files: list[Any], extra: dict[str, str]) -> None:
    """A ``.pt2`` package of AOTInductor's files, with ``extra`` text files beside them."""
    package, _ = _pt2_archive()
    package.package_pt2(path, aoti_files=files, extra_files=extra)


def package_extra_prefix() -> str:
    """Where a package keeps its extra files, below the archive's own top-level folder."""
    return _pt2_archive()[1].EXTRA_DIR

