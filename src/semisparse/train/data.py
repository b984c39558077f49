"""Data sets for training: the bundled digits, CIFAR-10 on disk, ImageFolder trees. Nothing is downloaded.

``load_data(path, ...)`` picks the format from ``path``:

* ``"digits"`` - scikit-learn's ``load_digits`` (1,797 8x8 grey images, 10 classes) as ``(1, 8, 8)``
  float tensors, standardised; a fixed stratified split of 1,440 train / 357 val images.
* a folder holding ``cifar-10-batches-py/`` (or that folder itself) - CIFAR-10 as torchvision lays it out
  (``data_batch_1..5``, ``test_batch``, ``batches.meta``); read with a restricted unpickler that only
  rebuilds plain containers and numpy arrays.
* a folder holding ``train/`` and ``val/`` class sub-folders - ImageNet / any ``ImageFolder`` tree.
* ``"synthetic"`` / ``"synthetic:N"`` - random in-memory images of ImageNet shape (:mod:`.synthetic`).

Augmentation (``AugmentOptions``) follows torchvision's reference presets. An ImageFolder file that cannot
be decoded becomes an :class:`UnreadableImage` sample instead of an exception inside a DataLoader worker;
the loader (:class:`~semisparse.train.loaders.ImageLoader`) names it in one line or skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import SemisparseError
from ..io.files import write_json
from .synthetic import NUM_CLASSES, SyntheticImages, synthetic_size

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

IMAGEFOLDER_LAYOUT = "<path>/train/<class>/<image> and <path>/val/<class>/<image>"
CIFAR_LAYOUT = "<path>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (torchvision's layout)"


@dataclass
class AugmentOptions:
    """The reference script's augmentation flags (torchvision reference presets). ``None`` crop sizes mean the format's
    own default (224/256/224 for ImageFolder; CIFAR uses 32 with 4-pixel padding)."""

    train_crop_size: int | None = None
    val_resize_size: int | None = None
    val_crop_size: int | None = None
    interpolation: str = "bilinear"
    auto_augment: str | None = None
    ra_magnitude: int = 9
    augmix_severity: int = 3
    random_erase: float = 0.0
    hflip: float = 0.5
    backend: str = "pil"
    use_v2: bool = False


@dataclass
class DataSets:
    """What training needs from the data: the two splits, class count and input shape ``(C, H, W)``."""

    train: Dataset
    val: Dataset
    num_classes: int
    kind: str  # "digits" | "cifar10" | "imagefolder" | "synthetic"
    classes: list[str] = field(default_factory=list)
    train_transform: object = None
    val_transform: object = None


def load_data(path: str, augment: AugmentOptions | None = None, cache: bool = False) -> DataSets:
    """The train/val data sets at ``path`` (see module doc); a clear error naming the layout otherwise.

    ``cache=True`` (``--cache-dataset``) keeps an ImageFolder's file index in a JSON file under the user
    cache so the next run skips the directory scan.
    """
    augment = augment or AugmentOptions()
    if path == "digits":
        return load_digits_data()
    n = synthetic_size(path)
    if n is not None:  # in-memory random images of ImageNet shape (throughput runs): see .synthetic
        size, val_size = augment.train_crop_size or 224, augment.val_crop_size or 224
        train, val = SyntheticImages(n, size), SyntheticImages(max(1, n // 10), val_size, seed=1)
        return DataSets(train, val, NUM_CLASSES, "synthetic", [str(i) for i in range(NUM_CLASSES)])
    if not path or not os.path.isdir(path):
        raise SemisparseError(
            f"data path {path!r} is not a directory; expected 'digits', an ImageFolder tree "
            f"({IMAGEFOLDER_LAYOUT}) or CIFAR-10 ({CIFAR_LAYOUT})"
        )
    if os.path.basename(os.path.normpath(path)) == "cifar-10-batches-py":
        return load_cifar10(path, augment)
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        return load_cifar10(os.path.join(path, "cifar-10-batches-py"), augment)
    if os.path.isdir(os.path.join(path, "train")) or os.path.isdir(os.path.join(path, "val")):
        return load_imagefolder(path, augment, cache)
    raise SemisparseError(
        f"{path} is neither an ImageFolder tree ({IMAGEFOLDER_LAYOUT}) nor CIFAR-10 ({CIFAR_LAYOUT})"
    )


# --- digits -------------------------------------------------------------------------------------------

DIGITS_VAL = 357  # leaves 1,440 training images: divisible by every power-of-two batch up to 32


def load_digits_data() -> DataSets:
    """scikit-learn's digits as tensors ``(N, 1, 8, 8)``, standardised with the train split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target.astype(np.int64)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=DIGITS_VAL, stratify=y, random_state=0)
    mean, std = float(xtr.mean()), float(xtr.std())
    train = TensorDataset(torch.from_numpy((xtr - mean) / std), torch.from_numpy(ytr))
    val = TensorDataset(torch.from_numpy((xva - mean) / std), torch.from_numpy(yva))
    return DataSets(train, val, 10, "digits", [str(i) for i in range(10)])


