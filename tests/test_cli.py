"""The ``gencnp`` CLI end to end on a tiny configuration, the metrics recompute, and clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gencnp_fast.cli import main
from gencnp_fast.data import mnist_split
from gencnp_fast.explain import load_pathways, recompute_metrics
from gencnp_fast.models import mnist_resnet
from gencnp_fast.target import load_target, save_target

TINY_DEMO = ["--quick", "--epochs", "1", "--target-epochs", "1", "--limit", "300", "--test-limit", "100",
             "--width", "4", "--quiet"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)] + TINY_DEMO) == 0
    return out


def test_demo_writes_everything(demo_dir):
    for f in ("metrics.json", "target_model.pt", "generator.pt", "pathways.pt"):
        assert (demo_dir / f).is_file(), f
    m = json.loads((demo_dir / "metrics.json").read_text())
    assert set(m["target"]) >= {"accuracy"}
    assert set(m["gencnp"]) >= {"fidelity", "mDC", "mIC", "density_mean", "density_std", "density_per_unit",
                                "acIOU", "inter_class_iou", "explain_ms_per_image"}
    saved = torch.load(demo_dir / "target_model.pt", weights_only=True)  # the safe format: no pickled objects
    assert saved["format"] == "gencnp_fast.target/1" and saved["spec"]["factory"] == "mnist_vgg"
    target = load_target(str(demo_dir / "target_model.pt"))
    assert type(target).__module__ == "gencnp_fast.models" and not target.training
    raw = torch.load(demo_dir / "pathways.pt", weights_only=True)  # format 2: packed pathways, every input here
    assert raw["format"] == "gencnp_fast.pathways/2" and raw["packed"]["bits"].dtype == torch.uint8
    assert raw["x"].shape == (100, 1, 28, 28) and raw["y"].shape == (100,) and len(raw["ids"]) == 100
    p = load_pathways(str(demo_dir / "pathways.pt"))
    assert list(p["pathway"]) == p["units"]
    assert all(p["pathway"][n].dtype == torch.bool and p["pathway"][n].shape[0] == 100 for n in p["units"])
    assert set(m["gencnp"]["density_per_unit"]) == set(p["units"])
    # the evaluation suite: baselines with GEN-CNP's keys, transfer, and the report
    assert set(m["baselines"]) == {"cdrp", "neuron_mct", "random"}
    for b in m["baselines"].values():
        assert set(b) >= set(m["gencnp"]) - {"dense_ms_per_image", "explain_cost_ratio", "dense_ms_per_image_b1",
                                             "explain_ms_per_image_b1", "explain_cost_ratio_b1"}
    for rule in ("majority", "union", "intersection"):
        assert set(m["transfer"][rule]) >= {"fidelity", "mDC", "mIC", "density_mean"}
    assert (demo_dir / "report.html").is_file()


def test_metrics_recompute_from_pathways_with_the_reference_forward(demo_dir):
    m = json.loads((demo_dir / "metrics.json").read_text())["gencnp"]
    r = recompute_metrics(str(demo_dir / "pathways.pt"), str(demo_dir / "target_model.pt"))
    for k in ("fidelity", "mDC", "mIC", "density_mean", "density_std", "acIOU", "inter_class_iou"):
        assert r[k] == pytest.approx(m[k], rel=1e-4, abs=1e-4), k
    for n, v in m["density_per_unit"].items():
        assert r["density_per_unit"][n] == pytest.approx(v, abs=1e-9)
    acc = json.loads((demo_dir / "metrics.json").read_text())["target"]["accuracy"]
    assert r["accuracy"] == pytest.approx(acc, abs=1e-9)


@pytest.fixture(scope="module")
def user_flow(tmp_path_factory):
    """A user's own data (.npz) and model: train-target, train, explain, evaluate."""
    d = tmp_path_factory.mktemp("user")
    tr, te = mnist_split()
    idx = torch.arange(0, 4000, 20)
    x = (tr.x[idx, 0] * 255).round().to(torch.uint8).numpy()  # [N, H, W] uint8
    np.savez(d / "digits.npz", x=x, y=tr.y[idx].numpy())
    base = ["--data", str(d / "digits.npz"), "--quiet"]
    assert main(["train-target", "--model", "mnist_vgg", "--out", str(d / "t.pt"), "--epochs", "1"] + base) == 0
    assert main(["train", "--target", str(d / "t.pt"), "--out", str(d / "g"), "--epochs", "1", "--hidden", "16",
                 "--code-dim", "16"] + base) == 0
    return d, base


