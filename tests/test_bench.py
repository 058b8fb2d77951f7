"""The benchmark harness itself, on a tiny model with a tiny measuring time: what it writes, how it
orders and threads its measurements, and how it fails."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from compilefuse._torch_private import gates
from compilefuse.bench import cli
from compilefuse.bench.harness import Row, benchmark_case, interleaved_order
from compilefuse.bench.systems import SYSTEMS as SYSTEMS_BY_NAME
from compilefuse.bench.systems import CompileSettings, System, without_batch_norm

QUICK = ["--rounds", "2", "--min-run-time", "0.01", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_json_and_csv_rows_for_every_system(tmp_path, capsys):
    json_path, csv_path = tmp_path / "out.json", tmp_path / "out.csv"
    cli.main(["--model", "bench_fixtures:tiny", "--systems", "eager", "bnfuse", "limit", "--batch-size", "1", "2",
              "--threads", "1", "--json", str(json_path), "--csv", str(csv_path), *QUICK])
    data = json.loads(json_path.read_text())
    meta = data["meta"]
    assert meta["threads"] == 1 and meta["systems"] == ["eager", "bnfuse", "limit"] and meta["batch_sizes"] == [1, 2]
    assert meta["round_order"] == [["eager", "bnfuse", "limit"], ["bnfuse", "limit", "eager"]]
    for key in ("machine", "cpu_count", "device", "torch", "dtype", "rounds", "min_run_time_s", "command", "date"):
        assert key in meta
    rows = data["results"]
    assert [(r["model"], r["batch_size"], r["system"]) for r in rows] == [
        ("bench_fixtures:tiny", b, s) for b in (1, 2) for s in ("eager", "bnfuse", "limit")
    ]
    fields = {f.name for f in dataclasses.fields(Row)}
    for row in rows:
        assert set(row) == fields and row["status"] == "ok", row
        assert row["latency_ms_median"] > 0 and row["latency_ms_p90"] >= row["latency_ms_median"]
        assert row["compile_s"] > 0 and row["ratio_to_limit"] > 0
    by_system = {r["system"]: r for r in rows if r["batch_size"] == 1}
    assert by_system["eager"]["speedup_vs_eager"] == 1.0 and by_system["limit"]["ratio_to_limit"] == 1.0
    assert (by_system["bnfuse"]["bn_folded"], by_system["bnfuse"]["bn_total"]) == (1, 1)
    assert by_system["bnfuse"]["max_rel_error"] < 1e-5 and by_system["limit"]["max_rel_error"] is None
    with open(csv_path) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 6 and set(lines[0]) == fields
    assert "bench_fixtures:tiny" in capsys.readouterr().out


def failing_system(name: str, fail_at_call: int) -> System:
    """A system whose ``fail_at_call``-th call raises (0: its preparation raises)."""

    def prepare(model, example, settings):
        if fail_at_call == 0:
            raise RuntimeError(f"boom in {name}")
        count = [0]

        def call(x):
            count[0] += 1
            if count[0] >= fail_at_call:
                raise RuntimeError(f"boom in {name}")
            return model(x)

        return call

    return System(name, "fails", prepare)


def test_a_failing_system_gets_a_failed_row_and_the_run_goes_on():
    systems = [failing_system("at-compile", 0), SYSTEMS_BY_NAME["eager"], failing_system("while-timed", 5)]
    rows = benchmark_case("m", nn.Linear(4, 4).eval(), torch.randn(2, 4), systems, CompileSettings(threads=1),
                          rounds=2, min_run_time=0.01)
    by_system = {row.system: row for row in rows}
    for name in ("at-compile", "while-timed"):
        assert by_system[name].status == "failed" and f"boom in {name}" in by_system[name].error
        assert by_system[name].latency_ms_median is None
    assert by_system["eager"].status == "ok" and by_system["eager"].latency_ms_median > 0


def recording_system(name: str, calls: list[tuple[str, int]]) -> System:
    def prepare(model, example, settings):
        def call(x):
            calls.append((name, torch.get_num_threads()))
            return model(x)

        return call

    return System(name, "records its calls", prepare)


def test_systems_are_timed_interleaved_in_rotated_order_with_the_thread_count_set():
    calls: list[tuple[str, int]] = []
    systems = [recording_system(name, calls) for name in ("a", "b", "c")]
    model = nn.Linear(4, 4).eval()
    benchmark_case("m", model, torch.randn(2, 4), systems, CompileSettings(threads=3), rounds=3, min_run_time=0.01)
    # Collapse each run of one system's calls: the first call + warm-ups of each, then the rounds.
    sequence = [name for i, (name, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != name]
    assert sequence == ["a", "b", "c", *("a", "b", "c", "b", "c", "a", "c", "a", "b")]  # warm-up, then rotated rounds
    assert interleaved_order("abc", 3) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    timed_threads = {threads for name, threads in calls[3 * 3:]}
    assert timed_threads == {3}


def test_unknown_model_and_missing_gpu_are_clear_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "resnet_styel"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet_styel'" in err and "resnet_style" in err
    with pytest.raises(SystemExit):
        cli.main(["--model", "bench_fixtures:no_such_factory"])
    assert "cannot load model factory" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_factory_must_return_model_and_input(tmp_path):
    json_path = tmp_path / "out.json"
    cli.main(["--model", "bench_fixtures:not_a_pair", "--systems", "eager", "--json", str(json_path), *QUICK])
    [row] = json.loads(json_path.read_text())["results"]
    assert row["status"] == "failed" and "must return (model, example_input)" in row["error"]


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plot.png"
    cli.main(["--model", "bench_fixtures:tiny", "--systems", "eager", "limit", "--plot", str(plot), *QUICK])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_limit_removes_every_batch_norm_frozen_ones_included():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4)))
    limit = without_batch_norm(model)
    kinds = [type(m).__name__ for m in limit.modules()]
    assert "BatchNorm2d" not in kinds and "FrozenBatchNorm2d" not in kinds and kinds.count("Identity") == 2
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched


def test_list_names_models_and_systems(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet_style", "dcgan_generator", "pointnet_head", "audio_cnn", "preact_cnn", "mobilenet_style",
                 "resnet18", "convnext_tiny", "inductor-freezing", "limit", "onnxruntime", "openvino"):
        assert name in out


def test_dtype_mode_and_dynamic_reach_the_compiled_systems(tmp_path):
    json_path = tmp_path / "out.json"
    cli.main(["--model", "bench_fixtures:tiny", "--systems", "eager", "bnfuse", "--dtype", "bfloat16", "--dynamic",
              "--batch-size", "2", "3", "--mode", "default", "--json", str(json_path), *QUICK])
    data = json.loads(json_path.read_text())
    assert data["meta"]["dtype"] == "bfloat16" and data["meta"]["dynamic"] is True and data["meta"]["mode"] == "default"
    rows = data["results"]
    assert all(r["status"] == "ok" for r in rows), rows
    bnfuse = [r for r in rows if r["system"] == "bnfuse"]
    assert all(r["bn_folded"] == 1 and r["max_rel_error"] < 2e-2 for r in bnfuse), bnfuse


@pytest.mark.parametrize(("dtype", "status"), [("float16", "failed"), ("float32", "ok")])
def test_non_finite_output_fails_its_row_instead_of_being_timed(tmp_path, dtype, status):
    json_path = tmp_path / "out.json"
    cli.main(["--model", "bench_fixtures:overflowing", "--systems", "eager", "--dtype", dtype, "--json", str(json_path),
              *QUICK])
    [row] = json.loads(json_path.read_text())["results"]
    assert row["status"] == status, row
    if status == "failed":
        assert "non-finite output" in row["error"] and row["latency_ms_median"] is None


def test_output_is_checked_on_a_copy_of_the_first_answer():
    """A system that reuses one output buffer (as CUDA graphs do) still has its first answer checked:
    later calls overwrite the buffer, and checking the overwritten one crashed reduce-overhead runs."""

    def prepare(model, example, settings):
        buffer, calls = torch.empty(2, 4), [0]

        def call(x):
            calls[0] += 1
            buffer.copy_(model(x) if calls[0] == 1 else torch.full_like(buffer, float(calls[0])))
            return buffer

        return call

    rows = benchmark_case("m", nn.Linear(4, 4).eval(), torch.randn(2, 4), [System("reuses", "one buffer", prepare)],
                          CompileSettings(threads=1), rounds=1, min_run_time=0.01)
    assert rows[0].status == "ok" and rows[0].max_rel_error < 1e-6


@pytest.mark.slow
def test_export_system_and_cold_start(tmp_path):
    """The export system runs the loaded package (its report gives the fold counts), and --cold-start
    times each system from a fresh process's start to its first result."""
    json_path = tmp_path / "out.json"
    cli.main(["--model", "bench_fixtures:tiny", "--systems", "eager", "export", "--threads", "1", "--cold-start",
              "--json", str(json_path), *QUICK])
    rows = {r["system"]: r for r in json.loads(json_path.read_text())["results"]}
    assert rows["export"]["status"] == "ok" and (rows["export"]["bn_folded"], rows["export"]["bn_total"]) == (1, 1)
    assert rows["export"]["max_rel_error"] < 1e-5
    for row in rows.values():
        assert 0 < row["cold_start_s"] < 120, row


