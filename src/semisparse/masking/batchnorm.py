"""BatchNorm statistics re-estimated after pruning: the running mean/var the pruned weights really produce.

Pruning shifts every layer's output distribution, and BatchNorm layers that normalise with the dense
model's statistics then mis-scale them; re-estimating the statistics on a few hundred unlabeled inputs
recovers much of a one-shot mask's loss (a cumulative average, as torch's ``momentum=None``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SemisparseError
from .calibration import Calibration, prepare

_BN = nn.modules.batchnorm._BatchNorm


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` has a BatchNorm layer tracking running statistics."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


def recalibrate_bn(
    model: nn.Module,
    batches: object,
    calib_batches: int | None = None,
    collect: Callable[[object], object] | None = None,
) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them on ``batches``; returns ``model``.

    ``batches`` takes the calibration forms of ``ss.sparsify`` (batches, a DataLoader, ``forward_loop``).
    Only BatchNorm layers run in training mode; every module's mode and momentum are restored afterwards,
    and on an error the statistics are put back as they were.
    """
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        raise SemisparseError("the model has no BatchNorm layer with running statistics to recalibrate")
    calib = batches if isinstance(batches, Calibration) else prepare(batches, model, calib_batches, collect)
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None})
             for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            calib.run(model)
        except SemisparseError:
            raise
        except Exception as e:  # noqa: BLE001 - the model's own error, in one line
            lines = str(e).strip().splitlines()
            raise SemisparseError(
                f"the model rejected the calibration inputs ({type(e).__name__}: {lines[0] if lines else ''})"
            ) from None
    except BaseException:
        with torch.no_grad():
            for m, _, bufs in saved:
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        for m, t in modes:
            m.training = t
    return model
