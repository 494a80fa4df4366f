"""torch.distributed (gloo, CPU): 2-process ``torchrun`` training equals one process with the same global batch,
2-process ``evaluate`` gives the single-process metrics, a run killed mid-epoch resumes (with another world size)
and ends as an uninterrupted run. Tiny configuration; the whole file takes well under 90 s on 2 cores."""

import json
import os
import socket
import subprocess
import sys
import time

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


def _mixed_generator(target, example, seed: int, path) -> None:
    """A generator with mixed pathways (about half of the channels kept, varying per sample), saved to ``path``."""
    seed_everything(seed)
    gen = GenCNP(target, example, d=8, code_dim=8)
    with torch.no_grad():
        for p in gen.rpd.parameters():
            p.add_(torch.randn_like(p) * 0.5)
            if p.dim() == 1:
                p.zero_()
    gen.save(str(path))


def _one_and_two_processes(args, out1, out2):
    """``args`` (an evaluate command) in this process (1 thread, as the torchrun children) into ``out1`` and under
    torchrun with 2 processes into ``out2``; the metrics must agree exactly (float64 sums to 1e-12). Returns both
    metrics.json and both raw pathways.pt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun children (OMP_NUM_THREADS=1): the same float32 kernels
    try:
        assert main(args + ["--out", str(out1)]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun(args + ["--out", str(out2)])
    m1 = json.loads((out1 / "metrics.json").read_text())
    m2 = json.loads((out2 / "metrics.json").read_text())
    g1, g2 = m1["gencnp"], m2["gencnp"]
    assert 0.05 < g1["density_mean"] < 0.95 and g1["density_std"] > 0 and g1["acIOU"] < 1
    assert m1["target"] == m2["target"]
    for k in ("fidelity", "density_mean", "density_std", "density_per_unit"):
        assert g1[k] == g2[k], k
    for k in ("mDC", "mIC", "acIOU", "inter_class_iou"):
        assert abs(g1[k] - g2[k]) <= 1e-12 * max(1.0, abs(g1[k])), (k, g1[k], g2[k])
    return (m1, m2, torch.load(out1 / "pathways.pt", weights_only=True),
            torch.load(out2 / "pathways.pt", weights_only=True))


def test_distributed_evaluate_equals_single_process(setup):
    root, target, _, _ = setup
    tr, _ = mnist_split()
    _mixed_generator(target, tr.x[:2], 5, root / "gen_eval.pt")
    args = ["evaluate", "--target", str(root / "target.pt"), "--generator", str(root / "gen_eval.pt"), "--data",
            "mnist", "--test-limit", "90", "--batch-size-eval", "16", "--no-timing", "--quiet"]
    m1, m2, p1, p2 = _one_and_two_processes(args, root / "eval1", root / "eval2")
    assert p1["units"] == p2["units"] and torch.equal(p1["y"], p2["y"]) and torch.equal(p1["x"], p2["x"])
    assert torch.equal(p1["packed"]["bits"], p2["packed"]["bits"]) and p1["ids"] == p2["ids"]
    assert torch.equal(p1["pred"], p2["pred"]) and torch.equal(p1["path_pred"], p2["path_pred"])
    assert torch.equal(p1["x_rows"], p2["x_rows"]) and len(p1["ids"]) == 90


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


FAULTY = '''
import os, time
from gencnp_fast.models import mnist_vgg

def make():
    """A user's model factory that fails on rank 1; on the others it is slow (``BUSY`` seconds) or quick."""
    if os.environ.get("RANK") == "1":
        raise ValueError("this factory fails on rank 1")
    time.sleep(float(os.environ.get("BUSY", "0")))
    return mnist_vgg(width=4)
