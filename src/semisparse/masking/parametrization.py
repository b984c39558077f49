"""The mask parametrization and how to find it again on a model.

A sparsified weight is an ordinary ``torch.nn.utils.parametrize`` parametrization, as in
``torch.ao.pruning``: ``module.weight`` computes ``original * mask`` on access, the dense ``original``
stays underneath (never zeroed, so masks can change or be removed), and the model keeps working with
``state_dict``, DDP and ``torch.compile``.

State-dict keys of a sparsified ``conv1.weight``::

    conv1.parametrizations.weight.original   # the dense weight
    conv1.parametrizations.weight.0.mask     # bool mask, the weight's shape

(``ss.masks`` and ``ss.finalize`` translate back to the original ``conv1.weight`` name.)

Every mask is put on a weight by :func:`attach` and taken off by :func:`detach` (as ``torch.ao.pruning``
has one ``prepare`` and one ``squash_mask``), and :func:`split_state_dict` / :func:`effective_state_dict`
read the keys above back into plain ones: this module is the only one that knows the parametrize machinery.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PatternError, SemisparseError
from ..layout import Layout
from ..patterns import NM, FanIn, check_view, fanin_mask, nm_mask, shared_row_scores

#: What a layer's mask must satisfy: N:M, a constant fan-in k per neuron (int), or None (unstructured).
Target = NM | int | None


def structured_mask(scores: torch.Tensor, layout: Layout, pattern: NM | FanIn,
                    shared_rows: int = 1) -> tuple[torch.Tensor, Target]:
    """The weight-shaped bool mask keeping the highest ``scores`` under ``pattern``, and its target.

    ``scores`` has the weight's shape. For a padded (kernel-tap) layout the padding scores ``-inf`` so a
    real weight always wins over padding. ``shared_rows > 1``: every block of that many output rows keeps the
    same positions, chosen by the block's summed scores (:func:`~semisparse.patterns.shared_row_scores`).
    """
    if isinstance(pattern, NM):
        if layout.mode == "taps":
            view = layout.to_view(scores.float(), pattern.m, fill=float("-inf"))
        else:
            view = layout.to_view(scores)
        return layout.from_view(nm_mask(shared_row_scores(view, shared_rows), pattern.n, pattern.m)), pattern
    view = layout.to_view(scores)
    k = pattern.k(view.shape[1])
    return layout.from_view(fanin_mask(shared_row_scores(view, shared_rows), k)), k


class SparseParametrization(nn.Module):
    """Base of every semisparse parametrization: knows its layout and its target structure.

    Subclasses implement :meth:`hard_mask` (the deterministic bool mask, weight-shaped) and ``forward``.
    """

    def __init__(self, layout: Layout, target: Target) -> None:
        super().__init__()
        self.layout = layout
        self.target = target

    def hard_mask(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def pattern_name(self) -> str:
        t = self.target
        if isinstance(t, NM):
            return str(t)
        if isinstance(t, int):
            return f"fan-in {t}"
        return "unstructured"

    def check(self, where: str) -> None:
        """Raise :class:`~semisparse.PatternError` if the current hard mask breaks ``target``."""
        mask = self.hard_mask()
        if isinstance(self.target, NM):
            if self.layout.mode == "taps":
                _check_padded(mask, self.layout, self.target, where)
            else:
                check_view(self.layout.to_view(mask), self.target, where)
        elif isinstance(self.target, int):
            check_view(self.layout.to_view(mask), self.target, where)


def _check_padded(mask: torch.Tensor, layout: Layout, nm: NM, where: str) -> None:
    """Padded layouts keep ``min(N, real weights)`` real entries per group of M kernel taps."""
    view = layout.to_view(mask, nm.m, fill=False).reshape(-1, nm.m)
    real = layout.to_view(torch.ones_like(mask), nm.m, fill=False).reshape(-1, nm.m).sum(-1)
    if not bool((view.sum(-1) == real.clamp(max=nm.n)).all()):
        raise PatternError(f"{where}: padded mask is not {nm} along kernel taps")


class Mask(SparseParametrization):
    """``weight = original * mask`` with a fixed bool mask buffer (magnitude, random, given, DST)."""

    def __init__(self, mask: torch.Tensor, layout: Layout, target: Target) -> None:
        super().__init__(layout, target)
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def hard_mask(self) -> torch.Tensor:
        return self.mask


@dataclass(frozen=True)
class SparseWeight:
    """A sparsified weight found on a model."""

    name: str  # module name
    module: nn.Module
    param: str
    parametrization: SparseParametrization

    @property
    def key(self) -> str:
        return f"{self.name}.{self.param}" if self.name else self.param

    @property
    def state_prefix(self) -> str:
        """The prefix of this weight's parametrization entries in the model's state_dict."""
        return (f"{self.name}." if self.name else "") + f"parametrizations.{self.param}."

    @property
    def original(self) -> torch.Tensor:
        """The dense weight underneath the mask (an ``nn.Parameter``)."""
        return self.module.parametrizations[self.param].original


def sparse_weights(model: nn.Module) -> Iterator[SparseWeight]:
    """Every weight of ``model`` that carries a semisparse parametrization, in module order."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseParametrization):
                    yield SparseWeight(name, module, param, p)


def is_sparsified(model: nn.Module) -> bool:
    return next(sparse_weights(model), None) is not None


