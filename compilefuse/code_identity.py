"""The identity of a piece of compilefuse's code: the hash of every compilefuse source file it runs.

A pass's ``uuid`` keys Inductor's caches, so it must change whenever the code the pass runs does.
Lists kept by hand went stale (the pattern moved to another file, the shim was left out); the files
here are derived from the imports themselves: the module, then every compilefuse module it imports,
transitively.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

from . import _torch_private as tp

_PACKAGE = __name__.rpartition(".")[0]


@functools.cache
def sources_of(module: str) -> tuple[str, ...]:
    """The source files of ``module`` and of every compilefuse module it imports, transitively."""
    seen: dict[str, str] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, AttributeError):  # ``from .rule import Rule``: a name, not a module
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        seen[name] = spec.origin
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        pending += _imported(Path(spec.origin), package)
    return tuple(sorted(seen.values()))


def _imported(path: Path, package: str) -> list[str]:
    """The compilefuse modules a file imports (``from . import x`` names ``x`` itself when it is one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return [name for name in found if name == _PACKAGE or name.startswith(_PACKAGE + ".")]


@functools.cache
def code_hash(module: str, extra: str) -> bytes:
    """Inductor's file hash of ``sources_of(module)``, with ``extra`` (a pass's settings). Once per
    process: the code a process runs is the code it imported (reading the files cost 60 ms of
    every compile's cache lookup)."""
    return tp.file_hash(list(sources_of(module)), extra=extra)
