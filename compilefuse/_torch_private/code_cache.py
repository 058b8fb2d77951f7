"""Inductor's generated-code modules (collected and released with the graphs that hold them) and
graph pickling, as Inductor's and AOTAutograd's own caches pickle graphs."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx

from .gates import PICKLES_GRAPHS

log = logging.getLogger("compilefuse")


def graph_to_bytes(gm: torch.fx.GraphModule) -> bytes:
    """``gm`` with its fake values, every operator allowed (the default refuses oneDNN's)."""
    assert PICKLES_GRAPHS
    from torch.fx._graph_pickler import GraphPickler, Options

    return GraphPickler.dumps(gm, Options(ops_filter=None))


def graph_from_bytes(data: bytes) -> torch.fx.GraphModule:
    """A graph ``graph_to_bytes`` wrote, its fake values in a fresh fake mode of static sizes."""
    assert PICKLES_GRAPHS
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = GraphPickler.loads(data, torch._subclasses.fake_tensor.FakeTensorMode(shape_env=ShapeEnv()))
    assert isinstance(gm, torch.fx.GraphModule)
    return gm


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
