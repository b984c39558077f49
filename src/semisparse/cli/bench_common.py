"""What ``semisparse bench`` (CPU), its CUDA rows and the demo share: the text tables, the end of a run
(table and JSON), and SRigL-like masks made without training."""

from __future__ import annotations

import torch
from torch import nn

from ..dst.budgets import erk_densities, fanin_budgets
from ..io.files import write_json
from ..layout import plan
from ..patterns import fanin_mask

__all__ = ["finish", "srigl_like_masks", "table"]


def table(head: list[str], body: list[list[str]]) -> list[str]:
    """Lines of a text table: the first column left-aligned, the others right-aligned, a rule under the head."""
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]


def finish(text: str, json_path: str | None, info: dict, rows: list[dict]) -> int:
    """Print a run's table and, when asked, write ``{"machine", "results"}`` as JSON; the exit status (0)."""
    print()
    print(text)
    if json_path:
        write_json(json_path, {"machine": info, "results": rows}, indent=2)
        print(f"wrote {json_path}")
    return 0


def srigl_like_masks(model: nn.Module, sparsity: float, ablation: float) -> dict[str, torch.Tensor]:
    """SRigL's structure without training: ERK per-layer density as a constant fan-in (magnitude top-k
    per neuron), and the ``ablation`` share of neurons with the smallest norms of every layer but the last
    fully masked (ablated). Layers ERK leaves dense get no mask."""
    cands = [c for c in plan(model, None) if c.eligible]
    shapes = [c.weight_shape for c in cands]
    dens = erk_densities(shapes, sparsity)
    ks = fanin_budgets(shapes, dens)
    out = {}
    for i, (c, d, k) in enumerate(zip(cands, dens, ks)):
        if d >= 1.0:
            continue
        w = getattr(c.module, c.param).detach()
        view = c.layout.to_view(w.abs())
        m = fanin_mask(view, k)
        if ablation > 0 and i < len(cands) - 1:
            n_abl = int(ablation * view.shape[0])
            if n_abl:
                gone = torch.topk((view * m).sum(1), n_abl, largest=False).indices
                m[gone] = False
        out[c.key] = c.layout.from_view(m)
    return out
