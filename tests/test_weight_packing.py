"""CPU weight packing per convolution: the generated code packs the weights of the convolutions ATen
would run on oneDNN (or large ones) and leaves the others to ATen's direct kernels; a
``cpp.weight_prepack`` the user sets decides for all. Results stay exact against float64."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from helpers import assert_matches_reference, float64_reference, randomize_bn
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import compilefuse
from compilefuse import weight_packing

#: How a call to each op is spelled in Inductor's Python wrapper and in its C++ wrapper (bnfuse's
#: default for CPU inference graphs).
PACKED = ("torch.ops.mkldnn._convolution_pointwise.default(", "aoti_torch_cpu_mkldnn__convolution_pointwise(")
PACKED_LINEAR = ("torch.ops.compilefuse.packed_linear.default(", 'aoti_torch_call_dispatcher("compilefuse::packed_linear"')
ATEN_CONVOLUTION = ("extern_kernels.convolution(", "aoti_torch_cpu_convolution(")


def calls(code: list[str], op: tuple[str, str]) -> list[str]:
    """The lines of the generated ``code`` that call ``op``, in either wrapper."""
    return [line for line in "\n".join(code).splitlines() if any(spelling in line for spelling in op)]


def without_bias(call: str) -> bool:
    """Whether a line calling ATen's convolution passes no bias (Python: by keyword; C++: third)."""
    return "bias=None" in call or re.search(r"aoti_torch_cpu_convolution\([^,]+, [^,]+, nullptr,", call) is not None


def three_convolutions() -> nn.Module:
    """At batch 1 on 24x24: a 3x3 and a 1x1 convolution on 4 channels (2304 input elements, ATen's
    direct kernels) and a 3x3 on 40 channels (23040, over ATen's oneDNN threshold)."""
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 40, 1), nn.ReLU(),
        nn.Conv2d(40, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
    )
    return randomize_bn(model.eval())


@pytest.mark.parametrize(
    "batch,options,packed",
    [
        (1, None, 1),
        (2, None, 3),  # ATen runs every batched float32 convolution on oneDNN
        (1, {"inductor": {"cpp.weight_prepack": True}}, 3),
        (1, {"inductor": {"cpp.weight_prepack": False}}, 0),
    ],
    ids=["batch1-by-aten", "batch2-by-aten", "user-packs-all", "user-packs-none"],
)
def test_packed_where_aten_would_use_onednn(batch, options, packed):
    model, x = three_convolutions(), torch.randn(batch, 4, 24, 24)
    assert 4 * 24 * 24 <= weight_packing.ATEN_ONEDNN_FROM_ELEMENTS < 40 * 24 * 24
    compiled = torch.compile(model, backend="bnfuse", options=options)
    with torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
        eager = model(x)
    assert len(calls(code, PACKED)) == packed
    assert_matches_reference(out, eager, float64_reference(model, x))


def test_inductors_own_freezing_is_left_alone():
    """bnfuse's choice applies to its own compiles only: Inductor's freezing, after them in the same
    process, packs every convolution as Inductor does."""
    model, x = three_convolutions(), torch.randn(1, 4, 24, 24)
    with torch.inference_mode():
        torch.compile(model, backend="bnfuse")(x)
        torch._dynamo.reset()
        with torch._inductor.config.patch(freezing=True):
            _, code = run_and_get_code(torch.compile(model, backend="inductor"), x)
    assert len(calls(code, PACKED)) == 3


def test_float64_graph_after_a_packed_float32_one():
    """oneDNN cannot pack float64 weights. Inductor registers its packing patterns once per process,
    so after a float32 compile its own setting no longer keeps them off a float64 graph: the size
    rule's override must (strict mode raises if the compile fails)."""
    model, x = three_convolutions(), torch.randn(1, 4, 24, 24)
    with torch.inference_mode():
        torch.compile(model, backend="bnfuse")(x)
    torch._dynamo.reset()
    model64, x64 = three_convolutions().double(), x.double()
    with torch.inference_mode():
        out = torch.compile(model64, backend="bnfuse")(x64)
        eager = model64(x64)
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-10)


