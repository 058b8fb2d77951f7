"""The README's first command: compile a small CNN with bnfuse, show what was folded and how far
the result is from eager and from a float64 reference.

    python -m compilefuse.examples.demo
"""

from __future__ import annotations

import torch

import compilefuse
from compilefuse.examples.models import SmallCNN, randomize_bn
from compilefuse.examples.reference import float64_reference, relative_error


def main() -> None:
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN().eval())
    x = torch.randn(4, 3, 32, 32)

    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        out = compiled(x)
        eager = model(x)
    reference = float64_reference(model, x)

    print(compilefuse.last_report())
    print()
    print(f"max |bnfuse - eager|   = {(out - eager).abs().max().item():.3e}")
    print(f"max rel. error vs fp64: bnfuse {relative_error(out, reference):.3e}, "
          f"eager {relative_error(eager, reference):.3e}")


if __name__ == "__main__":
    main()
