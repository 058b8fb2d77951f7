"""Helpers the tests share: devices, compiling with bnfuse, float64 references, branch builders."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

import compilefuse
from compilefuse.examples.models import randomize_bn
from compilefuse.examples.reference import float64_reference, relative_error

__all__ = ["float64_reference", "randomize_bn", "relative_error"]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


@dataclasses.dataclass
class BnfuseRun:
    outputs: object
    records: list[compilefuse.FoldRecord]

    @property
    def decisions(self) -> list[compilefuse.FoldDecision]:
        return [d for record in self.records for d in record.decisions]

    @property
    def folded(self) -> list[compilefuse.FoldDecision]:
        return [d for d in self.decisions if d.folded]

    @property
    def kept(self) -> list[compilefuse.FoldDecision]:
        return [d for d in self.decisions if not d.folded]


def run_bnfuse(model: nn.Module, *inputs: torch.Tensor, calls: int = 1, **compile_kwargs) -> BnfuseRun:
    """Compile ``model`` with bnfuse, call it under inference_mode, and collect its fold records."""
    compiled = torch.compile(model, backend="bnfuse", **compile_kwargs)
    with compilefuse.report.collecting() as records, torch.inference_mode():
        for _ in range(calls):
            outputs = compiled(*inputs)
    return BnfuseRun(outputs, records)


def run_exact(model: nn.Module, *inputs: torch.Tensor, tol: float = 1e-5, **compile_kwargs) -> BnfuseRun:
    """Compile ``model`` in eval mode, its BN statistics randomised, with bnfuse: every output within
    ``tol`` of the float64 reference, whatever was folded or kept."""
    model = randomize_bn(model.eval())
    result = run_bnfuse(model, *inputs, **compile_kwargs)
    reference = float64_reference(model, *inputs)
    outputs, references = (result.outputs, reference) if isinstance(reference, tuple) else ((result.outputs,), (reference,))
    for out, ref in zip(outputs, references, strict=True):
        assert relative_error(out, ref) < tol
    return result


def rms_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).pow(2).mean().sqrt().item()


def assert_matches_reference(
    outputs: Sequence[torch.Tensor] | torch.Tensor,
    eager: Sequence[torch.Tensor] | torch.Tensor,
    reference: Sequence[torch.Tensor] | torch.Tensor,
    tol: float = 1e-5,
) -> None:
    """Each output is within ``tol`` (relative) of the float64 reference, like eager's output."""
    if isinstance(outputs, torch.Tensor):
        outputs, eager, reference = [outputs], [eager], [reference]
    for i, (out, eag, ref) in enumerate(zip(outputs, eager, reference, strict=True)):
        assert out.shape == ref.shape and out.dtype == eag.dtype, f"output {i}"
        assert relative_error(eag, ref) < tol, f"eager output {i} is itself off: test setup bug"
        assert relative_error(out, ref) < tol, f"output {i}: {relative_error(out, ref):.3g} vs float64"


class Branches(nn.Module):
    """Parallel ``op -> BN`` branches on one input: one compile covers many configurations."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [branch(x) for branch in self.branches]


BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def op_bn_branches(op: type[nn.Module], dims: int, configs: list[tuple[dict, dict]]) -> Branches:
    """One ``op(**op_kwargs) -> BatchNorm{dims}d(**bn_kwargs)`` branch per configuration."""
    bn = BATCH_NORM[dims]
    return Branches([nn.Sequential(op(**c), bn(c["out_channels"], **b)) for c, b in configs])


def bn_op_branches(op: type[nn.Module], dims: int, configs: list[tuple[dict, dict]]) -> Branches:
    """One ``BatchNorm{dims}d(**bn_kwargs) -> op(**op_kwargs)`` branch per configuration."""
    bn = BATCH_NORM[dims]
    return Branches([nn.Sequential(bn(c["in_channels"], **b), op(**c)) for c, b in configs])


def check_branches(model: Branches, x: torch.Tensor, rule: str, tol: float = 1e-5) -> BnfuseRun:
    """Compile a Branches model; every branch must fold with ``rule`` and match float64."""
    model = randomize_bn(model.eval())
    with torch.inference_mode():
        eager = model(x)
    result = run_bnfuse(model, x)
    assert_matches_reference(result.outputs, eager, float64_reference(model, x), tol)
    assert [d.rule for d in result.folded] == [rule] * len(model.branches), result.decisions
    assert not result.kept, result.kept
    return result


def assert_counts_agree_with_graph(report: compilefuse.FoldReport, records, not_inference: int = 0) -> None:
    """Folded rows == BN ops the rules removed from the graph; kept rows == BN ops left, plus the
    BNs that never were inference BN ops (training mode, no running statistics)."""
    removed = sum(r.bn_ops_before - r.bn_ops_after for r in records)
    left = sum(r.bn_ops_after for r in records)
    assert report.folded == removed
    assert report.total - report.folded == left + not_inference


def calls_racing(call: Callable[[], None], swap: Callable[[int], None], swaps: int, threads: int = 4) -> None:
    """``call()`` in a loop on ``threads`` threads while this one runs ``swap(i)`` for each of
    ``swaps`` swaps of the weights; the threads stop and are joined whatever happens."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            call()

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        for i in range(swaps):
            swap(i)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
