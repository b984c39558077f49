"""Dense runtimes a deployed model is measured against: torch eager, onnxruntime, OpenVINO.

Nobody serves a CNN on CPU with torch eager alone: the fair bar for a sparse model is the fastest dense
runtime a user would pick instead. :func:`dense_anchors` exports the masked model (zeros in place, the same
weights the deployed model computes with) to ONNX once and opens it in each runtime that is installed, on a
fixed number of threads; the caller times them call by call, interleaved with the deployed model, in one
process (:func:`semisparse.runtime.timing.interleaved_medians`). A runtime that is not installed, or that
cannot open the model, is skipped with a note, never an error. The packages are the ``bench`` extra
(``pip install 'semisparse[bench]'``: onnx, onnxscript, onnxruntime, openvino).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SemisparseError
from ..runtime.cpu import cpus

__all__ = ["Anchor", "dense_anchors", "torch_eager", "torch_channels_last", "fastest_at"]


@dataclass
class Anchor:
    """One dense runtime ready to run the model on a fixed input: ``fn()`` returns its output as a tensor."""

    name: str
    precision: str  # "fp32" or "bf16": what the runtime computes in
    fn: Callable[[], torch.Tensor]
    info: dict = field(default_factory=dict)


def torch_eager(model: nn.Module, x: torch.Tensor) -> Anchor:
    """torch's own eager model, each call on the threads a deployed model's call gets (:mod:`.cpus`): the dense
    side with the same thread sizing as the deployed side."""

    def fn() -> torch.Tensor:
        with cpus.fitted_threads(), torch.no_grad():
            return model(x)

    return Anchor("torch eager", "fp32", fn)


def torch_bf16_autocast(model: nn.Module, x: torch.Tensor) -> Anchor:
    """torch eager under CPU bf16 autocast (convolutions and matrix products in bf16: oneDNN's AVX512-BF16 / AMX
    kernels where the CPU has them), thread-sized like :func:`torch_eager`: the bf16 dense side for
    ``ss.deploy(dtype=torch.bfloat16)``."""

    def fn() -> torch.Tensor:
        with cpus.fitted_threads(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    return Anchor("torch bf16 autocast", "bf16", fn)


def torch_channels_last(model: nn.Module, x: torch.Tensor) -> Anchor | None:
    """torch eager with weights and input channels-last (oneDNN's NHWC convolutions: often torch's fastest dense
    CNN on CPU), thread-sized like :func:`torch_eager`; None for a model without 2-D convolutions."""
    if x.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)

    def fn() -> torch.Tensor:
        with cpus.fitted_threads(), torch.no_grad():
            return cl(xc)

    return Anchor("torch channels-last", "fp32", fn)


def dense_anchors(masked: nn.Module, x: torch.Tensor, threads: int, *, onnx_path: str | os.PathLike | None = None,
                  runtimes: tuple[str, ...] = ("onnxruntime", "openvino")) -> tuple[list[Anchor], list[str]]:
    """The installed dense runtimes, each holding ``masked`` (a semisparse-masked or plain model) exported to
    ONNX, set to ``threads`` threads; returns ``(anchors, notes)``, a note per runtime skipped and why.

    OpenVINO gives two anchors where its default precision on this CPU is not f32 (bf16 on AVX512-BF16 / AMX
    processors): its default, and f32; one where they are the same. ``onnx_path``: where the export goes
    (default a temporary file, removed once the runtimes hold the model)."""
    notes: list[str] = []
    wanted = [r for r in runtimes if _importable(r, notes)]
    if not wanted:
        return [], notes
    from ..io.onnx_export import export_onnx

    x = x.detach().float().contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(onnx_path) if onnx_path is not None else Path(tmp) / "anchor.onnx"
        try:
            export_onnx(masked, path, x, dynamic_batch=False)
        except SemisparseError as exc:
            return [], notes + [f"dense runtimes skipped: {exc}"]
        anchors: list[Anchor] = []
        for rt in wanted:
            try:
                anchors += _OPENERS[rt](path, x, threads)
            except Exception as exc:  # a runtime that cannot open this graph: skipped, with its reason
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                notes.append(f"{rt} skipped: cannot run the model ({type(exc).__name__}: {first})")
    return anchors, notes


def fastest_at(times: dict[str, float], anchors: list[Anchor], precision: str = "fp32") -> tuple[str, float] | None:
    """``(name, seconds)`` of the fastest anchor computing in ``precision`` among ``times`` (by anchor name)."""
    got = [(times[a.name], a.name) for a in anchors if a.precision == precision and a.name in times]
    if not got:
        return None
    t, name = min(got)
    return name, t


def _importable(runtime: str, notes: list[str]) -> bool:
    mods = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",)}[runtime]
    for mod in ("onnx", "onnxscript", *mods):
        try:
            __import__(mod)
        except ImportError:
            notes.append(f"{runtime} skipped: {mod} is not installed (pip install 'semisparse[bench]')")
            return False
    return True


def _onnxruntime(path: Path, x: torch.Tensor, threads: int) -> list[Anchor]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: x.numpy()}

    def fn() -> torch.Tensor:
        return torch.from_numpy(sess.run(None, feed)[0])

    return [Anchor("onnxruntime", "fp32", fn, {"version": ort.__version__})]


def _openvino(path: Path, x: torch.Tensor, threads: int) -> list[Anchor]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    base = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    out = []
    default = core.compile_model(model, "CPU", dict(base))
    hint = default.get_property("INFERENCE_PRECISION_HINT")
    prec = (hint.to_string() if hasattr(hint, "to_string") else str(hint)).lower()
    configs = [("openvino f32", "fp32", {"INFERENCE_PRECISION_HINT": "f32"})]
    if "f32" not in prec:  # bf16 / f16 by default on this CPU: both anchors
        configs.insert(0, (f"openvino default ({prec})", "bf16" if "bf16" in prec else prec, None))
    xn = x.numpy()
    for name, precision, extra in configs:
        same = extra is None or "f32" in prec  # the default compiled model is the f32 one where f32 is default
        compiled = default if same else core.compile_model(model, "CPU", {**base, **extra})
        req = compiled.create_infer_request()

        def fn(req=req) -> torch.Tensor:
            req.infer({0: xn})
            return torch.from_numpy(req.get_output_tensor(0).data.copy())

        out.append(Anchor(name if extra is None or "f32" not in prec else "openvino f32 (=default)",
                          precision, fn, {"version": ov.__version__.split("-")[0], "default_precision": prec}))
    return out


_OPENERS = {"onnxruntime": _onnxruntime, "openvino": _openvino}
