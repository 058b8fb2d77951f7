"""Issue 30's rows, measured after the weights became data: each row in fresh processes, one
system per process, 2 threads, on a quiet machine.

    python benchmarks/weights_as_data_rows.py [--rows reload,instances,memory] [--json OUT]

- ``reload``: resnet18 at 64 and 224 px, batch 1: the first call after ``load_state_dict`` of
  another instance's weights (median of 3 reloads) and a plain call, per system; the answer
  against float64.
- ``instances``: 10 resnet18 instances (64 px by default) compiled and called in turn: the first
  round (all the compiles) and a steady round, per system; every answer against float64.
- ``memory``: resnet50 at 224 px, batch 1: RSS growth over the eager model after compiling and
  three calls, per system (a loaded ``compilefuse.export`` package too, frozen and refittable).

Systems: ``inductor`` (plain), ``inductor_freezing``, ``bnfuse`` (weights as data) and
``bnfuse_frozen`` (``options={"freeze": True}``: the weights in the code, as bnfuse compiled before).
Each process has a cache directory of its own (cold compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import _results  # benchmarks/_results.py (the script's folder is on sys.path)

SYSTEMS = ("inductor", "inductor_freezing", "bnfuse", "bnfuse_frozen")

CHILD = r"""
import copy, gc, json, os, statistics, sys, tempfile, time
import torch, torchvision
import compilefuse
from compilefuse.examples.models import randomize_bn
from compilefuse.examples.reference import float64_reference, relative_error
torch.set_num_threads(2)
row, system, size = sys.argv[1], sys.argv[2], int(sys.argv[3])

def make(name, seed):
    torch.manual_seed(seed)
    return randomize_bn(getattr(torchvision.models, name)().eval())

def compiled(model):
    if system == "inductor":
        return torch.compile(model)
    if system == "inductor_freezing":
        torch._inductor.config.freezing = True
        return torch.compile(model)
    if system.startswith("package"):
        path = os.path.join(tempfile.mkdtemp(), "m.pt2")
        compilefuse.export(model, (x,), path, refittable=system == "package_refittable")
        return compilefuse.load(path)
    return torch.compile(model, backend="bnfuse", options={"freeze": system == "bnfuse_frozen"})

def timed(fn):
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return out, time.perf_counter() - start

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

x = torch.randn(1, 3, size, size)
if row == "reload":
    model = make("resnet18", 0)
    fn = compiled(model)
    timed(lambda: fn(x))
    reload, plain, errors = [], [], []
    for seed in (1, 2, 3):
        other = make("resnet18", seed)
        model.load_state_dict(other.state_dict())
        out, seconds = timed(lambda: fn(x))
        reload.append(seconds)
        plain.append(timed(lambda: fn(x))[1])
        errors.append(relative_error(out, float64_reference(other, x)))
    result = {"first_call_after_reload_s": statistics.median(reload), "plain_call_s": statistics.median(plain),
              "max_error_vs_float64": max(errors)}
elif row == "instances":
    models = [make("resnet18", seed) for seed in range(10)]
    fns = [compiled(m) for m in models]
    outs, first = timed(lambda: [fn(x) for fn in fns])
    steady = []
    for _ in range(3):
        steady.append(timed(lambda: [fn(x) for fn in fns])[1])
    errors = [relative_error(out, float64_reference(m, x)) for out, m in zip(outs, models)]
    result = {"first_round_s": first, "steady_round_s": statistics.median(steady), "max_error_vs_float64": max(errors),
              "peak_rss_mib": rss_mib()}
else:
    model = make("resnet50", 0)
    gc.collect()
    before = rss_mib()
    fn = model if system == "eager" else compiled(model)
    for _ in range(3):
        timed(lambda: fn(x))
    gc.collect()
    result = {"rss_growth_mib": rss_mib() - before}
print("RESULT " + json.dumps(result))
"""


def child(row: str, system: str, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "2"}
        done = subprocess.run([sys.executable, "-c", CHILD, row, system, str(size)], env=env, capture_output=True,
                              text=True)
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="reload,instances,memory")
    parser.add_argument("--sizes", default="64,224", help="image sizes of the reload row")
    parser.add_argument("--instance-sizes", default="64", help="image sizes of the instances row")
    parser.add_argument("--json")
    args = parser.parse_args()
    result: dict[str, object] = {"threads": 2}
    for row in args.rows.split(","):
        if row == "memory":
            result[row] = {system: child(row, system, 224)
                           for system in ("eager", *SYSTEMS, "package", "package_refittable")}
            continue
        systems = SYSTEMS if row == "reload" else ("inductor", "bnfuse", "bnfuse_frozen")
        sizes = args.sizes if row == "reload" else args.instance_sizes
        result[row] = {size: {system: child(row, system, int(size)) for system in systems} for size in sizes.split(",")}
    _results.emit(result, args.json)


if __name__ == "__main__":
    main()
