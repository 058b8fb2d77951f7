"""Weights as data (issue 30): a weight change refits the compiled code instead of recompiling it,
instances of one architecture share one compile, and every answer is exact against float64."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from helpers import calls_racing, float64_reference, randomize_bn, relative_error
from torch import nn

import compilefuse
from compilefuse._torch_private import inductor
from compilefuse.jit import compiled_graph


def conv_bn_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 5), nn.BatchNorm1d(5))
    return randomize_bn(model.eval())


@pytest.fixture
def inductor_compiles(monkeypatch):
    """How many graphs bnfuse hands Inductor (plain, frozen or as data)."""
    calls = []
    original = inductor.compile_with_inductor

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(inductor, "compile_with_inductor", counting)
    return calls


def assert_exact(out: torch.Tensor, model: nn.Module, x: torch.Tensor) -> None:
    assert relative_error(out, float64_reference(model, x)) < 1e-5


def test_load_state_dict_refits_without_a_compile(inductor_compiles, caplog):
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        assert_exact(compiled(x), model, x)
    assert len(inductor_compiles) == 1
    for _ in range(3):
        model.load_state_dict(conv_bn_model().state_dict())
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="compilefuse"):
            assert_exact(compiled(x), model, x)
    assert len(inductor_compiles) == 1
    assert not [r for r in caplog.records if "recompil" in r.getMessage()]


class FrozenAffineModel(nn.Module):
    """Folds whose values the graph computes: torchvision's ``FrozenBatchNorm2d`` computes its scale
    in ``forward``, and a ``weight_norm`` convolution its weight."""

    def __init__(self) -> None:
        from torchvision.ops.misc import FrozenBatchNorm2d

        super().__init__()
        self.conv, self.frozen_bn = nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1))
        self.bn = nn.BatchNorm2d(8)
        for name in ("weight", "bias", "running_mean"):
            getattr(self.frozen_bn, name).uniform_(-1, 1)
        self.frozen_bn.running_var.uniform_(0.5, 2)
        randomize_bn(self.eval())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.normed(torch.relu(self.frozen_bn(self.conv(x)))))


def test_computed_scales_and_weights_refit_exactly(inductor_compiles):
    """The prologue replays each fold's arithmetic after the rewrite erased the nodes the rule read
    (the frozen affine's expression, the BN): a refit is exact, and no compile."""
    model, x = FrozenAffineModel(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="bnfuse", options={"strict": True})
    with torch.inference_mode(), compilefuse.report.collecting() as records:
        assert_exact(compiled(x), model, x)
    assert [d.folded for d in records[0].decisions] == [True, True]
    for _ in range(2):
        model.load_state_dict(FrozenAffineModel().state_dict())
        with torch.inference_mode():
            assert_exact(compiled(x), model, x)
    assert len(inductor_compiles) == 1


def test_instances_share_one_compile_past_the_variant_limit(inductor_compiles):
    """More instances than ``MAX_VARIANTS``, called in turn, twice: one compile, no refit in the
    second round, each answer its own instance's."""
    models = [conv_bn_model() for _ in range(compiled_graph.MAX_VARIANTS + 2)]
    x = torch.randn(2, 3, 6, 6)
    compiled = [torch.compile(m, backend="bnfuse") for m in models]
    with compilefuse.report.collecting() as records:
        for _ in range(2):
            for fn, model in zip(compiled, models, strict=True):
                with torch.inference_mode():
                    assert_exact(fn(x), model, x)
    assert len(inductor_compiles) == 1
    assert len(records) == len(models)  # one fold record per instance, none in the second round


def test_weights_a_fold_refuses_get_a_compile_with_that_bn_kept(inductor_compiles, caplog):
    """A refit whose folded weight would overflow where eager's products do not: that set of weights
    is compiled frozen with the BN kept, and answers as eager does."""
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        compiled(x)
    with torch.no_grad():
        model[1].weight.fill_(1e20)
        model[1].running_var.fill_(1.0)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="compilefuse"), \
            compilefuse.report.collecting() as records:
        out = compiled(x)
    assert any("fail a fold's check" in r.getMessage() for r in caplog.records)
    assert len(inductor_compiles) == 2
    [record] = records
    kept = [d for d in record.decisions if not d.folded]
    assert [d.bn for d in kept] == ["1"] and "folded weight reaches" in kept[0].reason
    torch.testing.assert_close(out.double(), float64_reference(model, x), rtol=1e-5, atol=1e-5)


