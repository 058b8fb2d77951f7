"""Does Inductor with freezing fold a model's BNs into the weights, or apply them per call?

Counts, in the code each system generates, the square roots (BN's rsqrt computed per call) and the
multiplications (a BN applied per call leaves a multiply per element in a pointwise kernel; a BN
folded into the weights leaves none). bnfuse is compared with Inductor+freezing and with the
BN-free limit; matching the limit means nothing of the BN is left at run time.

    python benchmarks/codegen_compare.py pointnet_head dcgan_generator resnet_style
"""

from __future__ import annotations

import copy
import re
import sys

import torch
from torch._inductor.utils import run_and_get_code

from compilefuse.bench.systems import without_batch_norm
from compilefuse.models import BUILTIN_MODELS, randomize_bn


MULTIPLY = re.compile(r"mul\(|\* ")


def generated_code(model, x, system: str) -> str:
    torch.compiler.reset()
    freezing = system == "inductor-freezing"
    with torch.inference_mode(), torch._inductor.config.patch(freezing=freezing):
        if freezing:
            fn = torch.compile(model, options={"freezing": True})
        else:
            fn = torch.compile(model, backend="bnfuse")
        _, code = run_and_get_code(fn, x)
    return "\n".join(code)


def main(names: list[str]) -> None:
    for name in names or list(BUILTIN_MODELS):
        spec = BUILTIN_MODELS[name]
        model, x = randomize_bn(spec.build().eval()), spec.example(4)
        counts = {}
        for system, m in (("inductor-freezing", copy.deepcopy(model)), ("bnfuse", copy.deepcopy(model)),
                          ("limit", without_batch_norm(model))):
            src = generated_code(m, x, system)
            multiplications = len(MULTIPLY.findall(src))
            counts[system] = f"sqrt {src.count('sqrt')}, multiplications {multiplications}"
        print(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