def test_system_with_its_own_options_takes_a_mode_too():
    """torch.compile refuses a mode together with options: the freezing system spells the mode out."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    run = SYSTEMS_BY_NAME["inductor-freezing"].prepare(model, x, CompileSettings(mode="reduce-overhead"))
    with torch.no_grad(), SYSTEMS_BY_NAME["inductor-freezing"].call_context():
        torch.testing.assert_close(run(x), model(x))


def test_train_reports_saved_bytes_step_time_and_gradient_error(tmp_path, capsys):
    json_path = tmp_path / "train.json"
    cli.main(["--train", "--model", "resnet_style", "--batch-size", "2", "--rounds", "1", "--threads", "2",
              "--json", str(json_path)])
    rows = {r["system"]: r for r in json.loads(json_path.read_text())["results"]}
    assert list(rows) == ["eager", "inductor", "inductor_efficient_conv_bn", "bnfuse"]
    for row in rows.values():
        assert row["step_ms"] > 0 and row["saved_mib"] > 0 and row["grad_err"] < 1e-4, row
    assert (rows["bnfuse"]["bn_folded"], rows["bnfuse"]["bn_total"]) == (11, 11)
    assert rows["bnfuse"]["saved_mib"] < rows["inductor"]["saved_mib"]
    assert rows["inductor"]["x_inductor_saved"] == 1.0
    assert "folded per step" in capsys.readouterr().out


@pytest.mark.skipif(not gates.AUTOCAST_TRACES_BEFORE_AUTOGRAD,
                    reason="this torch does not fold per step under autocast")
def test_train_under_autocast_folds_every_bn_and_refuses_autocast_without_train(tmp_path, capsys):
    json_path = tmp_path / "train.json"
    cli.main(["--train", "--autocast", "bf16", "--model", "resnet_style", "--batch-size", "2", "--rounds", "1",
              "--threads", "2", "--systems", "inductor", "bnfuse", "--json", str(json_path)])
    rows = {r["system"]: r for r in json.loads(json_path.read_text())["results"]}
    assert (rows["bnfuse"]["bn_folded"], rows["bnfuse"]["bn_total"]) == (11, 11)
    assert rows["bnfuse"]["grad_err"] <= 2 * rows["inductor"]["grad_err"]  # bfloat16: far above float32's
    assert rows["inductor"]["grad_err"] > 1e-4
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--autocast", "bf16"])
    assert exit_info.value.code == 2 and "--autocast: only with --train" in capsys.readouterr().err


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_cpu_runtime_systems_answer_as_eager(tmp_path, dynamic):
    """ONNX Runtime and OpenVINO (issue 32: the CPU runtimes bnfuse is measured against) run the
    model in float32 at the benchmark's thread count, at each batch size with --dynamic."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    json_path = tmp_path / "out.json"
    cli.main(["--model", "bench_fixtures:tiny", "--systems", "eager", "onnxruntime", "openvino", "--threads", "2",
              "--batch-size", "2", "3", *(["--dynamic"] if dynamic else []), "--json", str(json_path), *QUICK])
    rows = json.loads(json_path.read_text())["results"]
    assert {(r["system"], r["batch_size"]) for r in rows} == {(s, b) for s in ("eager", "onnxruntime", "openvino")
                                                              for b in (2, 3)}
    for row in rows:
        assert row["status"] == "ok" and row["max_rel_error"] < 1e-5, row