class _ReadersWriter:
    """Calls overlap each other; a load waits for them and they for it. (A call overlapping a load
    reads a half-loaded model in eager too: that race is the caller's.)"""

    def __init__(self) -> None:
        self._condition, self._readers, self._writing = threading.Condition(), 0, False

    @contextlib.contextmanager
    def reading(self):
        with self._condition:
            self._condition.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


def test_a_refit_never_mixes_old_and_new_weights_in_one_answer():
    """Four threads call while the main thread swaps between two sets of weights; after each swap
    the threads race to the refit. Every answer is one set's, whole."""
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    sets = [copy.deepcopy(model.state_dict()), conv_bn_model().state_dict()]
    answers = []
    for weights in sets:
        model.load_state_dict(weights)
        answers.append(float64_reference(model, x))
    model.load_state_dict(sets[0])
    compiled = torch.compile(model, backend="bnfuse")
    with torch.inference_mode():
        compiled(x)
    lock, errors, calls = _ReadersWriter(), [], []

    def call() -> None:
        with lock.reading(), torch.inference_mode():
            out = compiled(x).double()
        calls.append(1)
        if min(relative_error(out, answer) for answer in answers) > 1e-5:
            errors.append(out)

    def swap(i: int) -> None:
        with lock.writing():
            model.load_state_dict(sets[(i + 1) % 2])
        time.sleep(0.005)

    calls_racing(call, swap, swaps=20)
    assert not errors and len(calls) > 20


class StatisticsBumpedByAHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    @torch._dynamo.disable
    def bump(self) -> None:
        self.bn.running_var.add_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bump()
        return self.bn(self.conv(x))


def test_a_statistic_written_outside_the_graph_before_every_call_is_kept_live_after_two_refolds(caplog):
    model, x = randomize_bn(StatisticsBumpedByAHelper().eval()), torch.randn(2, 3, 8, 8)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bnfuse")
    with caplog.at_level(logging.INFO, logger="compilefuse"), compilefuse.report.collecting() as records:
        for _ in range(6):
            with torch.inference_mode():
                out = compiled(x)
                expected = twin(x)
            assert torch.equal(model.bn.running_var, twin.bn.running_var)
            assert relative_error(out, expected) < 1e-5
    assert len(records) == 3  # the compile, a refit, then (changed again) a compile with the statistic live
    assert [d.folded for d in records[-1].decisions] == [False]
    live = [r.getMessage() for r in caplog.records if "kept live" in r.getMessage()]
    assert len(live) == 1 and "bn.running_var" in live[0]


def test_freeze_option_bakes_the_weights_and_recompiles_on_a_change(inductor_compiles):
    model, x = conv_bn_model(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse", options={"freeze": True})
    with torch.inference_mode():
        compiled(x)
    model.load_state_dict(conv_bn_model().state_dict())
    with torch.inference_mode():
        assert_exact(compiled(x), model, x)
    assert len(inductor_compiles) == 2


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2], ids=["plain weights", "packed weights"])
def test_a_fresh_process_hits_aot_autograds_and_inductors_caches(tmp_path, batch):
    """The weights out of the code, AOTAutograd's cache (which refuses a freezing compile) and
    Inductor's FX graph cache both serve a second process's compile; also where the graph reads
    oneDNN-packed weights (batch 2 packs this convolution), which both caches refuse as inputs."""
    script = textwrap.dedent(f"""
        import gc, torch, compilefuse
        from torch._dynamo.utils import counters
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
        x = torch.randn({batch}, 3, 16, 16)
        compiled = torch.compile(model, backend="bnfuse")
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), model(x))
        tensors = [t for t in gc.get_objects() if type(t) in (torch.Tensor, nn.Parameter)]
        packed = any(t.is_mkldnn for t in tensors)
        hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
        print("packed", packed, "hits", hits)
    """)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    assert all(f"packed {batch > 1}" in run.stdout for run in runs), [run.stdout for run in runs]
    hits = [int(run.stdout.split("hits")[-1]) for run in runs]
    assert hits == [0, 2], [run.stderr[-2000:] for run in runs]
