"""Per-parameter gradient errors of one training step against a float64 eager copy, for eager,
Inductor and bnfuse (what docs/benchmarks.md quotes beside the --train table).

    python benchmarks/train_gradient_errors.py [MODEL] [BATCH]     # default: resnet50 8

The model is built as ``compilefuse-bench --train`` builds it (calibrated BN statistics), every BN
in eval mode with its affine trained. Printed: for each system the largest per-parameter error
(``max |g - g64| / max |g64|``), the largest per-parameter L2 error and the global L2 error (all
gradients as one vector); then the parameters where bnfuse's error is largest against Inductor's.
"""

from __future__ import annotations

import copy
import statistics
import sys

import torch

from compilefuse.bench import catalog
from compilefuse.bench.training import _loss, eval_bn_for_finetuning


def main(model_name: str = "resnet50", batch: int = 8) -> None:
    torch.set_num_threads(2)
    spec = catalog.resolve(model_name)
    torch.manual_seed(0)
    base = eval_bn_for_finetuning(spec.build())
    x = spec.make_input(batch)
    reference = copy.deepcopy(base).double()
    _loss(reference(x.double())).backward()
    ref = {n: p.grad for n, p in reference.named_parameters()}
    errors: dict[str, dict[str, float]] = {}
    for system in ("eager", "inductor", "bnfuse"):
        model = copy.deepcopy(base)
        fn = model if system == "eager" else torch.compile(model, backend=system)
        _loss(fn(x)).backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters()}
        errors[system] = {n: ((g - ref[n]).abs().max() / ref[n].abs().max()).item() for n, g in grads.items()}
        l2 = max(((g - ref[n]).norm() / ref[n].norm()).item() for n, g in grads.items())
        total = (sum((g - ref[n]).pow(2).sum() for n, g in grads.items()).sqrt()
                 / sum(r.pow(2).sum() for r in ref.values()).sqrt()).item()
        print(f"{system:9s} max per-parameter {max(errors[system].values()):.2e}  max L2 {l2:.2e}  global {total:.2e}")
    ratios = sorted(((errors["bnfuse"][n] / max(errors["inductor"][n], 1e-30), n) for n in ref), reverse=True)
    print(f"bnfuse / inductor per parameter: median {statistics.median(r for r, _ in ratios):.2f}")
    for r, n in ratios[:8]:
        print(f"  {n:36s} {r:5.2f}x  bnfuse {errors['bnfuse'][n]:.2e}  inductor {errors['inductor'][n]:.2e}"
              f"  eager {errors['eager'][n]:.2e}")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["resnet50"]), *(int(a) for a in sys.argv[2:3]))
