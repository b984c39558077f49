"""Optimizers and learning-rate schedules of the torchvision reference recipe.

``build_optimizer`` splits parameters into weight-decay groups (norm layers, biases, ViT embeddings,
and the sparsity parametrizations' own parameters such as learned mask logits, which never decay);
``build_lr_scheduler`` gives a per-epoch schedule with optional warm-up.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SemisparseError
from ..masking import SparseParametrization

OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw", "rmsprop")
SCHEDULERS = ("steplr", "cosineannealinglr", "exponentiallr")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LocalResponseNorm)  # fmt: skip
_EMBEDDINGS = ("class_token", "position_embedding", "relative_position_bias_table", "cls_token", "pos_embed")


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
    embedding_decay: float | None = None,
) -> list[dict]:
    """Trainable parameters grouped by weight decay (``None`` = same as ``weight_decay``)."""
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            wd = weight_decay
            if isinstance(module, SparseParametrization):
                wd = 0.0  # mask logits / scores: decaying them would pull every mask towards uniform
            elif isinstance(module, _NORMS) and norm_weight_decay is not None:
                wd = norm_weight_decay
            elif name == "bias" and bias_weight_decay is not None:
                wd = bias_weight_decay
            elif name in _EMBEDDINGS and embedding_decay is not None:
                wd = embedding_decay
            groups.setdefault(wd, []).append(p)
    return [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]


def build_optimizer(
    model: nn.Module,
    opt: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
    embedding_decay: float | None = None,
) -> torch.optim.Optimizer:
    """``sgd``, ``sgd_nesterov``, ``adamw`` or ``rmsprop`` (torchvision's eps=0.0316, alpha=0.9)."""
    opt = opt.lower()
    groups = parameter_groups(model, weight_decay, norm_weight_decay, bias_weight_decay, embedding_decay)
    if not groups:
        raise SemisparseError("the model has no trainable parameters (check --trainable)")
    if opt.startswith("sgd"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov="nesterov" in opt)
    if opt == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=0.0316, alpha=0.9)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise SemisparseError(f"unknown --opt {opt!r}; expected one of {', '.join(OPTIMIZERS)}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "steplr",
    epochs: int = 90,
    warmup_epochs: int = 0,
    warmup_method: str = "constant",
    warmup_decay: float = 0.01,
    step_size: int = 30,
    gamma: float = 0.1,
    lr_min: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule (``.step()`` once an epoch), with a linear/constant warm-up first."""
    name = name.lower()
    S = torch.optim.lr_scheduler
    if name == "steplr":
        main = S.StepLR(optimizer, step_size=step_size, gamma=gamma)
    elif name == "cosineannealinglr":
        main = S.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup_epochs), eta_min=lr_min)
    elif name == "exponentiallr":
        main = S.ExponentialLR(optimizer, gamma=gamma)
    else:
        raise SemisparseError(f"unknown --lr-scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    if warmup_epochs <= 0:
        return main
    method = warmup_method.lower()
    if method == "linear":
        warm = S.LinearLR(optimizer, start_factor=warmup_decay, total_iters=warmup_epochs)
    elif method == "constant":
        warm = S.ConstantLR(optimizer, factor=warmup_decay, total_iters=warmup_epochs)
    else:
        raise SemisparseError(f"unknown --lr-warmup-method {warmup_method!r}; expected linear or constant")
    return S.SequentialLR(optimizer, [warm, main], milestones=[warmup_epochs])
