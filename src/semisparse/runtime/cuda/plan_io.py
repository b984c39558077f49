"""Save a CUDA deployment's plan with its compressed weights, algorithm ids and kernel configs; load it
without re-planning.

A serving process calls ``ss.deploy(model, device="cuda", plan="plan.safetensors")`` with the same masked
model: each layer is built in its saved form only, its cuSPARSELt weights taken from the file instead of
compressed again, its searched algorithm ids set, a condensed layer's Triton kernel config set (the condensed
form itself is rebuilt from the mask: cheap); nothing is timed or searched. The file is safetensors
(no pickle): one tensor per compressed GEMM weight, and a JSON header with the choices, algorithm ids, the
planner's figures, a digest of every layer's mask (a file from other masks is refused) and the environment
(GPU, torch, cuSPARSELt). In another environment the packed weights and algorithm ids are not trusted:
the saved choices and kernel configs are kept (a config is correct anywhere, if not the fastest), weights
are compressed again and ids searched again on the first run.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import SemisparseError
from .forms import SparseGemm
from .layers import PlannedLayer

FORMAT = "semisparse-cuda-plan"
VERSION = 1


def environment(backend) -> dict:
    env = {"torch": torch.__version__, **backend.describe()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - depends on the machine
        pass
    if torch.cuda.is_available() and getattr(backend, "name", "") == "cusparselt":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
    return env


def save_plan(deployed: nn.Module, path: str | os.PathLike) -> None:
    """Write ``deployed``'s plan (choices, algorithm ids, compressed weights, figures) to ``path``."""
    from safetensors.torch import save_file

    inner = getattr(deployed, "deployed", None) or getattr(deployed, "module", deployed)
    layers = [m for m in inner.modules() if isinstance(m, PlannedLayer)]
    if not layers:
        raise SemisparseError("nothing to save: the model was not deployed with ss.deploy(..., device='cuda')")
    tensors, meta = {}, {}
    for layer in layers:
        form = layer.forms[layer.choice]
        gemms = [g for g in form.modules() if isinstance(g, SparseGemm)]
        for i, g in enumerate(gemms):
            tensors[f"{layer.key}/{i}"] = g.packed.detach().cpu().contiguous()
        meta[layer.key] = {"choice": layer.choice, "alg_ids": [g.alg_id for g in gemms], "mask": layer.mask_digest,
                           "figures": layer.figures}
        config = layer.kernel_configs().get(layer.choice)
        if config is not None:
            meta[layer.key]["config"] = config
    summary = getattr(deployed, "semisparse_plan", {})
    header = {"format": FORMAT, "version": VERSION, "layers": meta, "summary": summary,
              "environment": summary.get("environment", {"torch": torch.__version__})}
    save_file(tensors, str(path), metadata={"semisparse": json.dumps(header)})


@dataclass
class SavedPlan:
    header: dict
    path: str
    tensors: dict = field(default_factory=dict)
    trusted: bool = True  # packed weights and alg ids usable here (same environment)

    def forms_for(self, key: str) -> tuple[str, ...]:
        entry = self.header["layers"].get(key)
        if entry is None:
            raise SemisparseError(f"saved plan {self.path} has no layer {key!r}: it was written for another model")
        return (entry["choice"],)

    def backend_for(self, backend, key: str):
        if not self.trusted:
            return backend
        packed = [self.tensors[f"{key}/{i}"] for i in range(len(self.header["layers"][key]["alg_ids"]))]
        return _Precompressed(backend, packed)


class _Precompressed:
    """A back-end whose ``compress`` hands out the saved packed weights in order (mm/search delegate)."""

    def __init__(self, backend, packed: list[torch.Tensor]) -> None:
        self.base, self.packed = backend, list(packed)

    def compress(self, w: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            raise SemisparseError("saved plan holds fewer compressed weights than the layer needs")
        return self.packed.pop(0).to(w.device)

    def __getattr__(self, name):
        return getattr(self.base, name)


def read_plan(path: str | os.PathLike) -> SavedPlan:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise SemisparseError(f"{path}: not a saved semisparse CUDA plan ({exc})") from exc
    header = json.loads(meta.get("semisparse", "{}"))
    if header.get("format") != FORMAT:
        raise SemisparseError(f"{path}: not a saved semisparse CUDA plan (no {FORMAT!r} header)")
    if header.get("version", 0) > VERSION:
        raise SemisparseError(f"{path}: plan format version {header['version']} is newer than this semisparse")
    return SavedPlan(header, str(path), tensors)


def load_plan_into(model: nn.Module, saved: SavedPlan) -> None:
    """Set the saved choices and algorithm ids on a model built from the saved forms; check the masks."""
    layers = {m.key: m for m in model.modules() if isinstance(m, PlannedLayer)}
    missing = sorted(set(saved.header["layers"]) - set(layers))
    if missing:
        raise SemisparseError(f"saved plan {saved.path} names layers this model does not have: {missing[:3]}")
    for key, layer in layers.items():
        entry = saved.header["layers"][key]
        if entry["mask"] != layer.mask_digest:
            raise SemisparseError(f"saved plan {saved.path}: layer {key} was planned for another mask; deploy anew")
        layer.choose(entry["choice"])
        layer.dense_choice = entry["choice"] if not layer.is_sparse else layer.dense_choice
        layer.figures = dict(entry.get("figures", {}))
        if saved.trusted:
            layer.set_alg_ids({entry["choice"]: entry["alg_ids"]})
        if entry.get("config") is not None:
            layer.set_kernel_configs({entry["choice"]: entry["config"]})


def check_environment(saved: SavedPlan, backend) -> None:
    """Trust the packed weights and algorithm ids only in the environment that wrote them."""
    here = environment(backend)
    there = saved.header.get("environment", {})
    keys = ("backend", "cusparselt", "gpu", "capability")
    if any(here.get(k) != there.get(k) for k in keys):
        saved.trusted = False
        warnings.warn(f"semisparse: plan {saved.path} was saved on {[there.get(k) for k in keys]}, this is "
                      f"{[here.get(k) for k in keys]}: weights compressed and algorithms searched again",
                      RuntimeWarning, stacklevel=3)
