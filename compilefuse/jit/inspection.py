"""``compilefuse.explain`` and the last fold record: what bnfuse did to a model, without serving it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..decisions import FoldDecision, FoldRecord
from ..report import FoldReport, collecting
from .backend import RECORDS, bnfuse


def explain(
    model: torch.nn.Module,
    *example_inputs: Any,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    dynamic: bool | None = None,
    autograd: bool = False,
) -> FoldReport:
    """Compile ``model`` with bnfuse, run it once on the example inputs under ``torch.inference_mode()``
    (or the caller's ``no_grad``), and report every BatchNorm of every graph that answers, each named by its path in
    ``model``. The compile is ``torch.compile(model, backend="bnfuse", ...)`` with these arguments,
    so graphs already compiled that way answer again (Dynamo reuses them, adding nothing towards its
    recompile limit) and are reported. A BN of ``model`` that no graph holds (run eagerly by Dynamo:
    past its recompile limit, in a skipped frame; or not called) gets a row saying so. (The run is a
    real call: a model that writes its own state in ``forward`` writes it here too.)
    ``autograd=True`` runs the forward with autograd instead, as a training step does, and reports
    its per-step folds."""
    if autograd:
        grad_mode = torch.enable_grad()
    else:  # the caller's no_grad or inference_mode as it is: Dynamo guards on which
        grad_mode = contextlib.nullcontext() if not torch.is_grad_enabled() else torch.inference_mode()
    with collecting(reused=True) as records, grad_mode:
        torch.compile(model, backend=bnfuse, mode=mode, options=options, dynamic=dynamic)(*example_inputs)
    report = FoldReport.from_records(records)
    report.rows += _not_in_any_graph(model, report)
    return report


def _not_in_any_graph(model: torch.nn.Module, report: FoldReport) -> list[FoldDecision]:
    named = {row.bn for row in report.rows}
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or type(module).__name__.startswith("FrozenBatchNorm"):
            paths.setdefault(id(module), []).append(path)
    return [FoldDecision(bn=names[0], folded=False, reason=NOT_IN_ANY_GRAPH)
            for names in paths.values() if not named.intersection(names)]


NOT_IN_ANY_GRAPH = ("in no graph bnfuse compiled: Dynamo ran it eagerly (past its recompile limit, "
                    "or in a skipped frame), or the forward did not call it")


def last_record() -> FoldRecord | None:
    """The fold record of the most recently compiled bnfuse graph."""
    return RECORDS[-1] if RECORDS else None


def last_report() -> FoldReport | None:
    """The fold report of the most recently compiled bnfuse graph."""
    return FoldReport.from_records([RECORDS[-1]]) if RECORDS else None
