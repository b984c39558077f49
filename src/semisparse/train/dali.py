"""NVIDIA DALI loaders for ImageFolder trees (``semisparse train --enable-dali [--dali-cpu]``).

DALI is imported lazily: :func:`require_dali` turns a missing install into a one-line
:class:`~semisparse.SemisparseError` naming the pip package. The loaders read the file index of the
:class:`~semisparse.train.data.DataSets` (so ``--cache-dataset`` applies) and shard/shuffle it with the same
:class:`~semisparse.train.distributed.ShardSampler` as the PyTorch loaders: rank ``rank`` of ``world`` gets
``perm(seed + epoch)[rank::world]`` (call ``loader.sampler.set_epoch``, as :func:`~semisparse.train.fit` does).
A fresh DALI pipeline is built for every pass over the data with that pass's file list, so the order is exactly
reproducible. Decoding is ``"mixed"`` (nvJPEG, outputs on the GPU) on CUDA, ``"cpu"`` with ``dali_cpu`` or a CPU
device. Train: random-resized-crop + horizontal flip; val: resize (shorter side) + centre crop; both normalised
with the ImageNet mean/std to NCHW float32. Iterating yields ``(images, targets)`` torch tensors (targets int64).
"""

from __future__ import annotations

import math

import torch

from ..errors import SemisparseError
from .data import IMAGENET_MEAN, IMAGENET_STD, DataSets
from .distributed import ShardSampler

INSTALL_HINT = "pip install nvidia-dali-cuda120 (CUDA 12) or nvidia-dali-cuda130 (CUDA 13)"


def require_dali():
    """The ``nvidia.dali`` module, or a one-line :class:`SemisparseError` saying how to install it."""
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        raise SemisparseError(f"--enable-dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}; or drop "
                              "--enable-dali to use the PyTorch DataLoader") from exc  # fmt: skip
    return dali


def _interp(types, name: str):
    table = {"nearest": types.INTERP_NN, "bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
    if name.lower() not in table:
        raise SemisparseError(f"--interpolation {name!r} is not available with --enable-dali; expected one of "
                              f"{', '.join(table)}")  # fmt: skip
    return table[name.lower()]


class DALILoader:
    """A DataLoader look-alike over a DALI pipeline: ``len``, ``batch_size``, ``sampler.set_epoch``, and
    iteration yielding ``(images (B, 3, H, W) float32, targets (B,) int64)``; the last batch may be short."""

    def __init__(self, samples: list[tuple[str, int]], batch_size: int, *, train: bool, sampler: ShardSampler,
                 crop_size: int, resize_size: int | None = None, interpolation: str = "bilinear",
                 device: torch.device | None = None, dali_cpu: bool = False, num_threads: int = 1,
                 seed: int = 0) -> None:  # fmt: skip
        self.samples, self.batch_size, self.train, self.sampler = samples, batch_size, train, sampler
        self.crop_size, self.resize_size, self.interpolation = crop_size, resize_size, interpolation
        self.device = torch.device(device or "cpu")
        self.cpu = dali_cpu or self.device.type != "cuda"
        self.num_threads, self.seed = max(1, num_threads), seed
        self.num_workers = self.num_threads
        _interp(require_dali().types, interpolation)  # fail now, not at the first batch

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def _pipeline(self, files: list[str], labels: list[int]):
        dali = require_dali()
        from nvidia.dali import fn, types

        cpu, train = self.cpu, self.train
        crop, resize, interp = self.crop_size, self.resize_size, _interp(types, self.interpolation)
        mean = [255 * m for m in IMAGENET_MEAN]
        std = [255 * s for s in IMAGENET_STD]

        @dali.pipeline_def
        def pipe():
            jpegs, targets = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True,
                                             name="Reader")  # fmt: skip
            images = fn.decoders.image(jpegs, device="cpu" if cpu else "mixed", output_type=types.RGB)
            if train:
                images = fn.random_resized_crop(images, size=(crop, crop), random_area=(0.08, 1.0),
                                                random_aspect_ratio=(3 / 4, 4 / 3), interp_type=interp,
                                                antialias=True)  # fmt: skip
                mirror = fn.random.coin_flip(probability=0.5)
            else:
                images = fn.resize(images, resize_shorter=resize, interp_type=interp, antialias=True)
                mirror = 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(crop, crop),
                                              mean=mean, std=std, mirror=mirror)  # fmt: skip
            if not cpu:
                targets = targets.gpu()
            return images, targets

        device_id = None if cpu else (self.device.index if self.device.index is not None
                                      else torch.cuda.current_device())  # fmt: skip
        # augmentation randomness: one reproducible stream per (seed, epoch, rank), so a resumed run matches
        seed = (self.seed * 1_000_003 + self.sampler.epoch * 7919 + self.sampler.rank * 31) % 2**31
        p = pipe(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=1)  # fmt: skip
        p.build()
        return p

    def _to_torch(self, out) -> torch.Tensor:
        if self.cpu:
            return torch.from_numpy(out.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = out.as_tensor()
        res = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
        feed_ndarray(t, res, cuda_stream=torch.cuda.current_stream(self.device))
        return res

    def __iter__(self):
        order = list(self.sampler)
        if not order:
            return
        files = [self.samples[i][0] for i in order]
        labels = [int(self.samples[i][1]) for i in order]
        pipe = self._pipeline(files, labels)
        try:
            left = len(order)
            while left > 0:
                images, targets = pipe.run()
                n = min(left, self.batch_size)
                x = self._to_torch(images)[:n]
                y = self._to_torch(targets).reshape(-1)[:n].to(torch.int64)
                left -= n
                yield x, y
        finally:
            del pipe


def make_dali_loaders(
    data: DataSets,
    batch_size: int,
    *,
    crop_size: int | None = None,
    val_resize_size: int | None = None,
    val_crop_size: int | None = None,
    interpolation: str = "bilinear",
    device: torch.device | str = "cpu",
    dali_cpu: bool = False,
    num_threads: int = 1,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    ra_reps: int = 1,
    val_batch_size: int | None = None,
) -> tuple[DALILoader, DALILoader]:
    """(train, val) DALI loaders for ImageFolder ``data`` (one-line error for other data or without DALI).

    Sizes default as the PyTorch presets do: train crop 224, val resize 256 and centre crop 224."""
    if data.kind != "imagefolder":
        raise SemisparseError(f"--enable-dali reads ImageFolder trees (train/, val/ class folders of images) only, "
                              f"not {data.kind} data; drop --enable-dali to use the PyTorch DataLoader")  # fmt: skip
    require_dali()
    device = torch.device(device)
    train_sampler = ShardSampler(len(data.train), rank, world, shuffle=True, seed=seed, repeats=ra_reps)
    val_sampler = ShardSampler(len(data.val), rank, world, shuffle=False, pad=False)
    common = dict(interpolation=interpolation, device=device, dali_cpu=dali_cpu, num_threads=num_threads, seed=seed)
    train = DALILoader(list(data.train.samples), batch_size, train=True, sampler=train_sampler,
                       crop_size=crop_size or 224, **common)  # fmt: skip
    val = DALILoader(list(data.val.samples), val_batch_size or batch_size, train=False, sampler=val_sampler,
                     crop_size=val_crop_size or 224, resize_size=val_resize_size or 256, **common)  # fmt: skip
    return train, val


__all__ = ["DALILoader", "INSTALL_HINT", "make_dali_loaders", "require_dali"]
