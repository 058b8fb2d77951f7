"""Issue 29's rows: each way bnfuse was stale, crashed or answered differently from eager, as a test
(each failed on the main it was filed against)."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error
from torch import nn

import compilefuse
from compilefuse._torch_private import gates
from compilefuse.jit import backend, compiled_graph

CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def conv_bn() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval())


def assert_fresh(compiled, model, x, context) -> None:
    with context():
        out = compiled(x)
    assert relative_error(out, float64_reference(model, x)) < 1e-5


# -- 1: BN statistics updated by an eager training-mode forward (no version bump) ------------------


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_eager_train_mode_pass_after_compile_is_seen(context):
    model, x = conv_bn(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="bnfuse")
    assert_fresh(compiled, model, x, CONTEXTS[context])
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8) * 3 + 1)
    model.eval()
    assert_fresh(compiled, model, x, CONTEXTS[context])


def test_swa_update_bn_is_seen():
    model, x = conv_bn(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="bnfuse")
    assert_fresh(compiled, model, x, torch.no_grad)
    loader = [torch.randn(4, 3, 8, 8) * 2 - 1 for _ in range(3)]
    torch.optim.swa_utils.update_bn(loader, model)
    model.eval()
    assert_fresh(compiled, model, x, torch.no_grad)


# -- 2: optimizer steps that bump no version counter ----------------------------------------------

OPTIMIZERS = [
    ("Adam", {"fused": True}), ("AdamW", {"fused": True}), ("SGD", {"fused": True, "momentum": 0.9}),
    ("Adagrad", {"fused": True}), ("Adam", {"foreach": True}), ("RMSprop", {"foreach": True}),
    ("SGD", {"foreach": False}), ("NAdam", {}), ("Adamax", {"foreach": True}),
]


@pytest.mark.parametrize(("name", "kwargs"), OPTIMIZERS, ids=[f"{n}-{'-'.join(k) or 'default'}" for n, k in OPTIMIZERS])
def test_optimizer_step_between_compiled_calls_is_seen(name, kwargs):
    model, x = conv_bn(), torch.randn(2, 3, 8, 8)
    optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.1, **kwargs)
    compiled = torch.compile(model, backend="bnfuse")
    assert_fresh(compiled, model, x, torch.no_grad)
    for _ in range(2):
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert_fresh(compiled, model, x, torch.no_grad)


def test_a_step_of_another_models_optimizer_refolds_nothing():
    model, other, x = conv_bn(), conv_bn(), torch.randn(2, 3, 8, 8)
    optimizer = torch.optim.Adam(other.parameters(), fused=True)
    compiled = torch.compile(model, backend="bnfuse")
    with compilefuse.report.collecting() as records:
        assert_fresh(compiled, model, x, torch.no_grad)
        other(x).sum().backward()
        optimizer.step()
        assert_fresh(compiled, model, x, torch.no_grad)
    assert len(records) == 1


# -- 3: a write that lands while a refold compiles ------------------------------------------------


def test_a_write_landing_during_a_compile_is_seen_by_the_next_call(monkeypatch):
    """The compile reads the values, then (in a real race, another thread) ``load_state_dict``
    lands before the compile returns: the next call must refold."""
    model, x = conv_bn(), torch.randn(2, 3, 8, 8)
    new_weights = randomize_bn(conv_bn()).state_dict()
    real = backend.GraphCompiler.fold
    landed = []

    def compiled_then_written(self, inputs):
        result = real(self, inputs)
        if not landed:
            landed.append(True)
            model.load_state_dict(new_weights)
        return result

    monkeypatch.setattr(backend.GraphCompiler, "fold", compiled_then_written)
    compiled = torch.compile(model, backend="bnfuse")
    with torch.no_grad():
        compiled(x)  # answered by the code compiled from the old weights
    assert landed
    assert_fresh(compiled, model, x, torch.no_grad)


# -- 4: Inductor's own errors fall back; graphs Inductor's packing breaks fold without it ----------


@pytest.mark.parametrize("activation", [nn.ReLU, nn.GELU, nn.SiLU])
def test_circular_padding_folds_exactly(activation):
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(4), activation()).eval())
    x = torch.randn(2, 3, 8, 8)
    with compilefuse.report.collecting() as records, torch.no_grad():
        out = torch.compile(model, backend="bnfuse")(x)
    assert relative_error(out, float64_reference(model, x)) < 1e-5
    assert [d.folded for r in records for d in r.decisions] == [True]


def test_an_inductor_error_falls_back_to_plain_inductor_with_one_warning(monkeypatch, caplog):
    """``InductorError`` is a ``TorchDynamoException``: it used to pass through as Dynamo's own."""
    from torch._inductor.exc import InductorError

    from compilefuse._torch_private import inductor

    real = inductor.compile_with_inductor

    def failing_when_folded(gm, inputs, patches, *, keep_bn):
        if patches.get("freezing") or patches.get("post_grad_custom_pre_pass"):  # frozen, or as data
            raise InductorError(RuntimeError("planted Inductor failure"), "")
        return real(gm, inputs, patches, keep_bn=keep_bn)

    monkeypatch.setattr(inductor, "compile_with_inductor", failing_when_folded)
    monkeypatch.setattr(compiled_graph, "_fallback_warned", False)
    model, x = conv_bn(), torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="compilefuse"), torch.no_grad():
        compiled = torch.compile(model, backend="bnfuse", options={"strict": False})
        outs = [compiled(x) for _ in range(2)]
    for out in outs:
        assert relative_error(out, float64_reference(model, x)) < 1e-5
    warnings = [r.getMessage() for r in caplog.records if r.name == "compilefuse" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "InductorError" in warnings[0], warnings
    torch._dynamo.reset()
    with pytest.raises(Exception):  # noqa: B017 - strict: whatever Dynamo makes of it, it is raised
        with torch.no_grad():
            torch.compile(model, backend="bnfuse", options={"strict": True})(x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_torchvision_detection_models_fold_exactly(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None).eval()
    randomize_bn(model)
    images = [torch.rand(3, 160, 160)]
    with compilefuse.report.collecting() as records, torch.no_grad():
        out = torch.compile(model, backend="bnfuse")(images)
    with torch.no_grad():
        eager = model(images)
    # Random weights tie many scores, so which boxes survive the top-k cut and NMS moves with any
    # rounding (eager's own upper-half scores are 0.16 off float64's): of the whole model the box count and
    # the best score are compared with eager's, and the folded backbone, where the folds are, with float64.
    for got, want in zip(out, eager, strict=True):
        assert got["boxes"].shape == want["boxes"].shape
        if len(want["scores"]):
            assert relative_error(got["scores"].max(), want["scores"].max()) < 1e-4
    batch = model.transform(images)[0].tensors
    with torch.no_grad():
        features = torch.compile(model.backbone, backend="bnfuse")(batch)
        reference = copy.deepcopy(model.backbone).double()(batch.double())
    for name in reference:
        assert relative_error(features[name], reference[name]) < 1e-5, name
    assert sum(d.folded for r in records for d in r.decisions) > 10


# -- 5: autocast entered around the compiled call, grad enabled -----------------------------------


def test_autocast_around_a_training_call_keeps_autocasts_dtypes():
    model = randomize_bn(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)).eval())
    x = torch.randn(2, 16, 8, 8)
    compiled = torch.compile(model, backend="bnfuse")
    with compilefuse.report.collecting() as records, torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        eager = model(x)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert (out.float() - eager.float()).abs().max() <= 2 * (eager.float() - float64_reference(model, x)).abs().max() + 1e-2
    [decision] = [d for r in records for d in r.decisions]
    # folded per step in autocast's dtype (issue 31), where this torch traces autocast before autograd
    assert decision.folded == decision.per_step == gates.AUTOCAST_TRACES_BEFORE_AUTOGRAD
    out.float().sum().backward()
    assert model[0].weight.grad is not None


