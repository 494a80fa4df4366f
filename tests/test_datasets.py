"""The streaming data layer: Transform, FolderImages (ImageFolder read lazily), NpzImages (memory-mapped .npz),
batches with and without DataLoader workers, one-line errors, and memory that does not grow with the set.

Every expected image is decoded here by hand (PIL + numpy), independently of gencnp_fast.data. The ImageNet test
reads the 20 real ImageNet JPEGs that the foolbox==3.3.4 wheel ships (``bash scripts/install.sh --test``); foolbox
itself is never imported."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

from gencnp_fast import data as D
from gencnp_fast.data import FolderImages, ImageData, ImageSet, NpzImages, Transform

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


# ---------------------------------------------------------------------------------------------------------------
# helpers and oracles

def save_image(path, shape, seed, mode=None):
    """A random image of ``shape`` ((H, W) grayscale or (H, W, 3) RGB) saved at ``path`` (format from the suffix)."""
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    img = Image.fromarray(a)
    if mode is not None:
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path


def oracle_none(path, mode, size, mean=None, std=None):
    """Kind "none" by hand: convert to ``mode``, bilinear resize to ``size`` (H, W) if it differs, [0, 1], CHW."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(mode)
        if (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if mean is not None:
        a = (a - np.float32(mean).reshape(-1, 1, 1)) / np.float32(std).reshape(-1, 1, 1)
    return a


def oracle_imagenet(path, crop=224, short=256):
    """torchvision's ImageNet evaluation preprocessing by hand: RGB, Resize(short) (the shorter side, the longer
    one truncated), CenterCrop(crop), ToTensor, Normalize(ImageNet mean, std)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((new_w, new_h), Image.BILINEAR)
        left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
        img = img.crop((left, top, left + crop, top + crop))
        a = np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / 255.0
    return (a - MEAN) / STD


def torchvision_rule(root):
    """(path, label) pairs and classes by torchvision's ImageFolder rule, written out here."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = []
    for k, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(D.IMAGE_SUFFIXES):
                    samples.append((os.path.relpath(os.path.join(dirpath, f), root), k))
    return classes, samples


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def foolbox_imagenet_jpegs():
    """The real ImageNet JPEGs in the installed foolbox package (``data/imagenet_<i>_<label>.jpg``)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.origin:
        pytest.skip("foolbox==3.3.4 is not installed (bash scripts/install.sh --test): its 20 ImageNet JPEGs "
                    "are the real-image test data")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "imagenet_*.jpg")))
    if len(files) < 20:
        pytest.skip(f"foolbox ships {len(files)} ImageNet JPEGs here, expected 20 (foolbox==3.3.4)")
    return files


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """3 classes (names that sort differently by case), JPEG and PNG RGB images of mixed sizes, a nested folder
    inside a class (torchvision walks it), and files that are not images."""
    root = tmp_path_factory.mktemp("mixed")
    sizes = [(20, 30, 3), (24, 18, 3), (16, 16, 3), (33, 21, 3)]
    n = 0
    for cls in ["b_dog", "a_cat", "Zebra"]:
        for i in range(4 if cls != "Zebra" else 3):
            suffix = ".jpg" if (n % 2) else ".png"
            save_image(str(root / cls / f"img{i}{suffix}"), sizes[(n + i) % 4], seed=n)
            n += 1
    save_image(str(root / "a_cat" / "nested" / "deep.JPEG"), (12, 14, 3), seed=99)
    (root / "a_cat" / "notes.txt").write_text("not an image")
    (root / "b_dog" / "thumbs.db").write_bytes(b"\x00" * 10)
    return str(root)


# ---------------------------------------------------------------------------------------------------------------
# FolderImages

def test_folder_labels_follow_torchvision_rule(mixed_folder):
    f = FolderImages(mixed_folder)
    classes, samples = torchvision_rule(mixed_folder)
    assert f.classes == classes == ["Zebra", "a_cat", "b_dog"]
    assert f.ids(range(len(f))) == [p.replace(os.sep, "/") for p, _ in samples]
    assert f.y.tolist() == [k for _, k in samples] and f.y.dtype == torch.int64
    assert "a_cat/nested/deep.JPEG" in f.ids(range(len(f)))
    assert f.name == os.path.basename(mixed_folder) and len(f) == 12
    assert isinstance(f, ImageSet) and f.transform == Transform()
    g = pickle.loads(pickle.dumps(f.subset([3, 1])))  # as DataLoader workers started with "spawn" receive it
    assert g.ids([0, 1]) == f.ids([3, 1]) and torch.equal(g.batch([0, 1]), f.batch([3, 1]))


def test_folder_batch_equals_hand_decoding(mixed_folder):
    f = FolderImages(mixed_folder)
    paths = [os.path.join(mixed_folder, p) for p in f.ids(range(len(f)))]
    from PIL import Image

    with Image.open(paths[0]) as first:
        size = (first.height, first.width)
    assert f.sample_shape == (3,) + size
    x = f.batch(torch.arange(len(f)))
    assert x.dtype == torch.float32 and x.shape == (len(f), 3) + size
    for i, p in enumerate(paths):  # kind "none": every image resized (bilinear) to the first image's size
        assert np.array_equal(x[i].numpy(), oracle_none(p, "RGB", size)), p
    # a given size and mean / std
    t = Transform.from_options("none", image_size=(10, 12), mean=[0.5, 0.4, 0.3], std=0.25)
    g = FolderImages(mixed_folder, t)
    assert g.sample_shape == (3, 10, 12)
    xg = g.batch([4, 0, 7])
    for row, i in enumerate([4, 0, 7]):
        np.testing.assert_allclose(xg[row].numpy(), oracle_none(paths[i], "RGB", (10, 12), [0.5, 0.4, 0.3],
                                                                [0.25] * 3), rtol=0, atol=2e-6)
    # every index form gives the same images
    assert torch.equal(f.batch(range(2, 5)), x[2:5]) and torch.equal(f.batch(slice(2, 5)), x[2:5])
    assert torch.equal(f.batch([2, 3, 4]), x[2:5]) and torch.equal(f.batch(torch.tensor([-1])), x[-1:])
    with pytest.raises(IndexError, match="out of range"):
        f.batch([len(f)])


def test_folder_materialize_equals_its_batches(tmp_path):
    for k, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            save_image(str(tmp_path / cls / f"{i}.jpg"), (9, 7, 3), seed=10 * k + i)
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    f = D.load_data(str(tmp_path))
    assert isinstance(f, FolderImages) and not hasattr(f, "x")  # a streamed set is never loaded whole by accident
    assert f.y.tolist() == [0, 0, 0, 1, 1, 1] and f.classes == ["cat", "dog"] and f.name == tmp_path.name
    m = f.materialize()
    assert isinstance(m, ImageData) and torch.equal(m.x, f.batch(range(len(f)))) and torch.equal(m.y, f.y)
    assert m.x.shape == (6, 3, 9, 7)
    with pytest.raises(ValueError, match="read them in batches"):
        f.materialize(max_bytes=1000)


def test_only_the_first_image_is_decoded_at_construction(tmp_path):
    save_image(str(tmp_path / "a" / "0.png"), (8, 8, 3), seed=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.png").write_bytes(b"not a png at all")
    f = FolderImages(str(tmp_path))  # the corrupt file is only found when its batch is read
    assert len(f) == 2 and f.batch([0]).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError) as e:
        f.batch([1])
    one_line_error(e, "could not read image", os.path.join("b", "1.png"))


def test_split_limit_and_views_stay_lazy(mixed_folder):
    f = FolderImages(mixed_folder)
    tr, te = D.split_data(f, 0.34, seed=0)
    assert isinstance(tr, FolderImages) and isinstance(te, FolderImages)
    assert tr.name.endswith(":train") and te.classes == f.classes and te.transform == f.transform
    assert sorted(tr.ids(range(len(tr))) + te.ids(range(len(te)))) == sorted(f.ids(range(len(f))))
    assert sorted(set(te.y.tolist())) == [0, 1, 2]
    pos = {p: i for i, p in enumerate(f.ids(range(len(f))))}
    rows = [pos[p] for p in te.ids(range(len(te)))]
    assert torch.equal(te.batch(range(len(te))), f.batch(rows)) and torch.equal(te.y, f.y[rows])
    lim = f.limit(4)  # every k-th, as ImageData.limit
    assert lim.ids(range(4)) == f.ids(torch.linspace(0, len(f) - 1, 4).round().long())
    assert f.limit(None) is f and f.limit(100) is f
    D.check_labels(f, 3, "f")
    with pytest.raises(ValueError, match="model has 2 classes"):
        D.check_labels(f, 2, "f")


# ---------------------------------------------------------------------------------------------------------------
# The ImageNet preset on real ImageNet JPEGs

def imagenet_folder(root):
    """The foolbox JPEGs as an ImageFolder: one class folder per label in the file name."""
    files = foolbox_imagenet_jpegs()
    for f in files:
        label = re.match(r"imagenet_\d+_(\d+)\.jpg$", os.path.basename(f)).group(1)
        os.makedirs(os.path.join(root, label), exist_ok=True)
        shutil.copy(f, os.path.join(root, label, os.path.basename(f)))
    return files


def test_imagenet_preset_on_real_jpegs(tmp_path):
    imagenet_folder(str(tmp_path))
    t = Transform.from_options("imagenet")
    f = D.load_data(str(tmp_path), t)
    assert isinstance(f, FolderImages) and len(f) == 20 and f.sample_shape == (3, 224, 224)
    assert f.classes == sorted(f.classes) and "609" in f.classes
    ids = f.ids(range(len(f)))
    assert [f.classes[k] for k in f.y.tolist()] == [p.split("/")[0] for p in ids]
    assert [re.search(r"_(\d+)\.jpg$", p).group(1) for p in ids] == [p.split("/")[0] for p in ids]
    x = f.batch(range(len(f)))
    assert x.shape == (20, 3, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) < -1.0 and float(x.max()) > 1.5  # normalised, not in [0, 1]
    assert abs(float(x.mean())) < 0.75
    for i, p in enumerate(ids):  # 512x512 and one 1024x683 photograph
        np.testing.assert_allclose(x[i].numpy(), oracle_imagenet(os.path.join(str(tmp_path), p)), rtol=0, atol=1e-5)
    # smaller crop: the default resize follows (256/224 of it)
    small = Transform.from_options("imagenet", image_size=112)
    assert small.resize == 128 and small.describe() == "imagenet: resize 128, centre crop 112x112, mean/std normalised"
    g = f.with_transform(small)
    np.testing.assert_allclose(g.batch([3])[0].numpy(), oracle_imagenet(os.path.join(str(tmp_path), ids[3]), 112, 128),
                               rtol=0, atol=1e-5)
    # the same preprocessing of an in-memory tensor (torch's antialiased bilinear): close to PIL's
    from PIL import Image

    with Image.open(os.path.join(str(tmp_path), ids[0])) as img:
        raw = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    assert float((t.apply_tensor(raw[None])[0] - x[0]).abs().mean()) < 0.02


# ---------------------------------------------------------------------------------------------------------------
# batches: in order, with and without workers, errors as one line

def test_batches_workers_give_identical_ordered_batches(mixed_folder):
    f = FolderImages(mixed_folder, Transform.from_options("none", image_size=16))
    whole = f.batch(range(len(f)))
    for indices in (None, [7, 3, 3, 11, 0, 5, 9], torch.tensor([10, 2]), range(1, 12, 2)):
        runs = {w: list(f.batches(3, indices=indices, workers=w)) for w in (0, 2)}
        want = list(range(len(f))) if indices is None else [int(i) for i in indices]
        for w, run in runs.items():
            assert torch.cat([idx for idx, _, _ in run]).tolist() == want, w
            assert all(len(idx) <= 3 for idx, _, _ in run)
            for idx, x, y in run:
                assert idx.dtype == torch.int64 and torch.equal(x, whole[idx]) and torch.equal(y, f.y[idx])
        for (i0, x0, y0), (i2, x2, y2) in zip(runs[0], runs[2]):
            assert torch.equal(i0, i2) and torch.equal(x0, x2) and torch.equal(y0, y2)
    chunks = [torch.tensor([4, 1]), [0], range(5, 8)]
    got = list(f.batches_of(chunks, workers=2))
    assert [i.tolist() for i, _, _ in got] == [[4, 1], [0], [5, 6, 7]]
    assert torch.equal(got[2][1], whole[5:8])
    assert list(f.batches(4, indices=[])) == []
    with pytest.raises(ValueError, match="workers"):
        f.batches(4, workers=-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_jpeg_is_one_line_error(tmp_path, workers):
    for i in range(6):
        save_image(str(tmp_path / ("a" if i < 3 else "b") / f"{i}.jpg"), (32, 32, 3), seed=i)
    good = (tmp_path / "b" / "4.jpg").read_bytes()
    (tmp_path / "b" / "4.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    f = FolderImages(str(tmp_path))
    with pytest.raises(ValueError) as e:
        for _ in f.batches(2, workers=workers):
            pass
    path = os.path.join(str(tmp_path), "b", "4.jpg")
    msg = one_line_error(e, "could not read image", path)
    assert "DataLoader" not in msg.replace(path, "") and "worker" not in msg.replace(path, "")
    # the batches before it were delivered
    got = []
    with pytest.raises(ValueError):
        for idx, _, _ in f.batches(2, workers=workers):
            got += idx.tolist()
    assert got == [0, 1, 2, 3]


class _CollectingFolder(FolderImages):
    """Runs the garbage collector before every batch (in the worker processes when workers > 0)."""

    def batch(self, idx):
        import gc

        gc.collect()
        return super().batch(idx)


class _Cycle:
    """A reference cycle that writes the pid of the process that frees it (as a CUDA tensor would be freed)."""

    def __init__(self, path):
        self.path, self.me = path, self

    def __del__(self):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_workers_never_free_the_parents_garbage(mixed_folder, tmp_path):
    """A forked worker must not free what the parent left (a failed call's traceback holding GPU tensors: CUDA
    aborts in a forked process): the parent collects before the fork and the workers inherit a frozen heap."""
    import gc

    log = tmp_path / "freed"
    f = _CollectingFolder(mixed_folder, Transform.from_options("none", image_size=16))
    enabled = gc.isenabled()
    gc.disable()  # nothing collects the cycle in the parent but the data loader itself
    try:
        _Cycle(str(log))
        got = list(f.batches(4, workers=2))
    finally:
        if enabled:
            gc.enable()
    assert len(got) == 3
    assert log.read_text().split() == [str(os.getpid())]


def test_progress_bar_counts_images(mixed_folder, capsys, monkeypatch):
    f = FolderImages(mixed_folder)
    list(f.batches(5, progress="decode"))
    assert capsys.readouterr().err == ""  # not a terminal: no bar
    import gencnp_fast.target as T

    monkeypatch.setattr(T, "progress_enabled", lambda quiet=False: True)
    list(f.batches(5, progress="decode", workers=0))
    err = capsys.readouterr().err
    assert "decode" in err and re.search(r"12(\.0)?/12", err) and "img/s" in err


def test_in_memory_set_keeps_its_interface():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(10, 1, 6, 5, generator=g), torch.arange(10) % 3
    d = ImageData(x, y, ["a", "b", "c"], "arr")
    assert isinstance(d, ImageSet) and d.transform.is_identity and d.sample_shape == (1, 6, 5)
    assert torch.equal(d.batch([3, 1]), x[[3, 1]]) and d.materialize() is d
    sub = d.subset(torch.tensor([8, 2, 5]))
    assert isinstance(sub, ImageData) and torch.equal(sub.x, x[[8, 2, 5]]) and sub.ids([0, 2]) == ["arr[8]", "arr[5]"]
    assert torch.equal(d.limit(4).x, x[torch.linspace(0, 9, 4).round().long()])
    b0 = list(d.batches(4, workers=0))
    b2 = list(d.batches(4, workers=2))  # in memory: read directly, workers ignored
    assert [i.tolist() for i, _, _ in b2] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(b0, b2))
    tr, te = D.split_data(d, 0.3, seed=1)
    assert isinstance(tr, ImageData) and len(tr) + len(te) == 10


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs

def test_empty_class_folder_is_refused(tmp_path):
    save_image(str(tmp_path / "a" / "0.png"), (8, 8, 3), seed=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images")
    save_image(str(tmp_path / "c" / "0.png"), (8, 8, 3), seed=1)
    with pytest.raises(ValueError) as e:
        FolderImages(str(tmp_path))
    one_line_error(e, "class folder", os.path.join(str(tmp_path), "b"), "holds no images")


def test_missing_or_bad_roots(tmp_path):
    with pytest.raises(ValueError) as e:
        FolderImages(str(tmp_path / "nothing"))
    one_line_error(e, "nothing", "does not exist")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError) as e:
        FolderImages(str(tmp_path / "file"))
    one_line_error(e, "not a directory")
    (tmp_path / "flat").mkdir()
    save_image(str(tmp_path / "flat" / "0.png"), (8, 8, 3), seed=0)
    with pytest.raises(ValueError) as e:
        FolderImages(str(tmp_path / "flat"))
    one_line_error(e, "no class subdirectories")
    with pytest.raises(ValueError, match="not found"):
        D.load_data(str(tmp_path / "nothing"))


def test_corrupt_first_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.jpg").write_bytes(b"\xff\xd8\xff garbage")
    save_image(str(tmp_path / "a" / "1.jpg"), (8, 8, 3), seed=0)
    with pytest.raises(ValueError) as e:
        FolderImages(str(tmp_path))
    one_line_error(e, "could not read image", os.path.join("a", "0.jpg"))


def test_grayscale_image_in_rgb_folder(tmp_path):
    save_image(str(tmp_path / "a" / "0.jpg"), (40, 50, 3), seed=0)
    gray = save_image(str(tmp_path / "a" / "1.png"), (30, 30), seed=1)
    cmyk = save_image(str(tmp_path / "b" / "2.jpg"), (36, 44, 3), seed=2, mode="CMYK")
    rgba = save_image(str(tmp_path / "b" / "3.png"), (20, 20, 3), seed=3, mode="RGBA")
    f = FolderImages(str(tmp_path))
    assert f.sample_shape == (3, 40, 50)
    assert f.batch([0, 2, 3]).shape == (3, 3, 40, 50)  # CMYK and RGBA count as RGB
    with pytest.raises(ValueError) as e:
        f.batch([1])
    one_line_error(e, gray, "L image", "RGB", "--transform imagenet")
    for w in (0, 2):
        with pytest.raises(ValueError) as e:
            list(f.batches(2, workers=w))
        one_line_error(e, gray, "--transform imagenet")
    # channels given: every image converted to it
    assert FolderImages(str(tmp_path), channels=1).batch(range(4)).shape == (4, 1, 40, 50)
    # kind imagenet: every image converted to RGB, as PIL's convert("RGB")
    t = Transform.from_options("imagenet", image_size=24)
    x = FolderImages(str(tmp_path), t).batch(range(4))
    for i, p in enumerate([None, gray, cmyk, rgba]):
        if p is not None:
            np.testing.assert_allclose(x[i].numpy(), oracle_imagenet(p, 24, t.resize), rtol=0, atol=1e-5)
    plain = t.denormalize(x[1])  # the grayscale image: R = G = B
    torch.testing.assert_close(plain[0], plain[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(plain[1], plain[2], rtol=0, atol=1e-6)


def test_rgb_image_in_grayscale_folder(tmp_path):
    save_image(str(tmp_path / "a" / "0.png"), (12, 12), seed=0)
    rgb = save_image(str(tmp_path / "a" / "1.png"), (12, 12, 3), seed=1)
    f = FolderImages(str(tmp_path))
    assert f.sample_shape == (1, 12, 12)
    with pytest.raises(ValueError) as e:
        f.batch([0, 1])
    one_line_error(e, rgb, "RGB image", "L", "--transform imagenet")
    with pytest.raises(ValueError) as e:
        FolderImages(str(tmp_path), Transform.from_options(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]))
    one_line_error(e, "--mean", "1 channel")


@pytest.mark.parametrize("opts, option", [
    (dict(kind="imagenett"), "--transform"),
    (dict(kind=3), "--transform"),
    (dict(image_size=0), "--image-size"),
    (dict(image_size=-3), "--image-size"),
    (dict(image_size=2.5), "--image-size"),
    (dict(image_size="big"), "--image-size"),
    (dict(image_size=(1, 2, 3)), "--image-size"),
    (dict(image_size=True), "--image-size"),
    (dict(std=(0.2, 0.0, 0.2)), "--std"),
    (dict(std=float("nan")), "--std"),
    (dict(std=-1), "--std"),
    (dict(mean=(0.5, 0.5)), "--mean"),
    (dict(mean=(0.5, float("inf"), 0.5)), "--mean"),
    (dict(mean="a,b"), "--mean"),
    (dict(kind="imagenet", std=[1, 2, 3, 4]), "--std"),
])
def test_bad_transform_options(opts, option):
    with pytest.raises(ValueError) as e:
        Transform.from_options(**opts)
    one_line_error(e, option)


@pytest.mark.parametrize("d", [
    ["imagenet"], "imagenet", None,
    {"kind": "none", "size": 3},
    {"image_size": [224, 224]},
    {"kind": "resnet"},
    {"kind": "imagenet", "image_size": "x"},
    {"kind": "none", "mean": [0.5], "std": [0]},
    {"kind": "none", "mean": {"a": 1}},
])
def test_bad_transform_dicts(d):
    with pytest.raises(ValueError) as e:
        Transform.from_dict(d, source="g.pt: 'transform'")
    one_line_error(e, "g.pt: 'transform'", "malformed")


def test_mnist_and_imagenet_preset_is_refused():
    with pytest.raises(ValueError) as e:
        D.load_data("mnist", Transform.from_options("imagenet"))
    one_line_error(e, "--transform imagenet", "1-channel 28x28")
    tr, _ = D.mnist_split()
    with pytest.raises(ValueError, match="--transform imagenet"):
        tr.with_transform(Transform.from_options("imagenet"))
    m = D.load_data("mnist", Transform.from_options("none", image_size=14, mean=0.13, std=0.31))
    assert m.x.shape == (5000, 1, 14, 14) and m.transform.image_size == (14, 14)
    assert abs(float(m.x.mean())) < 0.2  # normalised
    plain = D.load_data("mnist")
    tr2, te2 = D.split_data(plain, 0.2, 0)  # the same split as the embedded default
    assert torch.equal(tr2.x, tr.x) and torch.equal(te2.y, D.mnist_split()[1].y)


# ---------------------------------------------------------------------------------------------------------------
# Memory-mapped .npz

@pytest.mark.parametrize("layout", ["uint8_nhwc", "float32_nchw", "uint8_nhw", "float64_fortran"])
def test_npz_is_memory_mapped_and_equal_to_in_memory(tmp_path, layout):
    rng = np.random.default_rng(0)
    if layout == "uint8_nhwc":
        x = rng.integers(0, 256, size=(11, 9, 7, 3), dtype=np.uint8)
    elif layout == "float32_nchw":
        x = rng.random((11, 3, 9, 7), dtype=np.float32)
    elif layout == "uint8_nhw":
        x = rng.integers(0, 256, size=(11, 9, 7), dtype=np.uint8)
    else:
        x = np.asfortranarray(rng.random((11, 3, 9, 7)))
    path = str(tmp_path / "d.npz")
    np.savez(path, x=x, y=np.arange(11) % 4)
    s = D.load_npz(path)
    mem = D.load_npz(path, mmap=False)
    assert isinstance(s, NpzImages) and isinstance(s.array, np.memmap) and isinstance(mem, ImageData)
    assert s.sample_shape == tuple(mem.x.shape[1:]) and torch.equal(s.y, mem.y) and s.classes is None
    assert torch.equal(s.batch(range(len(s))), mem.x)
    for w in (0, 2):
        for idx, xb, yb in s.batches(4, indices=[10, 0, 3, 3, 7], workers=w):
            assert torch.equal(xb, mem.x[idx]) and torch.equal(yb, mem.y[idx])
    v = s.subset([9, 2, 4])
    assert isinstance(v, NpzImages) and v.ids(range(3)) == ["d.npz[9]", "d.npz[2]", "d.npz[4]"]
    assert torch.equal(v.batch([2, 0]), mem.x[[4, 9]]) and torch.equal(s.limit(3).y, mem.limit(3).y)
    # a worker started with "spawn" gets the set pickled: the mapping is reopened, not copied
    blob = pickle.dumps(v)
    assert len(blob) < x.nbytes or x.nbytes < 4096
    w = pickle.loads(blob)
    assert isinstance(w.array, np.memmap) and torch.equal(w.batch(range(3)), v.batch(range(3)))
    # with a transform: the rows are read, then transformed as in memory
    t = Transform.from_options("none", image_size=(5, 6), mean=0.5, std=0.25)
    st = D.load_npz(path, t)
    assert st.sample_shape[1:] == (5, 6)
    torch.testing.assert_close(st.batch(range(11)), t.apply_tensor(mem.x), rtol=0, atol=1e-6)


def test_npz_compressed_falls_back_to_memory(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=np.arange(6))
    d = D.load_npz(str(tmp_path / "c.npz"))
    assert isinstance(d, ImageData) and d.x.shape == (6, 1, 8, 8)
    assert torch.equal(d.x, torch.from_numpy(x[:, None].astype(np.float32) / 255.0))
    t = Transform.from_options("none", mean=0.5, std=0.5)
    assert torch.equal(D.load_npz(str(tmp_path / "c.npz"), t).x, (d.x - 0.5) / 0.5)


def test_npz_nan_is_reported_when_its_batch_is_read(tmp_path):
    x = np.random.default_rng(2).random((10, 1, 6, 6), dtype=np.float32)
    x[7, 0, 2, 3] = np.nan
    path = str(tmp_path / "nan.npz")
    np.savez(path, x=x, y=np.zeros(10, dtype=np.int64))
    s = D.load_npz(path)  # no whole-file scan at load
    assert s.batch(range(7)).shape == (7, 1, 6, 6)
    with pytest.raises(ValueError) as e:
        s.batch([2, 7])
    one_line_error(e, "nan.npz", "image 7", "NaN")
    with pytest.raises(ValueError) as e:
        list(s.batches(3, workers=2))
    one_line_error(e, "nan.npz", "image 7", "NaN")
    with pytest.raises(ValueError, match="NaN"):  # in memory: checked at once, as before
        D.load_npz(path, mmap=False)


def test_npz_damaged_member_is_refused_at_load(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((50, 8, 8), dtype=np.uint8), y=np.arange(50))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x.npy")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len("x.npy") + 200 + 64 * 40] ^= 0xFF  # inside the image data
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError) as e:
        D.load_npz(str(tmp_path / "bad.npz"))
    one_line_error(e, "bad.npz", "could not read", "CRC")
    np.savez(tmp_path / "str.npz", x=np.array([["a"] * 4] * 3), y=np.arange(3))
    with pytest.raises(ValueError, match="expected real numbers"):
        D.load_npz(str(tmp_path / "str.npz"))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4, 4)), y=np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="no images"):
        D.load_npz(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "five.npz", x=np.zeros((2, 3, 4, 5, 6)), y=np.arange(2))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        D.load_npz(str(tmp_path / "five.npz"))


# ---------------------------------------------------------------------------------------------------------------
# Memory does not grow with the number of images

MEMORY_SCRIPT = textwrap.dedent("""
    import os, resource, sys, tracemalloc
    from gencnp_fast.data import FolderImages, Transform

    root, workers, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hold"
    f = FolderImages(root, Transform.from_options("none", image_size=128))  # 196 KB per decoded image
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():  # resident now, in bytes
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    def run(view):
        tracemalloc.start()
        n, top, kept = 0, 0, []
        for idx, x, y in view.batches(16, workers=workers):
            n += len(idx)
            assert x.shape == (len(idx), 3, 128, 128) and float(x.sum()) > 0  # read every page, as a consumer
            if hold:  # what a leak would do: the test must see it
                kept.append(x)
            top = max(top, rss())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return n, peak, top

    small = f.subset(range(40))
    run(small)  # warm up: imports, PIL plugins, allocator pools
    n1, peak1, rss1 = run(small)
    n2, peak2, rss2 = run(f)
    print(n1, peak1, rss1, n2, peak2, rss2)
""")


def test_iterating_memory_does_not_grow_with_the_set(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(400):
        d = tmp_path / f"c{i % 4}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg")
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("reads the resident set size from /proc (Linux)")

    def measure(workers, hold=False):
        out = subprocess.run([sys.executable, str(script), str(tmp_path), str(workers), "hold" if hold else "-"],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 0, out.stderr[-2000:]
        n1, peak1, rss1, n2, peak2, rss2 = map(int, out.stdout.split())
        assert (n1, n2) == (40, 400)
        return rss2 - rss1, peak2 - peak1

    # Holding the 360 extra decoded images would add 70 MB; iterating holds one batch (3 MB) and the prefetched ones.
    for workers in (0, 2):
        rss_growth, traced_growth = measure(workers)
        assert rss_growth < 20 << 20, (workers, rss_growth)
        assert traced_growth < 2 << 20, (workers, traced_growth)
    for workers in (0, 2):  # the measure sees a leak (batches from workers arrive in shared memory)
        assert measure(workers, hold=True)[0] > 50 << 20, workers


# ---------------------------------------------------------------------------------------------------------------
# Transform

def test_transform_round_trip_and_describe():
    cases = [Transform(), Transform.from_options("imagenet"), Transform.from_options("imagenet", image_size=(192, 256)),
             Transform.from_options("none", image_size=32, mean=0.1307, std=0.3081),
             Transform.from_options("none", mean=[0.5, 0.4, 0.3]), Transform.from_options("imagenet", std=0.5),
             Transform.from_options("imagenet", image_size="160x128", resize=200)]
    for t in cases:
        d = json.loads(json.dumps(t.to_dict()))
        assert Transform.from_dict(d) == t and Transform.from_dict(d).to_dict() == d
    net = cases[1]
    assert net.image_size == (224, 224) and net.resize == 256 and net.mean == D.IMAGENET_MEAN
    assert net.describe() == "imagenet: resize 256, centre crop 224x224, mean/std normalised"
    assert cases[2].resize == round(256 / 224 * 192)
    assert Transform().describe() == "none: [0, 1] scaling" and Transform().is_identity
    assert cases[3].describe() == "none: [0, 1] scaling, resize to 32x32, mean/std normalised"
    assert cases[4].std == (1.0, 1.0, 1.0) and not cases[4].is_identity
    assert cases[5].std == (0.5, 0.5, 0.5) and cases[6].resize == 200 and cases[6].image_size == (160, 128)
    assert Transform.from_options("imagenet", image_size=[224]) == net
    assert Transform.from_dict(net) is net and Transform.from_dict({"kind": "none"}) == Transform()


def test_transform_on_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 224, 224, generator=g)
    net = Transform.from_options("imagenet")
    y = net.apply_tensor(x)  # already 224x224: only normalised
    torch.testing.assert_close(y, (x - torch.tensor(MEAN)) / torch.tensor(STD))
    torch.testing.assert_close(net.denormalize(y), x, rtol=0, atol=1e-6)
    assert net.apply_tensor(torch.rand(2, 1, 300, 400)).shape == (2, 3, 224, 224)  # gray → RGB, resize, crop
    assert net.apply_tensor(torch.rand(3, 500, 260)).shape == (3, 224, 224)
    plain = Transform()
    assert plain.apply_tensor(x) is x and plain.denormalize(x) is x
    t = Transform.from_options("none", image_size=(20, 10))
    z = t.apply_tensor(x[:1])
    ref = torch.nn.functional.interpolate(x[:1], size=(20, 10), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(z, ref)
    with pytest.raises(ValueError, match="--mean"):
        Transform.from_options(mean=[0.1, 0.2, 0.3]).apply_tensor(torch.rand(1, 1, 4, 4))
    from PIL import Image

    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8))
    assert torch.equal(plain.apply_pil(img), torch.from_numpy(np.arange(48, dtype=np.float32).reshape(1, 6, 8) / 255))
    assert net.apply_pil(img).shape == (3, 224, 224)
