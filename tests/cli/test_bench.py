"""`semisparse bench`: the table and JSON carry the figures the benchmarks quote (smoke-sized here)."""

from __future__ import annotations

import json

import pytest
import torch

from semisparse.cli import bench
from semisparse.cli import main as cli_main


def test_bench_layers_json_has_ratios_and_limits(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--layer", "32x128", "--sparsity", "0.9", "--batch", "1", "16", "--reps", "3",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] == 2 and data["machine"]["dtype"] == "float32"
    rows = data["results"]
    assert [r["batch"] for r in rows] == [1, 16]
    for r in rows:
        assert r["max_rel_err"] <= 1e-5
        assert r["k"] == 13 and r["flop_limit"] == pytest.approx(128 / 13, rel=1e-2)
        assert r["byte_limit"] == pytest.approx(128 * 4 / (13 * 6), rel=1e-2)  # fp32 values + uint16 indices
        assert r["dense_ms"] > 0 and r["condensed_ms"] > 0 and r["csr_ms"] > 0
    assert "CSR ratio" in capsys.readouterr().out


def test_bench_whole_model_reports_condensed_share(tmp_path):
    row = bench.bench_model("digits_cnn", 0.9, batch=1, reps=3, masks="srigl", ablation=0.2, anchors=False)
    assert row["max_rel_err"] <= 1e-5
    assert 0.0 <= row["condensed_share_of_sparse_macs"] <= 1.0
    assert row["layers"] >= 1 and row["dense_ms"] > 0 and row["deployed_ms"] > 0
    for base in ("dense_bn_folded", "dense_deployed"):  # each baseline's time and the ratio against it
        assert row[f"{base}_ms"] > 0
    # The ratio comes from the unrounded times: it lies within what the times, rounded to the microsecond,
    # allow, give or take its own rounding to 2 decimals (a fixed relative tolerance fails on fast machines).
    d, p, half_us = row["dense_deployed_ms"], row["deployed_ms"], 0.0005
    lo, hi = (d - half_us) / (p + half_us), (d + half_us) / (p - half_us) if p > half_us else float("inf")
    assert lo - 0.005 <= row["ratio_vs_dense_deployed"] <= hi + 0.005
    assert "deployed all-dense ms" in bench.format_table([row])


def test_bench_bad_arguments_are_one_line_errors(capsys):
    assert cli_main(["bench", "--layer", "12by4"]) == 2
    assert "OUTxIN" in capsys.readouterr().err
    assert cli_main(["bench", "--sparsity", "1.5"]) == 2


def test_bench_model_times_the_dense_runtimes_beside_torch():
    """The first ratio is against the fastest dense runtime (onnxruntime is in the test venv), which ran the
    same masked model and computed the same output."""
    row = bench.bench_model("digits_cnn", 0.9, batch=1, reps=3, masks="uniform", blocked_too=True)
    times = row["dense_runtimes_ms"]
    assert set(row["blocked_ms"]) == {"deployed", *times} and min(row["blocked_ms"].values()) > 0
    assert "torch eager" in times and "onnxruntime" in times
    assert row["dense_runtimes_rel_err"]["onnxruntime"] <= 1e-5
    assert row["fastest_dense_ms"] == min(t for n, t in times.items() if "bf16" not in n)
    assert row["fastest_dense"] in times
    assert row["ratio_vs_fastest_dense"] == pytest.approx(row["fastest_dense_ms"] / row["deployed_ms"], rel=0.02,
                                                          abs=0.01)
    table = bench.format_table([row])
    assert "vs fastest dense" in table and "onnxruntime ms" in table


def test_bench_model_in_bf16_against_the_bf16_dense_runtimes(monkeypatch):
    """``--dtype bf16`` on CPU: ss.deploy(dtype=torch.bfloat16) timed beside the fp32 row, its ratio against the
    fastest bf16 dense runtime (torch under bf16 autocast here; OpenVINO's default too on a CPU with bf16), its
    outputs within bf16 rounding of the masked model; the fp32 figures stay against fp32 runtimes only."""
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # one ONNX runtime is enough here
    row = bench.bench_model("digits_cnn", 0.9, batch=1, reps=3, masks="uniform", blocked_too=True, bf16=True)
    times = row["dense_runtimes_ms"]
    assert "torch bf16 autocast" in times and row["fastest_bf16_dense"] == "torch bf16 autocast"
    assert row["fastest_bf16_dense_ms"] == times["torch bf16 autocast"]
    assert row["ratio_bf16_vs_fastest_bf16_dense"] == pytest.approx(
        row["fastest_bf16_dense_ms"] / row["deployed_bf16_ms"], rel=0.02, abs=0.01)
    assert row["fastest_dense"] != "torch bf16 autocast"  # the fp32 ratio is against fp32 runtimes
    assert 0 < row["max_rel_err_bf16"] <= 3e-2 and row["max_rel_err"] <= 1e-5
    assert set(row["blocked_ms"]) == {"deployed", "deployed bf16", *times}
    table = bench.format_table([row])
    assert "deployed bf16 ms" in table and "(torch bf16 autocast)" in table
    assert "deployed bf16 ms" not in bench.format_table([bench.bench_model("digits_cnn", 0.9, reps=3,
                                                                           anchors=False)])


def test_bench_fp16_on_cpu_is_a_one_line_error(capsys):
    assert cli_main(["bench", "--model", "digits_cnn", "--dtype", "fp16"]) == 2
    assert "--dtype fp16 is for --device cuda" in capsys.readouterr().err


def test_a_missing_runtime_is_skipped_with_a_note(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    row = bench.bench_model("digits_cnn", 0.9, batch=1, reps=3, masks="uniform")
    assert list(row["dense_runtimes_ms"]) == ["torch eager", "torch channels-last"]
    assert row["fastest_dense"] in ("torch eager", "torch channels-last")
    notes = row["dense_runtime_notes"]
    assert any(n.startswith("onnxruntime skipped: onnxruntime is not installed") for n in notes)
    assert any(n.startswith("openvino skipped: openvino is not installed") for n in notes)
    assert "note: onnxruntime skipped" in bench.format_table([row])


@pytest.mark.parametrize("pattern", ["2:4", "fan-in"])
def test_bench_file_on_cpu_at_the_recorded_input_size(tmp_path, pattern, capsys):
    """`semisparse bench --file` deploys the file's model and times it against its dense self, 2:4 included."""
    import semisparse as ss
    from semisparse.models import create_model

    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10).eval()
    ss.sparsify(model, "2:4" if pattern == "2:4" else 0.9)
    model.semisparse_input_size = [1, 8, 8]
    path = ss.save(model, tmp_path / "m.safetensors")
    out = tmp_path / "b.json"
    assert cli_main(["bench", "--file", str(path), "--reps", "3", "--no-anchors", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["input"] == [1, 1, 8, 8] and row["max_rel_err"] <= 1e-5 and row["layers"] >= 1
    assert row["masks"] == ("2:4" if pattern == "2:4" else "fan-in") or pattern in row["masks"]
    assert row["fastest_dense"].startswith("torch") and "m.safetensors (digits_cnn)" in capsys.readouterr().out
    assert cli_main(["bench", "--file", str(path), "--reps", "3", "--no-anchors", "--input-size", "12",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["input"] == [1, 1, 12, 12]


def test_bench_model_2of4_on_cpu():
    row = bench.bench_model("digits_cnn", batch=1, reps=3, pattern="2:4", anchors=False)
    assert row["masks"] == "2:4" and row["max_rel_err"] <= 1e-5
    assert row["kept_density"] == pytest.approx(0.5, abs=0.01)


def test_a_stalled_torch_eager_flags_only_the_ratio_against_it():
    """The limit bounds every ratio, but only one above it is impossible: 2.03x against a stalled torch eager
    is flagged, 1.38x against OpenVINO in the same row is a result (both were flagged)."""
    row = {"kind": "model", "model": "resnet50", "masks": "2:4-rows4", "sparsity": 0.5, "batch": 1,
           "input": [1, 3, 224, 224], "deployed_ms": 35.7, "ratio_vs_fastest_dense": 1.38,
           "fastest_dense": "openvino",
           "dense_ms": 72.4, "ratio": 2.03, "dense_runtimes_ms": {"torch eager": 72.4, "openvino": 49.2},
           "dense_deployed_ms": 63.8, "ratio_vs_dense_deployed": 1.79, "limit": 1.94, "condensed_layers": 53,
           "layers": 53, "above_limit": True, "loaded": False}
    line = bench.format_table([row]).splitlines()[2]
    assert " 1.38x " in line and "2.03x!" in line
    assert bench.marks(row, 1.38) == "" and bench.marks(row, 1.99) == "!" and bench.marks(row) == "!"


def test_impossible_or_loaded_ratios_are_flagged():
    """A ratio above the byte limit (batch 1) or FLOP limit, or measured while others took the CPUs, carries a
    marker and a footnote: the demo printed 10.84x and `bench --layer` 75.26x beside a byte limit of 6.69x."""
    base = {"kind": "layer", "shape": "Linear 3072->768", "sparsity": 0.9, "batch": 1, "dense_ms": 1.0,
            "condensed_ms": 0.1, "ratio": 10.0, "ratio_warm": 9.0, "csr_ms": None, "csr_ratio": None,
            "byte_limit": 6.69, "flop_limit": 10.0}
    honest = bench.format_table([dict(base, ratio=5.0, above_limit=False, loaded=False)])
    assert "!" not in honest and "~" not in honest
    flagged = bench.format_table([dict(base, above_limit=True, loaded=True, others_busy_cpus=1.5)])
    assert "10.00x!~" in flagged
    assert "! above the byte/FLOP limit" in flagged and "~ measured while other processes kept up to 1.50" in flagged
    assert bench.loaded(1.5, 2) and not bench.loaded(0.1, 1) and not bench.loaded(None, 2)
    row = bench.bench_linear(96, 384, 0.9, 1, reps=5, csr=False)
    assert row["above_limit"] == (row["ratio"] > row["byte_limit"] * 1.02)
    assert isinstance(row["loaded"], bool)
