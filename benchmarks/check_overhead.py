"""Per-call cost of bnfuse's staleness check (identity + version counter of every frozen tensor),
against the latency of the compiled model.

    python benchmarks/check_overhead.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from compilefuse.frozen_call import FrozenGraphCall
from torch.utils.benchmark import Timer

from compilefuse.examples.models import randomize_bn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = randomize_bn(torchvision.models.resnet18().eval(), (0.5, 2.0))
    x = torch.randn(1, 3, 224, 224)
    calls: list[tuple[FrozenGraphCall, tuple]] = []
    original = FrozenGraphCall.__call__

    def spy(self, *call_args):
        calls.append((self, call_args))
        return original(self, *call_args)

    FrozenGraphCall.__call__ = spy
    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        compiled(x)
    FrozenGraphCall.__call__ = original
    frozen_call, call_args = calls[-1]
    frozen = frozen_call._state[2]

    def check() -> bool:
        for i, tensor, version in frozen:  # the loop FrozenGraphCall.__call__ runs
            if call_args[i] is not tensor or call_args[i]._version != version:
                return True
        return False

    with torch.inference_mode():
        check_s = Timer("check()", globals={"check": check}, num_threads=args.threads).blocked_autorange(min_run_time=1).median
        model_s = Timer("compiled(x)", globals={"compiled": compiled, "x": x}, num_threads=args.threads).blocked_autorange(min_run_time=2).median
    print(f"frozen tensors checked per call: {len(frozen)}")
    print(f"check: {check_s * 1e6:.1f} us per call; resnet18 batch 1: {model_s * 1e3:.2f} ms; "
          f"overhead {100 * check_s / model_s:.3f} %")


if __name__ == "__main__":
    main()
