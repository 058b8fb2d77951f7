"""The arithmetic of folding an inference BatchNorm into the op that produces its input.

Inference BN is a per-channel affine map ``y = x * scale + shift`` with

    scale = gamma / sqrt(running_var + eps)        (gamma = 1 without affine)
    shift = beta - running_mean * scale            (beta = 0 without affine)

For an op whose output channel ``c`` is linear in its weight slice ``W_c`` plus bias ``b_c``,
``BN(op(x; W, b)) = op(x; W * scale, b * scale + shift)``. The only thing that differs between
convolution, transposed convolution and linear is *which slice of W* feeds output channel ``c``.

Everything is computed in float64 and cast once at the end, so an fp32 fold is exact to fp32
rounding and an fp16/bf16 fold adds no error beyond one final rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

FOLD_DTYPE = torch.float64

#: The dtype the fold functions below compute in: ``FOLD_DTYPE``, except inside ``computed_in``.
_fold_dtype: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("bnfuse_fold_dtype", default=FOLD_DTYPE)


@contextlib.contextmanager
def computed_in(dtype: torch.dtype) -> Iterator[None]:
    """The fold functions compute in ``dtype`` meanwhile (a per-step fold under autocast: float32)."""
    token = _fold_dtype.set(dtype)
    try:
        yield
    finally:
        _fold_dtype.reset(token)


def fold_dtype() -> torch.dtype:
    return _fold_dtype.get()


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an inference BatchNorm, in float64."""
    scale = torch.rsqrt(running_var.to(fold_dtype()) + eps)
    if gamma is not None:
        scale = scale * gamma.to(fold_dtype())
    shift = -running_mean.to(fold_dtype()) * scale
    if beta is not None:
        shift = shift + beta.to(fold_dtype())
    return scale, shift


def scale_output_channels(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Scale a conv / linear weight laid out as (out_channels, ...): row ``c`` times ``scale[c]``."""
    view = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return weight.to(fold_dtype()) * view


def scale_transposed_output_channels(
    weight: torch.Tensor, scale: torch.Tensor, groups: int
) -> torch.Tensor:
    """Scale a transposed-conv weight laid out as (in_channels, out_channels / groups, ...).

    Output channel ``g * out_per_group + j`` is fed by column ``j`` of group ``g``'s block of input
    rows, so the scale must be applied along dimension 1 *per group*: scaling dimension 0 (as a
    plain conv fold would) or ignoring groups gives wrong results.
    """
    in_channels, out_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    blocks = weight.to(fold_dtype()).reshape(groups, in_channels // groups, out_per_group, *kernel)
    view = scale.reshape(groups, 1, out_per_group, *([1] * len(kernel)))
    return (blocks * view).reshape(weight.shape)


def input_channel_view(weight: torch.Tensor, per_input: torch.Tensor, groups: int) -> torch.Tensor:
    """``per_input`` (one value per input channel) laid out like a conv / linear weight
    (out_channels, in_channels / groups, ...): entry ``[o, j]`` is input channel
    ``(o // out_per_group) * in_per_group + j``, the one that weight column reads."""
    out_channels, in_per_group = weight.shape[:2]
    view = per_input.reshape(groups, 1, in_per_group).expand(groups, out_channels // groups, in_per_group)
    return view.reshape(out_channels, in_per_group, *([1] * (weight.dim() - 2)))


def fold_into_input_channels(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``x * scale + shift`` applied to the *input* of a conv (no zero padding) or linear:

        W'[o, j] = W[o, j] * scale[in(o, j)]
        b'[o]    = b[o] + sum_{j, k} W[o, j, k] * shift[in(o, j)]

    exact because every output sums every weight tap over real (never padded) inputs.
    """
    weight64 = weight.to(fold_dtype())
    folded_weight = weight64 * input_channel_view(weight, scale, groups)
    through = (weight64 * input_channel_view(weight, shift, groups)).flatten(1).sum(1)
    return folded_weight, through if bias is None else bias.to(fold_dtype()) + through


def fold_bias(
    bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``b * scale + shift`` in float64 (a missing bias counts as zero)."""
    if bias is None:
        return shift.clone()
    return bias.to(fold_dtype()) * scale + shift


def cast_like(folded: torch.Tensor, original: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Round a float64 result once to ``dtype`` (default ``original``'s), keeping ``original``'s
    device and memory layout. (One cast where the layouts already agree: a per-step fold is then
    plain elementwise arithmetic that autograd's partitioner can recompute in the backward.)"""
    if folded.device == original.device and folded.stride() == original.stride():
        return folded.to(dtype or original.dtype)
    out = torch.empty_like(original, dtype=dtype)
    out.copy_(folded)
    return out


def input_fold_growth(
    running_mean: torch.Tensor, running_var: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor | None
) -> torch.Tensor:
    """Per channel, how much a BN folded into the op *after* it grows the terms that op sums (RMS,
    for an input distributed as the running statistics say), hence its rounding error.

    Eager sums ``W * (scale * (x - mean) + beta)``; the fold sums ``(W * scale) * x`` and adds
    ``W * shift`` back through the bias, so an input far from zero next to its spread (an offset
    input, a large gain) is summed at its full size and cancelled afterwards:

        growth = sqrt(scale² (mean² + var)) / sqrt(scale² var + beta²)

    (1 for a centred input; infinite where eager's terms are all zero and the fold's are not).
    """
    mean, var = running_mean.to(fold_dtype()), running_var.to(fold_dtype())
    folded = scale.square() * (mean.square() + var)
    eager = scale.square() * var + (0 if beta is None else beta.to(fold_dtype()).square())
    growth = (folded / eager).sqrt()
    return torch.where(folded == 0, torch.ones_like(growth), growth)
