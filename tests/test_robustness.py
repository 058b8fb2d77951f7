"""A failing rewrite never breaks the model; bad input passes through; many threads at once."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error, run_bnfuse
from test_regions import RepeatedBlocks, needs_regions
from torch import nn

import compilefuse
from compilefuse.jit import compiled_graph
from compilefuse.rules import convolution


def conv_bn_model() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval())


@pytest.fixture
def broken_conv_bn_rule(monkeypatch):
    def explode(self, weight, scale, site):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(convolution.Convolution, "scale_output_channels", explode)


def test_failing_rule_falls_back_to_plain_inductor_and_warns(broken_conv_bn_rule, caplog, monkeypatch):
    monkeypatch.setattr(compiled_graph, "_fallback_warned", False)
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="compilefuse"):
        result = run_bnfuse(model, x, options={"strict": False})
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    [decision] = result.decisions
    assert not decision.folded and decision.reason == "bnfuse failed, compiled by plain Inductor: RuntimeError"
    [message] = [r.getMessage() for r in caplog.records if r.name == "compilefuse"]
    assert "planted failure" in message and "strict" in message


def test_strict_raises_the_rule_failure(broken_conv_bn_rule):
    with pytest.raises(Exception, match="planted failure"):
        run_bnfuse(conv_bn_model(), torch.randn(2, 3, 6, 6), options={"strict": True})


@pytest.fixture
def miscompiled_first_run(monkeypatch):
    """A folded graph that fails when first run, as Inductor's CPU freezing did on dynamic convnext
    ("expected size 96==96, stride 256==1", torch 2.14.1: see docs/limitations.md)."""
    from compilefuse.jit import backend

    def miscompiled(real):
        def compile(self, inputs):
            compiled = real(self, inputs)

            def call(*args):
                raise AssertionError("planted miscompile")

            return compiled_graph.Executable(call, compiled.inputs_taken)

        return compile

    for route in ("folded", "as_data"):  # the weights in the code, or as data
        monkeypatch.setattr(backend.GraphCompiler, route, miscompiled(getattr(backend.GraphCompiler, route)))
    monkeypatch.setattr(compiled_graph, "_fallback_warned", False)


def test_graph_failing_at_its_first_run_falls_back_to_plain_inductor(miscompiled_first_run, caplog):
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="compilefuse"):
        result = run_bnfuse(model, x, calls=3, options={"strict": False})
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    assert [d.reason for d in result.decisions] == ["bnfuse failed, compiled by plain Inductor: AssertionError"]
    [message] = [r.getMessage() for r in caplog.records if r.name == "compilefuse"]
    assert "planted miscompile" in message


def test_graph_failing_at_its_first_run_raises_when_strict(miscompiled_first_run):
    with pytest.raises(AssertionError, match="planted miscompile"):
        run_bnfuse(conv_bn_model(), torch.randn(2, 3, 6, 6), options={"strict": True})


def test_meta_device_model_passes_through_unfolded():
    model = conv_bn_model().to("meta")
    result = run_bnfuse(model, torch.randn(2, 3, 6, 6, device="meta"))
    assert result.outputs.device.type == "meta" and result.outputs.shape == (2, 8, 4, 4)
    assert result.decisions and not result.folded  # kept: Inductor's matcher does not match meta nodes


def test_eight_threads_calling_at_once_match_eager_and_compile_once():
    model = conv_bn_model()
    compiled = torch.compile(model, backend="bnfuse")
    inputs = [torch.randn(2, 3, 6, 6) for _ in range(8)]
    outputs: list[torch.Tensor | None] = [None] * 8
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            start.wait()
            with torch.inference_mode():
                for _ in range(5):
                    outputs[i] = compiled(inputs[i])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    with compilefuse.report.collecting() as records:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(records) == 1, "compiled more than once"
    with torch.inference_mode():
        for x, out in zip(inputs, outputs, strict=True):
            torch.testing.assert_close(out, model(x))


def planted(*_args, **_kwargs):
    raise RuntimeError("planted failure")


#: Every stage of bnfuse's own work, as (module, attribute) to replace with a failure.
STAGES = {
    "setting up the frozen call": ("compilefuse.jit.compiled_graph", "input_key"),
    "naming placeholders": ("compilefuse.jit.backend", "source_path"),
    "reading frozen values": ("compilefuse._torch_private.aot_autograd", "aot_parameters"),
    "the fold pass": ("compilefuse.passes.fold", "fold_graph"),
    "building the report": ("compilefuse.jit.backend.GraphCompiler", "_publish"),
    "the per-call check": ("compilefuse.jit.freshness.FrozenTensors", "match"),
    "the torch version check": ("compilefuse.versions", "warn_once_if_untested"),
}


#: Stages of the frozen route only (``options={"freeze": True}``): as data, none of them runs.
FROZEN_ROUTE = {"reading frozen values", "the fold pass"}

#: Stages of the weights-as-data route: a failure there folds frozen instead (or raises, strict).
AS_DATA_STAGES = {
    "the as-data fold pass": ("compilefuse.jit.backend", "fold_graph_as_data"),
    "splitting out the prologue": ("compilefuse.fold_prologue", "split"),
}


def _plant(monkeypatch, stage: str) -> None:
    import importlib

    module_name, attribute = {**STAGES, **AS_DATA_STAGES}[stage]
    owner_path, _, class_name = module_name.rpartition(".") if stage in (
        "building the report", "the per-call check") else (module_name, "", "")
    owner = importlib.import_module(owner_path)
    target = getattr(owner, class_name) if class_name else owner
    monkeypatch.setattr(target, attribute, planted)
    monkeypatch.setattr(compiled_graph, "_fallback_warned", False)


@pytest.mark.parametrize("stage", list(STAGES))
def test_failure_at_any_stage_falls_back_to_plain_inductor_with_one_warning(stage, monkeypatch, caplog):
    _plant(monkeypatch, stage)
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="compilefuse"):
        compiled = torch.compile(model, backend="bnfuse", options={"strict": False, "freeze": stage in FROZEN_ROUTE})
        with torch.inference_mode():
            outputs = [compiled(x) for _ in range(3)]
    for out in outputs:
        assert relative_error(out, float64_reference(model, x)) < 1e-5
    messages = [r.getMessage() for r in caplog.records if r.name == "compilefuse" and "plain Inductor" in r.getMessage()]
    assert len(messages) == 1 and "planted failure" in messages[0], messages


@needs_regions
def test_a_failure_in_a_graph_with_a_shared_region_still_falls_back(monkeypatch, caplog):
    """The region's body was traced once, by the failed attempt, under bnfuse's decompositions; the
    plain Inductor compile reused it and failed in turn, raising into the model's call."""
    monkeypatch.setattr("compilefuse.freezing.frozen_values", planted)
    monkeypatch.setattr(compiled_graph, "_fallback_warned", False)
    model, x = randomize_bn(RepeatedBlocks().eval()), torch.randn(2, 3, 10, 10)
    # Compiled afresh: a cached plain compile of this graph would hide the reuse.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False), \
            caplog.at_level(logging.WARNING, logger="compilefuse"):
        result = run_bnfuse(model, x, options={"strict": False})
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    messages = [r.getMessage() for r in caplog.records if r.name == "compilefuse" and "plain Inductor" in r.getMessage()]
    assert len(messages) == 1 and "planted failure" in messages[0], messages


