"""The torch versions compilefuse is tested on, as declared in its package metadata, and a warning
once when it runs on another. Outside the range bnfuse still folds only where its checks pass, and
any failure of its own falls back to plain Inductor: an untested torch costs folds, never results."""

from __future__ import annotations

import importlib.metadata
import logging
import re

import torch

log = logging.getLogger("compilefuse")

_warned = False


def declared_torch_range() -> list[tuple[str, str]]:
    """The ``(operator, version)`` bounds on torch in compilefuse's installed metadata (empty when
    compilefuse runs from a source tree that was never installed)."""
    try:
        requirements = importlib.metadata.requires("compilefuse") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    for requirement in requirements:
        match = re.fullmatch(r"torch\s*([^;]*)", requirement.strip())
        if match:
            return re.findall(r"(>=|<=|==|!=|<|>)\s*([\w.+]+)", match.group(1))
    return []


def in_range(version: str, bounds: list[tuple[str, str]]) -> bool:
    current = torch.torch_version.TorchVersion(version.split("+")[0])
    checks = {">=": current.__ge__, "<=": current.__le__, ">": current.__gt__, "<": current.__lt__,
              "==": current.__eq__, "!=": current.__ne__}
    return all(checks[op](bound) for op, bound in bounds)


def warn_once_if_untested() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    bounds = declared_torch_range()
    if bounds and not in_range(torch.__version__, bounds):
        declared = ",".join(op + version for op, version in bounds)
        log.warning(
            "bnfuse: torch %s is outside the range compilefuse is tested on (torch%s). It folds only where "
            "its checks pass, and falls back to plain Inductor on any error of its own; see docs/compatibility.md.",
            torch.__version__, declared,
        )
