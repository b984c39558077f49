"""The model registry: every model semisparse can build by name, and rebuilding one from a file's record.

Names: every torchvision classification model (``resnet18``, ``convnext_tiny``, ``vit_b_16``...), built
with ``weights=None``; ``timm/<name>`` when timm is installed (``pretrained=False``); the papers' CIFAR
models ``resnet18_cifar`` (torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32
inputs) and ``wrn22_2`` (Wide ResNet 22-2, pre-activation blocks); ``digits_cnn``, a small CNN for
scikit-learn's 8x8 one-channel digits (no BatchNorm, so DDP runs equal one-process runs). semisparse's own
models carry ``image_size`` (the side of the square input they are built for, as torchvision's ViT does) so
``ss.deploy`` and ``semisparse bench`` know their input without being told.

:func:`from_arch` rebuilds a model from the architecture a file records (checked by :func:`arch_from_file`;
never a path or a weights option), on the meta device first. It reads no file and imports torch,
torchvision and (optionally) timm only: ``ss.load`` (:mod:`.io.compressed`) rebuilds through it, and
:mod:`.models` (``create_model``, which may also load weights from a file) sits above ``io``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors  # the factories torch.device("meta") redirects

from .errors import SemisparseError

__all__ = ["arch_from_file", "build_model", "from_arch", "list_models", "register_model", "state_mismatch", "MODELS"]

#: semisparse's own models: name -> constructor(num_classes=..., **kw).
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator adding ``fn`` to :data:`MODELS` under its function name."""
    MODELS[fn.__name__] = fn
    return fn


