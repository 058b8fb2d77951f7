"""Measuring one model at one batch size on every system, fairly.

- Every system is prepared and called once first (cold compile time, output error, memory), then
  timed in rounds; each round times every system once, in an order rotated by one per round, so
  drift of the machine (thermal, other load) hits every system alike.
- ``torch.utils.benchmark.Timer`` runs with the thread count set explicitly (its default is one
  thread, which would make torch look twice as slow as ONNX Runtime on a 2-core machine); CUDA is
  synchronised inside the timed statement; warm-up calls are never timed.
- A system that fails gets a row saying so, with the error; the others go on.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.benchmark import Timer

from .. import report as fold_report
from ..examples.reference import float64_reference, relative_error
from .systems import CompileSettings, System

WARMUP_CALLS = 2


@dataclasses.dataclass
class Row:
    """One model x batch size x system. Times in ms, memory in MiB; None where not measured."""

    model: str
    batch_size: int
    system: str
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    compile_s: float | None = None
    latency_ms_median: float | None = None
    latency_ms_p90: float | None = None
    speedup_vs_eager: float | None = None
    ratio_to_limit: float | None = None
    max_rel_error: float | None = None
    bn_folded: int | None = None
    bn_total: int | None = None
    peak_memory_mib: float | None = None
    #: Seconds from process start to the first result in a fresh process (``--cold-start``).
    cold_start_s: float | None = None


def interleaved_order(systems: Sequence[str], rounds: int) -> list[list[str]]:
    """The order systems are timed in, round by round: rotated by one each round."""
    n = len(systems)
    return [list(systems[r % n:]) + list(systems[: r % n]) for r in range(rounds)] if n else []


@dataclasses.dataclass
class Prepared:
    row: Row
    call: Callable[[], Any] | None = None
    system: System | None = None


def benchmark_case(
    model_name: str,
    model: nn.Module,
    example: torch.Tensor,
    systems: Sequence[System],
    settings: CompileSettings,
    *,
    rounds: int,
    min_run_time: float,
    on_step: Callable[[str], None] = lambda step: None,
) -> list[Row]:
    """Rows for every system on one model and input, in the order ``systems`` were given."""
    batch = example.shape[0]
    reference = _float64_reference(model, example)
    prepared = []
    for system in systems:
        on_step(f"{model_name} b{batch}: compile {system.name}")
        prepared.append(_prepare(model_name, model, example, system, settings, reference))
    timed = {p.row.system: p for p in prepared if p.call is not None}
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for round_index, order in enumerate(interleaved_order(list(timed), rounds)):
        for name in order:
            entry = timed[name]
            if entry.call is None:  # failed in an earlier round
                continue
            on_step(f"{model_name} b{batch}: round {round_index + 1}/{rounds} {name}")
            try:
                samples[name].extend(_time(entry, settings.threads, min_run_time))
            except Exception as error:  # noqa: BLE001 - a failure is reported, the run goes on
                fail(entry.row, error)
                entry.call = None
    for name, values in samples.items():
        row = next(p.row for p in prepared if p.row.system == name)
        if row.status == "ok" and values:
            row.latency_ms_median = statistics.median(values) * 1e3
            row.latency_ms_p90 = _quantile(values, 0.9) * 1e3
    _add_ratios([p.row for p in prepared])
    return [p.row for p in prepared]


def _prepare(model_name, model, example, system, settings, reference) -> Prepared:
    row = Row(model_name, int(example.shape[0]), system.name)
    reason = system.available()
    if reason is not None:
        row.status, row.error = "failed", reason
        return Prepared(row)
    device = example.device
    baseline = _reset_memory(device)
    rss_before = _rss_mib()
    try:
        with fold_report.collecting() as records:
            start = time.perf_counter()
            fn = system.prepare(copy.deepcopy(model), example, settings)
            with torch.inference_mode(), system.call_context():
                # A copy: later calls may overwrite the first output (CUDA graphs reuse their memory).
                output = _copied(fn(example))
                _sync(device)
            row.compile_s = time.perf_counter() - start
            call = _caller(fn, system, example)
            for _ in range(WARMUP_CALLS):
                call()
    except Exception as error:  # noqa: BLE001
        fail(row, error)
        return Prepared(row)
    row.peak_memory_mib = _peak_memory_mib(device, baseline, rss_before)
    non_finite = [t for t in _tensors(output) if t.is_floating_point() and not torch.isfinite(t).all()]
    if non_finite:  # timing NaNs would time garbage, and nothing could be checked
        fail(row, FloatingPointError(f"non-finite output ({non_finite[0].dtype}): not timed"))
        return Prepared(row)
    if system.same_function:
        row.max_rel_error = _relative_error(output, reference)
    report = getattr(fn, "report", None)  # an exported package carries its own
    if report is None and system.name in ("bnfuse", "limit") and records:
        report = fold_report.FoldReport.from_records(records)
    if report is not None:
        row.bn_folded, row.bn_total = report.folded, report.total
    return Prepared(row, call, system)


def _caller(fn, system: System, example: torch.Tensor) -> Callable[[], Any]:
    device = example.device

    def call() -> None:
        with torch.inference_mode(), system.call_context():
            fn(example)
        _sync(device)

    return call


def _time(entry: Prepared, threads: int, min_run_time: float) -> list[float]:
    timer = Timer(stmt="call()", globals={"call": entry.call}, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return list(measurement.times)


def _add_ratios(rows: list[Row]) -> None:
    by_system = {row.system: row for row in rows if row.latency_ms_median is not None}
    eager, limit = by_system.get("eager"), by_system.get("limit")
    for row in by_system.values():
        if eager is not None:
            row.speedup_vs_eager = eager.latency_ms_median / row.latency_ms_median
        if limit is not None:
            row.ratio_to_limit = row.latency_ms_median / limit.latency_ms_median


def fail(row: Row, error: BaseException) -> None:
    """Mark ``row`` failed with a one-line account of ``error``."""
    row.status = "failed"
    lines = traceback.format_exception_only(type(error), error)
    row.error = " ".join(line.strip() for line in lines)[:500]
    row.latency_ms_median = row.latency_ms_p90 = None


def _float64_reference(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    out = float64_reference(model, example)
    gc.collect()
    return out


def _relative_error(output: Any, reference: Any) -> float:
    """max |out - ref| / max |ref| over every output tensor, in float64."""
    outs = _tensors(output)
    refs = _tensors(reference)
    if len(outs) != len(refs):
        return float("nan")
    errors = [relative_error(out, ref) for out, ref in zip(outs, refs, strict=True)]
    return max(errors) if errors else float("nan")


def _copied(value: Any) -> Any:
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> int:
    """Start a system's memory measurement; returns what is allocated already (earlier systems)."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_memory_mib(device: torch.device, baseline: int, rss_before: float | None) -> float | None:
    """The system's own peak: CUDA, the peak allocated during compile and first calls above what
    earlier systems still hold; CPU, the growth of the process's resident memory over the same span
    (compiler memory included)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    after = _rss_mib()
    return None if after is None or rss_before is None else max(after - rss_before, 0.0)
