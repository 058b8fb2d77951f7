"""The built-in models (used by the demo and the benchmark) fold every BN counted foldable by hand,
at batch 1 and batch 4, and match float64 like eager does."""

from __future__ import annotations

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error, run_bnfuse

import compilefuse
from compilefuse.examples.models import BUILTIN_MODELS


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_model_folds_every_foldable_bn(name, batch):
    spec = BUILTIN_MODELS[name]
    model = randomize_bn(spec.build().eval())
    x = spec.example(batch)
    with torch.inference_mode():
        eager = model(x)
    result = run_bnfuse(model, x)
    report = compilefuse.FoldReport.from_records(result.records)
    assert (report.folded, report.total) == (spec.foldable, spec.total), str(report)
    reference = float64_reference(model, x)
    assert relative_error(eager, reference) < 1e-5
    assert relative_error(result.outputs, reference) < 1e-5