# --- transforms -----------------------------------------------------------------------------------------


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name.lower())
    except ValueError as exc:
        raise SemisparseError(
            f"unknown --interpolation {name!r}; expected one of nearest, bilinear, bicubic"
        ) from exc


def _auto_augment(T, a: AugmentOptions, interp):
    policy = a.auto_augment
    if policy is None:
        return []
    if policy == "ra":
        return [T.RandAugment(interpolation=interp, magnitude=a.ra_magnitude)]
    if policy == "ta_wide":
        return [T.TrivialAugmentWide(interpolation=interp)]
    if policy == "augmix":
        return [T.AugMix(interpolation=interp, severity=a.augmix_severity)]
    try:
        return [T.AutoAugment(T.AutoAugmentPolicy(policy), interpolation=interp)]
    except ValueError as exc:
        raise SemisparseError(
            f"unknown --auto-augment {policy!r}; expected ra, ta_wide, augmix, imagenet, cifar10 or svhn"
        ) from exc


def _modules(use_v2: bool):
    if use_v2:
        import torchvision.transforms.v2 as T
    else:
        import torchvision.transforms as T
    return T


def _tensor_ops(T, a: AugmentOptions, mean, std) -> list:
    """PIL/tensor image -> normalised float tensor, per ``--use-v2`` and ``--backend``."""
    if a.use_v2:
        ops = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    elif a.backend == "tensor":
        ops = [T.ConvertImageDtype(torch.float32)]
    else:
        ops = [T.ToTensor()]
    return [*ops, T.Normalize(mean, std)]


def _check_backend(a: AugmentOptions) -> None:
    if a.backend.lower() not in ("pil", "tensor"):
        raise SemisparseError(f"unknown --backend {a.backend!r}; expected PIL or tensor")
    a.backend = a.backend.lower()


def _stats(kind: str):
    return (CIFAR_MEAN, CIFAR_STD) if kind == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)


def train_transform(a: AugmentOptions, kind: str):
    """torchvision reference preset: random crop (resized for ImageFolder), flip, auto-augment, erase."""
    _check_backend(a)
    T = _modules(a.use_v2)
    interp = _interp(a.interpolation)
    ops = [T.PILToTensor()] if a.backend == "tensor" else []
    if kind == "cifar10":
        ops.append(T.RandomCrop(a.train_crop_size or 32, padding=4))
    else:
        ops.append(T.RandomResizedCrop(a.train_crop_size or 224, interpolation=interp, antialias=True))
    if a.hflip > 0:
        ops.append(T.RandomHorizontalFlip(a.hflip))
    ops += _auto_augment(T, a, interp) + _tensor_ops(T, a, *_stats(kind))
    if a.random_erase > 0:
        ops.append(T.RandomErasing(p=a.random_erase))
    return T.Compose(ops)


def val_transform(a: AugmentOptions, kind: str):
    """Resize + centre crop (ImageFolder; CIFAR as is), then tensor + normalise."""
    _check_backend(a)
    T = _modules(a.use_v2)
    ops = [T.PILToTensor()] if a.backend == "tensor" else []
    if kind != "cifar10":
        ops += [
            T.Resize(a.val_resize_size or 256, interpolation=_interp(a.interpolation), antialias=True),
            T.CenterCrop(a.val_crop_size or 224),
        ]
    return T.Compose(ops + _tensor_ops(T, a, *_stats(kind)))


# --- CIFAR-10 -------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays only: a CIFAR batch file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")


