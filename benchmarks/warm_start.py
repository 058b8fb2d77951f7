"""Warm start of a JIT compile (issue 23): a fresh process from its start to its first answer
under ``torch.compile``, with the compile caches warm, per system; and a replica with an empty
cache that is handed ``torch.compiler.save_cache_artifacts``' bytes first.

    python benchmarks/warm_start.py [--model resnet18] [--runs 5] [--json OUT]

Systems: plain Inductor, Inductor with ``freezing=True``, bnfuse (weights as data), bnfuse with
``options={"freeze": True}`` (weights in the code), bnfuse with ``options={"cache": True}``. Each
child imports torch and torchvision, builds the model (seeded), compiles, answers one batch-1 input
under ``inference_mode`` with 2 threads, and is timed whole from outside. All
share one fresh Inductor cache directory: each system's first (cold) run fills it and saves its
cache artifacts, and is reported apart; the measured runs are interleaved and reported as medians.
"Shipped" runs start with an empty cache directory and load the cold run's artifacts first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _results  # benchmarks/_results.py (the script's folder is on sys.path)

CHILD = r"""
import sys, time
import torch, torchvision
system, model_name, blob, save = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "save"
torch.set_num_threads(2)
if system.startswith("bnfuse"):
    import compilefuse  # registers bnfuse's artifact type before load_cache_artifacts
if blob != "-" and not save:
    with open(blob, "rb") as file:
        torch.compiler.load_cache_artifacts(file.read())
torch.manual_seed(0)
model = getattr(torchvision.models, model_name)().eval()
x = torch.randn(1, 3, 224, 224)
if system == "inductor":
    compiled = torch.compile(model)
elif system == "inductor freezing":
    torch._inductor.config.freezing = True
    compiled = torch.compile(model)
elif system == "bnfuse":
    compiled = torch.compile(model, backend="bnfuse")
elif system == "bnfuse frozen":
    compiled = torch.compile(model, backend="bnfuse", options={"freeze": True})
else:
    compiled = torch.compile(model, backend="bnfuse", options={"cache": True})
with torch.inference_mode():
    compiled(x)
if save:
    saved = torch.compiler.save_cache_artifacts()
    with open(blob, "wb") as file:
        file.write(saved[0] if saved else b"")
"""

SYSTEMS = ("inductor", "inductor freezing", "bnfuse", "bnfuse frozen", "bnfuse cache")
SHIPPED = ("inductor", "bnfuse cache")


def run(system: str, model: str, cache_dir: str, blob: str = "-", save: bool = False) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "2"}
    env.pop("COMPILEFUSE_CACHE_DIR", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, system, model, blob, "save" if save else "load"],
                   check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cache = os.path.join(folder, "cache")
        blobs = {s: os.path.join(folder, f"{s.replace(' ', '_')}.bin") for s in SYSTEMS}
        cold = {s: run(s, args.model, cache, blobs[s], save=True) for s in SYSTEMS}
        warm: dict[str, list[float]] = {s: [] for s in SYSTEMS}
        shipped: dict[str, list[float]] = {s: [] for s in SHIPPED}
        for r in range(args.runs):
            for s in SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]:
                warm[s].append(run(s, args.model, cache))
            for s in SHIPPED:
                shipped[s].append(run(s, args.model, os.path.join(folder, f"empty_{s}_{r}"), blobs[s]))
        result = {
            "model": args.model, "runs": args.runs, "threads": 2,
            "cold_s": cold,
            "warm_s": {s: statistics.median(v) for s, v in warm.items()},
            "shipped_s": {s: statistics.median(v) for s, v in shipped.items()},
            "artifact_bytes": {s: os.path.getsize(blobs[s]) for s in SYSTEMS},
            "warm_s_all": warm, "shipped_s_all": shipped,
        }
    result["warm_vs_inductor"] = {s: result["warm_s"][s] / result["warm_s"]["inductor"] for s in SYSTEMS}
    _results.emit(result, args.json)


if __name__ == "__main__":
    main()
