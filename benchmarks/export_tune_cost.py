"""What ``compilefuse.export(tune=True)`` costs against one ``compilefuse.export`` (issue 23).

    python benchmarks/export_tune_cost.py [--models resnet18 resnet_style] [--runs 2] [--json OUT]

Each export runs in a fresh process with an empty Inductor cache directory (a first build on a
machine), 2 threads; tuned and untuned alternate, models in turn. Reported per model: the medians
of the whole process (imports included) and of the ``export`` call alone, their ratios, and which
setting the tuner chose.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import _results  # benchmarks/_results.py (the script's folder is on sys.path)

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch, compilefuse
torch.set_num_threads(2)
name, tune, path = sys.argv[1], sys.argv[2] == "tune", sys.argv[3]
torch.manual_seed(0)
if name == "resnet18":
    import torchvision
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)
else:
    from compilefuse.examples import models
    model, x = models.randomize_bn(getattr(models, name)()).eval(), torch.randn(1, 3, 32, 32)
called = time.perf_counter()
compilefuse.export(model, (x,), path, tune=tune)
done = time.perf_counter()
tuning = compilefuse.load(path).metadata.get("tuning")
print(json.dumps({"process_s": done - start, "export_s": done - called, "chosen": tuning and tuning["chosen"]}))
"""


def run(model: str, tune: bool, folder: str, index: int) -> dict:
    cache = os.path.join(folder, f"cache_{model}_{tune}_{index}")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", CHILD, model, "tune" if tune else "one", os.path.join(folder, "m.pt2")],
                          check=True, env=env, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet_style"])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    samples: dict[str, dict[str, list[dict]]] = {m: {"one": [], "tune": []} for m in args.models}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.runs):
            for model in args.models:
                for kind in (("one", "tune") if index % 2 == 0 else ("tune", "one")):
                    samples[model][kind].append(run(model, kind == "tune", folder, index))
    result = {"runs": args.runs, "threads": 2, "models": {}}
    for model, kinds in samples.items():
        median = {kind: {key: statistics.median(s[key] for s in runs) for key in ("process_s", "export_s")}
                  for kind, runs in kinds.items()}
        result["models"][model] = {
            "median": median,
            "tune_over_one_process": median["tune"]["process_s"] / median["one"]["process_s"],
            "tune_over_one_export": median["tune"]["export_s"] / median["one"]["export_s"],
            "chosen": [s["chosen"] for s in kinds["tune"]],
            "all": kinds,
        }
    _results.emit(result, args.json)


if __name__ == "__main__":
    main()
