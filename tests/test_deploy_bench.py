"""`semisparse bench`: the table and JSON carry the figures the benchmarks quote (smoke-sized here)."""

from __future__ import annotations

import json

import pytest

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
    row = bench.bench_model("digits_cnn", 0.9, batch=1, reps=3, masks="srigl", ablation=0.2)
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
