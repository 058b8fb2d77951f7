"""The checks a fold's result must pass on real values before it replaces a BN: finite in its
dtype, and no rounding or overflow eager would not have.

They read only tensors the fold computed or read (``Judged``), never the graph, so a prologue
runs them again on every set of weights it folds, a replica's refit included, without the
compiler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import fold_math

#: The most a BN folded into the op after it may grow the terms that op sums (``NumericJudge``):
#: 2x where eager's BN computes in float32 and the op in half precision; in float32 16x (16 float32
#: roundings stay under 2e-6 relative, inside the 1e-5 bnfuse promises against float64).
MAX_INPUT_FOLD_GROWTH = {torch.float16: 2.0, torch.bfloat16: 2.0, torch.float32: 16.0}


@dataclasses.dataclass(frozen=True)
class Judged:
    """What a fold's value check reads: the BN's per-channel scale (float64), the op's weight
    before the fold (None: it has none), for a BN with running statistics folded into the op
    after it its running mean, running variance and beta, and the dtype the op computes in (under
    autocast, autocast's, not the weight's)."""

    scale: torch.Tensor
    weight: torch.Tensor | None
    statistics: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None
    dtype: torch.dtype


#: A fold's value check: why the fold would round or overflow where eager does not (None: it would not).
Judge = Callable[[Judged], "str | None"]


@dataclasses.dataclass(frozen=True)
class NumericJudge:
    """A BN fold's value check; ``output_side``: the BN normalises the op's output."""

    output_side: bool

    def __call__(self, judged: Judged) -> str | None:
        return self._growth_refusal(judged, judged.dtype) or self._overflow_refusal(judged, judged.dtype)

    def _growth_refusal(self, judged: Judged, dtype: torch.dtype) -> str | None:
        """A BN before the op: the fold sums the raw input and cancels its offset afterwards
        (``fold_math.input_fold_growth``). (A frozen affine map has no statistics of its input.)"""
        if self.output_side or judged.statistics is None:
            return None
        mean, var, beta = judged.statistics
        growth = float(fold_math.input_fold_growth(mean, var, judged.scale, beta).max())
        limit = MAX_INPUT_FOLD_GROWTH.get(dtype, MAX_INPUT_FOLD_GROWTH[torch.float32])
        if growth <= limit:
            return None
        return (f"folding would sum the input at up to {growth:.3g}x the size eager sums it (running_mean far "
                f"from zero against the running variance), multiplying {str(dtype).removeprefix('torch.')} "
                f"rounding error; limit {limit:g}x")

    def _overflow_refusal(self, judged: Judged, dtype: torch.dtype) -> str | None:
        """Where the fold would change whether the result is finite. A zero scale after the op turns
        eager's ``inf * 0 = nan`` (an overflowing output) into beta; a folded weight above
        sqrt(max) of the dtype and larger than the weight it replaces overflows its products with
        inputs eager's products take (``x * (w * s)`` against ``(x * w) * s`` after the sum)."""
        scale, weight = judged.scale, judged.weight
        if self.output_side and bool((scale == 0).any()):
            return "the BN's scale is 0 in some channel: eager gives nan there when the op's output overflows, the fold beta"
        if weight is None:
            return None
        largest = float(weight.detach().abs().max()) if weight.numel() else 0.0
        grown = largest * float(scale.abs().max())
        headroom = torch.finfo(dtype).max ** 0.5
        if grown > headroom and grown > largest:
            return (f"the folded weight reaches {grown:.3g} (over the square root of the "
                    f"{str(dtype).removeprefix('torch.')} maximum): its products overflow with inputs the unfolded op takes")
        return None


def value_refusal(weight: torch.Tensor, bias: torch.Tensor, judge: Judge | None, judged: Judged | None) -> str | None:
    """Why a fold's real result may not be used: not finite in its dtype, or ``judge``'s reason on
    what the fold read and computed (``judged``); None if it may."""
    for name, value in (("weight", weight), ("bias", bias)):
        if not torch.isfinite(value).all():
            return f"folded {name} is not finite in {value.dtype}"
    return judge(judged) if judge is not None and judged is not None else None
