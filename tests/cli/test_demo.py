"""`semisparse demo` runs end to end on the bundled digits and writes its report (short settings)."""

import json

from semisparse.cli import main


def test_demo_prints_the_table_and_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--epochs", "2", "--finetune-epochs", "1", "--no-speed", "--quiet", "--output-dir", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for method in ("dense", "magnitude 2:4, one-shot", "learned 2:4, frozen weights", "RigL 90%", "SRigL 90%",
                   "deployed"):
        assert method in text
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["dense"]["pattern"] == "dense" and rows["dense"]["mac_share"] == 0
    assert rows["magnitude 2:4, one-shot"]["pattern"] == "2:4"
    assert 0.5 < rows["magnitude 2:4, one-shot"]["kept"] < 0.51  # the 1-channel stem stays dense
    for method in ("sparsegpt 2:4, one-shot", "wanda 2:4, one-shot"):  # calibrated, no training
        assert rows[method]["pattern"] == "2:4" and 0.5 < rows[method]["kept"] < 0.51
    learned = rows["learned 2:4, frozen weights"]
    assert learned["pattern"] == "2:4" and 0.5 < learned["kept"] < 0.51 and learned["mac_share"] > 0.9
    srigl = rows["SRigL 90%"]
    assert srigl["pattern"] == "fan-in" and 0.09 < srigl["kept"] < 0.11  # ERK: 90% over all weights
    # the deployed model computes what the SRigL model computes: same accuracy
    assert rows["SRigL 90%, deployed"]["acc1"] == srigl["acc1"]
    assert rows["SRigL 90%, deployed"]["latency_ratio"] > 0
    assert "on the same thread sizing; load avg " in text and "CPUs available" in report["load"]  # conditions
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "density.png").stat().st_size > 1000


def test_the_speed_section_times_onnxruntime_and_the_deployed_model_each_alone():
    import pytest
    import torch
    from torch import nn

    import semisparse as ss
    from semisparse.cli.demo import runtime_alone, runtime_line

    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    ss.sparsify(model, 0.75)
    x = torch.randn(1, 3, 8, 8)
    got = runtime_alone(model, ss.deploy(model, example_input=x, plan="condensed"), x)
    assert got["onnxruntime_ms"] > 0 and got["deployed_alone_ms"] > 0
    assert got["vs_onnxruntime"] == pytest.approx(got["onnxruntime_ms"] / got["deployed_alone_ms"])
    assert runtime_line(got).startswith("against onnxruntime (dense, each alone in blocks): onnxruntime ")
