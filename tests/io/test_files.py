"""Writing files: only a regular file is ever replaced (never a device, FIFO, socket or symlink); new files
get the mode an ordinary write gives; a failed write (a full disk) is one line naming the file and keeps the
old one; a float16 file never stores a weight as inf."""

import os
import socket
import stat

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.cli import main as cli
from semisparse.errors import SemisparseError
from semisparse.io import files as io_files
from semisparse.train.checkpoint import atomic_save


def small() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ss.sparsify(model, "2:4")
    return model


def _fifo(path):
    os.mkfifo(path)


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


def _device(path):  # a /dev/null of our own (major 1, minor 3): root only
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")


def _symlink(path):
    real = path.parent / "real.bin"
    real.write_bytes(b"the file the link points to")
    os.symlink(real.name, path)


def _folder(path):
    path.mkdir()


KINDS = {"a FIFO": _fifo, "a socket": _socket, "a character device": _device, "a symlink": _symlink,
         "a folder": _folder}  # fmt: skip
WRITERS = {
    "ss.save": lambda p: ss.save(small(), p),
    "atomic_save": lambda p: atomic_save({"x": torch.ones(2)}, str(p)),
    "write_json": lambda p: io_files.write_json(p, {"a": 1}),
}


def _state(path):
    st = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return st.st_ino, stat.S_IFMT(st.st_mode), link


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_target_that_is_not_a_regular_file_is_refused_in_one_line_and_kept(tmp_path, kind, writer):
    target = tmp_path / "target"
    keep = KINDS[kind](target)  # noqa: F841 - a bound socket must stay open
    before = _state(target)
    with pytest.raises(SemisparseError, match=f"cannot write {target}: it is {kind}") as info:
        WRITERS[writer](target)
    assert len(str(info.value).splitlines()) == 1
    assert _state(target) == before  # not replaced
    assert sorted(os.listdir(tmp_path)) == sorted({"target", *(["real.bin"] if kind == "a symlink" else [])})
    if kind == "a symlink":
        assert (tmp_path / "real.bin").read_bytes() == b"the file the link points to"


def test_export_to_a_device_node_or_a_fifo_is_refused_in_one_line(tmp_path, capsys):
    from semisparse.models import create_model

    model = create_model("digits_cnn", num_classes=10)
    ss.sparsify(model, "2:4")
    ckpt = tmp_path / "checkpoint.pth"
    atomic_save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": None, "epoch": 0, "args": {},
               "arch": dict(model.semisparse_arch), "sparsity": {"pattern": "2:4", "masks": ss.masks(model)}},
              str(ckpt))  # fmt: skip
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    capsys.readouterr()
    assert cli(["export", str(ckpt), "-o", str(fifo)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {fifo}: it is a FIFO" in err, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_of_an_ordinary_write_and_a_replaced_file_keeps_its_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        for name, write in WRITERS.items():
            path = tmp_path / name
            write(path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, name
            os.chmod(path, 0o640)
            write(path)  # replaced: the mode its owner gave it stays
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, name
    finally:
        os.umask(old)


def test_a_write_failing_like_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    import resource
    import signal

    old = tmp_path / "checkpoint.pth"
    atomic_save({"x": torch.ones(4)}, str(old))
    before = old.read_bytes()
    writes = [("checkpoint.pth", lambda p: atomic_save({"x": torch.ones(1_000_000)}, p)),
              ("model.safetensors", lambda p: ss.save(nn.Linear(1000, 1000), p))]  # fmt: skip
    lines = []
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limit[1]))  # as a full disk would, from 200 kB on
    try:
        for name, write in writes:
            with pytest.raises(SemisparseError) as info:
                write(str(tmp_path / name))
            lines.append(str(info.value))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    for line, (name, _) in zip(lines, writes):
        assert line.startswith(f"cannot write {tmp_path / name}: ") and "nothing was replaced" in line, line
        assert "File too large" in line or "could not be written in full" in line, line
        assert len(line.splitlines()) == 1 and "inline_container" not in line, line
    assert old.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left


@pytest.mark.parametrize("where", ["0.weight", "2.bias"])
def test_saving_as_float16_refuses_a_value_float16_cannot_hold_naming_the_layer_and_value(tmp_path, where):
    model = small()
    with torch.no_grad():
        if where == "0.weight":  # a kept entry of a sparse weight
            kept = ss.masks(model)["0.weight"].reshape(-1).nonzero()[0, 0]
            model[0].parametrizations.weight.original.view(-1)[kept] = -1e5
        else:
            model[2].bias[1] = 1e5
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(SemisparseError, match=rf"cannot store {where} as float16: .*100000") as info:
        ss.save(model, path, dtype=torch.float16)
    assert len(str(info.value).splitlines()) == 1 and path.read_bytes() == b"old"
    ss.save(model, path, dtype=torch.bfloat16)  # bfloat16 holds it
    ss.save(model, path)


def test_a_weight_that_is_inf_already_or_masked_out_is_stored_as_float16(tmp_path):
    model = small()
    with torch.no_grad():
        dropped = (~ss.masks(model)["0.weight"]).reshape(-1).nonzero()[0, 0]
        model[0].parametrizations.weight.original.view(-1)[dropped] = 1e6  # masked out: not stored
        model[2].bias[0] = float("inf")  # inf already: stored as it is
    path = tmp_path / "m.safetensors"
    ss.save(model, path, dtype=torch.float16)
    loaded = ss.load(path, model=small())
    assert loaded[2].bias[0] == float("inf")