def test_the_rule_on_hand_built_convolutions():
    """ATen's direct-kernel case is left unpacked unless the convolution is large; low precision and
    symbolic sizes leave the choice to Inductor."""
    graph = torch.fx.Graph()
    with torch._subclasses.FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x, weight = graph.placeholder("x"), graph.placeholder("w")
        conv = graph.call_function(torch.ops.aten.convolution.default,
                                   (x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1))

        def packed(input_shape, weight_shape, dtype=torch.float32):
            x.meta["val"], weight.meta["val"] = torch.empty(input_shape, dtype=dtype), torch.empty(weight_shape)
            conv.meta["val"] = torch.empty(input_shape[0], weight_shape[0], *input_shape[2:])
            return weight_packing.worth_packing(conv)

        assert not packed((1, 8, 4, 4), (8, 8, 1, 1))
        assert packed((2, 8, 4, 4), (8, 8, 1, 1))  # batched: ATen uses oneDNN
        assert packed((1, 64, 14, 14), (512, 64, 1, 1))  # 6.4 M multiply-adds on a small input
        assert packed((1, 8, 4, 4), (8, 8, 1, 1), torch.bfloat16)
        batch = mode.shape_env.create_unbacked_symint()
        assert packed((batch, 8, 4, 4), (8, 8, 1, 1))


def test_inductors_cpp_wrapper_keeps_the_folds_and_the_packed_weights():
    """Inductor's C++ wrapper checked a packed input's strides as ATen's C API reports them, not as
    its fake has them: the graph failed its first call and bnfuse fell back to plain Inductor,
    folding nothing (``onednn.size_asserts_for_packed_inputs``)."""
    import compilefuse

    model, x = three_convolutions(), torch.randn(2, 4, 24, 24)
    compiled = torch.compile(model, backend="bnfuse", options={"inductor": {"cpp_wrapper": True}})
    with compilefuse.report.collecting() as records, torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
        eager = model(x)
    decisions = [d for r in records for d in r.decisions]
    assert len(decisions) == 2 and all(d.folded for d in decisions), decisions
    assert "\n".join(code).count("mkldnn__convolution_pointwise") >= 3  # the C shim's name for it
    assert_matches_reference(out, eager, float64_reference(model, x))


def linear_head() -> nn.Module:
    """At batch 16: a 512x512 linear layer (4.2 M multiply-adds, packed at any thread count) with
    its BN folded, and a 512x8 one (66 K, left to ATen's ``addmm``)."""
    return randomize_bn(nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 8)).eval())


@pytest.mark.parametrize("options,packed", [(None, 1), ({"inductor": {"cpp.weight_prepack": False}}, 0)],
                         ids=["by-size", "user-packs-none"])
def test_large_linear_layers_read_a_packed_weight_that_follows_the_model(options, packed, monkeypatch):
    """The prologue packs a large linear layer's folded weight for oneDNN's linear, as freezing
    packs a constant one, and packs it again after a weight changes: no recompile, no stale answer."""
    from compilefuse._torch_private import inductor

    compiles = []
    original = inductor.compile_with_inductor
    monkeypatch.setattr(inductor, "compile_with_inductor", lambda *a, **k: compiles.append(1) or original(*a, **k))
    model, x = linear_head(), torch.randn(16, 512)
    compiled = torch.compile(model, backend="bnfuse", options=options)
    with compilefuse.report.collecting() as records, torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
        eager = model(x)
    assert sum(d.folded for r in records for d in r.decisions) == 1
    assert len(calls(code, PACKED_LINEAR)) == packed
    assert_matches_reference(out, eager, float64_reference(model, x))
    with torch.no_grad():
        model[0].weight.mul_(-0.5)
        model[1].running_var.mul_(4.0)
    with torch.inference_mode():
        out, eager = compiled(x), model(x)
    assert len(compiles) == 1  # refitted, not recompiled
    assert_matches_reference(out, eager, float64_reference(model, x))


def test_a_packed_linear_weight_under_inductors_cpp_wrapper():
    """The C++ wrapper calls the packed linear through its proxy for ops it has no shim for, and
    checks no input's strides (a packed weight's are not its fake's)."""
    model, x = linear_head(), torch.randn(16, 512)
    compiled = torch.compile(model, backend="bnfuse", options={"inductor": {"cpp_wrapper": True}, "strict": True})
    with torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
        eager = model(x)
    assert "packed_linear" in "\n".join(code)
    assert_matches_reference(out, eager, float64_reference(model, x))


