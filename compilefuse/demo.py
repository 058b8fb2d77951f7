"""The README's first command: compile a small CNN with bnfuse, show what was folded and how far
the result is from eager and from a float64 reference.

    python -m compilefuse.demo
"""

from __future__ import annotations

import copy

import torch

import compilefuse
from compilefuse.models import SmallCNN, randomize_bn


def main() -> None:
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN().eval())
    x = torch.randn(4, 3, 32, 32)

    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        out = compiled(x)
        eager = model(x)
        reference = copy.deepcopy(model).double()(x.double())

    print(compilefuse.last_report())
    print()
    scale = reference.abs().max().item()
    print(f"max |bnfuse - eager|   = {(out - eager).abs().max().item():.3e}")
    print(f"max rel. error vs fp64: bnfuse {(out.double() - reference).abs().max().item() / scale:.3e}, "
          f"eager {(eager.double() - reference).abs().max().item() / scale:.3e}")


if __name__ == "__main__":
    main()
