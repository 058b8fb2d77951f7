"""``compilefuse-bench``: latency of bnfuse against eager, Inductor, Inductor with freezing, the
BN-free limit and ONNX Runtime. ``compilefuse-bench --help`` lists the options."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..runtime import heap
from . import _torch_private, catalog, cold_start, training
from .harness import Row, benchmark_case, fail, interleaved_order
from .systems import DTYPES, SYSTEMS, CompileSettings
from .training import TRAIN_SYSTEMS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compilefuse-bench",
        description="Latency of torch.compile(backend='bnfuse') against eager, Inductor, Inductor+freezing, "
        "the BN-free limit and ONNX Runtime. Systems are interleaved round by round; medians and p90 reported.",
    )
    p.add_argument("--model", action="append", metavar="NAME",
                   help="built-in name, torchvision name, or package.module:factory (repeatable; default: all built-in)")
    p.add_argument("--batch-size", type=int, nargs="+", action="extend", metavar="N", help="batch sizes (default: 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--mode", default=None, help="torch.compile mode for the compiled systems")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic=True")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, the Timer and ONNX Runtime (default: torch's current count)")
    p.add_argument("--systems", nargs="+", choices=list(dict.fromkeys([*SYSTEMS, *TRAIN_SYSTEMS])), metavar="SYSTEM",
                   help=f"subset of {', '.join(SYSTEMS)} (default: all; onnxruntime on CPU when installed); "
                   f"with --train, of {', '.join(TRAIN_SYSTEMS)}")
    p.add_argument("--train", action="store_true",
                   help="time one training step (forward + backward) with every BN in eval mode and its affine "
                   "trained, and report bytes saved for backward, CUDA peak memory and gradient error "
                   "(default model: resnet50, batch 8)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                   help="with --train: each step under torch.autocast in this dtype (the float64 reference without)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="compilefuse.reuse_freed_memory() first: every torch system's large tensors reuse "
                        "heap memory instead of being mapped afresh on each call (ONNX Runtime and OpenVINO "
                        "keep arenas of their own)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per Timer measurement (default 0.2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--image-size", type=int, default=224, help="input size for torchvision image models")
    p.add_argument("--cold-start", action="store_true",
                   help="also time each system from a fresh process's start to its first result (caches warm)")
    p.add_argument("--json", metavar="PATH", help="write results and machine metadata as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one CSV line per model x batch x system")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot of speed-up vs eager (needs matplotlib)")
    p.add_argument("--list", action="store_true", help="list the models and systems, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        print_catalog()
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if args.autocast and not args.train:
        p.error("--autocast: only with --train (the inference systems run in the model's own dtype)")
    if args.rounds < 1 or args.min_run_time <= 0:
        p.error("--rounds must be >= 1 and --min-run-time > 0")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'compilefuse[bench]'")
    default_models = ["resnet50"] if args.train else catalog.builtin_names()
    try:
        specs = [catalog.resolve(name, args.image_size) for name in args.model or default_models]
    except catalog.UnknownModel as error:
        p.error(str(error))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.reuse_freed_memory and not heap.reuse_freed_memory():
        p.error("--reuse-freed-memory: this C library is not glibc")
    if args.train:
        return run_training(p, specs, args)
    systems = [SYSTEMS[name] for name in args.systems or default_systems(args.device)]
    settings = CompileSettings(mode=args.mode, dynamic=True if args.dynamic else None, threads=threads)
    batches = args.batch_size or [1]
    rows = run(specs, batches, systems, settings, args, progress=not args.no_progress)
    if args.cold_start:
        add_cold_start(rows, args, threads)
    meta = metadata(args, threads, [s.name for s in systems], batches)
    print(format_table(rows))
    if args.json:
        write_json(args.json, meta, rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        write_plot(args.plot, rows, meta)
    return 0


def run_training(p: argparse.ArgumentParser, specs: list[catalog.ModelSpec], args) -> int:
    systems = args.systems or list(TRAIN_SYSTEMS)
    unknown = sorted(set(systems) - set(TRAIN_SYSTEMS))
    if unknown:
        p.error(f"--train: unknown system(s) {unknown}; choose from {', '.join(TRAIN_SYSTEMS)}")
    device = torch.device(args.device)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    rows = []
    with _torch_private.many_recompiles_allowed():
        for spec in specs:
            for batch in args.batch_size or [8]:
                torch.compiler.reset()
                rows += training.benchmark_training(spec.name, spec.build, spec.make_input(batch).to(device), systems,
                                                    rounds=args.rounds, autocast=autocast)
    print(training.format_rows(rows))
    if args.json:
        meta = metadata(args, torch.get_num_threads(), systems, args.batch_size or [8])
        write_json(args.json, meta, rows)
    return 0


def print_catalog() -> None:
    from ..examples.models import BUILTIN_MODELS

    print("built-in models (no download):")
    for name, spec in BUILTIN_MODELS.items():
        print(f"  {name:18s} input {tuple(spec.input_shape)}, {spec.foldable} of {spec.total} BNs foldable")
    names = catalog.torchvision_names()
    print("torchvision models:" if names else "torchvision models: (torchvision not installed)")
    if names:
        print("  " + ", ".join(names))
    print("  (the documented set: " + ", ".join(catalog.TORCHVISION_SET) + ")")
    print("your own: package.module:factory, factory() -> (model, example_input)")
    print("systems:")
    for name, system in SYSTEMS.items():
        missing = system.available()
        print(f"  {name:18s} {system.description}" + (f" [unavailable: {missing}]" if missing else ""))


def default_systems(device: str) -> list[str]:
    runtimes = ("onnxruntime", "openvino")  # CPU only, and optional
    on_request = (*runtimes, "reparameterized", "folded", "folded+inductor", "export+tune")
    names = [name for name in SYSTEMS if name not in on_request]
    if device == "cpu":
        names += [name for name in runtimes if SYSTEMS[name].available() is None]
    return names


def run(specs, batches, systems, settings, args, progress: bool) -> list[Row]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    steps = len(specs) * len(batches) * len(systems) * (1 + args.rounds)
    bar = _progress(steps, enabled=progress)
    rows: list[Row] = []
    with _torch_private.many_recompiles_allowed():
        for spec in specs:
            try:
                model = spec.build().to(device=device, dtype=dtype)
            except Exception as error:  # noqa: BLE001 - a model that cannot build fails its rows
                rows += [_failed(spec.name, b, s.name, error) for b in batches for s in systems]
                bar.update(len(batches) * len(systems) * (1 + args.rounds))
                continue
            for batch in batches:
                example = spec.make_input(batch).to(device=device, dtype=dtype)
                torch.compiler.reset()
                rows += benchmark_case(spec.name, model, example, systems, settings, rounds=args.rounds,
                                       min_run_time=args.min_run_time, on_step=bar.step)
            torch.compiler.reset()
    bar.close()
    return rows


def add_cold_start(rows: list[Row], args, threads: int) -> None:
    """Each measured row's cold start, in fresh processes (see ``cold_start``)."""
    for row in rows:
        if row.status != "ok":
            continue
        print(f"cold start: {row.model} b{row.batch_size} {row.system}", file=sys.stderr, flush=True)
        try:
            row.cold_start_s = cold_start.measure(
                row.model, row.system, row.batch_size, device=args.device, dtype=args.dtype, threads=threads,
                image_size=args.image_size, mode=args.mode, dynamic=args.dynamic)
        except Exception as error:  # noqa: BLE001 - the latency row stands; the cold start says why not
            print(f"cold start failed: {row.model} {row.system}: {error}", file=sys.stderr)


