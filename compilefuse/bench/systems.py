"""The systems the benchmark compares. Each turns an eager model into a callable and names the
context every call must run under (Inductor's freezing is read at trace time from the global
config, so ``torch.compile(options={"freezing": True})`` alone freezes nothing: the patch has to
cover every call, or a call outside it recompiles unfrozen)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._torch_private.inductor import inductor_mode_options
from ..examples.models import is_batch_norm
from . import _torch_private

#: The dtypes the benchmark runs models in, by their command-line name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """What the user asked for, applied alike to every compiled system."""

    mode: str | None = None
    dynamic: bool | None = None
    threads: int = 1


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    description: str
    prepare: Callable[[nn.Module, torch.Tensor, CompileSettings], Callable[[torch.Tensor], Any]]
    call_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    #: Whether its output should equal the model's (the BN-free limit computes another function).
    same_function: bool = True
    #: The optional package it needs, if any.
    requires: str | None = None

    def available(self) -> str | None:
        """None when the system can run here, else why not."""
        if self.requires is not None and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install 'compilefuse[bench]')"
        return None


def _compiled(backend: str, options: dict[str, Any] | None = None):
    def prepare(model: nn.Module, example: torch.Tensor, settings: CompileSettings):
        if options is None:
            return torch.compile(model, backend=backend, mode=settings.mode, dynamic=settings.dynamic)
        # torch.compile takes a mode or options, not both: a system with options spells its mode out.
        merged = {**inductor_mode_options(settings.mode), **options}
        return torch.compile(model, backend=backend, dynamic=settings.dynamic, options=merged)

    return prepare


def without_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm (frozen ones included) replaced by Identity: the
    same network with nothing left to fold, the lower bound folding can reach."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_batch_norm(child):
                setattr(parent, name, nn.Identity())
    return model


def _is_batch_norm(module: nn.Module) -> bool:
    return is_batch_norm(module) or type(module).__name__ == "FrozenBatchNorm2d"


def _limit(model: nn.Module, example: torch.Tensor, settings: CompileSettings):
    return torch.compile(without_batch_norm(model), backend="bnfuse", mode=settings.mode, dynamic=settings.dynamic)


def _reparameterized(model: nn.Module, example: torch.Tensor, settings: CompileSettings):
    """The model's own deploy step (``model.reparameterize()``, as timm's ``reparameterize_model`` or
    the papers' ``switch_to_deploy``), then compiled as bnfuse compiles: what bnfuse's merging of the
    as-trained model is measured against."""
    if not hasattr(model, "reparameterize"):
        raise RuntimeError(f"{type(model).__name__} has no reparameterize() (no hand deploy step to compare with)")
    return torch.compile(model.reparameterize(), backend="bnfuse", mode=settings.mode, dynamic=settings.dynamic)


@contextlib.contextmanager
def _traced_by_torch_jit():
    """Around an exporter that traces with ``torch.jit`` (ONNX's TorchScript exporter, OpenVINO's
    frontend): torch's deprecation notice for it is addressed to the exporter, not to a user of
    the benchmark."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
        yield