'''


def _faulty_setup(root):
    (root / "faulty_factory.py").write_text(FAULTY)
    torch.save(mnist_vgg(width=4).state_dict(), root / "faulty_sd.pt")
    return ["train", "--target", str(root / "faulty_sd.pt"), "--model", "faulty_factory:make", "--data", "mnist",
            "--limit", "100", "--epochs", "1", "--out", str(root / "faulty_run"), "--quiet"]


def test_one_failing_rank_stops_every_rank_under_torchrun(tmp_path):
    """Rank 1 fails with a bad input: torchrun ends with an error within seconds (not the 30-minute collective
    timeout), the failing rank's error is one line, and no rank prints a traceback."""
    args = _faulty_setup(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "gencnp_fast"] + args
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=dict(env, BUSY="1"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert "gencnp train: error (rank 1): model factory 'faulty_factory:make' failed" in r.stderr, r.stderr[-3000:]
    # torchrun reports the failed child with a traceback of its own launcher; no frame of a rank's code
    assert "gencnp_fast/" not in r.stderr, r.stderr[-3000:]


def test_a_failing_rank_stops_a_busy_rank(tmp_path):
    """Without torchrun's own clean-up (the agent's store hosted here, the ranks started by hand): rank 1 fails while
    rank 0 is busy for 120 s in no collective; rank 0 must still stop within seconds, non-zero, in one line."""
    import datetime

    import torch.distributed as dist

    args = _faulty_setup(tmp_path)
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,  # the agent's store
                          timeout=datetime.timedelta(seconds=60))
    procs = []
    t0 = time.monotonic()
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", BUSY="120", OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME="lo", TORCHELASTIC_RUN_ID=f"test{port}",
                   PYTHONPATH=os.pathsep.join([str(tmp_path), os.path.join(ROOT, "src"),
                                               os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-m", "gencnp_fast"] + args, env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
        del store
    assert time.monotonic() - t0 < 60
    (_, err0), (_, err1) = results
    assert procs[0].returncode == 1 and procs[1].returncode == 2, (err0, err1)
    assert err1.strip().splitlines() == [
        "gencnp train: error (rank 1): model factory 'faulty_factory:make' failed with kwargs {}: ValueError: this "
        "factory fails on rank 1"], err1
    assert len(err0.strip().splitlines()) == 1 and "another process failed" in err0, err0


def test_distributed_evaluate_of_a_jpeg_folder_equals_single_process(setup, tmp_path):
    """A streamed ImageFolder of JPEGs (``--test-data`` alone, read batch by batch, ``--workers 0``): 2 processes
    give the metrics and the pathways.pt (packed bits, ids, predictions) of one."""
    from PIL import Image

    root, target, _, _ = setup
    _, te = mnist_split()
    imgs = tmp_path / "digits"
    for k in range(10):  # 9 grayscale JPEGs of each digit: 90 images, 6 batches of 16 (the last of 10)
        (imgs / str(k)).mkdir(parents=True)
        for j, i in enumerate(torch.nonzero(te.y == k).flatten()[:9].tolist()):
            a = (te.x[i, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(a, mode="L").save(imgs / str(k) / f"{j}.jpg", quality=90)
    _mixed_generator(target, te.x[:2], 7, tmp_path / "gen.pt")
    args = ["evaluate", "--target", str(root / "target.pt"), "--generator", str(tmp_path / "gen.pt"), "--test-data",
            str(imgs), "--batch-size-eval", "16", "--workers", "0", "--no-timing", "--no-suite", "--quiet"]
    m1, m2, p1, p2 = _one_and_two_processes(args, tmp_path / "one", tmp_path / "two")
    assert m1["target"]["n_test"] == 90 and m2["throughput"]["images"] == 90
    ids = [f"{k}/{j}.jpg" for k in range(10) for j in range(9)]
    assert p1["ids"] == ids and p2["ids"] == ids
    assert p1["units"] == p2["units"] and torch.equal(p1["y"], p2["y"]) and torch.equal(p1["x"], p2["x"])
    assert torch.equal(p1["packed"]["bits"], p2["packed"]["bits"]) and p1["packed"]["bits"].shape[0] == 90
    assert torch.equal(p1["pred"], p2["pred"]) and torch.equal(p1["path_pred"], p2["path_pred"])
    assert torch.equal(p1["x_rows"], p2["x_rows"])
