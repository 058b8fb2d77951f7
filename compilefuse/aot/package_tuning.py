"""``export(..., tune=True)``: time each Inductor setting that is right for some models and wrong
for others on the example inputs, and build the package once, with the fastest.

On CPU those settings are Inductor's freezing and, under it, oneDNN weight packing: where ATen would
run the convolution on oneDNN (the default, ``weight_packing``), every convolution, or none. ATen's
rule is a rule of thumb; timing settles it per model. Freezing itself (layout optimisation
included) loses to plain Inductor on Conv1d models at batch 32. The folded weights are constants in
every candidate.

Each candidate is the folded program JIT-compiled by Inductor in this process with the settings
its package would be built with: the same kernels and extern calls as the package, reached
without building one (the candidates share their common kernels through Inductor's caches, and a
candidate whose code equals another's is a cache hit). They are timed interleaved, and only the
fastest becomes a package: about 2x one build, where a package per candidate cost 4x or more. A
packing candidate that would compile to the default's code (the default packs every convolution,
or none) is neither compiled nor timed.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import weight_packing
from .._torch_private import code_cache, inductor
from ..config import BnfuseConfig
from ..report import FoldReport
from . import package

#: The CPU candidates: Inductor settings for each build.
CPU_CANDIDATES: dict[str, dict[str, Any]] = {
    "packed_like_aten": {},
    "prepacked": {"cpp.weight_prepack": True},
    "unpacked": {"cpp.weight_prepack": False},  # no convolution (linear packing: Inductor's, per process)
    "unfrozen": {"freezing": False},
}
ROUNDS, BLOCK_S, WARMUP_CALLS = 7, 0.05, 3


def build_fastest(program: torch.export.ExportedProgram, args: tuple[Any, ...], path: str,
                  options: dict[str, Any] | None, candidates: dict[str, dict[str, Any]] = CPU_CANDIDATES) -> FoldReport:
    chosen_by_user = sorted({key for c in candidates.values() for key in c} & set((options or {}).get("inductor", {})))
    if chosen_by_user:
        raise ValueError(f"compilefuse.export: tune=True chooses {chosen_by_user} itself; leave it out of options")
    config = BnfuseConfig.from_options(options)
    with torch.no_grad():
        folded = package.fold_program(program, config.rules)
    same = _same_as_default(folded[0], candidates)
    with code_cache.loaded_code_modules() as modules:
        runs = {name: _compiled(folded[0], args, config, patches) for name, patches in candidates.items() if name not in same}
    try:
        timings = _median_ms(runs, args)
    finally:
        del runs
        code_cache.release_code_modules(modules)  # the candidates' constants: a copy of the weights each
    best = min(timings, key=timings.__getitem__)
    tuning = {"chosen": best, "median_ms": timings, "same_as_default": sorted(same), "candidates": candidates,
              "threads": torch.get_num_threads(), "timed": "each candidate JIT-compiled by Inductor with its package's settings"}
    return package.build_folded(folded, program, args, path, config, candidates[best], metadata={"tuning": tuning})


def _same_as_default(gm: torch.fx.GraphModule, candidates: dict[str, dict[str, Any]]) -> set[str]:
    """The packing candidates that would compile to the default's code, left untimed: packing every
    convolution where the default packs every one anyway, or none where it packs none."""
    if {} not in candidates.values():
        return set()
    convolutions = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default)
    default = {weight_packing.worth_packing(node) for node in convolutions}
    return {name for name, patches in candidates.items()
            if (patches == {"cpp.weight_prepack": True} and default <= {True})
            or (patches == {"cpp.weight_prepack": False} and default <= {False})}


def _compiled(gm: torch.fx.GraphModule, args: tuple[Any, ...], config: BnfuseConfig,
              candidate: dict[str, Any]) -> Callable[..., Any]:
    patches = package.build_patches(gm, args, config, candidate)
    with torch.no_grad(), weight_packing.packing(patches):
        # (a copy: Inductor takes the module over, and freezing rewrites its constants)
        return inductor.compile_with_inductor(copy.deepcopy(gm), pytree.tree_leaves(args), patches, keep_bn=False)


def _median_ms(runs: dict[str, Any], args: tuple[Any, ...]) -> dict[str, float]:
    """Median latency of each run on ``args``: ROUNDS rounds, the runs interleaved in each, a
    block of calls lasting about BLOCK_S per run and round (sized from its warm-up calls)."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        calls = {name: _calls_per_block(run, args) for name, run in runs.items()}
        for _ in range(ROUNDS):
            for name, run in runs.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    run(*args)
                samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def _calls_per_block(run: Callable[..., Any], args: tuple[Any, ...]) -> int:
    run(*args)  # the first call: allocations, oneDNN's primitive cache
    start = time.perf_counter()
    for _ in range(WARMUP_CALLS):
        run(*args)
    return max(1, round(BLOCK_S / ((time.perf_counter() - start) / WARMUP_CALLS)))