def test_the_linear_rule_on_sizes(monkeypatch):
    """oneDNN's linear costs a fixed 13 us more than ``addmm``: packed from 4 M multiply-adds on one
    thread, from 0.5 M on more (where ATen's matrix-vector product runs on one)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert weight_packing.worth_packing_linear(1, 960, 1280)  # mobilenet_v3_large's classifier
    assert not weight_packing.worth_packing_linear(1, 256, 256)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not weight_packing.worth_packing_linear(1, 960, 1280)
    assert weight_packing.worth_packing_linear(32, 512, 512)


def test_a_convolution_left_to_aten_adds_its_folded_bias_after_it():
    """The two small convolutions ATen runs with its direct kernel take no bias: the folded bias is
    an add Inductor fuses into the ReLU after them; the packed one keeps it in oneDNN's call."""
    model, x = three_convolutions(), torch.randn(1, 4, 24, 24)
    compiled = torch.compile(model, backend="bnfuse", options={"strict": True})
    with torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
        eager = model(x)
    aten_calls = calls(code, ATEN_CONVOLUTION)
    assert len(aten_calls) == 2 and all(map(without_bias, aten_calls)), aten_calls
    assert len(calls(code, PACKED)) == 1
    assert_matches_reference(out, eager, float64_reference(model, x))


def test_cpu_inference_graphs_take_inductors_cpp_wrapper_unless_told(monkeypatch, caplog):
    """bnfuse's CPU inference graphs run under Inductor's C++ wrapper by default (its per-call
    work is C++); options that name a wrapper decide; a graph the C++ wrapper fails on, compiling
    or at its first call, compiles with the Python one, still folded, with no warning."""
    from compilefuse._torch_private import gates, inductor

    if not gates.CPP_WRAPPER_FOR_CPU_INFERENCE:
        pytest.skip("the C++ wrapper is bnfuse's default from torch 2.14")
    model, x = three_convolutions(), torch.randn(1, 4, 24, 24)

    def code_of(options=None):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="bnfuse", options={"strict": True, **(options or {})})
        with compilefuse.report.collecting() as records, torch.inference_mode():
            out, code = run_and_get_code(compiled, x)
            assert_matches_reference(out, model(x), float64_reference(model, x))
        assert sum(d.folded for r in records for d in r.decisions) == 2
        return "\n".join(code)

    assert "aoti_torch_" in code_of() and "def call(" not in code_of()
    assert "def call(" in code_of({"inductor": {"cpp_wrapper": False}})
    original = inductor.compile_with_inductor

    def cpp_wrapper_fails(gm, examples, patches, **kwargs):
        if patches.get("cpp_wrapper"):
            raise RuntimeError("C++ compile failed")
        return original(gm, examples, patches, **kwargs)

    def cpp_wrapper_fails_when_run(gm, examples, patches, **kwargs):
        call = original(gm, examples, patches, **kwargs)
        if not patches.get("cpp_wrapper"):
            return call

        def fails(*args):
            raise RuntimeError("expected ndim 4 but got 0")
        return fails

    with caplog.at_level("WARNING", logger="compilefuse"):
        for planted in (cpp_wrapper_fails, cpp_wrapper_fails_when_run):  # compiling, or at its first call
            monkeypatch.setattr(inductor, "compile_with_inductor", planted)
            assert "def call(" in code_of()
    assert not [r for r in caplog.records if r.name == "compilefuse" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("options", [None, {"inductor": {"cpp_wrapper": True}}], ids=["default", "cpp-wrapper"])
def test_a_transposed_convolution_under_the_cpp_wrapper_reads_its_weight_unpacked(options):
    """Under Inductor's JIT C++ wrapper, oneDNN's transposed convolution given a packed weight as a
    graph input returned as many channels as it reads (a DCGAN generator gave 64 for 3): such a
    weight is not packed there; the folds stay, and the answer is exact."""
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                       nn.ConvTranspose2d(6, 3, 3, stride=2)).eval())
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(model, backend="bnfuse", options={"strict": True, **(options or {})})
    with compilefuse.report.collecting() as records, torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
        eager = model(x)
    assert [d.folded for r in records for d in r.decisions] == [True]
    assert "mkldnn__convolution_transpose_pointwise" not in "\n".join(code)
    assert out.shape == eager.shape == (2, 3, 25, 25)
    assert_matches_reference(out, eager, float64_reference(model, x))
