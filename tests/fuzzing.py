"""Hypothesis settings the property tests share. Profiles (``HYPOTHESIS_PROFILE``): ``ci``
(default), ``long`` (300 examples, random) and ``quick``; ``ci`` and ``quick`` are derandomised,
so a CI run is reproducible."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def fuzz_settings(*, ci: int, quick: int, long: int = 300, suppress: tuple[HealthCheck, ...] = ()) -> settings:
    """Settings with the given number of examples per profile (compiles are slow: no deadline).
    The one place the profiles are read: no test file registers or loads a profile of its own."""
    examples = {"ci": ci, "quick": quick, "long": long}
    return settings(
        max_examples=examples.get(PROFILE, ci),
        deadline=None,
        derandomize=PROFILE != "long",
        suppress_health_check=[HealthCheck.too_slow, *suppress],
    )


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                     transposed: bool = False, output_padding: int = 0) -> int:
    """A convolution's output length along one spatial dimension (< 1: the configuration is invalid)."""
    reach = dilation * (kernel - 1)
    if transposed:
        return (size - 1) * stride - 2 * padding + reach + output_padding + 1
    return (size + 2 * padding - reach - 1) // stride + 1


def input_growth_fits(mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                      eps: float) -> bool:
    """Whether a BN before the op passes the precision check (``value_checks.NumericJudge``): the
    folded op sums the raw input, ``sqrt(mean² + var) * |scale|`` per channel, where eager sums
    ``sqrt(scale² var + beta²)``; at most 2x in bfloat16, 16x in float32."""
    limit = 2.0 if mean.dtype == torch.bfloat16 else 16.0
    mean, var = mean.double(), var.double()
    scale = (var + eps).rsqrt() * (gamma.double() if gamma is not None else 1)
    beta = beta.double() if beta is not None else torch.zeros_like(mean)
    growth = (scale.square() * (mean.square() + var) / (scale.square() * var + beta.square())).sqrt().max()
    return float(growth) <= limit
