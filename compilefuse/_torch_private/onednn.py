"""oneDNN's CPU operators and Inductor's packing of weights for them: which convolutions its
freezing packs, the packed linear bnfuse reads as data, and what a packed input needs of a compile."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch._inductor import config as inductor_config

log = logging.getLogger("compilefuse")
aten = torch.ops.aten


#: The packing choice of the compile running in this thread (None: Inductor's own), read by the
#: check bnfuse adds to Inductor's packing patterns. A context variable, not a patch per compile:
#: refolds of different graphs may compile in several threads at once.
_conv_packing: contextvars.ContextVar[Callable[[torch.fx.Node], bool] | None] = contextvars.ContextVar(
    "bnfuse_conv_packing", default=None
)


_conv_packing_install = threading.Lock()


def _packing_allowed(node: torch.fx.Node) -> bool:
    keep = _conv_packing.get()
    return keep is None or keep(node)


def _narrow_conv_packing_patterns() -> None:
    """Add ``_packing_allowed`` to the check of each of Inductor's convolution packing patterns that
    lacks it (Inductor registers them once per process, at its first freezing compile)."""
    from torch._inductor.fx_passes import freezing_patterns

    freezing_patterns.lazy_init()
    key = ("call_function", aten.convolution.default)
    with _conv_packing_install:
        for passes in freezing_patterns.pass_patterns:
            for entry in passes.patterns.get(key, []):
                if not getattr(entry.extra_check, "bnfuse_narrowed", False):
                    check = entry.extra_check
                    narrowed = lambda match, check=check: check(match) and _packing_allowed(match.output_node())  # noqa: E731
                    narrowed.bnfuse_narrowed = True  # type: ignore[attr-defined]
                    entry.extra_check = narrowed


@contextlib.contextmanager
def cpu_conv_weight_packing(keep: Callable[[torch.fx.Node], bool]) -> Iterator[None]:
    """Under this, Inductor's freezing packs a CPU convolution's weight for oneDNN only where
    ``keep(convolution node)`` says so (and Inductor would). Inductor registers its packing
    patterns once per process and then applies them to every eligible convolution whatever
    ``cpp.weight_prepack`` says; bnfuse adds a check to them that consults ``keep`` for the compiles
    under this in this thread. With a pattern layout this file does not know, Inductor's own choice
    stands."""
    try:
        _narrow_conv_packing_patterns()
    except Exception as error:  # noqa: BLE001 - only a speed choice is lost
        log.debug("bnfuse: unknown layout of Inductor's freezing patterns (%r); weight packing left to Inductor", error)
    token = _conv_packing.set(keep)
    try:
        yield
    finally:
        _conv_packing.reset(token)


#: The oneDNN convolution Inductor's freezing rewrites a packed convolution to (and fuses unary and
#: binary ops into, in its post-grad passes, frozen or not).
MKLDNN_CONV_POINTWISE = torch.ops.mkldnn._convolution_pointwise.default


MKLDNN_CONV_TRANSPOSE_POINTWISE = torch.ops.mkldnn._convolution_transpose_pointwise.default


@functools.cache
def packed_linear_op() -> Any:
    """``compilefuse::packed_linear(input, weight, bias)``: oneDNN's linear on a weight packed ahead
    (``mkldnn._linear_pointwise``), as an op Inductor calls rather than lowers. Inductor's lowering
    of oneDNN's linear takes the weight from the graph's constants only ("weight must be a graph
    constant"), and a graph compiled with the weights as data reads it as an input. Registered on
    first use (importing this module registers no op); a fold loaded from the fold cache names it."""
    library = torch.library.Library("compilefuse", "DEF")
    library.define("packed_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor")
    linear = torch.ops.mkldnn._linear_pointwise.default

    def packed_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(input, weight, bias, "none", [], "")

    def fake(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return input.new_empty((*input.shape[:-1], weight.shape[0]))

    library.impl("packed_linear", packed_linear, "CompositeExplicitAutograd")  # a packed weight is MkldnnCPU
    torch.library.register_fake("compilefuse::packed_linear", fake, lib=library)
    _LIBRARIES.append(library)  # an op lives as long as its library
    return torch.ops.compilefuse.packed_linear.default


_LIBRARIES: list[Any] = []


def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether oneDNN convolves in ``dtype`` on this CPU."""
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def packed_fake_stride(value: torch.Tensor) -> tuple[int, ...]:
    """The strides a packed weight's fake gets: a convolution's those its own fake reports,
    ``(1, 0, ...)``; a linear layer's (2-D) contiguous ones, which Inductor's lowering of oneDNN's
    linear asks for (it would copy the input otherwise)."""
    return (value.shape[1], 1) if value.dim() == 2 else (1,) + (0,) * (value.dim() - 1)


def size_asserts_for_packed_inputs(patches: dict[str, Any], inputs: Sequence[Any]) -> dict[str, Any]:
    """The size-assert setting for a graph with these inputs. A oneDNN-packed one fails a size
    assert where its fake's strides are not what the check reads: Inductor's C++ wrapper reads them
    from ATen's C API, which for a packed tensor are never its fake's; the Python wrapper from
    ``stride()``, which is ``(1, 0, ...)``. Such a graph compiles without asserts: Dynamo's guards
    check the user's inputs, and bnfuse's prologue makes the packed ones."""
    packed = [value for value in inputs if getattr(value, "is_mkldnn", False)]
    if not packed:
        return {}
    if patches.get("cpp_wrapper", inductor_config.cpp_wrapper) or \
            any(packed_fake_stride(value) != tuple(value.stride()) for value in packed):
        return {"size_asserts": False}
    return {}
