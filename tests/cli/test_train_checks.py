"""`semisparse train` refuses bad flags in one line before any work, says what it does, and logs like
torchvision's and timm's scripts: numeric ranges, --config safety, --help sections, warnings for silent
no-ops, the start-up banner, the end-of-run summary, Ctrl-C and --keep-last."""

import copy
import json
import math
import os
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import semisparse as ss
from semisparse.cli import main
from semisparse.cli import train as cli_train

FAST = ["train", "--device", "cpu", "--data-path", "digits", "-b", "256", "--lr", "0.05", "--print-freq", "0"]


def one_line_error(capsys, argv, *needles) -> str:
    """``argv`` exits 2 with one stderr line holding every needle; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Any flag check that only fires once data or a model are built fails the test."""

    def boom(*a, **k):
        raise AssertionError("setup ran: the flag was not refused before any work")

    monkeypatch.setattr(cli_train, "setup", boom)


BAD = [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "1e30"], "--lr"), (["--lr", "-0.1"], "--lr"),
    (["--momentum", "-1"], "--momentum"), (["--momentum", "nan"], "--momentum"), (["--wd", "inf"], "--wd"),
    (["--wd", "-1e-4"], "--wd"), (["--clip-grad-norm", "nan"], "--clip-grad-norm"),
    (["--lr-warmup-epochs", "1", "--lr-warmup-decay", "inf"], "--lr-warmup-decay"),
    (["--bias-weight-decay", "nan"], "--bias-weight-decay"), (["--lr-gamma", "1e30"], "--lr-gamma"),
    (["--mixup-alpha", "-1"], "--mixup-alpha"), (["--accumulation-steps", "100000000000000000000"],
                                                 "--accumulation-steps"),
    (["--start-epoch", "-1"], "--start-epoch"), (["-j", "100000000000000000000"], "--workers"),
    (["--ra-sampler", "--ra-reps", "100000000000000000000"], "--ra-reps"),
    (["-b", "100000000000000000000"], "--batch-size"), (["--seed", "100000000000000000000"], "--seed"),
    (["--lr-step-size", "0"], "--lr-step-size"), (["--label-smoothing", "inf"], "--label-smoothing"),
    (["--device", "meta"], "--device"), (["-b", "1e20"], "--batch-size"), (["--keep-last", "0", "--output-dir", "x"],
                                                                          "--keep-last"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "named"), BAD)
def test_bad_numeric_flag_is_one_line_before_any_work(flags, named, capsys, no_work):
    one_line_error(capsys, [*FAST, *flags], named)