def _failed(model: str, batch: int, system: str, error: BaseException) -> Row:
    row = Row(model, batch, system)
    fail(row, error)
    return row


class _Lines:
    """Progress as plain lines on stderr, when tqdm is not installed."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)

    def step(self, what: str) -> None:
        self.bar.set_description_str(what, refresh=False)
        self.bar.update(1)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            return _Bar(total)
        except ImportError:
            pass
    return _Lines(total, enabled)


def metadata(args, threads: int, systems: list[str], batches: list[int]) -> dict[str, Any]:
    return {
        "command": "compilefuse-bench " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "dtype": args.dtype,
        "mode": args.mode,
        "dynamic": args.dynamic,
        "rounds": args.rounds,
        "min_run_time_s": args.min_run_time,
        "batch_sizes": batches,
        "systems": systems,
        "round_order": interleaved_order(systems, args.rounds),
        "reuse_freed_memory": args.reuse_freed_memory,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = ("model", "batch", "system", "compile s", "median ms", "p90 ms", "x eager", "/ limit", "rel err",
           "BN folded", "peak MiB", "cold s", "status")


def table_cells(row: Row) -> list[str]:
    bn = "-" if row.bn_total is None else f"{row.bn_folded}/{row.bn_total}"
    status = row.status if row.error is None else f"{row.status}: {row.error[:60]}"
    return [
        row.model, str(row.batch_size), row.system, _fmt(row.compile_s, ".1f"), _fmt(row.latency_ms_median, ".3f"),
        _fmt(row.latency_ms_p90, ".3f"), _fmt(row.speedup_vs_eager, ".2f"), _fmt(row.ratio_to_limit, ".3f"),
        _fmt(row.max_rel_error, ".1e"), bn, _fmt(row.peak_memory_mib, ".0f"), _fmt(row.cold_start_s, ".2f"), status,
    ]


def format_table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(path: str, meta: dict[str, Any], rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [dataclasses.asdict(row) for row in rows]}, f, indent=2)
        f.write("\n")


def write_csv(path: str, rows: list[Row]) -> None:
    fields = [field.name for field in dataclasses.fields(Row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row))


def write_plot(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    """Speed-up over eager per model, one panel per batch size, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row.batch_size for row in rows})
    systems = [s for s in meta["systems"] if s != "eager"]
    models = list(dict.fromkeys(row.model for row in rows))
    figure, axes = plt.subplots(len(batches), 1, figsize=(max(6, 1.4 * len(models) * len(systems) / 3), 3.2 * len(batches)),
                                squeeze=False)
    width = 0.8 / max(len(systems), 1)
    for axis, batch in zip(axes[:, 0], batches, strict=True):
        for i, system in enumerate(systems):
            values = []
            for model in models:
                match = [r for r in rows if (r.model, r.batch_size, r.system) == (model, batch, system)]
                values.append(match[0].speedup_vs_eager if match and match[0].speedup_vs_eager else 0.0)
            axis.bar([m + (i - (len(systems) - 1) / 2) * width for m in range(len(models))], values, width, label=system)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel("speed-up vs eager")
        axis.set_title(f"batch {batch} - {meta['device']} ({meta['machine']}), {meta['threads']} threads, "
                       f"torch {meta['torch']}", fontsize=9)
        axis.legend(fontsize=7, ncol=len(systems))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
