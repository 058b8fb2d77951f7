"""The float64 reference every accuracy figure is measured against (tests, benchmark, demo)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def float64_reference(model: nn.Module, *inputs: Any) -> Any:
    """The model's output computed in float64 on a copy (the model itself is not touched)."""
    reference = copy.deepcopy(model).double()
    with torch.inference_mode():
        return reference(*(x.double() if isinstance(x, torch.Tensor) else x for x in inputs))


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|, in float64 (on the reference's device)."""
    reference = reference.double()
    difference = actual.double().to(reference.device) - reference
    return (difference.abs().max() / reference.abs().max().clamp_min(1e-30)).item()
