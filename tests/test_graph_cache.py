"""``options={"cache": True}``: folded CPU inference graphs kept as packages on disk. A later
process loads the package instead of compiling; new weights never load an old package; graphs that
cannot be cached compile as they do without the option; ``save_cache_artifacts`` carries them."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.fx
from helpers import assert_matches_reference, float64_reference, randomize_bn, run_bnfuse
from torch import nn

import compilefuse
from compilefuse._torch_private import ops
from compilefuse.config import BnfuseConfig
from compilefuse.examples.models import SmallCNN
from compilefuse.jit import graph_cache

CACHED = {"options": {"cache": True}}

# A fresh process: "build" compiles with the cache and saves torch's cache artifacts; "load" loads
# them into an empty cache directory, with every way of compiling made to fail, and compiles again.
CHILD = r"""
import sys, torch, compilefuse
from compilefuse._torch_private import aoti, inductor
from compilefuse.examples.models import SmallCNN, randomize_bn
stage, blob, out = sys.argv[1:]
if stage == "load":
    with open(blob, "rb") as file:
        info = torch.compiler.load_cache_artifacts(file.read())
    assert len(info.compilefuse_package_artifacts) == 1, info
    def refuse(*args, **kwargs):
        raise AssertionError("compiled despite the cache")
    inductor.compile_with_inductor = aoti.aoti_compile = torch.export.export = refuse
torch.manual_seed(0)
model = randomize_bn(SmallCNN()).eval()
x = torch.randn(2, 3, 16, 16)
# (the replica turns the cache on through the environment: COMPILEFUSE_CACHE=1)
compiled = torch.compile(model, backend="bnfuse", options={"cache": True} if stage == "build" else None)
with compilefuse.collecting() as records, torch.inference_mode():
    answer = compiled(x)
folded = sum(d.folded for r in records for d in r.decisions)
torch.save({"answer": answer, "folded": folded, "rows": sum(len(r.decisions) for r in records)}, out)
if stage == "build":
    with open(blob, "wb") as file:
        file.write(torch.compiler.save_cache_artifacts()[0])
"""


def _packages(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".pt2")) if os.path.isdir(folder) else []


def _child(stage: str, cache_dir, tmp_path) -> dict:
    env = {**os.environ, "COMPILEFUSE_CACHE_DIR": str(cache_dir), "COMPILEFUSE_CACHE": "1" if stage == "load" else "0",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = tmp_path / f"{stage}.pt"
    subprocess.run([sys.executable, "-c", CHILD, stage, str(tmp_path / "artifacts.bin"), str(out)],
                   check=True, timeout=600, env=env)
    return torch.load(out)


@pytest.mark.slow
def test_a_fresh_process_loads_the_shipped_package_instead_of_compiling(tmp_path):
    """What a fleet does: one process compiles and saves torch's cache artifacts; a replica with an
    empty cache loads them and answers without compiling (Inductor, AOTInductor and export refuse
    to run there), bit for bit what the first process answered, with the same fold report."""
    built = _child("build", tmp_path / "builder", tmp_path)
    assert len(_packages(tmp_path / "builder")) == 1
    loaded = _child("load", tmp_path / "replica", tmp_path)
    assert _packages(tmp_path / "replica") == _packages(tmp_path / "builder")
    assert torch.equal(loaded["answer"], built["answer"])
    assert (loaded["folded"], loaded["rows"]) == (built["folded"], built["rows"]) == (4, 5)
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(built["answer"], eager, float64_reference(model, x))


def test_new_weights_never_load_an_old_package(tmp_path, monkeypatch, caplog):
    """The weights are in the key: a refold after load_state_dict builds a package of its own, and
    a second instance with the first weights loads the first package."""
    monkeypatch.setenv("COMPILEFUSE_CACHE_DIR", str(tmp_path))
    first = randomize_bn(SmallCNN()).eval()
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(first, backend="bnfuse", **CACHED)
    with torch.inference_mode():
        assert_matches_reference(compiled(x), first(x), float64_reference(first, x))
    assert len(_packages(tmp_path)) == 1

    first.load_state_dict(randomize_bn(SmallCNN()).state_dict())
    with torch.inference_mode():
        assert_matches_reference(compiled(x), first(x), float64_reference(first, x))
    assert len(_packages(tmp_path)) == 2

    again = SmallCNN().eval()
    again.load_state_dict(weights)
    with caplog.at_level(logging.INFO, logger="compilefuse"):
        result = run_bnfuse(again, x, **CACHED)
    assert "loaded from the compile cache" in caplog.text
    assert len(_packages(tmp_path)) == 2 and len(result.folded) == 4
    with torch.inference_mode():
        assert_matches_reference(result.outputs, again(x), float64_reference(again, x))


class Classifier(nn.Module):
    """A conv body and a dropout head in eval mode, as torchvision's mobilenets and efficientnets end."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.1))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2, inplace=True), nn.AlphaDropout(0.1), nn.Linear(144, 5))

    def forward(self, x):
        return self.head(self.body(x))


