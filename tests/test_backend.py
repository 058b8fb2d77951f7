"""The backend's contract with torch.compile: entry point, options, mode, autograd, dynamic shapes."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DEVICES, float64_reference, randomize_bn, relative_error, run_bnfuse
from torch import nn

import compilefuse
from compilefuse._torch_private import inductor


def small_cnn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    return randomize_bn(model.eval())


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_backend_name_works_in_a_fresh_process_without_importing_compilefuse():
    out = run_python(
        """
        import sys, torch
        from torch import nn
        assert "bnfuse" in torch._dynamo.list_backends()
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
        with torch.inference_mode():
            y = torch.compile(model, backend="bnfuse")(torch.randn(3, 4))
        print(y.shape, "compilefuse" in sys.modules)
        """
    )
    assert out.strip() == "torch.Size([3, 4]) True"  # the entry point loaded it, not the script


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"report_everything": True}, r"unknown option\(s\) \['report_everything'\].*'rules'.*'inductor'"),
        ({"rules": "conv_bn"}, "must be an iterable of rule ids"),
        ({"rules": ["conv_bn", "bn_relu"]}, r"unknown rule id\(s\) \['bn_relu'\].*'bn_conv'"),
        ({"inductor": {"no_such_setting": 1}}, "unknown Inductor config"),
        ({"inductor": {"freezing": False}}, "bnfuse controls them"),
    ],
)
def test_bad_options_raise_value_error_at_compile_time(options, message):
    # Dynamo lets a backend's error through unwrapped only where it has ShortenTraceback (newer
    # torch); on torch 2.6 the ValueError arrives inside BackendCompilerFailed, with the same message.
    expected = ValueError if hasattr(torch._dynamo.exc, "ShortenTraceback") else torch._dynamo.exc.BackendCompilerFailed
    compiled = torch.compile(small_cnn(), backend="bnfuse", options=options)  # not yet compiled
    with pytest.raises(expected, match=message), torch.inference_mode():
        compiled(torch.randn(1, 3, 4, 4))


def test_unknown_mode_raises_value_error():
    with pytest.raises(ValueError, match="Unrecognized mode=fastest"):
        compilefuse.BnfuseConfig.from_options(None, mode="fastest")


@pytest.mark.parametrize(
    ("compile_kwargs", "expected"),
    [
        (dict(mode="max-autotune-no-cudagraphs"), {"max_autotune": True, "coordinate_descent_tuning": True}),
        (dict(options={"inductor": {"cpp.simdlen": 8}}), {"cpp.simdlen": 8}),
    ],
)
def test_mode_and_inductor_options_reach_inductor(monkeypatch, compile_kwargs, expected):
    seen = []
    real = inductor.compile_fx

    def spy(gm, inputs, config_patches=None, decompositions=None):
        seen.append(dict(config_patches))
        return real(gm, inputs, config_patches=config_patches, decompositions=decompositions)

    monkeypatch.setattr(inductor, "compile_fx", spy)
    run_bnfuse(small_cnn(), torch.randn(1, 3, 4, 4), **compile_kwargs)
    [patches] = seen
    assert {k: patches[k] for k in expected} == expected
    assert "freezing" not in patches  # the weights are data (options={"freeze": True}: test_weights_as_data)


def test_autograd_graph_is_folded_per_step_and_gradients_match_eager(caplog):
    model = small_cnn()
    eager_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="compilefuse"), compilefuse.report.collecting() as records:
        compiled = torch.compile(model, backend="bnfuse")
        compiled(x).square().sum().backward()
        compiled(x + 1).square().sum().backward()
    eager_model(x).square().sum().backward()
    eager_model(x + 1).square().sum().backward()
    assert [d.status for r in records for d in r.decisions] == ["folded per step"] * 2
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not [r for r in caplog.records if r.name == "compilefuse"]  # nothing to warn about


def test_model_without_grad_folds_even_with_grad_mode_enabled():
    model = small_cnn().requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    with compilefuse.report.collecting() as records:
        out = torch.compile(model, backend="bnfuse")(x)  # grad mode is on
    [record] = records
    assert [d.folded for d in record.decisions] == [True, True]
    assert relative_error(out, float64_reference(model, x)) < 1e-5


def test_tiny_linear_at_batch_one_folds():
    """Inductor rewrites a one-row addmm with at most 16 features as multiply-and-sum on CPU; bnfuse
    keeps it a matrix product so the linear's BN still folds."""
    model = randomize_bn(nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10)).eval())
    x = torch.randn(1, 12)
    result = run_bnfuse(model, x)
    assert [(d.rule, d.folded) for d in result.decisions] == [("linear_bn", True)]
    assert relative_error(result.outputs, float64_reference(model, x)) < 1e-6


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_batch_folds_once_and_stays_exact(how):
    model = small_cnn()
    compiled = torch.compile(model, backend="bnfuse", dynamic=(how == "dynamic=True") or None)
    with compilefuse.report.collecting() as records, torch.inference_mode():
        for batch in (2, 5, 3):
            x = torch.randn(batch, 3, 6, 6)
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(x, 0)
            assert relative_error(compiled(x), float64_reference(model, x)) < 1e-5
    assert len(records) == 1, "recompiled for a new batch size"
    assert [d.folded for d in records[0].decisions] == [True, True]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fx_graph_cache_hits_in_a_second_process(tmp_path, device):
    # On CPU, Inductor's freezing prepacks conv weights into mkldnn tensors, which its FX cache
    # cannot pickle: it bypasses the cache for any frozen conv graph, with or without bnfuse.
    # Without prepacking nothing stops the cache, so the test shows our passes do not.
    options = {"inductor": {"cpp.weight_prepack": False}} if device == "cpu" else None
    script = f"""
        import torch
        from torch import nn
        from torch._dynamo.utils import counters
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval().to("{device}")
        with torch.inference_mode():
            torch.compile(model, backend="bnfuse", options={options!r})(torch.randn(1, 3, 8, 8, device="{device}"))
        print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
        """
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    first = run_python(script, env).split()
    second = run_python(script, env).split()
    assert first == ["0", "1"]
    assert second == ["1", "0"]
