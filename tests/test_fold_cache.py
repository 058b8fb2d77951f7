"""The fold of an inference graph kept across processes (``fold_cache``, issue 30 item 3): a warm
start loads it instead of tracing, folding and splitting again, and answers exactly as the fold it
loads; anything the fold depends on changes the key; a bad entry is a miss.

A fresh process is played by ``torch._dynamo.reset()`` and a new instance of the model: bnfuse
then holds nothing of the first compile in memory, and the cache directory is the test's own."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error
from torch import nn

import compilefuse
from compilefuse._torch_private import gates, pre_dispatch
from compilefuse.jit import backend

pytestmark = pytest.mark.skipif(not gates.PICKLES_GRAPHS, reason="this torch cannot pickle graphs (< 2.7)")


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head, self.head_bn = nn.Conv2d(width, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_bn(self.head(torch.relu(self.bn(self.conv(x)))))


class Renamed(Net):
    """Net under other module names: another report."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head, self.head_bn = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_bn(self.head(torch.relu(self.stem_bn(self.stem(x)))))


def entries() -> list[str]:
    folder = os.path.join(os.environ["COMPILEFUSE_CACHE_DIR"], "folds")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def answer(model: nn.Module, x: torch.Tensor, **options) -> tuple[torch.Tensor, compilefuse.FoldReport]:
    torch._dynamo.reset()  # a fresh process, as far as bnfuse and Dynamo know
    with compilefuse.report.collecting() as records, torch.inference_mode():
        out = torch.compile(model, backend="bnfuse", options=options or None)(x)
    return out, compilefuse.FoldReport.from_records(records)


def test_a_warm_start_loads_the_fold_and_answers_another_instance_exactly(monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    first = randomize_bn(Net().eval())
    out, report = answer(first, x)
    assert len(entries()) == 1 and report.folded == 2
    assert relative_error(out, float64_reference(first, x)) < 1e-5

    def no_trace(*_args, **_kwargs):
        raise AssertionError("traced again: the cached fold was not used")

    monkeypatch.setattr(pre_dispatch, "forward_before_autograd", no_trace)
    second = randomize_bn(Net().eval())  # other weights: the fold is kept, never its values
    out, again = answer(second, x)
    assert relative_error(out, float64_reference(second, x)) < 1e-5
    assert [(r.bn, r.folded, r.rule, r.producer) for r in again.rows] == [
        (r.bn, r.folded, r.rule, r.producer) for r in report.rows]
    assert len(entries()) == 1


def test_what_the_fold_depends_on_is_in_the_key():
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Net().eval())
    answer(model, x)
    answer(model, x.to(memory_format=torch.channels_last))  # another input layout
    answer(model, x, rules=["conv_bn"])  # other options
    _, report = answer(randomize_bn(Renamed().eval()), x)  # other module names
    assert {row.bn for row in report.rows} == {"stem_bn", "head_bn"}
    answer(randomize_bn(Net(width=6).eval()), x)  # other weight shapes
    answer(randomize_bn(Net().eval()).double(), x.double())  # another dtype
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # which weights are packed depends on it
        answer(model, x)
    finally:
        torch.set_num_threads(threads)
    assert len(entries()) == 7
    answer(model, x)  # and the first again: a hit
    assert len(entries()) == 7


def test_an_unreadable_entry_is_a_miss_and_is_replaced():
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Net().eval())
    answer(model, x)
    [name] = entries()
    path = os.path.join(os.environ["COMPILEFUSE_CACHE_DIR"], "folds", name)
    with open(path, "wb") as file:
        file.write(b"not a fold")
    out, report = answer(model, x)
    assert report.folded == 2 and relative_error(out, float64_reference(model, x)) < 1e-5
    with open(path, "rb") as file:
        assert file.read() != b"not a fold"


def test_nothing_is_kept_while_inductors_caches_are_off():
    model, x = randomize_bn(Net().eval()), torch.randn(2, 3, 8, 8)
    with torch.compiler.config.patch(force_disable_caches=True):
        out, _ = answer(model, x)
    assert entries() == [] and relative_error(out, float64_reference(model, x)) < 1e-5


def test_a_fold_that_reads_values_is_not_kept(monkeypatch):
    """A rule that runs on constants only (none today: ``branch_merge`` folds per step too) would
    make the fold depend on the weights' values: such a graph's fold is not stored."""
    monkeypatch.setattr(backend, "merges_read_values", lambda _traced: True)
    model, x = randomize_bn(Net().eval()), torch.randn(2, 3, 8, 8)
    answer(model, x)
    assert entries() == []


def test_a_fleet_gets_the_fold_through_save_cache_artifacts(tmp_path, monkeypatch):
    """The process that folded records the fold with Inductor's artifacts; a replica that loads
    the blob (after ``import compilefuse``) into an empty cache directory warm starts from it."""
    x = torch.randn(2, 3, 8, 8)
    answer(randomize_bn(Net().eval()), x)
    [folded] = entries()
    saved = torch.compiler.save_cache_artifacts()  # (with every other test's of this process)
    assert saved is not None
    monkeypatch.setenv("COMPILEFUSE_CACHE_DIR", str(tmp_path / "replica"))
    assert entries() == []
    torch.compiler.load_cache_artifacts(saved[0])
    assert folded in entries()
    monkeypatch.setattr(pre_dispatch, "forward_before_autograd", lambda *_a, **_k: pytest.fail("traced again"))
    model = randomize_bn(Net().eval())
    out, report = answer(model, x)
    assert report.folded == 2 and relative_error(out, float64_reference(model, x)) < 1e-5


LINEAR_RUN = """
import sys, torch
from torch import nn
import compilefuse
from compilefuse._torch_private import gates, pre_dispatch
from compilefuse.examples.models import randomize_bn
from compilefuse.examples.reference import float64_reference, relative_error
if sys.argv[1] == "warm":
    def no_trace(*_args, **_kwargs):
        raise AssertionError("traced again: the cached fold was not used")
    pre_dispatch.forward_before_autograd = no_trace
torch.manual_seed(int(sys.argv[2]))
model = randomize_bn(nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 8)).eval())
x = torch.randn(16, 512)
with compilefuse.report.collecting() as records, torch.inference_mode():
    out = torch.compile(model, backend="bnfuse", options={"strict": True})(x)
assert sum(d.folded for r in records for d in r.decisions) == 1
assert relative_error(out, float64_reference(model, x)) < 1e-5
print("ok")
"""


def test_a_fresh_process_loads_a_fold_that_calls_the_packed_linear(tmp_path):
    """A stored main graph names ``compilefuse::packed_linear``, an op registered on first use: a
    fresh process that loads the fold (and traces nothing) must have it registered first."""
    import subprocess
    import sys

    env = {**os.environ, "COMPILEFUSE_CACHE_DIR": str(tmp_path / "compilefuse"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for run, seed in (("cold", "0"), ("warm", "1")):
        done = subprocess.run([sys.executable, "-c", LINEAR_RUN, run, seed], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert len(os.listdir(tmp_path / "compilefuse" / "folds")) == 1
