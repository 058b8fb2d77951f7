"""Latency of bnfuse against eager, Inductor and Inductor with freezing, on resnet18 and a DCGAN
generator. Systems are interleaved round by round in one process (order rotated each round), the
thread count is set explicitly for torch and for the Timer, and medians and ratios are reported.

    python benchmarks/core_latency.py --device cpu --threads 2 --json benchmarks/results/core_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch import nn
from torch.utils.benchmark import Timer

from compilefuse.models import dcgan_generator, randomize_bn


def models(batch: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    import torchvision

    torch.manual_seed(0)
    return {
        f"resnet18/b{batch}": (randomize_bn(torchvision.models.resnet18().eval(), (0.5, 2.0)), torch.randn(batch, 3, 224, 224)),
        f"dcgan_generator/b{batch}": (randomize_bn(dcgan_generator().eval()), torch.randn(batch, 100, 1, 1)),
    }


SYSTEMS = {
    "eager": lambda m: m,
    "inductor": lambda m: torch.compile(m),
    "inductor-freezing": lambda m: torch.compile(m, options={"freezing": True}),
    "bnfuse": lambda m: torch.compile(m, backend="bnfuse"),
}

# Dynamo decides at trace time whether parameters become frozen graph constants, from the global
# Inductor config: torch.compile(options={"freezing": True}) alone freezes nothing, and a call
# outside the patched config recompiles without freezing. So the patch covers every call.
TRACE_CONFIG = {"inductor-freezing": {"freezing": True}}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_model(name, model, x, device, threads, rounds, min_run_time):
    model, x = model.to(device), x.to(device)
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(x.double())
    fns, compile_s, error = {}, {}, {}
    for system, make in SYSTEMS.items():
        torch._dynamo.reset()
        fn = make(copy.deepcopy(model))
        start = time.perf_counter()
        with torch.inference_mode(), torch._inductor.config.patch(TRACE_CONFIG.get(system, {})):
            out = fn(x)
            sync(device)
        compile_s[system] = time.perf_counter() - start
        error[system] = ((out.double() - reference).abs().max() / reference.abs().max()).item()
        fns[system] = fn
    samples: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    order = list(SYSTEMS)
    for r in range(rounds):
        for system in order[r % len(order):] + order[: r % len(order)]:
            fn = fns[system]
            timer = Timer(
                stmt="run()",
                globals={"run": lambda fn=fn: (fn(x), sync(device))},
                num_threads=threads,
            )
            with torch.inference_mode(), torch._inductor.config.patch(TRACE_CONFIG.get(system, {})):
                m = timer.blocked_autorange(min_run_time=min_run_time)
            samples[system].append(m.median)
    median = {s: statistics.median(v) * 1e3 for s, v in samples.items()}
    return {
        "model": name,
        "latency_ms": median,
        "compile_s": compile_s,
        "max_rel_error_vs_float64": error,
        "bnfuse_vs_inductor_freezing": median["bnfuse"] / median["inductor-freezing"],
        "bnfuse_vs_inductor": median["bnfuse"] / median["inductor"],
        "speedup_vs_eager": median["eager"] / median["bnfuse"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for batch in args.batch_size or [1]:
        for name, (model, x) in models(batch).items():
            row = bench_model(name, model, x, args.device, args.threads, args.rounds, args.min_run_time)
            results.append(row)
            lat = row["latency_ms"]
            print(
                f"{name:24s} " + " ".join(f"{s}={lat[s]:.3f}ms" for s in SYSTEMS)
                + f" | bnfuse/freezing={row['bnfuse_vs_inductor_freezing']:.3f}"
                f" bnfuse/inductor={row['bnfuse_vs_inductor']:.3f} speedup_vs_eager={row['speedup_vs_eager']:.2f}"
                f" | err {row['max_rel_error_vs_float64']}",
                flush=True,
            )
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "min_run_time_s": args.min_run_time,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