def attach(module: nn.Module, param: str, parametrization: SparseParametrization) -> None:
    """Put ``parametrization`` on ``module.<param>``: the weight becomes ``original`` under the mask.

    The module's parameter order is remembered so :func:`detach` puts the weight back in its place (the
    state_dict of a finalized model has the original key order).
    """
    parametrization.param_order = tuple(module._parameters)
    parametrize.register_parametrization(module, param, parametrization)


def detach(module: nn.Module, param: str, *, bake: bool = False) -> None:
    """Take the semisparse parametrization off ``module.<param>``, leaving a plain parameter.

    ``bake=False`` leaves the dense ``original`` (masked entries included); ``bake=True`` multiplies the
    hard mask in. The module first gets a private copy of parametrize's generated class: removal deletes
    the weight's property from that class, which a ``copy.deepcopy`` of the model shares, so without it
    detaching a copy would break the original.
    """
    plist = module.parametrizations[param]
    if len(plist) != 1:
        raise SemisparseError(f"{param} carries {len(plist)} parametrizations; semisparse handles only its own")
    p = plist[0]
    original = plist.original
    mask = p.hard_mask().detach() if bake else None
    _own_class(module)
    parametrize.remove_parametrizations(module, param, leave_parametrized=False)
    order = getattr(p, "param_order", ())
    if param in order:  # keep the original state_dict key order
        params = module._parameters
        rank = {name: i for i, name in enumerate(order)}
        items = sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        params.clear()
        params.update(items)
    if bake:
        with torch.no_grad():
            getattr(module, param).mul_(mask.to(original.dtype))


def detach_all(model: nn.Module, *, bake: bool = False) -> None:
    """:func:`detach` every semisparse parametrization of ``model``."""
    for sw in list(sparse_weights(model)):
        detach(sw.module, sw.param, bake=bake)


def multiply_mask(module: nn.Module, param: str, mask: torch.Tensor | None) -> None:
    """``module.<param>`` becomes a new tensor ``weight * mask`` (a plain weight, no parametrization). Never in
    place: a weight tied to another module (a decoder using the encoder's) stays as that module uses it."""
    if mask is not None:
        with torch.no_grad():
            w = getattr(module, param)
            baked = w.detach() * mask.to(w.dtype)
        setattr(module, param, nn.Parameter(baked, requires_grad=False) if isinstance(w, nn.Parameter) else baked)


def detached_copy(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, str]]:
    """An eval copy of ``model`` on the CPU for inference: no grads, no semisparse parametrizations, every
    masked weight multiplied by its mask as a new tensor (:func:`multiply_mask`), so a layer also reached
    outside its registered name computes the masked layer; returns it, the bool masks and the pattern names
    by the original state_dict key. What both deploys, the ONNX export and the benchmarks start from; the
    user's model is left untouched."""
    m = copy.deepcopy(model).cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    masks, patterns = {}, {}
    for sw in list(sparse_weights(m)):
        masks[sw.key] = sw.parametrization.hard_mask().detach().to(torch.bool).clone()
        patterns[sw.key] = sw.parametrization.pattern_name
    detach_all(m)
    for key, mask in masks.items():
        owner, _, param = key.rpartition(".")
        multiply_mask(m.get_submodule(owner) if owner else m, param, mask)
    return m, masks, patterns


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of parametrize's generated class (see :func:`detach`)."""
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def split_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A sparsified model's state_dict -> (dense state with the original keys, bool masks found in it).

    ``X.parametrizations.W.original`` becomes ``X.W``; a bool ``X.parametrizations.W.0.mask`` is collected
    as the mask of ``X.W``; any other parametrization buffer (a learned mask's logits) is dropped.
    """
    dense, found = {}, {}
    for name, t in state.items():
        head, sep, tail = name.partition("parametrizations.")
        if not sep or (head and not head.endswith(".")):
            dense[name] = t
            continue
        param, _, rest = tail.partition(".")
        key = head + param
        if rest == "original":
            dense[key] = t
        elif rest == "0.mask" and t.dtype == torch.bool:
            found[key] = t
    return dense, found


def effective_state_dict(
    state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A sparsified model's state_dict -> plain keys, each masked weight multiplied by its mask.

    ``masks`` (``{"layer.weight": bool}``, a training checkpoint's ``sparsity.masks``) take precedence over
    the bool mask buffers found in ``state``. A weight under a parametrization with no bool mask (a learned
    mask's logits) and no entry in ``masks`` is refused: its dense value is not what the model computed.
    """
    dense, found = split_state_dict(state)
    found.update(masks or {})
    for key, mask in found.items():
        if key in dense:
            dense[key] = dense[key] * mask.to(dense[key].dtype)
    unmasked = sorted({_param_key(name) for name in state if _param_key(name)} - set(found))
    if unmasked:
        raise SemisparseError(
            f"{unmasked[0]} carries a mask without a bool mask buffer (learned-mask logits) and no mask was "
            "given: read a training checkpoint whole (its 'sparsity.masks'), or export it first"
        )
    return dense


def _param_key(name: str) -> str | None:
    """``X.parametrizations.W.original`` -> ``X.W``; None for a key outside a parametrization."""
    head, sep, tail = name.partition("parametrizations.")
    if not sep or (head and not head.endswith(".")):
        return None
    return head + tail.partition(".")[0]