@settings(max_examples=60, deadline=None)
@given(flag=st.sampled_from(["--lr", "--momentum", "--wd", "--clip-grad-norm", "--lr-gamma", "--label-smoothing",
                             "--mixup-alpha", "--cutmix-alpha", "--random-erase", "--bias-weight-decay",
                             "--lr-warmup-decay", "--sparsity-level", "--t-end", "--alpha", "--ablation"]),
       value=st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_accepted_in_range_or_refused_in_one_line(flag, value):
    """Property: each float flag's value is either within its range (the check passes) or refused with one
    line naming the flag; never a traceback, never a NaN/Inf accepted."""
    dest = {"--wd": "weight_decay"}.get(flag, flag[2:].replace("-", "_"))
    args = copy.copy(PARSED)
    setattr(args, dest, value)
    if dest in DST_RANGES:  # the --dst options: checked by DSTSettings, once
        args.dst = "srigl"
        (lo, hi), check = DST_RANGES[dest], cli_train.dst_settings
    else:
        (lo, hi), check = cli_train.RANGES[dest], cli_train.check_ranges
    try:
        check(args)
    except ss.SemisparseError as exc:
        assert flag in str(exc) and "\n" not in str(exc)
        assert not (math.isfinite(value) and lo < value < hi)
        return
    assert math.isfinite(value) and lo <= value <= hi


DST_RANGES = {"sparsity_level": (0.0, 1.0), "t_end": (0.0, 1.0), "alpha": (0.0, 1.0), "ablation": (0.0, 1.0)}


PARSED = cli_train.parse_args(FAST[1:])


def test_float_flags_parse_what_check_ranges_sees(capsys, no_work):
    one_line_error(capsys, [*FAST, "--lr=-1e+16"], "--lr")
    one_line_error(capsys, [*FAST, "--momentum=1"], "--momentum", "[0, 1)")


def test_argparse_type_error_is_one_line(capsys):
    err = one_line_error(capsys, [*FAST, "--epochs", "ten"], "--epochs", "invalid int value")
    assert "usage:" not in err


@pytest.mark.parametrize("argv", [["export"], ["report", "x", "--input-size", "3xq"], ["eval"]])
def test_other_commands_argparse_errors_are_one_line(argv, capsys):
    assert "usage:" not in one_line_error(capsys, argv, f"semisparse {argv[0]} --help")


def test_sparsity_spelled_as_a_pattern_gets_a_hint(capsys):
    one_line_error(capsys, [*FAST, "--sparsity", "2:4"], "invalid choice", "sparse_2x4", "--pattern")


def test_help_has_sections_and_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for section in ("data:", "model:", "optimisation:", "sparsity (masks fixed or learned):",
                    "learned masks (--sparsity gumbel_2x4):", "dynamic sparse training (--dst):",
                    "run, output and deploy:"):
        assert f"\n{section}\n" in out, section
    assert "\nother:\n" not in out  # every flag has its section
    parser = cli_train.get_args_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and action.nargs != 0:
            assert "default" in formatter._get_help_string(action), action.dest


def test_library_keywords_are_named_as_flags():
    from semisparse.models import create_model

    model = create_model("digits_cnn", num_classes=10)
    text = cli_train.cli_words(str(ss.sparsify(model, "2:4")))
    assert "pad=True" not in text and "--aug-for-2x4" in text


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "lr: [1, 2]\n" * 10])
def test_binary_or_wrong_config_is_one_line(content, tmp_path, capsys, no_work):
    path = tmp_path / "c.yaml"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    one_line_error(capsys, [*FAST, "--config", str(path)], "--config")


def test_config_folder_is_one_line(tmp_path, capsys, no_work):
    one_line_error(capsys, [*FAST, "--config", str(tmp_path)], "--config", "folder")


