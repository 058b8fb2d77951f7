"""The house is one-directional: no import circles between compilefuse's modules, counting imports
inside functions too; the runtime imports no compiler, and the torch shim no bnfuse logic. (That a
replica loading a package never imports the compiler when it runs is in test_export.py, beside the
package it loads.) And no function is longer than a reader takes in at once."""

from __future__ import annotations

import ast
import os

import compilefuse

ROOT = os.path.dirname(compilefuse.__file__)


def module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return relative.removesuffix(".__init__")


def source_paths(folder: str) -> list[str]:
    """Every Python file under ``folder``."""
    return [os.path.join(below, f) for below, _, files in os.walk(folder) for f in files if f.endswith(".py")]


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
    paths = source_paths(ROOT)
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


#: What a replica's code may import from outside ``runtime/``: the package itself, the report it
#: reads and the fold arithmetic a refit checks with, each importing torch and these alone.
RUNTIME_SHARES = {"compilefuse", "compilefuse._notices", "compilefuse.decisions", "compilefuse.report",
                  "compilefuse.graph_ops", "compilefuse.fold_math", "compilefuse.value_checks"}
COMPILERS = ("torch._dynamo", "torch._inductor")


def module_level_torch_imports(path: str) -> set[str]:
    """The torch modules ``path`` imports when it is imported (not inside a function)."""
    found = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return {m for m in found if m == "torch" or m.startswith("torch.")}


def test_the_runtime_imports_no_compiler():
    """``runtime/`` and the Ray Serve replica, with every module they import transitively, stay
    out of ``jit/``, ``aot/``, the rules, the passes and the compiler's torch shim, and import
    neither Dynamo nor Inductor when imported."""
    paths = {module_name(p): p for p in source_paths(ROOT)}
    modules = set(paths)
    pending = [m for m in modules if m.startswith("compilefuse.runtime")] + ["compilefuse.ray_serve"]
    reached: set[str] = set()
    while pending:
        module = pending.pop()
        if module not in reached:
            reached.add(module)
            pending += imported_modules(paths[module], modules)
    outside = sorted(m for m in reached if not m.startswith("compilefuse.runtime") and m not in RUNTIME_SHARES
                     and m != "compilefuse.ray_serve")
    assert not outside, outside
    compilers = {m: sorted(t for t in module_level_torch_imports(paths[m]) if t.startswith(COMPILERS)) for m in reached}
    assert not any(compilers.values()), compilers


def test_imports_run_from_jit_to_aot_to_the_fold_engine():
    """``aot/`` never imports ``jit/``; nothing else imports either (the package's lazy names and
    the tools aside)."""
    paths = {module_name(p): p for p in source_paths(ROOT)}
    tools = ("compilefuse.bench", "compilefuse.examples")
    wrong = {}
    for module, path in paths.items():
        if module == "compilefuse" or module.startswith(tools) or module.startswith("compilefuse.jit"):
            continue
        above = ("compilefuse.jit",) if module.startswith("compilefuse.aot") else ("compilefuse.jit", "compilefuse.aot")
        found = sorted(m for m in imported_modules(path, set(paths)) if m.startswith(above))
        if found:
            wrong[module] = found
    assert not wrong, wrong


def test_the_torch_shim_holds_no_bnfuse_logic():
    """``_torch_private`` wraps torch; bnfuse's own modules build on it, never the other way round
    (it may name ops from ``graph_ops`` and the replica's shim)."""
    paths = source_paths(os.path.join(ROOT, "_torch_private"))
    modules = {module_name(p) for p in source_paths(ROOT)}
    allowed = {"compilefuse.graph_ops", "compilefuse.runtime._torch_runtime"}
    outside = {module_name(p): {m for m in imported_modules(p, modules)
                                if not m.startswith("compilefuse._torch_private") and m not in allowed} for p in paths}
    assert not any(outside.values()), outside


SHIM_IMPORT_EFFECTS = """
import importlib, logging, pkgutil
import torch
# What the shim's modules import of torch, first: only what importing the shim itself adds is compared.
import torch._inductor.compile_fx, torch._inductor.pattern_matcher, torch._inductor.decomposition
import torch._inductor.custom_graph_pass, torch._dynamo.source, torch._higher_order_ops.wrap
import torch._functorch._aot_autograd.schemas, torch.utils._pytree
from torch._inductor import config
import compilefuse  # the package's own import effects (its notice filter) are not the shim's

def state():
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger)]
    return (set(torch._C._dispatch_get_all_op_names()), config.save_config_portable(),
            {l.name: list(l.filters) for l in loggers if l.filters})

before = state()
import compilefuse._torch_private as shim
names = [m.name for m in pkgutil.iter_modules(shim.__path__)]
for name in names:
    importlib.import_module(f"compilefuse._torch_private.{name}")
after = state()
assert len(names) >= 10, names
assert after[0] == before[0], sorted(after[0] - before[0])
assert after[1] == before[1], {k: v for k, v in after[1].items() if before[1].get(k) != v}
assert after[2] == before[2], "a logging filter was installed"
print("ok", len(names))
"""


def test_importing_the_torch_shim_changes_nothing_in_torch():
    """No op registered, no Inductor setting changed, no logging filter installed by importing any
    of the shim's modules (in a fresh process: this one has long imported them)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SHIM_IMPORT_EFFECTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


#: The longest function the house keeps (docstring included): one a reader takes in at once.
LONGEST_FUNCTION = 55


def test_no_function_is_longer_than_a_reader_takes_in_at_once():
    long = []
    for path in source_paths(ROOT):
        with open(path) as file:
            tree = ast.parse(file.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