def _read_batch(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise SemisparseError(f"CIFAR-10 file {path} is missing; expected {CIFAR_LAYOUT}") from exc
    except Exception as exc:
        raise SemisparseError(f"CIFAR-10 file {path} is malformed ({exc}); expected {CIFAR_LAYOUT}") from exc
    if not isinstance(obj, dict):
        raise SemisparseError(f"CIFAR-10 file {path} is malformed (not a dict); expected {CIFAR_LAYOUT}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


class ArrayImages(Dataset):
    """``(N, H, W, 3)`` uint8 images + int labels, returned as PIL images through ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _check_cifar_arrays(path: str, data: np.ndarray, labels) -> np.ndarray:
    """Refuse, naming the file, what would fail later inside a DataLoader worker or the loss."""
    if data.dtype != np.uint8:
        raise SemisparseError(f"CIFAR-10 file {path} holds {data.dtype} pixels; expected uint8 (0-255), "
                              f"{CIFAR_LAYOUT}")  # fmt: skip
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise SemisparseError(f"CIFAR-10 file {path}: labels must be a list of integers, got {labels.dtype} "
                              f"values of shape {labels.shape}")  # fmt: skip
    if len(labels) and labels.min() < 0:
        raise SemisparseError(f"CIFAR-10 file {path}: label {int(labels.min())} is negative; expected class "
                              "indices 0..9")  # fmt: skip
    return labels.astype(np.int64)


def _cifar_split(root: str, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        path = os.path.join(root, name)
        b = _read_batch(path)
        labels = b.get("labels", b.get("fine_labels"))
        data = b.get("data")
        if labels is None or not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
            raise SemisparseError(
                f"CIFAR-10 file {path} is malformed (needs 'data' (N, 3072) uint8 and 'labels'); "
                f"expected {CIFAR_LAYOUT}"
            )
        if len(labels) != data.shape[0]:
            raise SemisparseError(f"CIFAR-10 file {path}: {data.shape[0]} images but {len(labels)} labels")
        ys.append(_check_cifar_arrays(path, data, labels))
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: str, augment: AugmentOptions) -> DataSets:
    """CIFAR-10 from torchvision's on-disk layout (no md5 check, so a tiny test instance loads too)."""
    xtr, ytr = _cifar_split(root, [f"data_batch_{i}" for i in range(1, 6)])
    xva, yva = _cifar_split(root, ["test_batch"])
    meta_path = os.path.join(root, "batches.meta")
    classes = [str(i) for i in range(10)]
    if os.path.exists(meta_path):
        classes = list(_read_batch(meta_path).get("label_names", classes))
    num_classes = max(len(classes), int(max(ytr.max(), yva.max())) + 1)
    tt, vt = train_transform(augment, "cifar10"), val_transform(augment, "cifar10")
    return DataSets(ArrayImages(xtr, ytr, tt), ArrayImages(xva, yva, vt), num_classes, "cifar10", classes, tt, vt)


# --- ImageFolder ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnreadableImage:
    """The sample of an image file that could not be decoded. It travels from a DataLoader worker to the
    main process like any sample, so the error there names the file in one line (no worker traceback)."""

    path: str
    folder: str
    reason: str

    def error(self) -> SemisparseError:
        return SemisparseError(
            f"cannot read image {self.path} (in the data set folder {self.folder}): {self.reason}; repair or "
            "remove the file, or pass --skip-bad-images to skip unreadable images"
        )


def _unreadable_reason(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):  # its message is a repr of the open file object
        return "not an image file PIL can identify"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ImageReader:
    """ImageFolder's loader (torchvision's ``default_loader``, which decodes the whole file) that returns an
    :class:`UnreadableImage` instead of raising."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, path: str):
        from torchvision.datasets.folder import default_loader

        try:
            return default_loader(path)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
            return UnreadableImage(path, self.folder, _unreadable_reason(exc))


class PassUnreadable:
    """A split's transform that lets :class:`UnreadableImage` samples through untouched."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        if isinstance(img, UnreadableImage) or self.transform is None:
            return img
        return self.transform(img)

    def __repr__(self) -> str:
        return repr(self.transform)


def _cache_path(split_dir: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(os.path.abspath(split_dir).encode()).hexdigest()[:16]
    return os.path.join(base, "semisparse", "datasets", f"{digest}.json")


def _image_folder(split_dir: str, transform, cache: bool):
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(split_dir):
        raise SemisparseError(f"missing {split_dir}; expected an ImageFolder tree {IMAGEFOLDER_LAYOUT}")
    cached = _cache_path(split_dir) if cache else None
    if cached and os.path.exists(cached):
        with open(cached) as f:
            index = json.load(f)
        ds = ImageFolder.__new__(ImageFolder)
        ds.root, ds.transform, ds.target_transform = split_dir, PassUnreadable(transform), None
        ds.loader, ds.extensions = ImageReader(split_dir), None
        ds.classes, ds.class_to_idx = index["classes"], index["class_to_idx"]
        ds.samples = [tuple(s) for s in index["samples"]]
        ds.imgs, ds.targets = ds.samples, [s[1] for s in ds.samples]
        return ds
    try:
        ds = ImageFolder(split_dir, transform=PassUnreadable(transform), loader=ImageReader(split_dir))
    except FileNotFoundError as exc:  # no class folders, or no images in them
        raise SemisparseError(f"{split_dir} holds no images ({exc}); expected {IMAGEFOLDER_LAYOUT}") from exc
    if cached:
        write_json(cached, {"classes": ds.classes, "class_to_idx": ds.class_to_idx, "samples": ds.samples})
    return ds


def load_imagefolder(root: str, augment: AugmentOptions, cache: bool = False) -> DataSets:
    """``root/train`` and ``root/val`` ImageFolder trees with the same classes."""
    tt, vt = train_transform(augment, "imagefolder"), val_transform(augment, "imagefolder")
    train = _image_folder(os.path.join(root, "train"), tt, cache)
    val = _image_folder(os.path.join(root, "val"), vt, cache)
    if train.classes != val.classes:
        raise SemisparseError(
            f"{root}: train/ has classes {train.classes[:5]}... but val/ has {val.classes[:5]}...; "
            "both splits need the same class folders"
        )
    return DataSets(train, val, len(train.classes), "imagefolder", list(train.classes), tt, vt)