# -- 6: forward reads its input through conv + BN, then writes it --------------------------------


class WritesInputAfterReading(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        x.mul_(0.5)
        return y


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_a_write_to_the_input_after_the_conv_reads_it_reaches_the_caller(context):
    model = randomize_bn(WritesInputAfterReading().eval())
    compiled = torch.compile(model, backend="bnfuse")
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8)
        before = x.clone()
        reference = float64_reference(model, before)
        with CONTEXTS[context]():
            out = compiled(x)
        assert torch.equal(x, before * 0.5)
        assert relative_error(out, reference) < 1e-5


# -- 7: a disabled helper writes a buffer the graph reads, before every call ----------------------


class ScaledByAHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.ones(1))

    @torch._dynamo.disable
    def bump(self) -> None:
        self.scale.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bump()
        return self.bn(self.conv(x)) * self.scale


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_state_written_outside_the_graph_before_every_call_is_kept_live_after_two_refolds(context, caplog):
    """With the weights in the code, every tensor the graph reads is frozen. (As data, ``scale`` is
    no fold's and is read live: test_weights_as_data has a written BN statistic instead.)"""
    model, x = randomize_bn(ScaledByAHelper().eval()), torch.randn(2, 3, 8, 8)
    twin = randomize_bn(ScaledByAHelper().eval())
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="bnfuse", options={"freeze": True})
    with caplog.at_level(logging.INFO, logger="compilefuse"), compilefuse.report.collecting() as records:
        for _ in range(6):
            with CONTEXTS[context]():
                out = compiled(x)
                expected = twin(x)
            assert torch.equal(model.scale, twin.scale)
            assert relative_error(out, expected) < 1e-5
    assert len(records) == 3  # the first compile and two refolds, the second with scale live
    live = [r.getMessage() for r in caplog.records if "kept live" in r.getMessage()]
    assert len(live) == 1 and "scale" in live[0]


