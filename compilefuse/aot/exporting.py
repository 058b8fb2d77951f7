"""``compilefuse.export``: trace a model with ``torch.export`` and build its package, once
(``package.build``) or with the fastest of several settings (``package_tuning``, ``tune=True``).

This module sits above both, so neither imports the other's caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from .. import aliasing
from .._torch_private import aoti
from ..config import BnfuseConfig
from ..report import FoldReport
from ..runtime import loading
from . import package, package_tuning

log = logging.getLogger("compilefuse")


def export(
    model: torch.nn.Module,
    args: Any,
    path: str | os.PathLike[str],
    *,
    dynamic_shapes: Any = None,
    options: dict[str, Any] | None = None,
    tune: bool = False,
    refittable: bool = False,
) -> FoldReport:
    """Export ``model`` on ``args``, fold its BatchNorms with bnfuse's rules, and write an
    AOTInductor package to ``path`` (``.pt2``) for the device of ``args``.

    ``dynamic_shapes`` is ``torch.export``'s (e.g. ``{"x": {0: torch.export.Dim("batch")}}``);
    ``options`` takes the backend's ``rules``, ``inductor`` and ``report``. ``tune=True`` (CPU) times
    the Inductor settings no one choice of which wins everywhere on ``args`` and builds the package
    with the fastest (see ``package_tuning``). ``refittable=True`` builds a package whose loaded
    model takes new weights without a rebuild (``load(path).refit(state_dict)``, see
    ``package_refit``). Returns the fold report, which the package also keeps (``load(path).report``).
    """
    if refittable and tune:
        raise ValueError("compilefuse.export: tune=True and refittable=True do not go together (tuning chooses "
                         "among frozen builds, whose constants cannot be refit)")
    config = BnfuseConfig.from_options(options, entry="compilefuse.export", takes=("rules", "inductor", "report"))
    aoti.package_extra_prefix()  # a torch without the PT2 archive format fails here, before any work
    path = _package_path(path)
    args = args if isinstance(args, tuple) else (args,)
    device = package.device_of(args)
    with torch.no_grad():
        program = trace_for_export(model, args, dynamic_shapes)
    _warn_if_state_written(program)
    if refittable:
        report = package.build_refittable(program, args, path, config, options)
    elif tune and device == "cpu":
        report = package_tuning.build_fastest(program, args, path, options)
    else:
        report = package.build(program, args, path, config)
    if config.report:
        log.info("bnfuse fold report (exported to %s):\n%s", path, report)
    return report


def _warn_if_state_written(program: torch.export.ExportedProgram) -> None:
    """A package keeps no state between calls: a buffer the model writes starts every call from its
    exported value (its inputs' writes do reach the caller)."""
    buffers = program.graph_signature.inputs_to_buffers  # (export's graph lists no writes: the schemas do)
    written = sorted({buffers[node.name] for node in aliasing.written_placeholders(program.graph) if node.name in buffers})
    if written:
        log.warning(
            "compilefuse.export: the model writes buffer(s) %s; a package keeps no state between calls, so each "
            "call starts from the exported values (eager would carry the writes over)", ", ".join(written))


def _package_path(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"compilefuse.export: the package path must end in .pt2, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"compilefuse.export: folder {folder!r} for the package does not exist")
    return path


def trace_for_export(
    model: torch.nn.Module, args: tuple[Any, ...], dynamic_shapes: Any, caller: str = "compilefuse.export"
) -> torch.export.ExportedProgram:
    """``torch.export``, with a failure naming the innermost module that was running. The model is
    left as it was: attributes its forward assigns are restored after tracing."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{caller}: expected a torch.nn.Module, got {type(model).__name__}")
    with _running_modules(model) as running, _attributes_restored(model):
        try:
            return torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
        except Exception as error:
            where = f" in module {running[-1]}" if running else ""
            summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise loading.ExportError(
                f"{caller}: torch.export could not trace {type(model).__name__}{where}: "
                f"{type(error).__name__}: {summary}"
            ) from error


@contextlib.contextmanager
def _attributes_restored(model: torch.nn.Module) -> Iterator[None]:
    """Every module's plain attributes as they were before the block. A forward that caches a tensor
    on its module (ultralytics' ``Detect`` keeps ``anchors`` / ``strides``) would otherwise leave
    torch.export's fake tensors there, and the eager model would answer with FakeTensors after."""
    saved = [(module, dict(module.__dict__)) for module in model.modules()]
    try:
        yield
    finally:
        for module, attributes in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)


@contextlib.contextmanager
def _running_modules(model: torch.nn.Module) -> Iterator[list[str]]:
    """The modules whose forward has started and not returned, innermost last (forward hooks)."""
    running: list[str] = []

    def entered(label: str) -> Any:
        return lambda _module, _args: running.append(label)  # None: the input is left alone

    def returned(_module: Any, _args: Any, _output: Any) -> None:
        running.pop()  # returning None leaves the output alone

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(entered(f"{name or '<root>'} ({type(module).__name__})")))
        handles.append(module.register_forward_hook(returned))
    try:
        yield running
    finally:
        for handle in handles:
            handle.remove()
