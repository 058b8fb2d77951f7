"""``export(..., tune=True)``: build the package with each Inductor setting that is right for some
models and wrong for others, time each on the example inputs, keep the fastest.

On CPU those settings are Inductor's freezing and, under it, oneDNN weight packing: where ATen would
run the convolution on oneDNN (the default, ``weight_packing``), every convolution, or none. ATen's
rule is a rule of thumb; timing settles it per model. Freezing itself (layout optimisation
included) loses to plain Inductor on Conv1d models at batch 32. The folded weights are constants in
every candidate. Each candidate is built in a fresh process (from the saved exported program), so
no build inherits another's compiled state; they are then loaded side by side here and timed
interleaved.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from typing import Any

import torch
from torch.utils.benchmark import Timer

from . import fresh_process, loading, package
from .config import BnfuseConfig
from .report import FoldReport

#: The CPU candidates: Inductor settings for each build.
CPU_CANDIDATES: dict[str, dict[str, Any]] = {
    "packed_like_aten": {},
    "prepacked": {"cpp.weight_prepack": True},
    "unpacked": {"cpp.weight_prepack": False},
    "unfrozen": {"freezing": False},
}
ROUNDS, MIN_RUN_TIME_S = 3, 0.2


def build_fastest(program: torch.export.ExportedProgram, args: tuple[Any, ...], path: str,
                  options: dict[str, Any] | None, candidates: dict[str, dict[str, Any]] = CPU_CANDIDATES) -> FoldReport:
    chosen_by_user = sorted({key for c in candidates.values() for key in c} & set((options or {}).get("inductor", {})))
    if chosen_by_user:
        raise ValueError(f"compilefuse.export: tune=True chooses {chosen_by_user} itself; leave it out of options")
    with tempfile.TemporaryDirectory() as folder:
        torch.export.save(program, os.path.join(folder, "program.pt2"))
        torch.save({"args": args, "options": options, "candidates": candidates}, os.path.join(folder, "request.pt"))
        built = {name: _build_in_child(folder, name) for name in candidates}
        timings = _median_ms({name: loading.load(p, check_inputs=False) for name, p in built.items()}, args)
        best = min(timings, key=timings.__getitem__)
        metadata = loading.read_metadata(built[best])
        metadata["tuning"] = {"chosen": best, "median_ms": timings, "candidates": candidates,
                              "threads": torch.get_num_threads()}
        package.copy_with_metadata(built[best], path, metadata)
    return FoldReport.from_dict(metadata["report"])


def _build_in_child(folder: str, name: str) -> str:
    try:
        fresh_process.run_module("compilefuse.package_tuning", folder, name)
    except fresh_process.ChildFailed as error:
        raise loading.ExportError(f"compilefuse.export: building the {name!r} candidate failed:\n{error}") from None
    return os.path.join(folder, f"{name}.pt2")


def _median_ms(runs: dict[str, Any], args: tuple[Any, ...]) -> dict[str, float]:
    """Median latency of each run on ``args``, the runs interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(*args)  # warm up
        for _ in range(ROUNDS):
            for name, run in runs.items():
                timer = Timer("run(*args)", globals={"run": run, "args": args}, num_threads=torch.get_num_threads())
                samples[name] += timer.blocked_autorange(min_run_time=MIN_RUN_TIME_S).times
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def _child(folder: str, name: str) -> None:
    program = torch.export.load(os.path.join(folder, "program.pt2"))
    request = torch.load(os.path.join(folder, "request.pt"), weights_only=False)
    config = BnfuseConfig.from_options(request["options"])
    package.build(program, request["args"], os.path.join(folder, f"{name}.pt2"), config, request["candidates"][name])


if __name__ == "__main__":
    _child(*sys.argv[1:3])
    print(json.dumps({"built": sys.argv[2]}))
