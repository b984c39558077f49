"""``semisparse report PATH`` and ``semisparse export CHECKPOINT``: inspect; write the compressed form.

``report`` reads either a training checkpoint (``torch.save`` of ``{"model", "arch", "args", "sparsity"}``)
or a compressed file written by ``ss.save`` / ``export``, and prints the per-layer sparsity report (plus,
for a compressed file, its size against the same model stored dense). ``export`` rebuilds the model of a
training checkpoint, applies its masks and writes the compressed safetensors file.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SemisparseError
from ..io import compressed as ckpt_io
from ..io.files import check_file, check_write_target, is_safetensors
from ..masking import LayerReport, Report, report
from ..masking import masks as ss_masks
from ..models import create_model
from ..train.checkpoint import load_training_checkpoint
from .args import OneLineParser


def _input_size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 3x224x224, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 3x224x224, got {text!r}")
    return dims


def get_report_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="semisparse report",
        description="Per-layer sparsity report of a training "
        "checkpoint or of a compressed file written by `semisparse export` / ss.save.",
    )
    p.add_argument("path", help="training checkpoint (.pth) or compressed file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument(
        "--input-size",
        type=_input_size,
        default=None,
        metavar="CxHxW",
        help="one example input's size (e.g. 3x224x224) to count MACs and the sparse share of them",
    )
    p.add_argument(
        "--model", default=None, help="model name, for a file that does not record its architecture"
    )
    p.add_argument("--num-classes", type=int, default=None, help="with --model: number of classes")
    return p


def get_export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="semisparse export",
        description="Write the compressed safetensors form "
        "(kept values + indices, no pickle) of a training checkpoint.",
    )
    p.add_argument("checkpoint", help="training checkpoint written by `semisparse train` (.pth)")
    p.add_argument("-o", "--output", default=None, help="output file (default: CHECKPOINT with .safetensors)")
    p.add_argument("--fp16", action="store_true", help="store floating tensors as float16")
    p.add_argument("--bf16", action="store_true", help="store floating tensors as bfloat16")
    p.add_argument("--keep-dense", action="store_true", help="also keep the dense weights under the masks")
    p.add_argument("--model", default=None, help="model name, for a checkpoint that does not record its arch")
    p.add_argument("--num-classes", type=int, default=None, help="with --model: number of classes")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--onnx", action="store_true",
                   help="write a plain ONNX graph instead (masks baked in: zeros in place, no mask nodes), e.g. for "
                   "TensorRT's sparse engines; CHECKPOINT may also be a compressed file")
    p.add_argument("--input-size", type=_input_size, default=None, metavar="CxHxW",
                   help="with --onnx: one input's size (default: guessed from the model, 3x224x224 for ImageNet)")
    return p


def _export_onnx(args: argparse.Namespace) -> int:
    """``semisparse export --onnx``: see :func:`semisparse.io.onnx_export.export_onnx`."""
    from ..io.onnx_export import export_onnx

    src = Path(args.checkpoint)
    dst = Path(args.output) if args.output else src.with_suffix(".onnx")
    if dst.resolve() == src.resolve():
        raise SemisparseError(f"output {dst} would overwrite the checkpoint; pass -o OUT")
    check_write_target(dst)  # a folder, a device or a FIFO: refused before any work
    if is_compressed(src):
        model = ckpt_io.load(src, model=_given_model(args))
    else:
        model, _ = load_training_checkpoint(src, model=_given_model(args))
    example = None if args.input_size is None else torch.randn(1, *args.input_size)
    export_onnx(model, dst, example)
    result = {"output": str(dst), "sparse_layers": len(ss_masks(model)), "bytes": dst.stat().st_size}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {dst}: {_mb(result['bytes'])}, {result['sparse_layers']} sparse weights with zeros in place")
    return 0


def _given_model(args: argparse.Namespace) -> torch.nn.Module | None:
    if args.model is None:
        if args.num_classes is not None:
            raise SemisparseError("--num-classes needs --model")
        return None
    kw = {} if args.num_classes is None else {"num_classes": args.num_classes}
    return create_model(args.model, **kw)


def is_compressed(path: str | Path) -> bool:
    """True for a safetensors file (8-byte header length, then JSON), False for a torch.save zip/pickle."""
    path = Path(path)
    check_file(path, "file")
    return is_safetensors(path)


def _header_report(header: dict, path: Path) -> Report:
    """A report from the compressed file's header alone (when its model cannot be rebuilt)."""
    rows = []
    for key, e in header["layers"].items():
        t = e.get("target", {})
        pattern = {"nm": f"{t.get('n')}:{t.get('m')}", "fanin": f"fan-in {t.get('k')}"}.get(
            t.get("kind"), "unstructured"
        )
        numel = math.prod(e["shape"])
        rows.append(
            LayerReport(
                key,
                e["layout"],
                tuple(e["shape"]),
                pattern,
                e["kept"] / max(1, numel),
                numel,
                extra={"encoding": e["encoding"]},
            )
        )
    stats = ("running_mean", "running_var", "num_batches_tracked")
    with safe_open(str(path), framework="pt") as f:
        dense = sum(math.prod(f.get_slice(n).get_shape()) for n in header["dense"] if not n.endswith(stats))
    rep = Report(rows, sum(r.params for r in rows) + dense)
    rep.notes.append(
        "(model not rebuilt: only the sparse layers recorded in the file are listed; pass --model)"
    )
    return rep


