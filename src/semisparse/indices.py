"""Column indices of a ``(rows, K)`` weight view, as condensed layers and compressed files store them.

uint16 while ``K <= 65,536`` (held in an int16 tensor carrying the uint16 bit pattern: 2 bytes per kept
weight, the byte budget of a batch-1 sparse layer), int32 only beyond.
"""

from __future__ import annotations

import torch

#: Largest view width the uint16 form addresses.
U16_LIMIT = 1 << 16


def store(cols: torch.Tensor, width: int) -> torch.Tensor:
    """View columns in ``[0, width)`` as int16 holding uint16 bits when ``width <= 65,536``, else int32."""
    c = cols.to(torch.int32)
    if width <= U16_LIMIT:
        return torch.where(c >= 1 << 15, c - U16_LIMIT, c).to(torch.int16)
    return c


def columns(idx: torch.Tensor) -> torch.Tensor:
    """Stored indices back to int64 view columns (int16 read as unsigned)."""
    out = idx.to(torch.int64)
    return out & 0xFFFF if idx.dtype == torch.int16 else out
