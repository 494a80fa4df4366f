"""Bad inputs to the CLI (issue #12): each is refused with ONE line on stderr naming the problem, exit status 2, no
traceback, and nothing half-written left behind. Classes: (1) code from data files, (3) NaN / infinity, (4) bad
options, files and environments, (6) outputs that survive a failure or a kill. Tiny models; about a minute on 2
cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import fails
from gencnp_fast.cli import main
from gencnp_fast.data import mnist_split
from gencnp_fast.generator import GenCNP
from gencnp_fast.models import mnist_resnet, mnist_vgg
from gencnp_fast.target import TARGET_FORMAT, load_target, save_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# helpers

def ok(capsys, argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err, cap.err
    return cap


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny target (safe format and whole-module pickle), a generator for it, an .npz, a trained run dir."""
    d = tmp_path_factory.mktemp("bad")
    tr, _ = mnist_split()
    idx = torch.arange(0, 4000, 40)  # 100 images, 10 per class
    np.savez(d / "d.npz", x=(tr.x[idx, 0] * 255).round().to(torch.uint8).numpy(), y=tr.y[idx].numpy())
    torch.manual_seed(0)
    model = mnist_vgg(width=4).eval()
    save_target(model, str(d / "t.pt"))
    torch.save(model, d / "whole.pt")
    torch.manual_seed(0)
    GenCNP(model, tr.x[:2], d=8, code_dim=8).save(str(d / "g.pt"))
    run = d / "run"
    assert main(["train", "--target", str(d / "t.pt"), "--data", str(d / "d.npz"), "--out", str(run), "--epochs",
                 "1", "--hidden", "8", "--code-dim", "8", "--batch-size", "32", "--quiet"]) == 0
    return d


def common(files):
    return ["--data", files / "d.npz", "--quiet"]


# ---------------------------------------------------------------------------------------------------------------
# 1. code from data files

def test_whole_module_pickle_is_refused_and_never_run(files, capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this creates the marker file

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    ev = ["--generator", files / "g.pt", "--out", tmp_path / "o", "--no-timing", "--no-suite"] + common(files)
    line = fails(capsys, ["evaluate", "--target", tmp_path / "evil.pt"] + ev, "pickle", "--trust-pickle",
                 untouched=[tmp_path])
    assert "io.open" in line or "builtins.open" in line
    fails(capsys, ["evaluate", "--target", files / "whole.pt"] + ev, "gencnp_fast.models.VGG", "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "o").exists()
    # the Python API refuses too, and loads the whole module only when trusted
    with pytest.raises(ValueError, match="trust-pickle"):
        load_target(str(files / "whole.pt"))
    assert isinstance(load_target(str(files / "whole.pt"), trust_pickle=True), torch.nn.Module)
    ok(capsys, ["evaluate", "--target", files / "whole.pt", "--trust-pickle"] + ev)


def test_a_target_file_does_not_choose_the_code_that_runs(files, capsys, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": TARGET_FORMAT, "spec": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
                "state_dict": {}}, tmp_path / "t.pt")
    fails(capsys, ["evaluate", "--target", tmp_path / "t.pt", "--generator", files / "g.pt", "--out",
                   tmp_path / "o", "--no-suite"] + common(files), "os:system", "--model")
    assert not marker.exists()


def test_train_target_writes_the_safe_format(files, capsys, tmp_path):
    ok(capsys, ["train-target", "--model", "mnist_vgg", "--num-classes", "10", "--out", tmp_path / "m" / "t.pt",
                "--epochs", "1", "--limit", "40"] + common(files))
    saved = torch.load(tmp_path / "m" / "t.pt", weights_only=True)
    assert saved["format"] == TARGET_FORMAT and saved["spec"] == {
        "factory": "mnist_vgg", "kwargs": {"num_classes": 10, "in_channels": 1}}
    assert sorted(os.listdir(tmp_path / "m")) == ["t.pt"]  # no temporary file left
    # a plain state_dict with --model still works
    torch.save(load_target(str(tmp_path / "m" / "t.pt")).state_dict(), tmp_path / "sd.pt")
    assert isinstance(load_target(str(tmp_path / "sd.pt"), "mnist_vgg"), torch.nn.Module)


# ---------------------------------------------------------------------------------------------------------------
# 3. NaN and infinity

def test_non_finite_data_stops_training(files, capsys, tmp_path):
    z = np.load(files / "d.npz")
    x = z["x"].astype(np.float32) / 255
    x[3, 4, 5] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=z["y"])
    fails(capsys, ["train-target", "--model", "mnist_vgg", "--data", tmp_path / "nan.npz", "--out",
                   tmp_path / "out" / "t.pt"], "nan.npz", "NaN", untouched=[tmp_path])
    fails(capsys, ["train", "--target", files / "t.pt", "--data", tmp_path / "nan.npz", "--out", tmp_path / "g"],
          "NaN", untouched=[tmp_path])