def main_report(argv: list[str] | None = None) -> int:
    args = get_report_parser().parse_args(argv)
    path = Path(args.path)
    example = None if args.input_size is None else torch.zeros(1, *args.input_size)
    out: dict = {"path": str(path)}
    if is_compressed(path):
        header = ckpt_io.verify(path)  # every tensor read and checked against the digest before anything else
        out |= {"kind": "compressed"} | ckpt_io.sizes(path)
        model = _given_model(args)
        if model is None and not (header.get("arch") or {}).get("name"):
            rep = _header_report(header, path)
        else:
            model = ckpt_io.load(path, model=model)
            rep = report(model, example_input=example)
        out["arch"] = header.get("arch")
        out["dtype"] = header.get("dtype")
        out["encodings"] = sorted({e["encoding"] for e in header["layers"].values()})
    else:
        model, info = load_training_checkpoint(path, model=_given_model(args))
        rep = report(model, example_input=example)
        out |= {
            "kind": "training checkpoint",
            "arch": getattr(model, "semisparse_arch", None),
            "sparsity": _jsonable(info),
        }
    if args.json:
        print(json.dumps(out | {"report": rep.to_dict()}, indent=2))
        return 0
    print(rep)
    if out["kind"] == "compressed":
        print(
            f"file: {_mb(out['file_bytes'])} vs {_mb(out['dense_bytes'])} dense in the same dtype "
            f"({out['ratio']:.3f}x); encodings: {', '.join(out['encodings']) or 'none (all dense)'}"
        )
    elif out["sparsity"]:
        print("sparsity: " + ", ".join(f"{k}={v}" for k, v in out["sparsity"].items()))
    return 0


def main_export(argv: list[str] | None = None) -> int:
    args = get_export_parser().parse_args(argv)
    if args.fp16 and args.bf16:
        raise SemisparseError("choose one of --fp16 and --bf16")
    if args.onnx:
        return _export_onnx(args)
    src = Path(args.checkpoint)
    if is_compressed(src):
        raise SemisparseError(
            f"{src} is already a compressed file; `semisparse export` reads training checkpoints"
        )
    dst = Path(args.output) if args.output else src.with_suffix(".safetensors")
    if dst.is_dir():  # refused before the work, not after it
        raise SemisparseError(f"-o {dst} is a folder; expected the path of the file to write (e.g. {dst}/model"
                              ".safetensors)")  # fmt: skip
    if dst.resolve() == src.resolve():
        raise SemisparseError(f"output {dst} would overwrite the checkpoint; pass -o OUT")
    check_write_target(dst)  # a folder, a device or a FIFO: refused before any work
    model, _ = load_training_checkpoint(src, model=_given_model(args))
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    ckpt_io.save(model, dst, dtype=dtype, keep_dense=args.keep_dense)
    size = ckpt_io.sizes(dst)
    n_sparse = len(ckpt_io.read_header(dst)["layers"])
    result = {"output": str(dst), "sparse_layers": n_sparse, **size}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"wrote {dst}: {_mb(size['file_bytes'])}, {size['ratio']:.3f}x of the dense "
            f"{_mb(size['dense_bytes'])}; {n_sparse} sparse weights stored as values + indices"
        )
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _jsonable(d: dict) -> dict:
    return {
        k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
        for k, v in d.items()
    }