@pytest.mark.parametrize("stage", list(STAGES))
def test_failure_at_any_stage_raises_when_strict(stage, monkeypatch):
    _plant(monkeypatch, stage)
    with pytest.raises(Exception, match="planted failure"):
        run_bnfuse(conv_bn_model(), torch.randn(2, 3, 6, 6), calls=2,
                   options={"strict": True, "freeze": stage in FROZEN_ROUTE})


@pytest.mark.parametrize("stage", list(AS_DATA_STAGES))
def test_failure_of_the_weights_as_data_route_folds_frozen_without_a_warning(stage, monkeypatch, caplog):
    """A failure there is bnfuse's to absorb: the graph still folds (frozen), so nothing to warn about."""
    _plant(monkeypatch, stage)
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.INFO, logger="compilefuse"):
        result = run_bnfuse(model, x, calls=3, options={"strict": False})
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5
    assert result.decisions and all(d.folded for d in result.decisions)
    assert not [r for r in caplog.records if r.name == "compilefuse" and r.levelno >= logging.WARNING]
    assert any("planted failure" in r.getMessage() and "frozen" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("stage", list(AS_DATA_STAGES))
def test_failure_of_the_weights_as_data_route_raises_when_strict(stage, monkeypatch):
    _plant(monkeypatch, stage)
    with pytest.raises(Exception, match="planted failure"):
        run_bnfuse(conv_bn_model(), torch.randn(2, 3, 6, 6), options={"strict": True})


def test_failing_release_of_old_code_never_fails_a_call(monkeypatch):
    monkeypatch.setattr("compilefuse._torch_private.code_cache.release_code_modules", planted)
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse", options={"strict": True})
    with torch.inference_mode():
        compiled(x)
        model[1].running_mean.add_(1.0)  # a refold drops, and releases, the old variant
        out = compiled(x)
    assert relative_error(out, float64_reference(model, x)) < 1e-5


def test_strict_raises_a_failure_dynamo_would_run_eagerly(monkeypatch):
    """A fake-tensor error (data-dependent, unsupported operator) raised by a backend is one Dynamo
    turns into a graph break, running the frame eagerly: with ``strict`` it reaches the caller
    (seen with ``cpp_wrapper=True`` and ``dynamic=True``, where the fold raised one)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    def explode(self, weight, scale, site):
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    monkeypatch.setattr(convolution.Convolution, "scale_output_channels", explode)
    with pytest.raises(Exception, match="DataDependentOutputException"):
        run_bnfuse(conv_bn_model(), torch.randn(2, 3, 6, 6), options={"strict": True})