def test_an_occasional_weight_change_still_refolds_and_stays_folded():
    model, x = conv_bn(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="bnfuse")
    with compilefuse.report.collecting() as records:
        for _ in range(3):
            for _ in range(2):
                assert_fresh(compiled, model, x, torch.no_grad)
            model.load_state_dict(randomize_bn(conv_bn()).state_dict())
        assert_fresh(compiled, model, x, torch.no_grad)
    assert len(records) == 4 and all(d.folded for r in records for d in r.decisions)


# -- smaller items ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "option"), [("export", "strict"), ("export", "cache"), ("export", "training"),
                                               ("fold", "inductor"), ("fold", "report"), ("fold", "strict")])
def test_an_option_an_entry_point_does_not_use_is_refused_by_name(entry, option, tmp_path):
    values = {"strict": True, "cache": True, "training": False, "inductor": {}, "report": True}
    model, x = conv_bn(), torch.randn(1, 3, 8, 8)
    call = {"export": lambda: compilefuse.export(model, (x,), tmp_path / "m.pt2", options={option: values[option]}),
            "fold": lambda: compilefuse.fold(model, (x,), options={option: values[option]})}[entry]
    with pytest.raises(ValueError, match=f"compilefuse.{entry} does not use option\\(s\\) \\['{option}'\\]"):
        call()


def test_each_pass_is_identified_by_every_file_it_runs():
    """The uuids key Inductor's FX graph cache: a change to any file a pass runs must change them.
    The hand-kept lists left out ``rules/site.py`` (the kept-BN pattern) and the shim."""
    from compilefuse import code_identity

    fold_files = {p.rpartition("compilefuse/")[2] for p in code_identity.sources_of("compilefuse.passes.fold")}
    post_grad_files = {p.rpartition("compilefuse/")[2] for p in code_identity.sources_of("compilefuse.passes.post_grad")}
    assert {"passes/fold.py", "fold_math.py", "freezing.py", "_torch_private/pre_dispatch.py",
            "_torch_private/inductor.py", "rules/site.py", "rules/rule.py"} <= fold_files
    assert {"passes/post_grad.py", "passes/lower.py", "passes/pool_relu.py", "rules/site.py"} <= post_grad_files


class CachesAnchors(nn.Module):
    """Like ultralytics' ``Detect``: forward computes a tensor once per input shape and keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shape, self.anchors = None, torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape != x.shape:
            self.anchors, self.shape = torch.arange(x.shape[-1], dtype=x.dtype), x.shape
        return self.bn(self.conv(x)) + self.anchors


@pytest.mark.parametrize("entry", ["export", "fold"])
def test_fold_and_export_leave_the_users_model_untouched(entry, tmp_path):
    model, x = randomize_bn(CachesAnchors().eval()), torch.randn(1, 3, 8, 8)
    if entry == "export":
        compilefuse.export(model, (x,), tmp_path / "m.pt2")
    else:
        compilefuse.fold(model, (x,))
    assert not isinstance(model.anchors, torch._subclasses.FakeTensor) and model.shape is None
    with torch.no_grad():
        out = model(x)
    assert not isinstance(out, torch._subclasses.FakeTensor)
    assert relative_error(out, float64_reference(model, x)) < 1e-5


# -- the fold report: full module paths, one row per BN, one record per compile ----------------------


class BrokenBlock(nn.Module):
    """A block with a graph break inside: Dynamo traces its frames with ``self`` = the block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        torch._dynamo.graph_break()
        return x.relu()


def test_explain_after_a_compile_names_each_bn_once_by_its_full_path():
    """On main: ``bn`` ten times (and one BN counted twice, 11 of 11)."""
    model, x = nn.Sequential(*[BrokenBlock(4, 4) for _ in range(6)]).eval(), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.compile(model, backend="bnfuse")(x)
        report = compilefuse.explain(model, x)
    assert [row.bn for row in report.rows] == [f"{i}.bn" for i in range(6)]
    assert [row.producer for row in report.rows] == [f"{i}.conv" for i in range(6)]
    assert report.folded == report.total == 6


