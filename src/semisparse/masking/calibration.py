"""Calibration inputs: the forms a user may pass, turned into one way of running the model on them.

Accepted forms (``calibration=`` of the calibrated one-shot methods and of ``recalibrate_bn``):

* an iterable of batches: a tensor (``model(x)``), a tuple/list of tensors (``model(*batch)``) or a dict
  (``model(**batch)``);
* a ``torch.utils.data.DataLoader``: the first element of each batch is the input (``(images, labels)``),
  or whatever ``collect(batch)`` returns;
* a callable ``forward_loop(model)`` that runs the model on its own data.

``calib_batches`` caps the number of batches taken. Batches are moved to the model's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SemisparseError

Call = tuple[tuple, dict]


@dataclass
class Calibration:
    """The calibration set, as materialised calls of the model, or a user loop that makes its own calls."""

    calls: list[Call] | None
    forward_loop: Callable[[nn.Module], object] | None = None

    def run(self, model: nn.Module, on_call: Callable[[int], None] | None = None) -> None:
        """Run ``model`` on every calibration batch (under ``no_grad``); ``on_call(i)`` before call ``i``."""
        with torch.no_grad():
            if self.forward_loop is not None:
                self.forward_loop(model)
                return
            for i, (args, kwargs) in enumerate(self.calls):
                if on_call is not None:
                    on_call(i)
                model(*args, **kwargs)

    def concatenated(self) -> Calibration:
        """The same set as one forward when its batches are single tensors of one shape (one sweep pass).

        The whole set's activations at one layer are then held at once, as SparseGPT holds a block's inputs.
        """
        return self if self.calls is None else Calibration(_concat(self.calls))

    @property
    def streamed(self) -> bool:
        """True when the calls cannot be replayed one at a time (a user loop)."""
        return self.forward_loop is not None


def _is_tensor_tree(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return all(_is_tensor_tree(v) for v in x)
    if isinstance(x, Mapping):
        return all(_is_tensor_tree(v) for v in x.values())
    return False


def _to(x: object, device: torch.device) -> object:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _as_call(batch: object, index: int, device: torch.device) -> Call:
    if isinstance(batch, torch.Tensor):
        return (batch.to(device),), {}
    if isinstance(batch, Mapping) and batch and all(isinstance(k, str) for k in batch) and _is_tensor_tree(batch):
        return (), dict(_to(batch, device))
    if isinstance(batch, (tuple, list)) and batch and _is_tensor_tree(batch):
        return tuple(_to(batch, device)), {}
    raise SemisparseError(
        f"calibration batch {index} is a {type(batch).__name__}, not an input of the model; expected a tensor, "
        "a tuple of tensors, a dict of tensors, a DataLoader of (input, ...) batches or a forward_loop(model)"
    )


def _concat(calls: list[Call]) -> list[Call]:
    """One call with every batch concatenated along dim 0, when every batch is one tensor of the same shape.

    Tuples and dicts stay separate calls: which of their tensors run along the batch is not known.
    """
    if len(calls) < 2 or any(kw or len(args) != 1 for args, kw in calls):
        return calls
    first = calls[0][0][0]
    if first.dim() == 0 or any(a[0].shape[1:] != first.shape[1:] or a[0].dtype != first.dtype for a, _ in calls):
        return calls
    return [((torch.cat([a[0] for a, _ in calls]),), {})]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare(
    calibration: object,
    model: nn.Module,
    calib_batches: int | None = None,
    collect: Callable[[object], object] | None = None,
) -> Calibration:
    """The calibration set in a runnable form; a one-line :class:`SemisparseError` on bad input."""
    if calib_batches is not None and (isinstance(calib_batches, bool) or not isinstance(calib_batches, int)
                                      or calib_batches < 1):
        raise SemisparseError(f"calib_batches must be a positive int (batches taken), got {calib_batches!r}")
    if collect is not None and not callable(collect):
        raise SemisparseError(f"collect must be a callable batch -> model input, got {type(collect).__name__}")
    if calibration is None:
        raise SemisparseError(
            "this method needs calibration=...: input batches, a DataLoader or a forward_loop(model) callable"
        )
    if isinstance(calibration, (torch.Tensor, str, bytes)):
        raise SemisparseError(
            f"calibration must be an iterable of batches (e.g. [x1, x2] or a DataLoader), a forward_loop(model) "
            f"callable, not a single {type(calibration).__name__}"
        )
    if callable(calibration) and not isinstance(calibration, (torch.utils.data.DataLoader, nn.Module)):
        return Calibration(None, calibration)
    if not isinstance(calibration, Iterable):
        raise SemisparseError(
            f"calibration must be an iterable of batches, a DataLoader or a forward_loop(model), "
            f"got {type(calibration).__name__}"
        )
    loader = isinstance(calibration, torch.utils.data.DataLoader)
    device = model_device(model)
    calls = []
    for i, batch in enumerate(calibration):
        if calib_batches is not None and i >= calib_batches:
            break
        if collect is not None:
            batch = collect(batch)
        elif loader and isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        calls.append(_as_call(batch, i, device))
    if not calls:
        raise SemisparseError("calibration is empty: pass at least one input batch")
    return Calibration(calls)
