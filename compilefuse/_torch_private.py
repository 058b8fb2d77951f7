"""Every use of torch's private compiler internals, in one place.

``torch._dynamo``, ``torch._functorch`` and ``torch._inductor`` move between releases; when a torch
upgrade breaks compilefuse, this is the file to read first. The rest of the package imports the
pattern-matcher vocabulary and the compiler entry points from here, never from torch directly.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.source import is_from_unspecialized_param_buffer_source
from torch._functorch._aot_autograd.schemas import MutationType
from torch._inductor import config as inductor_config
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.pattern_matcher import (  # noqa: F401  (re-exported for the rules)
    MULTIPLE,
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

aten = torch.ops.aten

#: The inference BatchNorm op that Inductor normally decomposes before any custom pass runs.
BN_INFERENCE_OP = aten._native_batch_norm_legit_no_training.default

__all__ = [
    "BN_INFERENCE_OP",
    "CustomGraphPass",
    "compile_with_inductor",
    "file_hash",
    "frozen_placeholder_values",
    "inductor_config_keys",
    "inductor_mode_options",
    "lift_module_state",
]


def inductor_mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor config patches for a ``torch.compile`` mode (raises for an unknown mode)."""
    return dict(list_mode_options(mode)) if mode else {}


def inductor_config_keys() -> frozenset[str]:
    return frozenset(inductor_config.get_config_copy())


def file_hash(paths: Sequence[str], extra: str) -> bytes:
    return get_hash_for_files(tuple(paths), extra)


class _DecompositionTable(dict):  # type: ignore[type-arg]
    """Pickles as a call to the function that builds it.

    Inductor puts a custom decomposition table into its FX graph cache key; the table's values
    include pybind functions, which cannot be pickled and make Inductor bypass the cache.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_decompositions_keeping_inference_bn, ())


def _decompositions_keeping_inference_bn() -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table minus inference BatchNorm.

    Inductor decomposes BN into sub/mul/add before the joint-graph passes, after which its own
    binary folding folds those into convolutions (wrongly for transposed ones). Keeping BN whole
    lets the bnfuse pass see it as one op; the pass decomposes whatever it does not fold.
    """
    table = _DecompositionTable(select_decomp_table())
    for op in (BN_INFERENCE_OP, aten._batch_norm_no_update.default):
        table.pop(op, None)
    return table


def compile_with_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config_patches: dict[str, Any],
    *,
    keep_bn: bool,
) -> Callable[..., Any]:
    """Run Inductor (AOTAutograd included) on a Dynamo graph."""
    decompositions = _decompositions_keeping_inference_bn() if keep_bn else None
    return compile_fx(
        gm, list(example_inputs), config_patches=config_patches, decompositions=decompositions
    )


def is_module_state(node: torch.fx.Node) -> bool:
    """A placeholder that Dynamo lifted from a module's parameters or buffers."""
    source = getattr(node, "_dynamo_source", None)
    return source is not None and is_from_unspecialized_param_buffer_source(source)


def lift_module_state(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[torch.fx.GraphModule, list[int]]:
    """Turn the module-state placeholders of a Dynamo graph into graph attributes.

    Dynamo hands a custom backend parameters and buffers as graph inputs; Inductor's freezing only
    freezes graph attributes. This returns a copy of ``gm`` in which every parameter and buffer is
    an attribute (registered with its Dynamo source, as AOTAutograd requires), and the indices of
    the inputs the copy still takes. The caller's graph is left untouched: Dynamo derives the
    compiled call's arguments from it.
    """
    graph = torch.fx.Graph()
    old_to_new: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, old_to_new)
    graph.output(output)
    for old, new in old_to_new.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)  # type: ignore[attr-defined]
    lifted = torch.fx.GraphModule(gm, graph)
    lifted.meta = copy.copy(gm.meta)
    lifted._param_name_to_source = dict(getattr(gm, "_param_name_to_source", {}))  # type: ignore[assignment]

    kept: list[int] = []
    placeholders = list(graph.find_nodes(op="placeholder"))
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if not (isinstance(value, torch.Tensor) and is_module_state(node)):
            kept.append(index)
            continue
        name = f"_bnfuse_state_{index}"
        if isinstance(value, torch.nn.Parameter):
            lifted.register_parameter(name, value)
        else:
            lifted.register_buffer(name, value)
        lifted._param_name_to_source[name] = node._dynamo_source  # type: ignore[index]
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    lifted.recompile()
    return lifted, kept