@register_model
def resnet18_cifar(num_classes: int = 10, **kw: object) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (the SRigL paper's CIFAR model)."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, **kw)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    model.image_size = 32
    return model


class _WideBasic(nn.Module):
    """Pre-activation basic block of a Wide ResNet: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.dropout(torch.relu(self.bn2(o))))
        return o + skip


class WideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis) for 32x32 inputs: depth = 6n + 4, widths 16k, 32k, 64k."""

    def __init__(self, depth: int = 22, widen: int = 2, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise SemisparseError(f"Wide ResNet depth must be 6n + 4 (e.g. 16, 22, 28), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = [_WideBasic(cin if j == 0 else w, w, stride if j == 0 else 1, dropout) for j in range(n)]
            setattr(self, f"block{i + 1}", nn.Sequential(*blocks))
            layers.append(f"block{i + 1}")
            cin = w
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.image_size = 32
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model
def wrn22_2(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet-22-2 (the SRigL paper's CIFAR-10 model)."""
    return WideResNet(22, 2, num_classes, dropout)


class DigitsCNN(nn.Module):
    """Small CNN for ``(B, in_channels, 8, 8)`` digits: 3 convs + 2 Linear, ~60k parameters, no norm layers.

    Every layer but the 1-channel stem can take 2:4 (channels 32/64, features 256/128).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * w, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, num_classes)
        )
        self.image_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """The demo's and tests' model for scikit-learn's 8x8 digits."""
    return DigitsCNN(num_classes, in_channels, width)


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every name :func:`create_model` accepts (timm's as the ``timm/`` prefix only)."""
    return sorted(MODELS) + torchvision_names() + ["timm/<name>"]


def _unknown(name: str) -> SemisparseError:
    close = difflib.get_close_matches(name, sorted(MODELS) + torchvision_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return SemisparseError(
        f"unknown model {name!r}{hint} (expected a torchvision classification model name, "
        f"timm/<name>, or one of {', '.join(sorted(MODELS))})"
    )


def _build(name: str, num_classes: int, kw: Mapping[str, object]) -> nn.Module:
    if name.startswith("timm/"):
        try:
            import timm
        except ImportError as exc:
            raise SemisparseError(f"model {name!r} needs timm: pip install timm") from exc
        try:
            return timm.create_model(name[5:], pretrained=False, num_classes=num_classes, **kw)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise SemisparseError(f"timm has no model {name[5:]!r}: {exc}") from exc
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, **kw)
    if name in torchvision_names():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    raise _unknown(name)


def build_model(name: str, num_classes: int = 1000, **kw: object) -> nn.Module:
    """Model ``name`` with ``num_classes`` outputs and fresh weights; extra ``kw`` go to the constructor and are
    recorded, with the name, in ``model.semisparse_arch`` (so a checkpoint can rebuild it)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise SemisparseError(f"num_classes must be a positive int, got {num_classes!r}")
    try:
        model = _build(name, num_classes, kw)
    except TypeError as exc:  # a constructor keyword it does not take
        raise SemisparseError(f"model {name!r} does not accept {sorted(kw)}: {exc}") from exc
    model.semisparse_arch = {"name": name, "num_classes": num_classes, **kw}
    return model


#: Constructor options a file's recorded architecture may set for a torchvision or timm model (besides
#: ``num_classes``); semisparse's own models take the keywords of their constructor. Anything else, and
#: ``weights`` / ``pretrained`` above all, is refused: a file never names another file to read or fetch.
FILE_ARCH_OPTIONS = frozenset({
    "dropout", "attention_dropout", "stochastic_depth_prob", "zero_init_residual", "groups", "width_per_group",
    "replace_stride_with_dilation", "aux_logits", "transform_input", "init_weights", "width_mult",
    "image_size", "patch_size", "norm_eps", "drop_rate", "drop_path_rate", "in_chans", "in_channels", "width",
    "depth", "widen",
})  # fmt: skip
_NEVER_FROM_A_FILE = ("weights", "pretrained", "weights_backbone", "pretrained_backbone", "progress")


def _allowed_options(name: str) -> set[str]:
    if name in MODELS:
        try:
            params = inspect.signature(MODELS[name]).parameters.values()
        except (TypeError, ValueError):
            return set()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        named = {p.name for p in params if p.kind in kinds}
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
            named |= FILE_ARCH_OPTIONS
        return named - set(_NEVER_FROM_A_FILE)
    return set(FILE_ARCH_OPTIONS)


def _plain_option(v: object) -> bool:
    if isinstance(v, list):
        return all(isinstance(x, (bool, int, float)) for x in v)
    return isinstance(v, (bool, int, float))


def arch_from_file(arch: object, where: object) -> dict:
    """A file's recorded architecture, checked: a mapping of a model name and plain constructor options.

    Only ``name``, ``num_classes`` and the options the model's constructor takes (numbers, bools, lists of
    them; never a path or a ``weights`` / ``pretrained`` option) pass, so a file cannot make a load open or
    download another file.
    """
    if arch is None:
        raise SemisparseError(
            f"{where}: the file records no model architecture; pass one: ss.load(path, model=...) (CLI: --model NAME)"
        )
    if not isinstance(arch, Mapping):
        raise SemisparseError(f"{where}: the recorded architecture is a {type(arch).__name__}; expected a mapping")
    name = arch.get("name")
    if not isinstance(name, str) or not name:
        raise SemisparseError(f"{where}: the recorded architecture names no model (name {name!r})")
    allowed = _allowed_options(name)
    for key, value in arch.items():
        if key == "name":
            continue
        if key == "num_classes":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SemisparseError(f"{where}: the recorded num_classes {value!r} is not a positive int")
            continue
        if key not in allowed:
            raise SemisparseError(
                f"{where}: the recorded architecture sets {key!r}, which a file may not set for {name!r} "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'}); build the model yourself and pass it: "
                "ss.load(path, model=...) (CLI: --model NAME)"
            )
        if not _plain_option(value):
            raise SemisparseError(
                f"{where}: the recorded option {key}={value!r} is not a number, bool or list of them"
            )
    return dict(arch)


def state_mismatch(own: Mapping[str, tuple], given: Mapping[str, tuple]) -> str | None:
    """What differs between a model's tensor shapes ``own`` and a file's ``given`` (None when they fit)."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(k for k in set(own) & set(given) if tuple(own[k]) != tuple(given[k]))
    parts = []
    if wrong:
        parts.append("shape mismatch: " + ", ".join(f"{k} {tuple(given[k])} vs {tuple(own[k])}" for k in wrong[:3]))
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{label} {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else ""))
    return "; ".join(parts) or None


def from_arch(arch: object, where: object, shapes: Mapping[str, tuple] | None = None) -> nn.Module:
    """The model a file's recorded ``semisparse_arch`` describes (``where`` names the file in errors).

    The architecture is checked by :func:`arch_from_file`. With ``shapes`` (the tensors the file holds, by
    plain state_dict key) the model is first built without its weights (:func:`_build_on_meta`), and refused
    unless its tensors are exactly those: a header cannot make a load allocate more than its file holds.
    """
    kw = arch_from_file(arch, where)
    name = kw.pop("name")
    if shapes is None:
        return build_model(name, **kw)
    try:
        _fits(_build_on_meta(name, kw), shapes, where, name)
    except SemisparseError as exc:
        raise SemisparseError(f"{where}: {exc}" if str(where) not in str(exc) else str(exc)) from None
    except Exception as exc:  # a constructor that refuses the options, or that cannot be built without memory
        raise SemisparseError(f"{where}: cannot build the recorded model {name!r}: {_first_line(exc)}") from None
    return _fits(build_model(name, **kw), shapes, where, name)


class _LargeOnMeta(TorchFunctionMode):
    """Tensor factories make tensors of more than :data:`_SMALL` elements on the meta device (no memory),
    smaller ones for real: a constructor that computes its layer widths from tensor values (RegNet's
    ``.tolist()``) still runs, and the parameters, which is where the memory goes, stay empty."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            t = func(*args, **{**kwargs, "device": "meta"})
            if isinstance(t, torch.Tensor) and t.numel() <= _SMALL:
                return func(*args, **kwargs)
            return t
        return func(*args, **kwargs)


_SMALL = 1 << 16


def _build_on_meta(name: str, kw: Mapping[str, object]) -> nn.Module:
    """``build_model(name, **kw)`` without allocating its weights: on the meta device, or, for a model whose
    constructor reads tensor values (RegNet), with only its small tensors (<= 64 Ki elements each) real."""
    try:
        with torch.device("meta"):
            return build_model(name, **kw)
    except SemisparseError:
        raise
    except Exception:  # noqa: BLE001 - tried again below, which reports the constructor's own error
        pass
    with _LargeOnMeta():
        return build_model(name, **kw)


def _fits(model: nn.Module, shapes: Mapping[str, tuple], where: object, name: str) -> nn.Module:
    wrong = state_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes)
    if wrong:
        raise SemisparseError(f"{where}: the recorded architecture ({name}) does not match the tensors in the file "
                              f"({wrong})")  # fmt: skip
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
