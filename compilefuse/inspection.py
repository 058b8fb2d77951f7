"""``compilefuse.explain`` and the last fold record: what bnfuse did to a model, without serving it."""

from __future__ import annotations

from typing import Any

import torch

from .backend import RECORDS, bnfuse
from .decisions import FoldRecord
from .report import FoldReport, collecting


def explain(
    model: torch.nn.Module,
    *example_inputs: Any,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    dynamic: bool | None = None,
    autograd: bool = False,
) -> FoldReport:
    """Compile ``model`` with bnfuse, run it once under ``torch.inference_mode()`` on the example
    inputs, and report every BatchNorm of every compiled graph. A graph bnfuse compiled before for
    the same model, options and inputs answers again, and is reported. (The run is a real call: a
    model that writes its own state in ``forward`` writes it here too.) ``autograd=True`` runs the
    forward with autograd instead, as a training step does, and reports its per-step folds."""

    def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        # A backend object of its own: Dynamo recompiles instead of reusing an earlier bnfuse compile.
        return bnfuse(gm, inputs, mode=mode, options=options)

    grad_mode = torch.enable_grad() if autograd else torch.inference_mode()
    with collecting(reused=True) as records, grad_mode:
        torch.compile(model, backend=backend, dynamic=dynamic)(*example_inputs)
    return FoldReport.from_records(records)


def last_record() -> FoldRecord | None:
    """The fold record of the most recently compiled bnfuse graph."""
    return RECORDS[-1] if RECORDS else None


def last_report() -> FoldReport | None:
    """The fold report of the most recently compiled bnfuse graph."""
    return FoldReport.from_records([RECORDS[-1]]) if RECORDS else None
