"""Model states inference servers produce: weights that are inference tensors (built, loaded or copied
under ``torch.inference_mode()``), hot reloads, and parametrised weights (weight_norm, spectral_norm)."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn
from torch.nn.utils import parametrizations

import compilefuse


def conv_bn() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                                      nn.BatchNorm2d(4)).eval())


def assert_exact(compiled, model, x) -> None:
    with torch.inference_mode():
        out = compiled(x)
    assert relative_error(out, float64_reference(model, x)) < 1e-5


def built_under_inference_mode() -> nn.Module:
    with torch.inference_mode():
        return conv_bn()


def loaded_under_inference_mode() -> nn.Module:
    """A checkpoint read and assigned under inference mode, as a server loads it."""
    saved = io.BytesIO()
    torch.save(conv_bn().state_dict(), saved)
    saved.seek(0)
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    with torch.inference_mode():
        model.load_state_dict(torch.load(saved), assign=True)
    return model.eval()


def copied_under_inference_mode() -> nn.Module:
    model = conv_bn()
    with torch.inference_mode():
        return copy.deepcopy(model)


@pytest.mark.parametrize("make", [built_under_inference_mode, loaded_under_inference_mode, copied_under_inference_mode])
def test_model_with_inference_tensor_weights_compiles_folds_and_is_exact(make):
    model, x = make(), torch.randn(2, 3, 6, 6)
    assert all(p.is_inference() for p in model.parameters())
    result = run_bnfuse(model, x)
    assert [d.folded for d in result.decisions] == [True, True]
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-5


def test_hot_reload_under_inference_mode_gives_fresh_results(caplog):
    model, x = built_under_inference_mode(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse")
    assert_exact(compiled, model, x)
    for _ in range(2):  # a reload after a reload is seen too (the new variant watches again)
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="compilefuse"):
            model.load_state_dict(conv_bn().state_dict())
        with compilefuse.report.collecting() as records:
            assert_exact(compiled, model, x)
            assert_exact(compiled, model, x)
        assert len(records) == 1, "refolded once per reload"
    assert "load_state_dict on" in caplog.text


def test_replaced_inference_tensor_is_seen():
    model, x = built_under_inference_mode(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse")
    assert_exact(compiled, model, x)
    with torch.inference_mode():
        model[1].running_var = torch.rand(8) + 0.5
    assert_exact(compiled, model, x)


def test_assigning_data_is_seen_although_it_bumps_no_version():
    """``param.data = x`` gives the parameter new storage without touching its version counter."""
    model, x = conv_bn(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse")
    assert_exact(compiled, model, x)
    version = model[0].weight._version
    model[0].weight.data = torch.randn_like(model[0].weight)
    assert model[0].weight._version == version
    assert_exact(compiled, model, x)


def test_dropped_model_releases_its_watch_hooks():
    model, x = built_under_inference_mode(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse")
    assert_exact(compiled, model, x)
    assert all(len(m._load_state_dict_post_hooks) == 1 for m in model if list(m.parameters(recurse=False)))
    with torch.inference_mode():
        model.load_state_dict(conv_bn().state_dict())
    assert_exact(compiled, model, x)  # refolded: the old variant's hooks go with it
    assert all(len(m._load_state_dict_post_hooks) == 1 for m in model if list(m.parameters(recurse=False)))


@pytest.mark.parametrize(
    "parametrize",
    [
        pytest.param(lambda m: parametrizations.weight_norm(m), id="weight_norm"),
        pytest.param(lambda m: parametrizations.weight_norm(m, dim=None), id="weight_norm_dim_none"),
        pytest.param(lambda m: parametrizations.spectral_norm(m), id="spectral_norm"),
    ],
)
@pytest.mark.parametrize("layer", ["conv", "conv_transpose", "linear"])
def test_parametrised_weight_folds_and_is_exact(parametrize, layer):
    ops = {
        "conv": (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 9)),
        "conv_transpose": (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 9)),
        "linear": (nn.Linear(4, 6), nn.BatchNorm1d(6), (3, 4)),
    }
    op, bn, shape = ops[layer]
    model = randomize_bn(nn.Sequential(parametrize(op), bn).eval())
    with torch.no_grad():
        for _ in range(3):  # spectral_norm's power iteration runs in training mode: settle u, v
            model.train()(torch.randn(*shape))
    model.eval()
    x = torch.randn(*shape)
    with torch.inference_mode():
        eager = model(x)
    result = run_bnfuse(model, x)
    [decision] = result.decisions
    assert decision.folded, decision
    reference = float64_reference(model, x)
    assert relative_error(eager, reference) < 1e-5
    assert relative_error(result.outputs, reference) < 1e-5


def test_parametrised_weight_change_refolds():
    model = randomize_bn(nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)).eval())
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse")
    assert_exact(compiled, model, x)
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(3.0)  # the norm g
    assert_exact(compiled, model, x)
