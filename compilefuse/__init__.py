"""compilefuse: a torch.compile backend that folds BatchNorm into conv, conv-transpose and linear.

    model = torch.compile(model, backend="bnfuse")   # found through the entry point
    print(compilefuse.explain(model, example_input))  # what was folded, what was kept, and why
    compilefuse.export(model, (example_input,), "model.pt2")  # the same folds, in an AOTInductor package
    folded = compilefuse.fold(model, (example_input,))  # the same folds, as a plain nn.Module
    compilefuse.load("model.pt2")(example_input)  # in a replica: needs torch only

Importing this package is not needed for the backend name to work; it gives access to the fold
report and the backend callable itself. It imports the compiler (Dynamo, Inductor, the rules) only
when a name that needs it is first used, so a replica that only loads a package starts in
``import torch`` plus a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _notices
from .decisions import FoldDecision, FoldRecord
from .report import FoldReport, collecting
from .runtime import cache_store
from .runtime.heap import reuse_freed_memory
from .runtime.loading import ExportedModel, ExportError, load

__version__ = "0.1.0"

_notices.quiet()  # before any of our modules imports torch.utils.cpp_extension
cache_store.register()  # before any load_cache_artifacts that holds bnfuse's packages

#: The names whose modules import the compiler, and those modules.
_COMPILER_NAMES = {
    "RECORDS": "jit.backend",
    "bnfuse": "jit.backend",
    "BnfuseConfig": "config",
    "RULE_IDS": "rules",
    "export": "aot.exporting",
    "fold": "aot.folded_module",
    "explain": "jit.inspection",
    "last_record": "jit.inspection",
    "last_report": "jit.inspection",
}

__all__ = [
    "RECORDS",
    "RULE_IDS",
    "BnfuseConfig",
    "ExportError",
    "ExportedModel",
    "FoldDecision",
    "FoldRecord",
    "FoldReport",
    "bnfuse",
    "collecting",
    "explain",
    "export",
    "fold",
    "last_record",
    "last_report",
    "load",
    "reuse_freed_memory",
]


def __getattr__(name: str) -> Any:
    module = _COMPILER_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'compilefuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
