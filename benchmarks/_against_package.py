"""What the scripts that set JIT variants against the package share: their command line and model
(``model_from_arguments``), then for the systems each system's error against eager, every system
timed round by round in one process (the order rotated each round, ``torch.utils.benchmark.Timer``
with the thread count set), and a table of medians against the package's."""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer

import compilefuse
from compilefuse.bench.catalog import resolve


def model_from_arguments(description: str, rounds: int) -> tuple[argparse.Namespace, torch.nn.Module, torch.Tensor]:
    """``--model``, ``--batch-size``, ``--threads`` and ``--rounds`` from the command line, torch's
    thread count set to ``--threads``, and the bench's model (BN statistics calibrated) with its input."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = resolve(args.model)
    return args, spec.build(), spec.make_input(args.batch_size)


def compare(calls: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, reference: torch.Tensor,
            threads: int, rounds: int, title: str) -> dict[str, list[float]]:
    """Time ``calls`` (one named "package") on ``x`` and print the table; the times (ms) per system."""
    with torch.no_grad():
        for name, fn in calls.items():
            for _ in range(3):
                out = fn(x)
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            print(f"{name}: relative error {error:.1e}", flush=True)
        times: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                timer = Timer("fn(x)", globals={"fn": calls[name], "x": x}, num_threads=threads)
                times[name].append(timer.blocked_autorange(min_run_time=0.5).median * 1e3)
    print({name: [round(t, 3) for t in values] for name, values in times.items()})
    package = statistics.median(times["package"])
    print(f"\n{title}, {threads} threads, medians of {rounds} rounds")
    print("| system | ms per call | x package |\n| --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / package:.2f} |")
    return times


def against_package(calls: dict[str, Callable[[torch.Tensor], torch.Tensor]], model: torch.nn.Module,
                    x: torch.Tensor, reference: torch.Tensor, threads: int, rounds: int,
                    title: str) -> dict[str, list[float]]:
    """``compare`` with the package of ``model`` (``compilefuse.export`` with defaults, then
    ``compilefuse.load``) added to ``calls`` as "package"."""
    with tempfile.TemporaryDirectory() as tmp:
        compilefuse.export(copy.deepcopy(model), (x,), f"{tmp}/model.pt2")
        calls["package"] = compilefuse.load(f"{tmp}/model.pt2")
        return compare(calls, x, reference, threads, rounds, title)