def test_cli_prints_no_warning_a_user_cannot_act_on(tmp_path):
    """Issue 32: the CLI's first line was torch's "No CUDA runtime is found" (``torch.utils.benchmark``
    imports the C++ extension loader before bnfuse's filter was installed), and the runtime
    systems' exporters add torch.jit's deprecation notices. Only the table may be printed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    tests = str(pathlib.Path(__file__).parent)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [tests, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "compilefuse.bench", "--model", "bench_fixtures:tiny", "--systems",
                          "eager", "inductor", "bnfuse", "onnxruntime", "openvino", *QUICK], capture_output=True,
                         text=True, env=env, timeout=600, check=True)
    assert out.stderr == ""
    assert out.stdout.splitlines()[0].split()[:3] == ["model", "batch", "system"]


def test_folded_systems_run_the_plain_folded_module(tmp_path):
    json_path = tmp_path / "out.json"
    cli.main(["--model", "bench_fixtures:tiny", "--systems", "eager", "folded", "folded+inductor",
              "--json", str(json_path), *QUICK])
    rows = {r["system"]: r for r in json.loads(json_path.read_text())["results"]}
    for name in ("folded", "folded+inductor"):
        assert rows[name]["status"] == "ok" and rows[name]["max_rel_error"] < 1e-5, rows[name]
