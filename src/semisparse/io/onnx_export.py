"""ONNX export of a masked model: a plain graph with the zeros in place, for TensorRT's sparse engines.

The masks are multiplied into the weights before export, so the graph holds ordinary initializers that are
exactly N:M (2:4: what ``trtexec --sparsity=enable`` looks for) and no mask or multiply node. Needs the
``onnx`` extra (``pip install semisparse[onnx]``: onnx, onnxscript); nothing else imports it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import SemisparseError
from ..masking.parametrization import detached_copy
from ..runtime.example import default_example_input

__all__ = ["export_onnx"]


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor | None = None, *,
                opset: int = 18, dynamic_batch: bool = True) -> Path:
    """Write ``model`` (masked by ``ss.sparsify`` / ``ss.load``, or plain) as ONNX at ``path``; returns it.

    ``example_input``: one input (default ``(1, C, 224, 224)`` guessed from the first conv). The export is
    of an fp32 eval copy with every mask baked in; the user's model is not changed. ``dynamic_batch``:
    the first input dimension is symbolic. The exporter is ``torch.onnx.export(dynamo=True)`` (the
    TorchScript one cannot export ``nn.MultiheadAttention``'s fused eval path).
    """

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise SemisparseError("ONNX export needs onnx and onnxscript: pip install 'semisparse[onnx]'") from None
    m = detached_copy(model)[0].float()
    x = example_input if example_input is not None else default_example_input(model, 1)
    x = x.detach().cpu().float()
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation / tracer chatter
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        try:
            prog = torch.onnx.export(m, (x,), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                     input_names=["input"], output_names=["output"], verbose=False)
        except Exception as exc:
            raise SemisparseError(f"torch.onnx.export could not export the model: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        prog.save(str(path))
    return path