def test_an_eval_mode_dropout_draws_nothing_and_its_graph_is_cached(tmp_path, monkeypatch, caplog):
    """``torch.export`` keeps an eval-mode ``nn.Dropout`` as ``aten.dropout(x, p, False)``, an op
    tagged as drawing random numbers: read by its tag alone, every such model compiled without the
    cache, on the slower frozen route (mobilenet_v3_large: docs/benchmarks.md)."""
    monkeypatch.setenv("COMPILEFUSE_CACHE_DIR", str(tmp_path))
    model = randomize_bn(Classifier()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        eager = model(x)
    result = run_bnfuse(model, x, calls=2, **CACHED)
    assert len(_packages(tmp_path)) == 1 and len(result.folded) == 1
    assert_matches_reference(result.outputs, eager, float64_reference(model, x))
    with caplog.at_level(logging.INFO, logger="compilefuse"):
        again = run_bnfuse(copy.deepcopy(model), x, **CACHED)
    assert "loaded from the compile cache" in caplog.text
    assert torch.equal(again.outputs, result.outputs)


def test_a_dropout_draws_random_numbers_unless_told_it_is_not_training():
    """What the cache refuses: a graph that draws random numbers. A dropout is judged by its
    ``train`` argument (only a literal False draws nothing); any other random op always draws."""

    def exported(forward) -> torch.fx.Graph:
        class Module(nn.Module):
            def forward(self, x):
                return forward(x)

        return torch.export.export(Module(), (torch.randn(2, 4, 3, 3),), strict=False).graph

    functional = torch.nn.functional
    for dropout in (functional.dropout, functional.alpha_dropout, functional.dropout2d,
                    functional.feature_alpha_dropout):
        for inplace in (False, True):
            assert not ops.draws_random_numbers(exported(lambda x, d=dropout, i=inplace: d(x * 1, 0.5, False, i)))
            assert ops.draws_random_numbers(exported(lambda x, d=dropout, i=inplace: d(x * 1, 0.5, True, i)))
    assert ops.draws_random_numbers(exported(lambda x: x + torch.rand_like(x)))
    assert not ops.draws_random_numbers(exported(lambda x: x * 2))


class CountsCalls(nn.Module):
    """Writes a buffer on every call: state the graph writes is never frozen, let alone cached."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.body(x)


class ReturnsItsInput(nn.Module):
    """Returns a view of its input beside the folded result."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x), x.flatten(1)


@torch.compiler.allow_in_graph
def shifted(x):
    return x + 1


class CallsAPythonFunction(nn.Module):
    """Calls a function of the user's in its graph: its body could change and the graph's code not."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        return shifted(self.body(x))


CANNOT_BE_CACHED = {"writes_state": CountsCalls, "returns_a_view_of_its_input": ReturnsItsInput,
                    "dynamic_batch": CountsCalls, "calls_a_python_function": CallsAPythonFunction}


@pytest.mark.parametrize("case", CANNOT_BE_CACHED)
def test_graphs_that_cannot_be_cached_compile_as_without_the_option(case, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILEFUSE_CACHE_DIR", str(tmp_path))
    model = randomize_bn(CANNOT_BE_CACHED[case]()).eval()
    x = torch.randn(2, 3, 8, 8)
    if case == "dynamic_batch":
        torch._dynamo.mark_dynamic(x, 0)
    with torch.inference_mode():
        eager = model(x)
    result = run_bnfuse(model, x, calls=2, **CACHED)
    assert _packages(tmp_path) == [] and len(result.folded) == 1
    assert_matches_reference(result.outputs, eager, float64_reference(model, x))
    if case == "writes_state":
        assert model.calls.item() == 3  # once in eager, once per compiled call
    if case == "returns_a_view_of_its_input":
        assert result.outputs[1].data_ptr() == x.data_ptr()  # a view, as in eager


def test_the_key_holds_the_frozen_weights_but_only_the_metadata_of_the_inputs():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    weight, x = torch.randn(4, 3, 3, 3), torch.randn(1, 3, 8, 8)
    config = BnfuseConfig()
    key = graph_cache.cache_key(gm, [x, weight], [0], config)
    assert graph_cache.cache_key(gm, [torch.randn(1, 3, 8, 8), weight.clone()], [0], config) == key
    nudged = weight.clone()
    nudged[0, 0, 0, 0] += 1e-6
    assert graph_cache.cache_key(gm, [x, nudged], [0], config) != key
    assert graph_cache.cache_key(gm, [torch.randn(2, 3, 8, 8), weight], [0], config) != key
    assert graph_cache.cache_key(gm, [x, weight], [0], BnfuseConfig(rules=frozenset({"conv_bn"}))) != key
    with torch._inductor.config.patch(max_autotune=True):  # the user's global Inductor settings
        assert graph_cache.cache_key(gm, [x, weight], [0], config) != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert graph_cache.cache_key(gm, [x, weight], [0], config) != key
    finally:
        torch.set_num_threads(threads)


def test_the_option_takes_a_bool_and_defaults_to_the_environment(monkeypatch):
    with pytest.raises(Exception, match="'cache' must be True or False"):
        compilefuse.BnfuseConfig.from_options({"cache": "yes"})
    monkeypatch.delenv("COMPILEFUSE_CACHE", raising=False)
    assert not compilefuse.BnfuseConfig.from_options(None).cache
    monkeypatch.setenv("COMPILEFUSE_CACHE", "1")
    assert compilefuse.BnfuseConfig.from_options(None).cache
    assert not compilefuse.BnfuseConfig.from_options({"cache": False}).cache
