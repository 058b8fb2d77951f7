"""compilefuse.export / load: the AOTInductor package is exact against float64, carries its fold
report, loads in a process that never imports compilefuse (Python and C++), checks its inputs,
and fails clearly on bad input."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from helpers import DEVICES, assert_matches_reference, float64_reference, randomize_bn
from torch import nn

import compilefuse
from compilefuse.examples.models import BUILTIN_MODELS, SmallCNN
from compilefuse.runtime.loading import is_metadata_file, read_metadata

BATCH = torch.export.Dim("batch", min=1, max=32)


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """SmallCNN (conv, depthwise, conv-transpose and linear BNs, one BN with nothing to fold into),
    exported once with a dynamic batch."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN()).eval()
    path = tmp_path_factory.mktemp("export") / "small_cnn.pt2"
    report = compilefuse.export(model, (torch.randn(2, 3, 16, 16),), path, dynamic_shapes=({0: BATCH},))
    return model, report, path


def test_report_says_what_was_folded(small_cnn):
    _, report, _ = small_cnn
    by_bn = {row.bn: row for row in report.rows}
    assert report.total == 5 and report.folded == 4
    assert by_bn["stem.1"].rule == "conv_bn" and by_bn["depthwise.1"].rule == "conv_bn"
    assert by_bn["up.1"].rule == "conv_transpose_bn" and by_bn["head.1"].rule == "linear_bn"
    assert not by_bn["skip_bn"].folded and "no conv or linear next to it" in by_bn["skip_bn"].reason


@pytest.mark.parametrize("batch", [1, 5])
def test_package_matches_float64_at_any_batch(small_cnn, batch):
    model, _, path = small_cnn
    x = torch.randn(batch, 3, 16, 16)
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(compilefuse.load(path)(x), eager, float64_reference(model, x))


def test_a_replica_that_loads_a_package_imports_neither_dynamo_nor_inductor(small_cnn, tmp_path):
    """``import compilefuse`` + ``compilefuse.load`` + a call, in a fresh process: what a replica
    runs; it answers exactly what this process's load answers."""
    _, _, path = small_cnn
    x = torch.randn(3, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    torch.save(compilefuse.load(path)(x), tmp_path / "expected.pt")
    code = (
        "import sys, torch, compilefuse\n"
        f"out = compilefuse.load({str(path)!r})(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r}))\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'compilefuse.jit.backend') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert callable(compilefuse.bnfuse) and "conv_bn" in compilefuse.RULE_IDS  # imported when first used


def test_report_is_kept_in_the_package(small_cnn):
    _, report, path = small_cnn
    loaded = compilefuse.load(path)
    assert loaded.report == report and loaded.device == "cpu"
    assert str(loaded.report) == str(report)


def test_folded_weights_replace_the_originals(small_cnn):
    """The package carries the folded weights only: no BN statistics, no unfolded conv weights."""
    _, _, path = small_cnn
    metadata = read_metadata(str(path))
    assert metadata["inductor"]["freezing"] is True  # nothing kept next to a conv or linear
    with zipfile.ZipFile(path) as archive:
        so_size = sum(i.file_size for i in archive.infolist() if i.filename.endswith(".so"))
    assert so_size < 4 * 2**20


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.randn(2, 3, 17, 16), r"shape \(2, 3, 17, 16\) where the package takes \(1..32, 3, 16, 16\)"),
        (torch.randn(33, 3, 16, 16), "shape"),
        (torch.randn(2, 3, 16), "shape"),
        (torch.randn(2, 3, 16, 16, dtype=torch.float64), "torch.float64 on cpu where the package takes torch.float32"),
        ("not a tensor", "a str where the model takes a tensor"),
    ],
)
def test_wrong_input_is_refused_not_answered(small_cnn, bad, message):
    """AOTInductor itself runs a wrong-shaped or wrong-dtype input and answers garbage."""
    with pytest.raises(ValueError, match=message):
        compilefuse.load(small_cnn[2])(bad)


def test_wrong_number_of_inputs(small_cnn):
    with pytest.raises(ValueError, match="takes 1 inputs, got 2"):
        compilefuse.load(small_cnn[2])(torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16))


