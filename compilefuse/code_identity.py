"""The identity of a piece of compilefuse's code: the hash of every compilefuse source file it runs.

A pass's ``uuid`` keys Inductor's caches, so it must change whenever the code the pass runs does.
Lists kept by hand went stale (the pattern moved to another file, the shim was left out); the files
here are derived from the imports themselves: the module, then every compilefuse module it imports,
transitively.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from ._torch_private import inductor

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


#: ``from X import a, (b as c)`` and ``import X, Y as Z`` at the start of a line, any indent (lazy imports too).
_FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w.][\w., \t]*)", re.M)


def _imported(path: Path, package: str) -> list[str]:
    """The compilefuse modules a file imports (``from . import x`` names ``x`` itself when it is one).
    Read with two patterns, not ``ast``: parsing every file slowed the first compile of a process
    (docs/benchmarks.md); a line in a docstring that looks like an import only adds a file to the
    hash."""
    text = path.read_text()
    found = []
    for match in _IMPORT.finditer(text):
        found += [name.split()[0] for name in match.group(1).split(",") if name.strip()]
    for match in _FROM_IMPORT.finditer(text):
        base, dots = match.group(1).lstrip("."), len(match.group(1)) - len(match.group(1).lstrip("."))
        if dots:
            base = importlib.util.resolve_name("." * dots + base, package)
        found.append(base)
        names = match.group(2).strip("()").replace("\n", " ").split("#")[0]
        found += [f"{base}.{name.split()[0]}" for name in names.split(",") if name.split()]
    return [name for name in found if name == _PACKAGE or name.startswith(_PACKAGE + ".")]


@functools.cache
def code_hash(module: str, extra: str) -> bytes:
    """Inductor's file hash of ``sources_of(module)``, with ``extra`` (a pass's settings). Once per
    process: the code a process runs is the code it imported (reading the files again slowed every
    compile's cache lookup)."""
    return inductor.file_hash(list(sources_of(module)), extra=extra)
