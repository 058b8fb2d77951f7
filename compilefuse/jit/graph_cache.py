"""A folded inference graph compiled once per machine (``options={"cache": True}``): kept on disk
as an AOTInductor package, loaded by every later process that compiles the same graph.

Inductor's own caches refuse bnfuse's compiles (its AOTAutograd cache refuses freezing, its FX
graph cache oneDNN-packed constants), so without this a warm start traces, folds and lowers again.
A cached graph is compiled as ``compilefuse.export`` compiles a model: ``torch.export`` of the graph
with its module state as attributes, the same rules and float64 math, AOTInductor. A package holds
the folded weights, so its key holds a SHA-256 of the weights' bytes beside the graph's code, its
inputs' metadata, the settings (bnfuse's and Inductor's global ones), the CPU's vector ISA, the
thread count (weight packing depends on it) and the torch version and compilefuse sources: only a
compile that would build the same package finds it.

Cached: CPU graphs with static sizes and tensor inputs that write nothing, draw no random numbers,
return no view of an input and call no function outside torch and Python's own (a user's function
in the graph, ``allow_in_graph``, could change without the graph's code changing). Every other graph
compiles as it does without the option.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from .. import aliasing, freezing
from .._torch_private import aoti, dynamo, fake_tensors, inductor, ops
from ..aot import package
from ..config import BnfuseConfig
from ..decisions import FoldRecord
from ..runtime import cache_store, loading

log = logging.getLogger("compilefuse")


def compiled(
    gm: torch.fx.GraphModule, inputs: Sequence[Any], config: BnfuseConfig
) -> tuple[loading.ExportedModel, list[int], FoldRecord] | None:
    """The graph's package from the cache, built and stored first on a miss: the loaded package,
    the indices of the inputs it takes and its fold record. None: not cacheable, compile as usual."""
    if _no_packages():
        return None
    reason = _not_cacheable(gm, inputs)
    if reason is not None:
        log.debug("bnfuse: graph not cached: %s", reason)
        return None
    state = set(freezing.module_state(gm, inputs))  # what a miss lifts into the package
    taken = [i for i in range(len(inputs)) if i not in state]
    key = cache_key(gm, inputs, taken, config)
    path = cache_store.path_for(key)
    try:
        if os.path.isfile(path):
            log.info("bnfuse: graph loaded from the compile cache (%s)", path)
        elif not _build(gm, inputs, key, config):
            return None
        model = loading.load(path, check_inputs=False)
    except Exception as error:  # the cache is a speed-up: without it the graph still compiles
        if config.strict:
            raise
        log.warning("bnfuse: the compile cache failed on a graph (%s: %s); compiled without it",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return None
    report = model.report
    return model, taken, FoldRecord(list(report.rows), list(report.merges), report.fold_seconds)


@functools.cache
def _no_packages() -> bool:
    """A torch without the PT2 archive format cannot write packages: said once, then nothing is cached."""
    try:
        aoti.package_extra_prefix()
    except RuntimeError:
        log.warning("bnfuse: the compile cache needs torch's PT2 archive format (torch.export.pt2_archive), "
                    "which torch %s lacks; graphs compile without it", torch.__version__)
        return True
    return False


def _not_cacheable(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> str | None:
    for value in inputs:
        if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.layout != torch.strided:
            return f"an input is a {type(value).__name__}, not a dense tensor"
        if value.device.type != "cpu":
            return f"an input is on {value.device.type} (packages are cached for CPU graphs)"
    if dynamo.has_symbolic_shapes(gm):
        return "symbolic sizes"
    for node in gm.graph.nodes:
        if node.op == "call_module":
            return f"it calls submodule {node.target} (its code is not in the key)"
        if node.op == "call_function" and not _code_in_the_key(node.target):
            return f"it calls {getattr(node.target, '__qualname__', node.target)} (its code is not in the key)"
        value = freezing.attribute(gm, node.target) if node.op == "get_attr" else None
        if node.op == "get_attr" and not isinstance(value, torch.Tensor):
            return f"it holds a {type(value).__name__} attribute"
    return None


# Functions whose code is fixed by torch's version (in the key) or is Python's own operators and math.
# Operators, custom ones included, are keyed by name, as in Inductor's AOTAutograd cache.
_KEYED_MODULES = frozenset({"torch", "_operator", "operator", "math", "builtins"})


def _code_in_the_key(target: Any) -> bool:
    if ops.is_operator(target):
        return True
    module = getattr(target, "__module__", None) or getattr(getattr(target, "__objclass__", None), "__module__", "")
    return module.split(".")[0] in _KEYED_MODULES


def cache_key(gm: torch.fx.GraphModule, inputs: Sequence[Any], inputs_taken: Sequence[int], config: BnfuseConfig) -> str:
    digest = hashlib.sha256()

    def add(part: Any) -> None:
        digest.update(repr(part).encode())
        digest.update(b"\0")

    def add_tensor(value: torch.Tensor, *, data: bool) -> None:
        add((type(value).__name__, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype))
        if data:
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    add((cache_store.ARTIFACT_TYPE, torch.__version__, _compilefuse_sources(),
         torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()))
    add((sorted(config.rules), sorted((k, repr(v)) for k, v in config.inductor_patches.items())))
    add(inductor.inductor_settings())
    add(dynamo.traced_global_state())  # autocast and the rest Dynamo guards but its graph's code omits
    add(gm.code)
    taken = set(inputs_taken)
    for index, value in enumerate(inputs):
        add(index in taken)
        add_tensor(value, data=index not in taken)
    for node in gm.graph.find_nodes(op="get_attr"):
        add(node.target)
        add_tensor(freezing.attribute(gm, node.target), data=True)
    return digest.hexdigest()


def _build(gm: torch.fx.GraphModule, inputs: Sequence[Any], key: str, config: BnfuseConfig) -> bool:
    """Export the graph with its module state lifted, build the package and store it under
    ``key``; False if the graph turns out not to be cacheable (export says it writes, draws random
    numbers or returns an input's view)."""
    lifted, taken = freezing.lift_module_state(gm, inputs)
    args = tuple(inputs[i] for i in taken)
    with fake_tensors.outside_dynamo_tracing(), torch.no_grad():
        program = torch.export.export(lifted, args, strict=False)
        # (export's graph is not functionalised: its signature lists no writes; the ops' schemas do)
        reason = (
            "it writes its inputs or state" if aliasing.written_placeholders(program.graph)
            else "it draws random numbers" if ops.draws_random_numbers(program.graph)
            else "it returns an input or a view of one" if aliasing.outputs_alias_inputs(program.graph)
            else None
        )
        if reason is not None:
            log.debug("bnfuse: graph not cached: %s", reason)
            return False
        with tempfile.TemporaryDirectory() as folder:
            built = os.path.join(folder, "graph.pt2")
            package.build(program, args, built, config)
            with open(built, "rb") as file:
                content = file.read()
    path = cache_store.store(key, content)
    cache_store.record(key, content)
    log.info("bnfuse: graph compiled into the compile cache (%s)", path)
    return True


@functools.cache
def _compilefuse_sources() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the whole package, not jit/
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names if name.endswith(".py"))
    return inductor.file_hash(paths, extra="graph-cache").hex()
