"""What the compiled systems leave for run time, read off the code Inductor generates.

A BN applied per call leaves a multiply per element in a pointwise kernel; a BN folded into the
weights leaves none. Counting multiplies (and square roots: BN's rsqrt computed per call) in the
generated code shows whether a system's BN costs anything at run time, with no timing noise.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from . import _torch_private

MULTIPLY = re.compile(r"mul\(|\* ")  # a multiply in Inductor's C++ or Triton kernels


def generated_code(model: nn.Module, x: torch.Tensor, system: str) -> str:
    """Inductor's code for ``model`` compiled as ``system`` ("bnfuse" or "inductor-freezing")."""
    torch.compiler.reset()
    if system == "inductor-freezing":
        with torch.inference_mode(), _torch_private.inductor_freezing():
            return _torch_private.generated_code(torch.compile(model, options={"freezing": True}), x)
    # Inductor's Python wrapper, as for the others: only the kernels' arithmetic is compared, not
    # the C++ wrapper bnfuse takes on CPU by default.
    options = {"inductor": {"cpp_wrapper": False}}
    with torch.inference_mode():
        return _torch_private.generated_code(torch.compile(model, backend="bnfuse", options=options), x)


def multiplications(code: str) -> int:
    return len(MULTIPLY.findall(code))
