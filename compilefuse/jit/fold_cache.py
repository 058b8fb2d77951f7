"""An inference graph's fold, kept across processes, so that a warm start is Inductor's.

With the weights as data, Inductor's own caches hit on the main graph; what a fresh process still
paid over plain Inductor was bnfuse's trace before autograd, its fold and its split
(docs/benchmarks.md, warm start). Their result depends on the graph, never on the weights' values (every value check runs
in the prologue, on each set of weights), so it is stored beside Inductor's caches under a key of
everything it is computed from, and a warm start loads it instead.

The key holds the Dynamo graph's code, each node's module names (the report's), each input's
metadata and which inputs share memory, the values of the graph's tensor constants, the state a
trace depends on (``traced_global_state``), bnfuse's options and Inductor's settings, the CPU's
ISA, the torch version and the hash of every compilefuse source file. A graph with symbolic sizes
is not stored, nor one whose fold would read values (a rule that runs on constants only), nor
anything when Inductor's caches are off. Any failure to store or load is a miss.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx

from .. import code_identity, freezing
from .._torch_private import code_cache, dynamo, gates, inductor, onednn
from ..decisions import FoldRecord
from ..fold_prologue import Split
from ..runtime import _torch_runtime, cache_store
from ..runtime.prologue import Prologue

log = logging.getLogger("compilefuse")

_FORMAT = "bnfuse-fold-1"

#: Node metadata the fold's report reads (module names), kept in the key.
_NAMING_META = ("nn_module_stack", "source_fn_stack", "compilefuse_full_name")


@dataclasses.dataclass
class Folded:
    """What ``GraphCompiler`` computes from a graph before its prologue runs."""

    written: frozenset[int]
    readable: tuple[int, ...]
    record: FoldRecord
    split: Split
    draws_random_numbers: bool
    #: False where the fold read the weights' values (see ``passes.merges_read_values``).
    cacheable: bool = True


def key(gm: torch.fx.GraphModule, inputs: Sequence[Any], live: Collection[int], no_packing: bool,
        config: Any) -> str | None:
    """The key of ``gm``'s fold for these inputs; None where the fold is not kept."""
    if not gates.PICKLES_GRAPHS or inductor.caches_disabled() or dynamo.has_symbolic_shapes(gm):
        return None
    digest = hashlib.sha256()

    def add(part: Any) -> None:
        digest.update(repr(part).encode())
        digest.update(b"\0")

    add((_FORMAT, torch.__version__, _sources_hash(), torch.backends.cpu.get_cpu_capability()))
    add(_stable(config))
    add(inductor.inductor_settings())
    add(dynamo.traced_global_state())
    add((sorted(live), no_packing, torch.get_num_threads()))  # which weights are packed depends on threads
    add(gm.code)
    placeholders = gm.graph.find_nodes(op="placeholder")
    storages: dict[int, int] = {}
    for node, value in zip(placeholders, inputs, strict=True):
        source = _torch_runtime.dynamo_source(node)
        add((None if source is None else _torch_runtime.source_name(source), dynamo.is_module_state(node)))
        if isinstance(value, torch.Tensor):
            shared = storages.setdefault(value.untyped_storage().data_ptr(), len(storages))
            add((type(value).__name__, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype,
                 value.device, value.requires_grad, value.is_inference(), shared))
        else:
            add(repr(value))
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")  # keyed by a per-process id: its values name the modules
        add([_stable(None if stack is None else list(stack.values())),
             *(_stable(node.meta.get(name)) for name in _NAMING_META if name != "nn_module_stack")])
    for node in gm.graph.find_nodes(op="get_attr"):
        value = freezing.attribute(gm, node.target)
        add(node.target)
        if isinstance(value, torch.Tensor):
            add((tuple(value.shape), value.stride(), value.dtype))
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            add(type(value).__qualname__)
    return digest.hexdigest()


def load(cache_key: str) -> Folded | None:
    path = cache_store.fold_path(cache_key)
    if not os.path.isfile(path):
        return None
    onednn.packed_linear_op()  # a stored main graph may call it
    try:
        with open(path, "rb") as file:
            stored = pickle.load(file)
        if stored.get("format") != _FORMAT:
            return None
        split = Split(Prologue.from_bytes(stored["prologue"]), code_cache.graph_from_bytes(stored["main"]),
                      tuple(stored["inputs_taken"]))
        return Folded(frozenset(stored["written"]), tuple(stored["readable"]), stored["record"], split,
                      stored["draws_random_numbers"])
    except Exception as error:  # noqa: BLE001 - an unreadable entry is a miss, never a failure
        log.debug("bnfuse: fold cache entry %s unreadable (%s: %s)", path, type(error).__name__, error)
        return None


def store(cache_key: str, folded: Folded) -> None:
    try:
        content = pickle.dumps({
            "format": _FORMAT,
            "written": sorted(folded.written),
            "readable": list(folded.readable),
            "record": folded.record,
            "prologue": folded.split.prologue.to_bytes(),
            "main": code_cache.graph_to_bytes(folded.split.main),
            "inputs_taken": list(folded.split.inputs_taken),
            "draws_random_numbers": folded.draws_random_numbers,
        }, protocol=pickle.HIGHEST_PROTOCOL)
        cache_store.store_fold(cache_key, content)
        cache_store.record_fold(cache_key, content)
    except Exception as error:  # noqa: BLE001 - not storing costs the next process a fold, nothing more
        log.debug("bnfuse: fold not cached (%s: %s)", type(error).__name__, error)


@functools.cache
def _sources_hash() -> str:
    return inductor.file_hash(code_identity.sources_of("compilefuse.jit.backend"), extra=_FORMAT).hex()


def _stable(value: Any) -> Any:
    """``value`` as data that prints the same in every process: sets and dicts sorted, a class or
    function by its name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _stable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return sorted((_stable(k), repr(_stable(v))) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return sorted(repr(_stable(item)) for item in value)
    if isinstance(value, (list, tuple)):
        return [_stable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
