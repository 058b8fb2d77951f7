"""The tracing context of a compile in progress and its fake tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx

from .onednn import packed_fake_stride


def current_fake_mode() -> Any:
    """The fake-tensor mode of the Dynamo compile in progress (None outside one)."""
    context = torch._guards.TracingContext.try_get()
    return None if context is None else context.fake_mode


def tracing(fake_mode: Any | None) -> contextlib.AbstractContextManager:
    """A tracing context for compiling a Dynamo graph again, in ``fake_mode`` (None: a fresh mode)."""
    mode = fake_mode if fake_mode is not None else torch._subclasses.fake_tensor.FakeTensorMode()
    return torch._guards.tracing(torch._guards.TracingContext(mode))


@contextlib.contextmanager
def static_tracing() -> Iterator[Callable[[Any], Any]]:
    """A fresh tracing context for a compile of static sizes, yielding the conversion of its
    example inputs to fake tensors of that mode. Unlike ``tracing(None)`` it has a shape
    environment (with none, AOTAutograd's and the FX graph cache both bypass: "No shape env"),
    and the inputs are fake already, so none gets a symbolic size."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = torch._subclasses.fake_tensor.FakeTensorMode(shape_env=ShapeEnv())
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        yield lambda value: _fake(mode, value) if isinstance(value, torch.Tensor) else value


def outside_dynamo_tracing() -> contextlib.AbstractContextManager:
    """No tracing context: a compile started from inside Dynamo's (``torch.export`` and
    AOTInductor of a graph a backend received) as if it ran on its own."""
    return torch._guards.tracing(None)


def static_fake(value: torch.Tensor) -> Any:
    """``value`` as a fake tensor of static sizes in the fake mode of the compile under way."""
    return _fake(torch._guards.detect_fake_mode(), value)


def set_value(node: torch.fx.Node, value: Any) -> None:
    """A node's fake value, with the ``tensor_meta`` the pattern matcher of torch 2.6 asserts on
    beside a tensor's (newer releases read ``val`` alone)."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    node.meta["val"] = value
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)


def _fake(mode: Any, value: torch.Tensor) -> Any:
    """A fake of ``value`` with static sizes. A oneDNN-packed weight becomes a strided fake of its
    sizes and ``packed_fake_stride``: Inductor compiles the same code for either (it reads an
    input's sizes and strides, never its layout), and both its caches refuse a graph with an input
    of oneDNN's layout ("mkldnn tensors unpickleable")."""
    if not value.is_mkldnn:
        return mode.from_tensor(value, static_shapes=True)
    with mode:
        return torch.empty_strided(value.shape, packed_fake_stride(value), dtype=value.dtype, device=value.device)


def fake_tensor_of(node: torch.fx.Node, value: torch.Tensor) -> Any:
    """A fake tensor for a new constant, in the fake mode of the graph around ``node``."""
    fake = node.meta["val"]
    return fake.fake_mode.from_tensor(value, static_shapes=True)
