"""GEN-CNP training: the loss goes down, pathways get sparse, same seed gives the same result, resume is exact."""

import pytest
import torch

from gencnp_fast.data import mnist_split, split_data
from gencnp_fast.generator import GenCNP, TrainConfig, seed_everything, train_gencnp
from gencnp_fast.models import mnist_vgg
from gencnp_fast.target import train_target


@pytest.fixture(scope="module")
def setup():
    train, test = mnist_split()
    train = train.subset(torch.arange(0, 4000, 10))  # 400 images, 40 per class
    torch.manual_seed(0)
    target = mnist_vgg(width=4)
    for m in target.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    train_target(target, train, epochs=1, lr=5e-3, batch_size=32, quiet=True)
    # (accuracy does not matter here: any frozen CNN can be explained)
    tr, val = split_data(train, 0.25, seed=0)
    return target, tr, val


def small_cfg(**kw):
    base = dict(epochs=3, batch_size=50, lr=1e-2, lambda_sp=4.0, sp_warmup=0.0, soft_fraction=0.34, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def make_gen(target, x, seed=3):
    seed_everything(seed)
    return GenCNP(target, x[:2], d=16, code_dim=16)


def test_training_lowers_loss_and_density(setup, tmp_path):
    target, tr, val = setup
    gen = make_gen(target, tr.x)
    res = train_gencnp(gen, tr, val, small_cfg(), out_dir=str(tmp_path), quiet=True)
    h = res["history"]
    assert len(h) == 3
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["val_density_mean"] < 1.0
    assert min(r["val_density_mean"] for r in h) < 0.95
    assert (tmp_path / "generator.pt").is_file() and (tmp_path / "checkpoint.pt").is_file()
    best = GenCNP.load(tmp_path / "generator.pt", target)
    p = best.explain(val.x[:20])
    assert abs(p.density() - res["history"][res["best_epoch"]]["val_density_mean"]) < 0.2
    assert all(not q.requires_grad for q in target.parameters())


def test_same_seed_same_result(setup):
    target, tr, val = setup
    tr = tr.limit(120)
    runs = []
    for _ in range(2):
        gen = make_gen(target, tr.x)
        res = train_gencnp(gen, tr, val.limit(40), small_cfg(epochs=2), quiet=True)
        runs.append((gen.state_dict(), res["history"]))
    (s1, h1), (s2, h2) = runs
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    for a, b in zip(h1, h2):
        assert {k: v for k, v in a.items() if k != "train_seconds"} == {k: v for k, v in b.items()
                                                                       if k != "train_seconds"}


def test_resume_continues_exactly(setup, tmp_path):
    target, tr, val = setup
    tr, val = tr.limit(120), val.limit(40)
    cfg = small_cfg(epochs=2)
    full = make_gen(target, tr.x)
    res_full = train_gencnp(full, tr, val, cfg, out_dir=str(tmp_path / "a"), quiet=True)
    part = make_gen(target, tr.x)
    train_gencnp(part, tr, val, cfg, out_dir=str(tmp_path / "b"), quiet=True, stop_after=1)
    resumed = make_gen(target, tr.x, seed=99)  # different init: everything must come from the checkpoint
    res_resumed = train_gencnp(resumed, tr, val, cfg, out_dir=str(tmp_path / "b"), resume=True, quiet=True)
    assert len(res_resumed["history"]) == 2
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert res_full["best_epoch"] == res_resumed["best_epoch"]


def test_resume_from_corrupt_checkpoint_is_a_clear_error(setup, tmp_path):
    target, tr, val = setup
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    gen = make_gen(target, tr.x)
    with pytest.raises(ValueError, match="corrupt"):
        train_gencnp(gen, tr.limit(20), val.limit(10), small_cfg(epochs=1), out_dir=str(tmp_path), resume=True,
                     quiet=True)


def test_labels_out_of_range_are_rejected(setup):
    target, tr, val = setup
    bad = tr.limit(10)
    bad = type(bad)(bad.x, bad.y + 5, None, "bad")
    gen = make_gen(target, tr.x)
    with pytest.raises(ValueError, match="10 classes"):
        train_gencnp(gen, bad, val.limit(10), small_cfg(epochs=1), quiet=True)