def test_user_model_and_data(user_flow):
    d, base = user_flow
    assert (d / "g" / "generator.pt").is_file() and (d / "g" / "checkpoint.pt").is_file()
    assert main(["explain", "--target", str(d / "t.pt"), "--generator", str(d / "g" / "generator.pt"),
                 "--out", str(d / "e")] + base) == 0
    p = torch.load(d / "e" / "pathways.pt", weights_only=True)
    assert p["x"].shape == (40, 1, 28, 28)  # the deterministic 20 % test split of 200 images
    # a state_dict plus module:factory
    model = load_target(str(d / "t.pt"))
    torch.save(model.state_dict(), d / "sd.pt")
    assert main(["evaluate", "--target", str(d / "sd.pt"), "--model", "gencnp_fast.models:mnist_vgg",
                 "--generator", str(d / "g" / "generator.pt"), "--out", str(d / "ev"), "--no-timing"] + base) == 0
    m = json.loads((d / "ev" / "metrics.json").read_text())
    assert 0.0 <= m["gencnp"]["fidelity"] <= 1.0
    # resume a finished run: nothing left to do, still fine
    assert main(["train", "--target", str(d / "t.pt"), "--out", str(d / "g"), "--epochs", "1", "--hidden", "16",
                 "--code-dim", "16", "--resume"] + base) == 0


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err


def test_bad_inputs_give_clear_errors(user_flow, capsys, tmp_path):
    d, _ = user_flow
    gen = str(d / "g" / "generator.pt")
    ev = ["--target", str(d / "t.pt"), "--generator", gen, "--out", str(tmp_path / "o"), "--no-timing", "--quiet"]
    # wrong image shape for the model
    np.savez(tmp_path / "rgb.npz", x=np.zeros((10, 32, 32, 3), np.uint8), y=np.arange(10))
    _fails(capsys, ["evaluate", "--data", str(tmp_path / "rgb.npz")] + ev, "do not fit")
    # labels out of range
    np.savez(tmp_path / "lab.npz", x=np.zeros((10, 28, 28), np.uint8), y=np.arange(10) + 5)
    _fails(capsys, ["evaluate", "--data", str(tmp_path / "lab.npz"), "--test-data", str(tmp_path / "lab.npz")]
           + ev, "10 classes")
    # a generator checkpoint made for another model
    save_target(mnist_resnet(width=4), str(tmp_path / "other.pt"))
    _fails(capsys, ["evaluate", "--data", str(d / "digits.npz"), "--target", str(tmp_path / "other.pt"),
                    "--generator", gen, "--out", str(tmp_path / "o"), "--quiet"], "another model")
    # corrupt checkpoints
    (tmp_path / "bad.pt").write_bytes(b"\x00\x01garbage" * 50)
    _fails(capsys, ["evaluate", "--data", str(d / "digits.npz"), "--target", str(d / "t.pt"), "--generator",
                    str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o"), "--quiet"], "corrupt")
    _fails(capsys, ["evaluate", "--data", str(d / "digits.npz"), "--target", str(tmp_path / "bad.pt"),
                    "--generator", gen, "--out", str(tmp_path / "o"), "--quiet"], "corrupt")
    # a state_dict that belongs to another model
    _fails(capsys, ["evaluate", "--data", str(d / "digits.npz"), "--target", str(d / "sd.pt"), "--model",
                    "gencnp_fast.models:mnist_resnet", "--generator", gen, "--out", str(tmp_path / "o"), "--quiet"],
           "does not fit")


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "gencnp_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout and "train-target" in r.stdout


def test_evaluation_hooks_extend_metrics(user_flow, tmp_path):
    from gencnp_fast import explain

    d, base = user_flow

    def hook(result):
        result.metrics["extra"] = {"n": len(result.data), "units": len(result.generator.units)}

    explain.register_evaluation_hook(hook)
    try:
        assert main(["evaluate", "--target", str(d / "t.pt"), "--generator", str(d / "g" / "generator.pt"),
                     "--out", str(tmp_path / "ev"), "--no-timing"] + base) == 0
    finally:
        explain.EVALUATION_HOOKS.remove(hook)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["extra"] == {"n": 40, "units": 6}