def test_non_finite_loss_stops_training_before_writing(files, capsys, tmp_path):
    torch.manual_seed(0)
    m = mnist_vgg(width=4).eval()
    with torch.no_grad():  # finite weights whose logits overflow to inf / NaN
        m.classifier[-1].weight.normal_(0, 1e36)
        m.features[0].weight.mul_(1e8)
    save_target(m, str(tmp_path / "inf.pt"))
    fails(capsys, ["train", "--target", tmp_path / "inf.pt", "--out", tmp_path / "g", "--epochs", "1"]
          + common(files), "nan", "target model's logits", untouched=[tmp_path])
    fails(capsys, ["train-target", "--model", "mnist_vgg", "--out", tmp_path / "t.pt", "--lr", "1e30", "--epochs",
                   "1"] + common(files), "diverged", untouched=[tmp_path])
    # a target file holding NaN weights is refused when it is read
    with torch.no_grad():
        m.features[0].bias.fill_(float("nan"))
    torch.save({"format": TARGET_FORMAT, "spec": {"factory": "mnist_vgg", "kwargs": {"width": 4}},
                "state_dict": m.state_dict()}, tmp_path / "nan.pt")
    fails(capsys, ["train", "--target", tmp_path / "nan.pt", "--out", tmp_path / "g"] + common(files),
          "features.0.bias", "NaN")