def frozen_placeholder_values(graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.Tensor]:
    """Real values of the placeholders that Inductor's freezing will turn into constants.

    Valid inside a freezing compile, during the joint-graph passes: AOTAutograd puts the graph's
    attributes first among the placeholders, and freezing keeps as inputs only those it mutates or
    returns aliased. Everything else here is a compile-time constant.
    """
    context = torch._guards.TracingContext.try_get()
    if context is None or context.params_flat is None or context.fw_metadata is None:
        return {}
    meta = context.fw_metadata
    params = context.params_flat_unwrap_subclasses or context.params_flat
    mutated = {
        i
        for i, info in enumerate(meta.input_info)
        if info.mutation_type in (MutationType.MUTATED_IN_GRAPH, MutationType.MUTATED_OUT_GRAPH)
    }
    aliased = {out.base_idx for out in meta.output_info if out.base_idx is not None}
    placeholders = graph.find_nodes(op="placeholder")
    return {
        node: value
        for index, (node, value) in enumerate(zip(placeholders, params, strict=False))
        if isinstance(value, torch.Tensor) and index not in mutated and index not in aliased
    }


def fake_tensor_of(node: torch.fx.Node, value: torch.Tensor) -> Any:
    """A fake tensor for a new constant, in the fake mode of the graph around ``node``."""
    fake = node.meta["val"]
    return fake.fake_mode.from_tensor(value, static_shapes=True)


def mark_frozen(value: torch.Tensor) -> None:
    """Tag a folded constant as a frozen parameter: the FX graph cache then keys on its metadata
    and reloads the value from the graph, as it does for Inductor's own frozen constants."""
    value._is_frozen_param = True  # type: ignore[attr-defined]


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


def real_tensor_math() -> Any:
    """Context for eager math on real tensors inside a pass that runs under a fake-tensor mode."""
    return torch.utils._python_dispatch._disable_current_modes()


def current_fake_mode() -> Any:
    """The fake-tensor mode of the Dynamo compile in progress (None outside one)."""
    context = torch._guards.TracingContext.try_get()
    return None if context is None else context.fake_mode


def recompile_context(fake_mode: Any, dynamic: bool) -> Any:
    """Context for compiling a Dynamo graph again, after Dynamo is done with it.

    AOTAutograd and freezing read the parameters from the tracing context. A dynamic graph's
    symbolic sizes live in the shape environment of Dynamo's fake mode, so that mode is reused. A
    static graph gets a fresh mode without one: in Dynamo's mode, tensors it has not seen (another
    instance's weights) would get fresh symbolic sizes and the recompile would turn dynamic.
    """
    mode = fake_mode if dynamic else torch._subclasses.fake_tensor.FakeTensorMode()
    return torch._guards.tracing(torch._guards.TracingContext(mode))


def is_dynamo_control_flow(error: BaseException) -> bool:
    """Exceptions Dynamo uses to restart or redirect a compile: they must pass through a backend."""
    return isinstance(error, torch._dynamo.exc.TorchDynamoException)


@contextlib.contextmanager
def loaded_code_modules() -> Iterator[list[Any]]:
    """Collect the generated-code modules Inductor loads inside the block."""
    from torch._inductor.codecache import PyCodeCache

    before = len(PyCodeCache.modules)
    loaded: list[Any] = []
    try:
        yield loaded
    finally:
        loaded.extend(PyCodeCache.modules[before:])


def release_code_modules(modules: Sequence[Any]) -> None:
    """Drop Inductor's cache references to generated-code modules no longer used.

    Inductor keeps every module it loads (in its cache and in ``sys.modules``) for the life of the
    process, and a frozen graph's module holds the graph's constants: without this, each recompile of a frozen graph keeps the old
    weights alive. Compiled callables hold their own module, so only dead graphs are freed.
    """
    from torch._inductor.codecache import PyCodeCache

    dead = {id(m) for m in modules}
    PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in dead]
    for key, module in list(PyCodeCache.modules_no_attr.items()):
        if id(module) in dead:
            del PyCodeCache.modules_no_attr[key]
    for module in modules:  # Inductor also registers them in sys.modules
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]


def inductor_freezing() -> contextlib.AbstractContextManager:
    """Inductor's ``freezing=True`` for the calls under it (Dynamo reads it at trace time)."""
    return inductor_config.patch(freezing=True)


def many_recompiles_allowed() -> contextlib.AbstractContextManager:
    """Raise Dynamo's recompile limits (for the benchmark, which compiles one model class many times:
    past the limit Dynamo silently runs eager). Only the limits this torch has are touched."""
    wanted = {"recompile_limit": 64, "cache_size_limit": 64, "accumulated_recompile_limit": 4096,
              "accumulated_cache_size_limit": 4096}
    present = {key: value for key, value in wanted.items() if hasattr(torch._dynamo.config, key)}
    return torch._dynamo.config.patch(**present)


def has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced this graph with symbolic (dynamic) sizes."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return True
    return False


def generated_code(compiled: Callable[..., Any], *inputs: Any) -> str:
    """Call a compiled callable and return the source Inductor generated for it."""
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(compiled, *inputs)
    return "\n".join(code)
