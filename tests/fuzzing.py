"""Hypothesis settings the property tests share. Profiles (``HYPOTHESIS_PROFILE``): ``ci``
(default), ``long`` (300 examples, random) and ``quick``; ``ci`` and ``quick`` are derandomised,
so a CI run is reproducible."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

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


@st.composite
def branch_cases(draw):
    """Parallel conv branches of one input, each with its BN, summed (or subtracted), then maybe a
    layer scale and an identity BN: kernels 1/3/5, paddings, strides, groups."""
    channels = draw(st.sampled_from([4, 6]))
    convs = []
    for _ in range(draw(st.integers(2, 3))):
        kernel = draw(st.sampled_from([1, 3, 5]))
        convs.append(dict(kernel=kernel, padding=draw(st.sampled_from([kernel // 2, kernel // 2, 0, 1])),
                          stride=draw(st.sampled_from([1, 1, 2])), groups=draw(st.sampled_from([1, 1, 2, channels]))))
    return dict(channels=channels, convs=convs, identity=draw(st.booleans()), scale=draw(st.booleans()),
                subtract=draw(st.booleans()), size=draw(st.integers(5, 8)))


def addable(case) -> bool:
    """Whether a branch case is a model at all: branches of one output size, and with an identity
    term, that of the input."""
    sizes = {conv_output_size(case["size"], c["kernel"], c["stride"], c["padding"]) for c in case["convs"]}
    if len(sizes) != 1 or min(sizes) < 1:
        return False
    return not case["identity"] or (sizes == {case["size"]} and all(c["stride"] == 1 for c in case["convs"]))


def mergeable(convs: list[dict]) -> bool:
    """branch_merge's conditions, restated: same stride and groups, kernels centred alike."""
    same = all(len({d[k] for d in convs}) == 1 for k in ("stride", "groups"))
    return same and len({2 * d["padding"] - (d["kernel"] - 1) for d in convs}) == 1


def expected_merge(case) -> tuple[list[int], bool]:
    """What branch_merge does to a case: the sizes of its merges, and whether every BN folds. The
    sum is ((c0 + c1) + c2) ...: if not all branches merge, the first two may still. With an
    identity the sizes match already (centring 0, stride 1)."""
    convs = case["convs"]
    everything = mergeable(convs)
    merged = len(convs) + case["identity"] if everything else (2 if len(convs) == 3 and mergeable(convs[:2]) else 0)
    return ([merged] if merged else []), everything or not case["identity"]


@st.composite
def cat_cases(draw):
    """Convs on channel slices of one input, concatenated along channels, then one BN: 2-4 slices of
    1-3 channels, each conv ``c -> c + 1`` channels with kernel 1/3/5 and "same" padding."""
    splits = draw(st.lists(st.integers(1, 3), min_size=2, max_size=4))
    return dict(splits=splits, kernels=[draw(st.sampled_from([1, 3, 5])) for _ in splits], transposed=draw(st.booleans()))