def test_explain_after_a_compile_past_dynamos_recompile_limit_reports_what_alone_reports():
    """Blocks of different widths each take a cache entry of the block's code; explain's own
    compile used to hit the recompile limit after the user's and report 0 of 0. Now it reuses the
    user's compiled graphs, and a BN in no graph (Dynamo ran it eagerly) has a row saying so."""
    widths = [3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96]
    model = nn.Sequential(*[BrokenBlock(a, b) for a, b in itertools.pairwise(widths)]).eval()
    x = torch.randn(1, 3, 8, 8)
    torch._dynamo.reset()
    with torch.inference_mode():
        alone = compilefuse.explain(model, x)
        torch._dynamo.reset()
        torch.compile(model, backend="bnfuse")(x)
        after = compilefuse.explain(model, x)
    limit = torch._dynamo.config.recompile_limit
    for report in (alone, after):
        assert [row.bn for row in report.rows] == [f"{i}.bn" for i in range(10)]
        assert [row.folded for row in report.rows] == [True] * limit + [False] * (10 - limit)
        assert all(row.reason == compilefuse.jit.inspection.NOT_IN_ANY_GRAPH for row in report.rows[limit:])


class ScaledBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + 1


def test_a_bn_subclass_with_arithmetic_after_its_bn_is_one_row():
    """On main: two rows ("folded 2 of 2") for one BN; its ``* 2 + 1`` still folds."""
    model, x = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4)).eval()), torch.randn(1, 3, 8, 8)
    report = compilefuse.explain(model, x)
    assert [(row.bn, row.folded, row.producer) for row in report.rows] == [("1", True, "0")]
    with torch.inference_mode():
        out = torch.compile(model, backend="bnfuse")(x)
    assert relative_error(out, float64_reference(model, x)) < 1e-5
    assert compilefuse.last_record().bn_ops_after == 0


class BnLinearBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn0, self.l1, self.bn1 = nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.l1(self.bn0(x)))


def test_a_bn_folded_into_an_already_folded_linear_names_the_linear():
    """On main: "bn0 folded into linear bn1"."""
    report = compilefuse.explain(randomize_bn(BnLinearBn().eval()), torch.randn(4, 8))
    assert {(row.bn, row.producer) for row in report.rows} == {("bn0", "l1"), ("bn1", "l1")}


def test_threads_racing_through_refolds_publish_one_record_per_compile():
    """On main: 8 threads through 6 refolds published 22-25 records."""
    import threading

    model, x = conv_bn(), torch.randn(1, 3, 8, 8)
    compiled = torch.compile(model, backend="bnfuse")
    states = [{k: v + 0.01 * i if v.is_floating_point() else v for k, v in model.state_dict().items()}
              for i in range(1, 7)]

    def call(barrier: threading.Barrier) -> None:
        barrier.wait()
        with torch.no_grad():
            compiled(x)

    with compilefuse.report.collecting() as records:
        with torch.no_grad():
            compiled(x)
        for state in states:
            model.load_state_dict(state)
            barrier = threading.Barrier(8)
            threads = [threading.Thread(target=call, args=(barrier,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert len(records) == 7
    assert_fresh(compiled, model, x, torch.no_grad)


# -- one model called with and without autocast (found on issue 31's BN-before-conv row) ----------


def bn_then_conv() -> nn.Module:
    """Kept under autocast (its output is rounded to bfloat16 before the conv), folded without."""
    return randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)).eval())


@pytest.mark.parametrize("cache", [False, True], ids=["as_data", "cache_option"])
def test_one_graph_called_with_and_without_autocast_answers_in_each_ones_dtype(cache, tmp_path, monkeypatch):
    """Dynamo recompiles a graph when autocast is switched (its global-state guard), but gives the
    backend the same graph code; bnfuse shared its compiled graphs (and the ``cache`` option its
    packages) by code and inputs alone, so the second call answered in the first one's dtype
    (bfloat16 outside autocast, or float32 inside)."""
    monkeypatch.setenv("COMPILEFUSE_CACHE_DIR", str(tmp_path))
    model, x = bn_then_conv(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="bnfuse", options={"cache": cache})
    reference = float64_reference(model, x)
    for autocast in (True, False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, eager = compiled(x), model(x)
        assert out.dtype == eager.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert relative_error(out.float(), reference) <= 2 * relative_error(eager.float(), reference) + 1e-6
