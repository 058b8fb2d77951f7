"""Packages refit (issue 30, item 6): a package exported with ``refittable=True`` takes new weights
with ``load(path).refit(state_dict)``, folded with the build's folds and checks, exact against
float64, without a rebuild; bad state dicts and weights a fold refuses leave it as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import calls_racing, float64_reference, randomize_bn, relative_error
from torch import nn

import compilefuse
from compilefuse.examples.models import SmallCNN
from compilefuse.runtime.loading import read_metadata

X = torch.randn(2, 3, 16, 16)  # batch 2: the larger convolutions read oneDNN-packed weights


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(SmallCNN()).eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    path = tmp_path_factory.mktemp("refit") / "small_cnn.pt2"
    model = small_cnn(0)
    report = compilefuse.export(model, (X,), path, refittable=True)
    return model, report, path


def assert_exact(out: torch.Tensor, model: nn.Module) -> None:
    assert relative_error(out, float64_reference(model, X)) < 1e-5


def test_a_refit_takes_new_weights_exactly_without_a_rebuild(package, monkeypatch):
    model, report, path = package
    loaded = compilefuse.load(path)
    assert_exact(loaded(X), model)
    assert report.folded >= 4
    constants = read_metadata(path)["refit"]["constants"]
    assert any(c["packed"] for c in constants) and any(c["fqn"] for c in constants)
    from compilefuse._torch_private import aoti

    monkeypatch.setattr(aoti, "aoti_compile", lambda *a, **k: pytest.fail("a refit built the package again"))
    for seed in (1, 2, 3):
        other = small_cnn(seed)
        loaded.refit(other.state_dict())
        assert_exact(loaded(X), other)


def test_a_state_dict_that_does_not_fit_is_refused_and_the_weights_stay(package):
    model, _, path = package
    loaded = compilefuse.load(path)
    state = small_cnn(4).state_dict()
    name = next(k for k in state if k.endswith("weight"))
    with pytest.raises(KeyError, match="missing"):
        loaded.refit({k: v for k, v in state.items() if k != name})
    with pytest.raises(KeyError, match="unexpected"):
        loaded.refit({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=name):
        loaded.refit({**state, name: state[name][:1]})
    assert_exact(loaded(X), model)


@pytest.mark.parametrize("gamma, var, reason", [
    (1e38, 1e-30, "folded weight is not finite"),  # the folded weight overflows float32
    (1e25, 1.0, "the folded weight reaches"),  # finite, but its products overflow where eager's do not (the judge)
])
def test_weights_a_fold_refuses_are_refused_and_the_weights_stay(package, gamma, var, reason):
    """A folded weight that would overflow where eager's products do not: the package cannot keep
    that BN (its code has none), so the refit is refused, by the checks the package keeps with its
    prologue."""
    model, _, path = package
    loaded = compilefuse.load(path)
    other = small_cnn(5)
    bn = next(m for m in other.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight.fill_(gamma)
        bn.running_var.fill_(var)
    with pytest.raises(ValueError, match=f"fail a fold's check \\({reason}"):
        loaded.refit(other.state_dict())
    assert_exact(loaded(X), model)


def test_a_package_built_frozen_says_it_cannot_refit(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    compilefuse.export(model, (X,), tmp_path / "frozen.pt2")
    with pytest.raises(compilefuse.ExportError, match="refittable=True"):
        compilefuse.load(tmp_path / "frozen.pt2").refit(model.state_dict())
    with pytest.raises(ValueError, match="do not go together"):
        compilefuse.export(model, (X,), tmp_path / "tuned.pt2", tune=True, refittable=True)


def test_calls_racing_refits_answer_with_one_set_of_weights(package):
    _, _, path = package
    loaded = compilefuse.load(path)
    models = [small_cnn(seed) for seed in (6, 7)]
    expected = []
    for model in models:
        loaded.refit(model.state_dict())
        expected.append(loaded(X))
    mixed, answers = [], []

    def call() -> None:
        out = loaded(X)
        answers.append(out)
        if not any(torch.equal(out, e) for e in expected):
            mixed.append(out)

    calls_racing(call, lambda i: loaded.refit(models[i % 2].state_dict()), swaps=10)
    assert answers and not mixed


@pytest.mark.slow
def test_a_fresh_replica_loads_without_the_compiler_and_refits(package, tmp_path):
    """A replica: ``load``, a call and a refit import neither Dynamo nor Inductor (the package keeps
    its fold prologue as data), and the refit answers exactly."""
    _, _, path = package
    other = small_cnn(8)
    torch.save(other.state_dict(), tmp_path / "state.pt")
    torch.save(X, tmp_path / "x.pt")
    torch.save(float64_reference(other, X), tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import sys, torch, compilefuse
        loaded = compilefuse.load({str(path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        loaded(x)
        loaded.refit(torch.load({str(tmp_path / 'state.pt')!r}))
        print("compiler imported", any(m in sys.modules for m in ('torch._inductor', 'torch._dynamo')))
        out, expected = loaded(x).double(), torch.load({str(tmp_path / 'expected.pt')!r})
        print("error", float((out - expected).abs().max() / expected.abs().max()))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiler imported False" in run.stdout
    assert float(run.stdout.split("error")[-1]) < 1e-5