def test_yaml_alias_bomb_does_not_expand(tmp_path, capsys, no_work):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"{'abcdefghij'[i]}: &{'abcdefghij'[i]} [*{'abcdefghij'[i - 1]}" + f", *{'abcdefghij'[i - 1]}"
                      * 8 + "]")
    levels.append("lr: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    assert path.stat().st_size < 600
    t0 = time.perf_counter()
    err = one_line_error(capsys, [*FAST, "--config", str(path)], "--config", "aliases")
    assert time.perf_counter() - t0 < 5 and len(err) < 400


def test_huge_value_in_an_error_is_truncated(tmp_path, capsys, no_work):
    path = tmp_path / "long.yaml"
    path.write_text("lr: " + "9" * 100_000 + "x\n")
    err = one_line_error(capsys, [*FAST, "--config", str(path)], "--lr")
    assert len(err) < 500


def test_unwritable_output_dir_is_refused_at_start(tmp_path, capsys, no_work):
    if os.geteuid() == 0:
        target = "/sys/kernel"  # root writes anywhere else
        if not os.path.isdir(target):
            pytest.skip("no read-only folder to try as root")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    one_line_error(capsys, [*FAST, "--epochs", "1", "--output-dir", str(target)], "not writable")


def test_export_to_a_folder_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    from semisparse.cli import inspect

    monkeypatch.setattr(inspect, "load_training_checkpoint", lambda *a, **k: pytest.fail("loaded first"))
    ckpt = tmp_path / "c.pth"
    torch.save({"model": {}}, ckpt)
    one_line_error(capsys, ["export", str(ckpt), "-o", str(tmp_path)], "folder")


def test_ss_load_of_a_training_checkpoint_says_export_first(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ss.SemisparseError, match="training checkpoint.*semisparse export"):
        ss.load(path)


@pytest.mark.parametrize("device", ["gpu", "tpu:0"])
def test_deploy_unknown_device_is_one_line(device):
    from semisparse.models import create_model

    model = create_model("digits_cnn", num_classes=10)
    ss.sparsify(model, "2:4")
    with pytest.raises(ss.SemisparseError, match="unknown device"):
        ss.deploy(model, device=device)


# --- what a run says ------------------------------------------------------------------------------------------


def test_learning_masks_on_random_weights_warns(capsys, monkeypatch):
    monkeypatch.setattr(cli_train, "fit", lambda *a, **k: [])
    assert main([*FAST, "--epochs", "1", "--sparsity", "gumbel_2x4", "--trainable", "gumbel_2x4",
                 "--apex-verbosity", "0"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--weights" in warnings[0] and "frozen" in warnings[0]


def test_dst_that_never_updates_warns_and_prints_its_schedule(capsys, monkeypatch):
    monkeypatch.setattr(cli_train, "fit", lambda *a, **k: [])
    assert main([*FAST, "--epochs", "1", "--dst", "srigl", "--apex-verbosity", "0"]) == 0
    cap = capsys.readouterr()
    assert "srigl: topology update every 100 steps before step 4 (0 updates)" in cap.out
    warnings = [line for line in cap.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "never updates" in warnings[0] and "--delta" in warnings[0]


def test_dst_metrics_record_updates_and_ablations(tmp_path, capsys):
    assert main([*FAST, "-b", "128", "--epochs", "1", "--dst", "srigl", "--delta", "4", "--ablation", "0.3",
                 "--apex-verbosity", "0", "--output-dir", str(tmp_path)]) == 0
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["dst_updates"] == 2  # 12 steps, t_end 9: updates after steps 4 and 8
    assert isinstance(row["dst_ablated_neurons"], int) and row["dst_ablated_neurons"] >= 0
    out = capsys.readouterr().out
    assert "(2 updates)" in out


def test_banner_summary_resume_line_keep_last_and_ctrl_c(tmp_path, capsys, monkeypatch):
    assert main([*FAST, "--epochs", "2", "--output-dir", str(tmp_path), "--keep-last", "1", "--print-freq",
                 "3"]) == 0
    out = capsys.readouterr().out
    assert "digits_cnn (89,930 parameters, 89,930 trainable) on cpu" in out
    assert "1,440 train / 357 val images, 10 classes" in out
    assert "options: " in out and "--keep-last 1" in out
    assert " img/s eta 0:00:" in out and " data 0." in out
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best = max(metrics, key=lambda r: r["val_acc1"])
    assert f"best val_acc1 {best['val_acc1']:.2f} (epoch {best['epoch']})" in out
    assert f"checkpoint {tmp_path / 'checkpoint.pth'}" in out
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_1.pth"]
    assert main([*FAST, "--epochs", "3", "--resume", str(tmp_path / "checkpoint.pth"), "--output-dir",
                 str(tmp_path), "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 1 done" in out and "continuing at epoch 2 of 3" in out
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_2.pth"]

    def interrupted(*a, **k):  # Ctrl-C during training: the command that continues the run, no traceback
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "fit", interrupted)
    ckpt = tmp_path / "checkpoint.pth"
    assert main([*FAST, "--epochs", "4", "--resume", str(ckpt), "--output-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [f"semisparse: interrupted; continue with: semisparse train --resume {ckpt} --output-dir "
                        f"{tmp_path}", "semisparse: interrupted"]


def test_ctrl_c_during_start_up_is_one_line(capsys, monkeypatch):
    import semisparse.cli as cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert main(["train", "--epochs", "1"]) == 130
    assert capsys.readouterr().err.strip() == "semisparse: interrupted"
