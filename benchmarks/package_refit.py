"""Packages that refit (issue 30, item 6): what a refit costs in a replica, and what a refittable
package's call costs against a frozen one's. 2 threads, a quiet machine.

    python benchmarks/package_refit.py [--model resnet18] [--sizes 64,224] [--json OUT]

Per size: one process exports the model twice (``refittable=True`` and the default frozen build)
and records both export times; a fresh process (a replica) loads both packages, refits the
refittable one with another instance's weights (the first refit reads the fold prologue the package
keeps; then three more, median), checks every answer against float64, and times
calls of the two packages interleaved (medians of 5 rounds of 50 calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import _results  # benchmarks/_results.py (the script's folder is on sys.path)

BUILD = r"""
import json, sys, time, torch, torchvision, compilefuse
from compilefuse.examples.models import randomize_bn
torch.set_num_threads(2)
name, size, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = randomize_bn(getattr(torchvision.models, name)().eval())
x = torch.randn(1, 3, size, size)
seconds = {}
for kind, refittable in (("frozen", False), ("refittable", True)):
    start = time.perf_counter()
    compilefuse.export(model, (x,), f"{folder}/{kind}.pt2", refittable=refittable)
    seconds[kind] = time.perf_counter() - start
print("RESULT " + json.dumps({"export_s": seconds}))
"""

REPLICA = r"""
import json, statistics, sys, time
start = time.perf_counter()
import torch, torchvision, compilefuse
from compilefuse.examples.models import randomize_bn
from compilefuse.examples.reference import float64_reference, relative_error
torch.set_num_threads(2)
name, size, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
x = torch.randn(1, 3, size, size)
frozen, refittable = (compilefuse.load(f"{folder}/{kind}.pt2") for kind in ("frozen", "refittable"))
with torch.inference_mode():
    frozen(x), refittable(x)
loaded_s = time.perf_counter() - start

def make(seed):
    torch.manual_seed(seed)
    return randomize_bn(getattr(torchvision.models, name)().eval())

errors, refits = [], []
for seed in (1, 2, 3, 4):
    other = make(seed)
    state = other.state_dict()
    begin = time.perf_counter()
    refittable.refit(state)
    refits.append(time.perf_counter() - begin)
    with torch.inference_mode():
        errors.append(relative_error(refittable(x), float64_reference(other, x)))

def call_s(fn):
    times = []
    with torch.inference_mode():
        for _ in range(50):
            begin = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - begin)
    return statistics.median(times)

rounds = {"frozen": [], "refittable": []}
systems = [("frozen", frozen), ("refittable", refittable)]
for r in range(5):
    for kind, fn in systems if r % 2 == 0 else systems[::-1]:
        rounds[kind].append(call_s(fn))
call = {kind: statistics.median(v) for kind, v in rounds.items()}
print("RESULT " + json.dumps({
    "replica_load_and_first_calls_s": loaded_s, "first_refit_s": refits[0],
    "later_refit_s": statistics.median(refits[1:]),
    "max_error_vs_float64": max(errors), "call_ms": {k: v * 1e3 for k, v in call.items()},
    "refittable_vs_frozen_call": call["refittable"] / call["frozen"]}))
"""


def run(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"model": args.model, "threads": 2, "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            build = run(BUILD, args.model, str(size), folder)
            replica = run(REPLICA, args.model, str(size), folder)
        result["sizes"][str(size)] = {**build, **replica}
    _results.emit(result, args.json)


if __name__ == "__main__":
    main()