def _onnxruntime(model: nn.Module, example: torch.Tensor, settings: CompileSettings):
    """Export through ``torch.onnx`` (TorchScript exporter, no extra packages) and run on ORT's CPU
    provider with the same thread count as torch, its threads not spinning after a run: spinning
    threads take the cores from the torch systems measured next in the same process
    (``benchmarks/ort_spinning.py`` measures how much; docs/benchmarks.md)."""
    import onnxruntime

    if example.device.type != "cpu":
        raise RuntimeError("the onnxruntime system runs on CPU only")
    buffer = io.BytesIO()
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if settings.dynamic else None
    with torch.no_grad(), _traced_by_torch_jit():
        torch.onnx.export(model, (example,), buffer, input_names=["input"], output_names=["output"],
                          dynamic_axes=dynamic_axes, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    return run


def _openvino(model: nn.Module, example: torch.Tensor, settings: CompileSettings):
    """``openvino.convert_model`` (its own PyTorch frontend), compiled for its CPU plugin in float32
    (its default on CPUs with bf16 or AMX units is a lower precision) with the benchmark's thread
    count and the latency hint. OpenVINO's ``torch.compile`` backend is not used: it failed on
    torch 2.14 ("sources must not be empty for symbol")."""
    import openvino

    if example.device.type != "cpu":
        raise RuntimeError("the openvino system runs on CPU only")
    shape = [-1, *example.shape[1:]] if settings.dynamic else list(example.shape)
    with torch.no_grad(), _traced_by_torch_jit():
        converted = openvino.convert_model(model, example_input=example, input=[shape])
    compiled = openvino.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": settings.threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer([x.numpy()])[0].copy())

    return run


def _exported(tune: bool):
    """``compilefuse.export`` to a package, then ``compilefuse.load`` (input check on): what a server
    that builds once and loads in every replica runs. ``tune``: on CPU, the fastest of the tuning
    settings, measured at the benchmark's thread count (on request: about 2x the build time).
    torch.compile's mode does not apply."""

    def prepare(model: nn.Module, example: torch.Tensor, settings: CompileSettings):
        from ..aot import exporting
        from ..runtime import loading

        dynamic = ({0: torch.export.Dim.AUTO},) if settings.dynamic else None
        with tempfile.TemporaryDirectory() as folder:  # AOTInductor extracts what it loads
            path = os.path.join(folder, "model.pt2")
            exporting.export(model, (example,), path, dynamic_shapes=dynamic, tune=tune and example.device.type == "cpu")
            return loading.load(path)

    return prepare


def _folded(compile_with: str | None):
    """``compilefuse.fold``: the folded model as a plain module, run as is (eager) or compiled by
    another backend (Inductor): what any runtime gets from bnfuse without bnfuse."""

    def prepare(model: nn.Module, example: torch.Tensor, settings: CompileSettings):
        from ..aot.folded_module import fold

        dynamic = ({0: torch.export.Dim.AUTO},) if settings.dynamic else None
        folded = fold(model, (example,), dynamic_shapes=dynamic)
        if compile_with is None:
            return folded
        return torch.compile(folded, backend=compile_with, mode=settings.mode, dynamic=settings.dynamic)

    return prepare


SYSTEMS: dict[str, System] = {
    system.name: system
    for system in (
        System("eager", "the model as is", lambda model, example, settings: model),
        System("inductor", "torch.compile, default Inductor", _compiled("inductor")),
        # options={"freezing": True} alone freezes nothing, but it keeps Dynamo from reusing the plain
        # Inductor system's compiled graph (backends compare equal when their options do).
        System("inductor-freezing", "torch.compile, Inductor with freezing=True (patched around every call)",
               _compiled("inductor", {"freezing": True}), call_context=_torch_private.inductor_freezing),
        System("bnfuse", "torch.compile(backend='bnfuse')", _compiled("bnfuse")),
        System("bnfuse-frozen", "torch.compile(backend='bnfuse', options={'freeze': True}): the folded weights "
               "in the code (Inductor's freezing), as bnfuse compiled before its weights became data",
               _compiled("bnfuse", {"freeze": True})),
        System("limit", "every BatchNorm replaced by Identity, compiled as bnfuse compiles: the lower bound",
               _limit, same_function=False),
        System("export", "compilefuse.export (AOTInductor package, BN folded), loaded with compilefuse.load",
               _exported(tune=False)),
        System("export+tune", "compilefuse.export(tune=True) on CPU: the fastest of its builds, loaded the same way",
               _exported(tune=True)),
        System("folded", "compilefuse.fold: the folded model as a plain module, eager", _folded(None)),
        System("folded+inductor", "compilefuse.fold, then torch.compile with default Inductor", _folded("inductor")),
        System("reparameterized", "the model's own hand deploy step (reparameterize()), compiled as bnfuse compiles",
               _reparameterized),
        System("onnxruntime", "torch.onnx export, ONNX Runtime CPU provider, same thread count", _onnxruntime,
               requires="onnxruntime"),
        System("openvino", "openvino.convert_model, OpenVINO's CPU plugin in float32, same thread count",
               _openvino, requires="openvino"),
    )
}