def _run_with_plain_torch(path, x: torch.Tensor, tmp_path) -> torch.Tensor:
    """Load and run the package in a fresh process that never imports compilefuse."""
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        run = torch._inductor.aoti_load_package({str(path)!r})
        y = run(torch.load({str(tmp_path / "x.pt")!r}))
        assert "compilefuse" not in sys.modules, "the package needs compilefuse"
        torch.save(y, {str(tmp_path / "y.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    return torch.load(tmp_path / "y.pt")


@pytest.mark.slow
def test_loads_with_plain_torch_in_a_fresh_process(small_cnn, tmp_path):
    model, _, path = small_cnn
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(_run_with_plain_torch(path, x, tmp_path), eager, float64_reference(model, x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_package(small_cnn, tmp_path):
    """A CUDA package: the CPU package's folds, exact against float64 at any batch, a CUDA device in
    its metadata, and a load with plain torch in a fresh process."""
    model, cpu_report, _ = small_cnn
    model = copy.deepcopy(model).cuda()
    path = tmp_path / "small_cnn_cuda.pt2"
    report = compilefuse.export(model, (torch.randn(2, 3, 16, 16, device="cuda"),), path, dynamic_shapes=({0: BATCH},))
    assert [(row.bn, row.rule, row.folded) for row in report.rows] == [(row.bn, row.rule, row.folded) for row in cpu_report.rows]
    loaded = compilefuse.load(path)
    assert loaded.device == "cuda" and loaded.report == report
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16, device="cuda")
        with torch.inference_mode():
            eager = model(x)
        assert_matches_reference(loaded(x), eager, float64_reference(model, x))
    x = torch.randn(3, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(_run_with_plain_torch(path, x, tmp_path).cuda(), eager, float64_reference(model, x))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_cpp_example_loads_the_package(small_cnn, tmp_path):
    """compilefuse/examples/cpp/run_package.cpp, built against the torch wheel's libtorch, runs the
    package on a batch of ones and prints the sum Python gets."""
    from torch.utils import cpp_extension

    _, _, path = small_cnn
    source = os.path.join(os.path.dirname(compilefuse.__file__), "examples", "cpp", "run_package.cpp")
    library = cpp_extension.library_paths()[0]
    binary = tmp_path / "run_package"
    includes = [flag for include in cpp_extension.include_paths() for flag in ("-I", include)]
    subprocess.run(
        ["c++", "-std=c++20", "-O1", *includes, source, "-o", str(binary), f"-L{library}", f"-Wl,-rpath,{library}",
         "-ltorch", "-ltorch_cpu", "-lc10", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"],
        check=True, timeout=600,
    )
    env = {**os.environ, "LD_LIBRARY_PATH": library}  # the package's own library links libtorch
    out = subprocess.run([str(binary), str(path), "4", "3", "16", "16"], check=True, capture_output=True, text=True, env=env)
    shape, total = out.stdout.split(" sum ")
    expected = compilefuse.load(path)(torch.ones(4, 3, 16, 16))
    assert shape == "shape [4, 10]"
    assert float(total) == pytest.approx(expected.sum().item(), rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_tune_keeps_the_faster_build(tmp_path):
    """tune=True times the folded program compiled with and without weight prepacking and without
    freezing, and builds the fastest; the package is exact and says what was measured."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN()).eval()
    x = torch.randn(1, 3, 16, 16)
    report = compilefuse.export(model, (x,), tmp_path / "tuned.pt2", tune=True)
    run = compilefuse.load(tmp_path / "tuned.pt2")
    tuning = run.metadata["tuning"]
    assert set(tuning["median_ms"]) | set(tuning["same_as_default"]) == {"packed_like_aten", "prepacked", "unpacked", "unfrozen"}
    assert {"packed_like_aten", "unfrozen"} <= set(tuning["median_ms"])
    assert all(t > 0 for t in tuning["median_ms"].values())
    assert tuning["chosen"] == min(tuning["median_ms"], key=tuning["median_ms"].get)
    assert run.metadata["inductor"]["freezing"] is (tuning["chosen"] != "unfrozen")
    assert run.report == report and report.folded == 4
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(run(x), eager, float64_reference(model, x))


def test_tune_refuses_a_setting_it_chooses(tmp_path):
    with pytest.raises(ValueError, match=r"tune=True chooses \['cpp.weight_prepack'\]"):
        compilefuse.export(_ConvBN().eval(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.pt2", tune=True,
                           options={"inductor": {"cpp.weight_prepack": False}})


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_refusal_stays_a_refusal(tmp_path):
    """With conv_bn disabled, the BN is kept, and the package is compiled without Inductor's
    freezing, whose binary folding would fold it anyway (without bnfuse's checks)."""
    model = randomize_bn(_ConvBN()).eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "kept.pt2"
    report = compilefuse.export(model, (x,), path, options={"rules": []})
    assert [(row.bn, row.folded, row.reason) for row in report.rows] == [("bn", False, "rule conv_bn disabled by options")]
    assert compilefuse.load(path).metadata["inductor"]["freezing"] is False
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(compilefuse.load(path)(x), eager, float64_reference(model, x))


def test_bn_without_running_statistics_is_kept(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 8, 8)
    report = compilefuse.export(model, (x,), tmp_path / "stats.pt2")
    assert [(row.bn, row.reason) for row in report.rows] == [("1", "no running statistics (track_running_stats=False)")]
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(compilefuse.load(tmp_path / "stats.pt2")(x), eager, float64_reference(model, x))


class _WritesBnStatistics(_ConvBN):
    """An eval-mode BN whose running mean the forward shifts after the BN has read it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        self.bn.running_mean.add_(0.25)
        return y


def test_a_buffer_the_program_writes_is_not_folded(tmp_path):
    """Folded as exported, the running mean would be right at the first call and stale at the second."""
    model = randomize_bn(_WritesBnStatistics()).eval()
    x = torch.randn(2, 3, 8, 8)
    before = model.bn.running_mean.clone()
    report = compilefuse.export(model, (x,), tmp_path / "writes.pt2")
    assert [row.folded for row in report.rows] == [False], str(report)
    model.bn.running_mean.copy_(before)
    package = compilefuse.load(tmp_path / "writes.pt2")
    with torch.no_grad():
        for call in range(3):
            torch.testing.assert_close(package(x), model(x), rtol=1e-5, atol=1e-5, msg=f"call {call}")


#: One built-in model per rule family (conv, conv-transpose, linear/Conv1d, refusals, branch merge, tokens).
CUDA_MODELS = ["resnet_style", "dcgan_generator", "pointnet_head", "densenet_style", "mobileone_style", "levit_style"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,device",
    [(name, "cpu") for name in sorted(BUILTIN_MODELS)]
    + [pytest.param(name, "cuda", marks=DEVICES[1].marks, id=f"{name}-cuda") for name in CUDA_MODELS],
)
def test_builtin_models_export_exactly(name, device, tmp_path):
    """Every built-in model, branchy ones included: the backend's fold counts, exact against float64."""
    spec = BUILTIN_MODELS[name]
    torch.manual_seed(0)
    x = spec.example(2).to(device)
    model = randomize_bn(spec.build().eval()).to(device)
    report = compilefuse.export(model, (x,), tmp_path / f"{name}.pt2")
    assert (report.folded, report.total) == (spec.foldable, spec.total)
    with torch.inference_mode():
        eager = model(x)
    assert_matches_reference(compilefuse.load(tmp_path / f"{name}.pt2")(x), eager, float64_reference(model, x))


# --- bad input -----------------------------------------------------------------------------------


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_model_that_does_not_export_names_the_module(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _DataDependent()).eval()
    with pytest.raises(compilefuse.ExportError, match=r"could not trace Sequential in module 1 \(_DataDependent\)"):
        compilefuse.export(model, (torch.randn(1, 3, 4, 4),), tmp_path / "m.pt2")


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [("model.pt", ValueError, "must end in .pt2"), ("missing/model.pt2", FileNotFoundError, "does not exist")],
)
def test_wrong_package_path(tmp_path, path, error, message):
    with pytest.raises(error, match=message):
        compilefuse.export(_ConvBN().eval(), (torch.randn(1, 3, 8, 8),), tmp_path / path)


def test_inputs_must_be_tensors_on_one_device(tmp_path):
    with pytest.raises(ValueError, match="tensors on one device type, found no tensors"):
        compilefuse.export(_ConvBN().eval(), (3,), tmp_path / "m.pt2")


def test_load_errors(small_cnn, tmp_path):
    with pytest.raises(FileNotFoundError, match="no package"):
        compilefuse.load(tmp_path / "absent.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(compilefuse.ExportError, match=r"not a \.pt2 package"):
        compilefuse.load(tmp_path / "junk.pt2")
    _without_metadata(small_cnn[2], tmp_path / "plain.pt2")
    with pytest.raises(compilefuse.ExportError, match=r"not written by compilefuse\.export"):
        compilefuse.load(tmp_path / "plain.pt2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA package without CUDA")
def test_cuda_package_without_cuda(small_cnn, tmp_path):
    """bnfuse's own check of the device recorded in the package (a CUDA package cannot be built
    here, so the record is rewritten)."""
    metadata = {**read_metadata(str(small_cnn[2])), "device": "cuda"}
    copy_with_metadata(str(small_cnn[2]), str(tmp_path / "cuda.pt2"), metadata)
    with pytest.raises(compilefuse.ExportError, match="built for CUDA and this process has no CUDA device"):
        compilefuse.load(tmp_path / "cuda.pt2")


def copy_with_metadata(source: str, target: str, metadata: dict) -> None:
    """A copy of the package ``source`` at ``target`` with its compilefuse metadata replaced."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, json.dumps(metadata) if is_metadata_file(info.filename) else old.read(info))


def _without_metadata(source, target) -> None:
    """A copy of a package without compilefuse's file: what plain AOTInductor packages look like."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if not is_metadata_file(info.filename):
                new.writestr(info, old.read(info))


class _CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.bn(self.conv(x)) * self.calls


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_a_model_that_writes_a_buffer_is_exported_with_a_warning(context, tmp_path, caplog):
    """A package keeps no state between calls: its answers are eager's first answer every time,
    and export says so."""
    model = randomize_bn(_CountsCalls()).eval()
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="compilefuse"), (
            torch.inference_mode() if context == "inference_mode" else torch.no_grad()):
        compilefuse.export(model, (x,), tmp_path / "counts.pt2")
    assert "writes buffer(s) calls" in caplog.text
    run = compilefuse.load(tmp_path / "counts.pt2")
    model.calls.zero_()
    with torch.no_grad():
        first = model(x)
        assert torch.allclose(run(x), first, atol=1e-5) and torch.allclose(run(x), first, atol=1e-5)
