"""torch.distributed (gloo, CPU): 2-process ``torchrun`` training equals one process with the same global batch,
2-process ``evaluate`` gives the single-process metrics, a run killed mid-epoch resumes (with another world size)
and ends as an uninterrupted run. Tiny configuration; the whole file takes well under 90 s on 2 cores."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gencnp_fast import distributed as D
from gencnp_fast.cli import main
from gencnp_fast.data import mnist_split
from gencnp_fast.generator import GenCNP, seed_everything
from gencnp_fast.models import mnist_vgg
from gencnp_fast.target import save_target, train_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "gencnp_fast"] + list(args)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    train, _ = mnist_split()
    torch.manual_seed(0)
    target = mnist_vgg(width=4)
    for m in target.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    train_target(target, train.limit(300), epochs=1, lr=5e-3, batch_size=32, quiet=True)  # varied predictions
    save_target(target, str(root / "target.pt"))
    # 233 images -> 210 train / 23 validation; batch 36: 5 full batches (18 per rank) and one of 30 (15 + 15)...
    train_args = ["--target", str(root / "target.pt"), "--data", "mnist", "--limit", "233", "--epochs", "2",
                  "--batch-size", "36", "--hidden", "8", "--code-dim", "8", "--seed", "1", "--soft-fraction", "0.5",
                  "--lambda-sp", "1.0", "--quiet"]
    single = root / "single"
    assert main(["train"] + train_args + ["--out", str(single)]) == 0
    return root, target, train_args, single


def _state(path):
    ck = torch.load(path, weights_only=True)
    return ck["generator"]["state_dict"] if "generator" in ck else ck["state_dict"]


def _assert_close_states(a, b, atol=1e-5):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=atol, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


def test_distributed_shard_rules():
    assert D.shard_sizes(33, 2) == [17, 16] and D.shard_sizes(1, 4) == [1, 0, 0, 0]
    for n, w in ((36, 2), (33, 2), (3, 4), (10, 3)):
        parts = [list(range(n))[D.shard_slice(n, w, r)] for r in range(w)]
        assert sum(parts, []) == list(range(n))
    for n, bs, w in ((90, 16, 2), (90, 16, 3), (10, 16, 2)):  # whole eval batches, single-process batch edges
        got = [b for r in range(w) for b in D.batch_shard(n, bs, w, r)]
        assert got == [(i, min(i + bs, n)) for i in range(0, n, bs)]
    assert D.env_from_torchrun({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == D.DistEnv(3, 4, 1)
    assert not D.env_from_torchrun({}).distributed and not D.is_active() and D.is_main()


def test_distributed_train_matches_single_process(setup):
    root, _, train_args, single = setup
    # the check is not vacuous: the global batch's class term couples samples and the predictions vary
    out = root / "ddp"
    torchrun(["train"] + train_args + ["--out", str(out)])
    _assert_close_states(_state(single / "checkpoint.pt"), _state(out / "checkpoint.pt"))
    _assert_close_states(_state(single / "generator.pt"), _state(out / "generator.pt"))
    h1 = torch.load(single / "checkpoint.pt", weights_only=True)["history"]
    h2 = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    for a, b in zip(h1, h2):
        for k in ("train_loss", "train_kd", "train_density", "train_cls", "val_fidelity", "val_density_mean"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    assert h1[-1]["train_cls"] > 0.1


def test_distributed_evaluate_equals_single_process(setup):
    root, target, _, _ = setup
    tr, _ = mnist_split()
    seed_everything(5)
    gen = GenCNP(target, tr.x[:2], d=8, code_dim=8)
    with torch.no_grad():  # a generator with mixed pathways (half of the channels kept, varying per sample)
        for p in gen.rpd.parameters():
            p.add_(torch.randn_like(p) * 0.5)
            if p.dim() == 1:
                p.zero_()
    gen.save(str(root / "gen_eval.pt"))
    args = ["evaluate", "--target", str(root / "target.pt"), "--generator", str(root / "gen_eval.pt"), "--data",
            "mnist", "--test-limit", "90", "--batch-size-eval", "16", "--no-timing", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun children (OMP_NUM_THREADS=1): the same float32 kernels
    try:
        assert main(args + ["--out", str(root / "eval1")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun(args + ["--out", str(root / "eval2")])
    m1 = json.loads((root / "eval1" / "metrics.json").read_text())
    m2 = json.loads((root / "eval2" / "metrics.json").read_text())
    g1, g2 = m1["gencnp"], m2["gencnp"]
    assert 0.05 < g1["density_mean"] < 0.95 and g1["density_std"] > 0 and g1["acIOU"] < 1
    assert m1["target"] == m2["target"]
    for k in ("fidelity", "density_mean", "density_std", "density_per_unit"):
        assert g1[k] == g2[k], k
    for k in ("mDC", "mIC", "acIOU", "inter_class_iou"):
        assert abs(g1[k] - g2[k]) <= 1e-12 * max(1.0, abs(g1[k])), (k, g1[k], g2[k])
    p1 = torch.load(root / "eval1" / "pathways.pt", weights_only=True)
    p2 = torch.load(root / "eval2" / "pathways.pt", weights_only=True)
    assert p1["units"] == p2["units"] and torch.equal(p1["y"], p2["y"]) and torch.equal(p1["x"], p2["x"])
    assert all(torch.equal(p1["pathway"][n], p2["pathway"][n]) for n in p1["units"])


def test_distributed_killed_run_resumes_with_other_world_size(setup):
    root, _, train_args, single = setup
    out = root / "killed"
    # 2 processes, checkpoint every 2 steps, "killed" after step 3 of epoch 1 (6 steps per epoch): the step after
    # the last checkpoint is lost; resume with ONE process from the mid-epoch checkpoint
    torchrun(["train"] + train_args + ["--out", str(out), "--checkpoint-every", "2", "--stop-after-steps", "3"])
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == -1 and ck["partial"]["epoch"] == 0 and ck["partial"]["next_batch"] == 2
    assert not (out / "generator.pt").exists()
    assert main(["train"] + train_args + ["--out", str(out), "--resume"]) == 0
    _assert_close_states(_state(single / "checkpoint.pt"), _state(out / "checkpoint.pt"))
    _assert_close_states(_state(single / "generator.pt"), _state(out / "generator.pt"))
    h1 = torch.load(single / "checkpoint.pt", weights_only=True)["history"]
    h2 = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    assert [r["epoch"] for r in h2] == [0, 1]
    for a, b in zip(h1, h2):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * max(1.0, abs(a["train_loss"]))
