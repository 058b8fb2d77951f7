"""The house is one-directional: no import circles between compilefuse's modules, counting imports
inside functions too. (That a replica loading a package never imports the compiler is in
test_export.py, beside the package it loads.)"""

from __future__ import annotations

import ast
import os

import compilefuse

ROOT = os.path.dirname(compilefuse.__file__)


def module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return relative.removesuffix(".__init__")


def imported_modules(path: str, modules: set[str]) -> set[str]:
    """The compilefuse modules ``path`` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules  # `from . import x`
            found.update(submodules or {base})
    # (a module's own packages are imported before it, whatever it imports: not a circle)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def test_no_import_circles():
    paths = [os.path.join(folder, f) for folder, _, files in os.walk(ROOT) for f in files if f.endswith(".py")]
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imported_modules(p, modules) for p in paths}
    circles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for target in graph[node]:
            if target in stack:
                circles.append([*stack[stack.index(target):], target])
            elif target not in done:
                visit(target, [*stack, target], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module], done)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)
