"""Does Inductor with freezing fold a model's BNs into the weights, or apply them per call?

Counts, in the code each system generates, the square roots (BN's rsqrt computed per call) and the
multiplications (a BN applied per call leaves a multiply per element in a pointwise kernel; a BN
folded into the weights leaves none). bnfuse is compared with Inductor+freezing and with the
BN-free limit; matching the limit means nothing of the BN is left at run time.

    python benchmarks/codegen_compare.py pointnet_head dcgan_generator resnet_style
"""

from __future__ import annotations

import copy
import sys

from compilefuse.bench.codegen import generated_code, multiplications
from compilefuse.bench.systems import without_batch_norm
from compilefuse.examples.models import BUILTIN_MODELS, randomize_bn


def main(names: list[str]) -> None:
    for name in names or list(BUILTIN_MODELS):
        spec = BUILTIN_MODELS[name]
        model, x = randomize_bn(spec.build().eval()), spec.example(4)
        counts = {}
        for system, m in (("inductor-freezing", copy.deepcopy(model)), ("bnfuse", copy.deepcopy(model)),
                          ("limit", without_batch_norm(model))):
            src = generated_code(m, x, "inductor-freezing" if system == "inductor-freezing" else "bnfuse")
            counts[system] = f"sqrt {src.count('sqrt')}, multiplications {multiplications(src)}"
        print(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
