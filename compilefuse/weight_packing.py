"""Which frozen CPU convolution weights Inductor packs for oneDNN.

Under freezing, Inductor packs the weight of every eligible CPU convolution ahead of time and calls
oneDNN for it. Packing saves the per-call weight reorder of a convolution that would run on oneDNN
anyway. But ATen does not run every convolution on oneDNN: for a batch-1, ungrouped convolution with
a kernel of at most 3x3 on a small input (and a 1x1 one with one thread) its own direct kernel is
faster than a packed oneDNN call (on the built-in models at batch 1, freezing made them slower than
plain Inductor; docs/benchmarks.md). So a weight is packed where ATen would
choose oneDNN for that convolution, or where the convolution is large enough for that fixed cost not
to matter (mobilenet_v2's 1x1 expansions on 7x7 and 14x14 inputs, where ATen's direct kernel was
the slower). A ``cpp.weight_prepack`` the user sets decides instead, for every convolution
of the compile.

A linear layer's weight is packed for oneDNN's linear (``mkldnn._linear_pointwise``) where the
product is large enough: oneDNN's call has a fixed cost above ATen's ``addmm``, but on larger
products it is faster, and at batch 1 with two or more threads ATen's matrix-vector
product runs on one (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from ._torch_private import onednn

#: ATen's own input size (elements) above which a batch-1 float32 convolution runs on oneDNN
#: (``ConvParams::use_mkldnn`` in aten/src/ATen/native/Convolution.cpp: "for some case, native is faster").
ATEN_ONEDNN_FROM_ELEMENTS = 20480

#: Multiply-adds per call from which a convolution is packed whatever ATen would do, and a linear
#: layer's weight on one thread.
PACK_FROM_MACS = 4_000_000

#: Multiply-adds per call from which a linear layer's weight is packed when torch runs more than one thread.
LINEAR_PACK_FROM_MACS = 500_000


def worth_packing(convolution: torch.fx.Node) -> bool:
    """Whether a packed weight only saves work here: ATen would run this convolution on oneDNN, or it
    is large. Sizes not known at compile time (a dynamic batch) leave the choice to Inductor."""
    input, weight = convolution.args[0], convolution.args[1]
    input = input.meta.get("val") if isinstance(input, torch.fx.Node) else None
    weight = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor) or input.dim() != 4:
        return True
    if input.dtype != torch.float32 or not all(isinstance(size, int) for size in (*input.shape, *weight.shape)):
        return True  # ATen runs low precision on oneDNN; symbolic sizes: Inductor's choice
    stride, _padding, dilation, _transposed, _output_padding, groups = convolution.args[3:9]
    batch, (kernel_h, kernel_w) = input.shape[0], weight.shape[-2:]
    output = convolution.meta.get("val")
    if isinstance(output, torch.Tensor) and output.numel() * math.prod(weight.shape[1:]) >= PACK_FROM_MACS:
        return True
    if (kernel_h, kernel_w) == (1, 1) and batch < 16 and torch.get_num_threads() == 1 and \
            all(s == 1 for s in stride) and all(d == 1 for d in dilation):
        return False
    return groups > 1 or (kernel_h > 3 and kernel_w > 3) or batch > 1 or input.numel() > ATEN_ONEDNN_FROM_ELEMENTS


def worth_packing_linear(batch: int, in_features: int, out_features: int) -> bool:
    """Whether oneDNN's packed linear is the faster for this product (at compile time's thread count)."""
    macs = batch * in_features * out_features
    return macs >= (LINEAR_PACK_FROM_MACS if torch.get_num_threads() > 1 else PACK_FROM_MACS)


def convolution_choice(patches: Mapping[str, Any]) -> Callable[[torch.fx.Node], bool]:
    """Which convolutions of a compile with these Inductor ``patches`` read a packed weight:
    ``worth_packing``, or for every one what ``cpp.weight_prepack`` says when the patches set it."""
    setting = patches.get("cpp.weight_prepack")
    return worth_packing if setting is None else (lambda _convolution: bool(setting))


def linear_choice(patches: Mapping[str, Any]) -> Callable[[int, int, int], bool]:
    """Which matrix products (rows, in features, out features) read a packed weight:
    ``worth_packing_linear``, or for every one what ``cpp.weight_prepack`` says when set."""
    setting = patches.get("cpp.weight_prepack")
    return worth_packing_linear if setting is None else (lambda *_sizes: bool(setting))


def packing(patches: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """The weight packing of one freezing compile with these Inductor ``patches`` (``convolution_choice``)."""
    return onednn.cpu_conv_weight_packing(convolution_choice(patches))


def cpu_float64_patches(example_inputs: Sequence[Any]) -> dict[str, Any]:
    """oneDNN weight packing crashes on float64 convolution weights ("itensor_view_from_dense
    expects float/bfloat16/half"): no packing there."""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == "cpu" for t in example_inputs):
        return {"cpp.weight_prepack": False}
    return {}