def test_metrics_json_is_strict_with_reasons(files, capsys, tmp_path):
    z = np.load(files / "d.npz")
    np.savez(tmp_path / "one.npz", x=z["x"][::10], y=z["y"][::10])  # one image per class: acIOU is undefined
    ok(capsys, ["evaluate", "--target", files / "t.pt", "--generator", files / "g.pt", "--data", tmp_path / "one.npz",
                "--test-data", tmp_path / "one.npz", "--out", tmp_path / "ev", "--no-timing", "--no-suite",
                "--quiet"])

    def no_constants(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    m = json.loads((tmp_path / "ev" / "metrics.json").read_text(), parse_constant=no_constants)
    assert m["gencnp"]["acIOU"] is None and "two or more samples" in m["undefined"]["gencnp.acIOU"]
    # evaluate --pathways prints strict JSON too
    cap = ok(capsys, ["evaluate", "--target", files / "t.pt", "--pathways", tmp_path / "ev" / "pathways.pt"])
    r = json.loads(cap.out, parse_constant=no_constants)
    assert r["acIOU"] is None and "acIOU" in r["undefined"]


# ---------------------------------------------------------------------------------------------------------------
# 4. bad options, files and environments

@pytest.mark.parametrize("cmd, option, value", [
    ("train", "--batch-size", "0"), ("train", "--batch-size", "-3"), ("train", "--epochs", "0"),
    ("train", "--lr", "nan"), ("train", "--lr", "-1"), ("train", "--hidden", "0"), ("train", "--val-fraction", "1"),
    ("train", "--checkpoint-every", "0"), ("train", "--seed", "-1"), ("train", "--test-fraction", "1.5"),
    ("train-target", "--batch-size", "0"), ("train-target", "--epochs", "x"), ("train-target", "--lr", "inf"),
    ("explain", "--batch-size-eval", "0"), ("evaluate", "--batch-size-eval", "-1"), ("evaluate", "--limit", "0"),
])
def test_bad_numbers_name_the_option(files, capsys, tmp_path, cmd, option, value):
    base = {"train": ["--target", files / "t.pt", "--out", tmp_path / "o"],
            "train-target": ["--model", "mnist_vgg", "--out", tmp_path / "o.pt"],
            "explain": ["--target", files / "t.pt", "--generator", files / "g.pt", "--out", tmp_path / "o"],
            "evaluate": ["--target", files / "t.pt", "--generator", files / "g.pt", "--out", tmp_path / "o"]}[cmd]
    fails(capsys, [cmd] + base + common(files) + [option, value], option, repr(value), untouched=[tmp_path])


def test_bad_npz_files(files, capsys, tmp_path):
    raw = (files / "d.npz").read_bytes()
    bad = bytearray(raw)
    bad[len(raw) // 2] ^= 0xFF  # inside the image member: a bad CRC
    cases = {"crc.npz": bytes(bad), "trunc.npz": raw[: len(raw) // 2], "garbage.npz": b"\x00garbage" * 40,
             "empty.npz": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 3, dtype=object), y=np.arange(3))
    np.savez(tmp_path / "keys.npz", images_wrong=np.zeros((3, 8, 8)))
    for name in list(cases) + ["obj.npz", "keys.npz"]:
        fails(capsys, ["train", "--target", files / "t.pt", "--data", tmp_path / name, "--out", tmp_path / "o"],
              name, untouched=[tmp_path])


def test_out_that_is_an_existing_file_or_directory(files, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    g = ["--generator", files / "g.pt"]
    for argv in (["train", "--target", files / "t.pt"] + common(files),
                 ["explain", "--target", files / "t.pt"] + g + common(files),
                 ["evaluate", "--target", files / "t.pt"] + g + common(files), ["demo", "--quiet"]):
        fails(capsys, argv + ["--out", f], "--out", "existing file", untouched=[tmp_path])
    fails(capsys, ["train", "--target", files / "t.pt", "--out", f / "sub"] + common(files), "is a file",
          untouched=[tmp_path])
    fails(capsys, ["train-target", "--model", "mnist_vgg", "--out", tmp_path] + common(files), "--out",
          "directory", untouched=[tmp_path])


def test_resume_checks(files, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files / "run", run)
    base = ["train", "--target", files / "t.pt", "--out", run, "--resume"] + common(files)
    fails(capsys, base + ["--hidden", "16"], "another size", "--hidden 8", untouched=[run])
    save_target(mnist_resnet(width=4), str(tmp_path / "other.pt"))
    fails(capsys, ["train", "--target", tmp_path / "other.pt", "--out", run, "--resume"] + common(files),
          "another model", untouched=[run])
    fails(capsys, base + ["--batch-size", "16"], "batch_size 32 -> 16", "--override", untouched=[run])
    fails(capsys, base + ["--lr", "0.5"], "lr 0.01 -> 0.5", "--override", untouched=[run])
    ok(capsys, base)  # the same settings (taken from the checkpoint): nothing to change, nothing refused
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    for key in ("optimizer", "epoch", "history"):
        broken = {k: v for k, v in ck.items() if k != key}
        (tmp_path / key).mkdir()
        torch.save(broken, tmp_path / key / "checkpoint.pt")
        fails(capsys, ["train", "--target", files / "t.pt", "--out", tmp_path / key, "--resume"] + common(files),
              repr(key), untouched=[tmp_path / key])
    gen_only = dict(ck, generator={k: v for k, v in ck["generator"].items() if k != "units"})
    (tmp_path / "gen").mkdir()
    torch.save(gen_only, tmp_path / "gen" / "checkpoint.pt")
    fails(capsys, ["train", "--target", files / "t.pt", "--out", tmp_path / "gen", "--resume"] + common(files),
          "'units' is missing")
    # --override accepts the change and says so; the checkpoint records it
    cap = ok(capsys, base + ["--batch-size", "16", "--lr", "0.005", "--epochs", "2", "--override"])
    assert "batch_size 32 -> 16" in cap.err and "lr 0.01 -> 0.005" in cap.err and "epochs 1 -> 2" in cap.err
    ck2 = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck2["config"]["batch_size"] == 16 and tuple(ck2["overrides"][0]["changes"]["lr"]) == (0.01, 0.005)
    assert ck2["optimizer"]["param_groups"][0]["lr"] == 0.005 and len(ck2["history"]) == 2


def test_pathways_files_that_do_not_fit(files, capsys, tmp_path):
    ok(capsys, ["explain", "--target", files / "t.pt", "--generator", files / "g.pt", "--out", tmp_path / "ex"]
       + common(files))
    p = torch.load(tmp_path / "ex" / "pathways.pt", weights_only=True)
    units = ["no_such_unit"] + p["units"][1:]
    renamed = dict(p, units=units, packed=dict(p["packed"], units=units))
    packed = p["packed"]
    cases = {"unit.pt": (renamed, "no_such_unit"), "int.pt": (dict(p, x=(p["x"] * 255).long()), "torch.float32"),
             "f64.pt": (dict(p, x=p["x"].double()), "torch.float32"), "nokey.pt": ({"x": p["x"]}, "pathways file"),
             "labels.pt": (dict(p, y=p["y"] + 20), "10 classes"),
             "units.pt": (dict(p, units=p["units"][::-1]), "differ from the packed"),
             "ids.pt": (dict(p, ids=p["ids"][:-1]), "'ids' must be"),
             "rows.pt": (dict(p, x_rows=p["x_rows"] + 10_000), "'x_rows' must be"),
             "bits.pt": (dict(p, packed=dict(packed, bits=packed["bits"][:, :-1])), "'bits' has shape"),
             "nox.pt": (dict(p, x=p["x"][:0], x_rows=p["x_rows"][:0]), "--save-inputs")}
    for name, (obj, word) in cases.items():
        torch.save(obj, tmp_path / name)
        fails(capsys, ["evaluate", "--target", files / "t.pt", "--pathways", tmp_path / name], name, word)


@pytest.mark.parametrize("env, word", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
                                       ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5"),
                                       ({"RANK": "x"}, "RANK='x'"), ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1")])
def test_bad_torchrun_environment(files, capsys, tmp_path, monkeypatch, env, word):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fails(capsys, ["train", "--target", files / "t.pt", "--out", tmp_path / "o"] + common(files), word,
          untouched=[tmp_path])


def test_class_names_that_break_mathtext(files, capsys, tmp_path):
    from PIL import Image

    z = np.load(files / "d.npz")
    for k, cls in enumerate(["$\\frac$", "a$b"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(z["x"][k * 10 + i]).save(tmp_path / "imgs" / cls / f"{i}.png")
    ok(capsys, ["evaluate", "--target", files / "t.pt", "--generator", files / "g.pt", "--data", tmp_path / "imgs",
                "--out", tmp_path / "ev", "--no-timing", "--quiet"])
    assert (tmp_path / "ev" / "report.html").is_file() and (tmp_path / "ev" / "class_frequency_gencnp.png").is_file()


def test_python_api_names_the_expected_dtype():
    from gencnp_fast.evaluation.interop import PathwayAttribution
    from gencnp_fast.target import check_model_input

    m = mnist_vgg(width=4).eval()
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="expected torch.float32"):
        PathwayAttribution(m, density=0.5).attribute(x.double())
    with pytest.raises(ValueError, match="expected torch.float32"):
        check_model_input(m, (x * 255).long())


# ---------------------------------------------------------------------------------------------------------------
# 6. outputs that survive a failure or a kill

def test_a_failed_write_keeps_the_old_file(files, capsys, tmp_path, monkeypatch):
    out = tmp_path / "ex"
    ok(capsys, ["explain", "--target", files / "t.pt", "--generator", files / "g.pt", "--out", out] + common(files))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the disk is full
        real_save(obj, f, *a, **k)
        if hasattr(f, "truncate"):
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    fails(capsys, ["explain", "--target", files / "t.pt", "--generator", files / "g.pt", "--out", out]
          + common(files), "No space left", untouched=[out])
    monkeypatch.undo()
    assert torch.load(out / "pathways.pt", weights_only=True)["x"].shape[0] == 20


def test_outputs_survive_a_kill(files, tmp_path):
    """SIGKILL a training run at several moments: every file in --out stays loadable (complete)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "gencnp_fast", "train", "--target", str(files / "t.pt"), "--data",
           str(files / "d.npz"), "--out", str(out), "--epochs", "50", "--batch-size", "8", "--checkpoint-every", "1",
           "--hidden", "8", "--code-dim", "8", "--quiet"]
    for delay in (3.5, 4.5, 5.5):
        p = subprocess.Popen(cmd + (["--resume"] if out.exists() else []), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        for f in ("checkpoint.pt", "generator.pt"):
            if (out / f).exists():
                torch.load(out / f, weights_only=True)  # complete and readable
    assert (out / "checkpoint.pt").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "partial" in ck or ck["epoch"] >= 0


def test_stderr_is_one_line_in_a_fresh_process(files, tmp_path):
    """The same checks through a real process: torch's own warnings must not add lines."""
    b = (files / "whole.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(b[: len(b) // 2])
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for target in (tmp_path / "trunc.pt", files / "whole.pt"):
        r = subprocess.run([sys.executable, "-m", "gencnp_fast", "evaluate", "--target", str(target), "--generator",
                            str(files / "g.pt"), "--data", str(files / "d.npz"), "--out", str(tmp_path / "o")],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and str(target.name) in r.stderr
