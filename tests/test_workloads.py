"""Real workloads through the ``gencnp`` CLI: real ImageNet JPEGs with the ResNet-18 / ResNet-50 architectures,
``--test-data DIR`` alone, transform overrides, peak memory that stays flat in the number of images, outputs whose
size does not grow with it (``report_bytes``), bad inputs of image folders and of the new options (one line, exit
status 2), and ``--device cpu`` against ``--device auto``. Small models and sets; about 2 minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import fails
from gencnp_fast.cli import main
from gencnp_fast.data import FolderImages, Transform, load_data
from gencnp_fast.explain import evaluate_gencnp, explain_to_file, load_pathways, write_outputs
from gencnp_fast.generator import GenCNP, seed_everything
from gencnp_fast.models import mnist_vgg
from gencnp_fast.target import load_target, save_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# helpers

def ok(capsys, argv):
    """``main(argv)`` returns 0 without a traceback; the captured output."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err, cap.err
    return cap


def jpeg_folder(root, n, size, classes=3, mode="RGB", seed=0):
    """``n`` JPEGs of ``size`` x ``size`` dealt over ``classes`` class folders ``c0``, ``c1``, ... (image ``i`` in
    ``c{i % classes}``): smooth random images (upsampled 8x8 noise), so they compress small."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        d = os.path.join(str(root), f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BILINEAR).convert(mode)
        img.save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
    return root


def folder_ids(root):
    """The relative paths of a folder's images in ImageFolder order (classes sorted, files sorted)."""
    return [f"{c}/{f}" for c in sorted(os.listdir(root)) for f in sorted(os.listdir(os.path.join(root, c)))]


def mixed_generator(target, example, seed=5, d=8):
    """A generator whose pathways vary per sample (about half of the channels kept): randomised decoder weights,
    zero biases (as tests/test_distributed.py)."""
    seed_everything(seed)
    gen = GenCNP(target, example, d=d, code_dim=8)
    with torch.no_grad():
        for p in gen.rpd.parameters():
            p.add_(torch.randn_like(p) * 0.5)
            if p.dim() == 1:
                p.zero_()
    return gen.eval()


def pathways(path):
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# 1. real ImageNet JPEGs, ResNet-18 and ResNet-50

def foolbox_jpegs():
    spec = importlib.util.find_spec("foolbox")  # found, never imported
    if spec is None or not spec.origin:
        return []
    d = os.path.join(os.path.dirname(spec.origin), "data")
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.startswith("imagenet_") and f.endswith(".jpg")]


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    files = foolbox_jpegs()
    if len(files) != 20:
        pytest.skip("needs the 20 ImageNet JPEGs of the foolbox wheel (pip install --no-deps foolbox==3.3.4); "
                    f"found {len(files)}")
    root = tmp_path_factory.mktemp("imagenet") / "imgs"
    for i, f in enumerate(files):
        (root / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / f"class{i % 4}" / os.path.basename(f))
    return root


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_real_jpegs_train_explain_evaluate(imagenet_folder, arch, tmp_path, capsys):
    from gencnp_fast import models

    imgs = imagenet_folder
    torch.manual_seed(0)
    torch.save(getattr(models, arch)().state_dict(), tmp_path / "w.pth")  # a plain state_dict, random weights
    model = ["--target", tmp_path / "w.pth", "--model", f"gencnp_fast.models:{arch}", "--model-kwargs",
             '{"num_classes": 1000}', "--device", "auto"]
    ok(capsys, ["train"] + model + ["--data", imgs, "--test-data", imgs, "--transform", "imagenet", "--epochs", "1",
                                    "--batch-size", "8", "--val-fraction", "0.25", "--hidden", "16", "--code-dim",
                                    "16", "--out", tmp_path / "run", "--quiet"])
    imagenet = Transform.from_options("imagenet").to_dict()
    g = pathways(tmp_path / "run" / "generator.pt")
    assert g["transform"] == imagenet and g["input_shape"] == [3, 224, 224]
    assert imagenet["image_size"] == [224, 224] and imagenet["resize"] == 256

    # explain without --transform: the generator's transform is reused
    cap = ok(capsys, ["explain"] + model + ["--generator", tmp_path / "run" / "generator.pt", "--test-data", imgs,
                                            "--out", tmp_path / "ex", "--batch-size-eval", "10"])
    assert re.search(r"explained 20 images in [0-9.]+ s: [0-9.]+ images/s", cap.out), cap.out
    p = pathways(tmp_path / "ex" / "pathways.pt")
    ids = folder_ids(imgs)
    assert p["ids"] == ids and len(ids) == 20 and all(i.endswith(".jpg") for i in ids)
    assert p["transform"] == imagenet
    assert p["packed"]["bits"].shape[0] == 20 and p["y"].tolist() == [int(i[5]) for i in ids]
    assert p["x"].shape == (20, 3, 224, 224) and p["x_rows"].tolist() == list(range(20))
    want = FolderImages(str(imgs), Transform.from_options("imagenet")).batch(torch.arange(20))
    assert torch.equal(p["x"], want)  # read with resize 256 / centre crop 224 / ImageNet mean and std

    ok(capsys, ["evaluate"] + model + ["--generator", tmp_path / "run" / "generator.pt", "--test-data", imgs,
                                       "--out", tmp_path / "ev", "--batch-size-eval", "10", "--no-suite",
                                       "--no-timing", "--quiet"])
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["throughput"]["images"] == 20 and m["target"]["n_test"] == 20
    assert m["throughput"]["images_per_s"] > 0 and m["throughput"]["precision"] == "fp32"
    assert m["throughput"]["device"].startswith("cuda" if HAS_CUDA else "cpu")
    pe = pathways(tmp_path / "ev" / "pathways.pt")
    assert pe["ids"] == ids and torch.equal(pe["packed"]["bits"], p["packed"]["bits"])


# ---------------------------------------------------------------------------------------------------------------
# a small model on generated JPEGs (tests 2, 3, 5, 6, 7)

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """24 JPEGs (3 classes x 8, 32x32 RGB); a target trained with ``train-target``; a generator trained with
    ``--transform imagenet --image-size 32`` (stored in generator.pt); a generator with no stored transform and
    pathways that vary per sample."""
    d = tmp_path_factory.mktemp("small")
    jpeg_folder(d / "imgs", 24, 32)
    assert main(["train-target", "--model", "mnist_vgg", "--num-classes", "3", "--model-kwargs", '{"width": 8}',
                 "--data", str(d / "imgs"), "--out", str(d / "t.pt"), "--epochs", "1", "--batch-size", "8",
                 "--workers", "0", "--quiet"]) == 0
    assert main(["train", "--target", str(d / "t.pt"), "--data", str(d / "imgs"), "--transform", "imagenet",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25", "--hidden",
                 "8", "--code-dim", "8", "--workers", "0", "--out", str(d / "run"), "--quiet"]) == 0
    target = load_target(str(d / "t.pt"))
    data = load_data(str(d / "imgs"))
    mixed_generator(target, data.batch(torch.arange(2))).save(str(d / "plain.pt"))
    return d


def test_test_data_alone_explains_every_image(small, capsys, tmp_path):
    imgs, t = small / "imgs", small / "t.pt"
    ids = folder_ids(imgs)
    assert len(ids) == 24
    ok(capsys, ["explain", "--target", t, "--generator", small / "run" / "generator.pt", "--test-data", imgs,
                "--out", tmp_path / "ex", "--workers", "0", "--quiet"])
    p = pathways(tmp_path / "ex" / "pathways.pt")
    assert p["ids"] == ids and p["packed"]["bits"].shape[0] == 24 and p["y"].tolist() == [int(i[1]) for i in ids]
    ok(capsys, ["evaluate", "--target", t, "--generator", small / "run" / "generator.pt", "--test-data", imgs,
                "--out", tmp_path / "ev", "--workers", "0", "--no-suite", "--no-timing", "--quiet"])
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["target"]["n_test"] == 24 and m["throughput"]["images"] == 24
    assert pathways(tmp_path / "ev" / "pathways.pt")["ids"] == ids
    # --data alone is split: only its test part (round(0.2 x 8) = 2 of each class) is explained
    ok(capsys, ["explain", "--target", t, "--generator", small / "run" / "generator.pt", "--data", imgs,
                "--out", tmp_path / "split", "--workers", "0", "--quiet"])
    part = pathways(tmp_path / "split" / "pathways.pt")["ids"]
    assert len(part) == 6 and set(part) < set(ids)


# ---------------------------------------------------------------------------------------------------------------
# 3. transform overrides

def test_transform_is_stored_and_reused(small, capsys, tmp_path):
    gen = small / "run" / "generator.pt"
    stored = pathways(gen)["transform"]
    assert stored == Transform.from_options("imagenet", image_size=32).to_dict()
    ok(capsys, ["explain", "--target", small / "t.pt", "--generator", gen, "--test-data", small / "imgs",
                "--out", tmp_path / "ex", "--workers", "0", "--quiet"])
    p = pathways(tmp_path / "ex" / "pathways.pt")
    assert p["transform"] == stored
    want = FolderImages(str(small / "imgs"), Transform.from_dict(stored)).batch(torch.arange(24))
    assert torch.equal(p["x"], want)
    # the same size as stored is accepted; another size does not fit the generator: one line naming both shapes
    ok(capsys, ["explain", "--target", small / "t.pt", "--generator", gen, "--test-data", small / "imgs",
                "--out", tmp_path / "same", "--image-size", "32", "--workers", "0", "--quiet"])
    assert torch.equal(pathways(tmp_path / "same" / "pathways.pt")["x"], want)
    for cmd in ("explain", "evaluate"):
        fails(capsys, [cmd, "--target", small / "t.pt", "--generator", gen, "--test-data", small / "imgs",
                       "--out", tmp_path / f"o_{cmd}", "--image-size", "24", "--workers", "0", "--quiet"],
              "(3, 24, 24)", "(3, 32, 32)")
        assert not (tmp_path / f"o_{cmd}").exists()


def _explain_with_mean_std(small, tmp_path, capsys, gen):
    ok(capsys, ["explain", "--target", small / "t.pt", "--generator", gen, "--test-data", small / "imgs",
                "--out", tmp_path / "ms", "--mean", "0.5", "--std", "0.25", "--workers", "0", "--quiet"])
    return pathways(tmp_path / "ms" / "pathways.pt")


def test_mean_std_override_the_stored_ones(small, capsys, tmp_path):
    p = _explain_with_mean_std(small, tmp_path, capsys, small / "run" / "generator.pt")
    over = Transform.from_options("imagenet", image_size=32, mean=0.5, std=0.25)
    want = FolderImages(str(small / "imgs"), over).batch(torch.arange(24))
    assert torch.equal(p["x"], want)  # the inputs were read with the given mean / std, the rest as stored
    plain = FolderImages(str(small / "imgs"), Transform.from_options("imagenet", image_size=32)).batch(range(24))
    assert not torch.allclose(p["x"], plain)


def test_pathways_record_the_overridden_transform(small, capsys, tmp_path):
    p = _explain_with_mean_std(small, tmp_path, capsys, small / "run" / "generator.pt")
    assert p["transform"] == Transform.from_options("imagenet", image_size=32, mean=0.5, std=0.25).to_dict()


def test_an_override_keeps_the_stored_resize(small, capsys, tmp_path):
    st = pathways(small / "run" / "generator.pt")
    custom = Transform.from_options("imagenet", image_size=32, resize=48)  # e.g. a generator trained via the API
    st["transform"] = custom.to_dict()
    torch.save(st, tmp_path / "g48.pt")
    ok(capsys, ["explain", "--target", small / "t.pt", "--generator", tmp_path / "g48.pt", "--test-data",
                small / "imgs", "--out", tmp_path / "as_stored", "--workers", "0", "--quiet"])
    as_stored = pathways(tmp_path / "as_stored" / "pathways.pt")["x"]
    assert torch.equal(as_stored, FolderImages(str(small / "imgs"), custom).batch(torch.arange(24)))  # no override
    p = _explain_with_mean_std(small, tmp_path, capsys, tmp_path / "g48.pt")
    over = Transform.from_options("imagenet", image_size=32, mean=0.5, std=0.25, resize=48)
    assert torch.equal(p["x"], FolderImages(str(small / "imgs"), over).batch(torch.arange(24)))


# ---------------------------------------------------------------------------------------------------------------
# 4. peak memory: flat in the number of images

PEAK = ("import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:])\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n")


def _peak_kb(args, tmp_path) -> int:
    """Peak RSS (KiB) of ``python -m gencnp_fast ARGS`` run in a fresh wrapper process (so the child maxima of
    different runs never mix)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GENCNP_FAST_TUNE_MALLOC", None)  # the CLI's default allocator settings
    r = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "gencnp_fast"] + [str(a) for a in args],
                       env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    m = re.search(r"PEAK_KB (\d+) (-?\d+)", r.stdout)
    assert m and m.group(2) == "0", r.stdout[-2000:] + r.stderr[-2000:]
    return int(m.group(1))


def test_explain_peak_memory_is_flat_in_the_number_of_images(tmp_path):
    """224x224 RGB JPEGs: 600 images take 361 MB as float32, far above the run's own footprint and the CLI's
    256 MB pre-faulted heap, so a pass holding the set (or growing per image) shows; a --save-inputs run, which
    does keep every input, checks that the measure sees it. At 64x64 the 600 inputs (29 MB) would all fit in the
    report sample anyway, and the pre-faulted heap would hide them."""
    n, size = 60, 224
    torch.manual_seed(0)
    target = mnist_vgg(num_classes=3, in_channels=3, width=8).eval()
    save_target(target, str(tmp_path / "t.pt"))
    GenCNP(target, torch.rand(2, 3, size, size), d=8, code_dim=8).save(str(tmp_path / "g.pt"))
    jpeg_folder(tmp_path / "small", n, size, seed=1)
    jpeg_folder(tmp_path / "large", 10 * n, size, seed=2)
    base = ["explain", "--target", tmp_path / "t.pt", "--generator", tmp_path / "g.pt", "--quiet", "--workers",
            "0", "--batch-size-eval", "32"]
    p_n = _peak_kb(base + ["--test-data", tmp_path / "small", "--out", tmp_path / "o1"], tmp_path)
    p_10n = _peak_kb(base + ["--test-data", tmp_path / "large", "--out", tmp_path / "o2"], tmp_path)
    assert len(pathways(tmp_path / "o2" / "pathways.pt")["ids"]) == 10 * n
    msg = f"peak RSS: {p_n / 1024:.0f} MiB for {n} images, {p_10n / 1024:.0f} MiB for {10 * n}"
    print(msg)
    assert p_10n <= 1.3 * p_n, msg
    p_all = _peak_kb(base + ["--test-data", tmp_path / "large", "--out", tmp_path / "o3", "--save-inputs"], tmp_path)
    print(f"--save-inputs, {10 * n} images: {p_all / 1024:.0f} MiB")
    assert p_all > 1.3 * p_n, f"the measure does not see every input held in memory: {p_all / 1024:.0f} MiB; " + msg


# ---------------------------------------------------------------------------------------------------------------
# 5. outputs that scale

def test_report_bytes_bound_the_kept_inputs(small, tmp_path):
    target = load_target(str(small / "t.pt"))
    gen = GenCNP.load(str(small / "plain.pt"), target)
    data = load_data(str(small / "imgs"))
    n, per_image = len(data), 4 * 3 * 32 * 32
    x_all = data.batch(torch.arange(n))
    every = gen.explain(x_all)
    assert 0.05 < float(torch.cat([every[u].float() for u in gen.unit_names], 1).mean()) < 0.95

    small_bytes = 5 * per_image
    res = evaluate_gencnp(target, gen, data, batch_size=7, timing=False, report_bytes=small_bytes)
    full = evaluate_gencnp(target, gen, data, batch_size=7, timing=False, keep_all=True)
    ex = res.explained
    assert len(ex.packed) == n and 1 < len(ex.kept) < n and len(ex.kept) <= 5 and len(ex.x) == len(ex.kept)
    assert len(res.data) == len(ex.kept) and len(full.explained.kept) == n
    m, mf = dict(res.metrics), dict(full.metrics)
    m.pop("throughput"), mf.pop("throughput")
    assert m == mf  # every metric over all n images, exactly: density, acIOU, fidelity, mDC, mIC, IoU
    assert torch.equal(ex.packed.bits, full.explained.packed.bits)
    write_outputs(str(tmp_path / "ev"), res)
    _check_pathways_file(tmp_path / "ev" / "pathways.pt", gen, data, every, kept=len(ex.kept))
    # the suite run from that directory works on the rows with inputs, with their own labels
    from gencnp_fast.evaluation.suite import SuiteConfig, run_suite_from_dir

    shutil.copy(small / "t.pt", tmp_path / "ev" / "target_model.pt")
    cfg = SuiteConfig(make_report=False, cdrp_max_samples=4, cdrp_steps=1, sweep_densities=(0.3,),
                      transfer_js=("all",))
    suite = run_suite_from_dir(str(tmp_path / "ev"), config=cfg, update_metrics=False)
    assert suite["baselines"]["random"]["n_samples"] == len(ex.kept)
    write_outputs(str(tmp_path / "ev_all"), full)
    _check_pathways_file(tmp_path / "ev_all" / "pathways.pt", gen, data, every, kept=n)

    ex2 = explain_to_file(gen, data, str(tmp_path / "p.pt"), batch_size=7, report_bytes=small_bytes)
    assert len(ex2.kept) == len(ex.kept)
    _check_pathways_file(tmp_path / "p.pt", gen, data, every, kept=len(ex.kept))
    explain_to_file(gen, data, str(tmp_path / "p_all.pt"), batch_size=7, report_bytes=small_bytes, save_inputs=True)
    _check_pathways_file(tmp_path / "p_all.pt", gen, data, every, kept=n)
    explain_to_file(gen, data, str(tmp_path / "p_one.pt"), batch_size=7, report_bytes=1)
    _check_pathways_file(tmp_path / "p_one.pt", gen, data, every, kept=1)


def _check_pathways_file(path, gen, data, every, kept):
    """``path`` holds every pathway (packed) and the inputs of ``kept`` rows; its unpacked rows are the
    generator's pathways of those inputs."""
    p = load_pathways(str(path))
    n = len(data)
    assert len(p["packed"]) == n and len(p["ids"]) == n and p["y"].tolist() == data.y.tolist()
    assert len(p["x_rows"]) == kept and p["x"].shape == (kept, 3, 32, 32)
    rows = p["x_rows"]
    assert torch.equal(p["x"], data.batch(rows))
    mine = gen.explain(p["x"])
    every_unpacked = p["packed"].unpack()
    for u in gen.unit_names:
        assert torch.equal(p["pathway"][u], mine[u].bool()), u
        assert torch.equal(every_unpacked[u], every[u].bool()), u


# ---------------------------------------------------------------------------------------------------------------
# 6. bad inputs through the CLI

def _explain(small, imgs, out, *extra, gen="plain.pt"):
    return ["explain", "--target", small / "t.pt", "--generator", small / gen, "--test-data", imgs, "--out", out,
            "--quiet"] + list(extra)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_truncated_jpeg_is_one_line_naming_the_file(small, capsys, tmp_path, workers):
    imgs = tmp_path / "imgs"
    shutil.copytree(small / "imgs", imgs)
    bad = imgs / "c1" / sorted(os.listdir(imgs / "c1"))[3]
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    for cmd in ("explain", "evaluate"):
        argv = _explain(small, imgs, tmp_path / "o", "--workers", workers, "--batch-size-eval", "5")
        argv[0] = cmd
        if cmd == "evaluate":
            argv += ["--no-suite", "--no-timing"]
        fails(capsys, argv, str(bad))
        assert not (tmp_path / "o").exists()


def test_grayscale_jpeg_in_an_rgb_folder(small, capsys, tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    shutil.copytree(small / "imgs", imgs)
    gray = imgs / "c2" / "zz_gray.jpg"
    Image.open(imgs / "c2" / sorted(os.listdir(imgs / "c2"))[0]).convert("L").save(gray)
    for workers in ("0", "2"):
        fails(capsys, _explain(small, imgs, tmp_path / "o", "--workers", workers), str(gray), "--transform imagenet")
    ok(capsys, _explain(small, imgs, tmp_path / "o", "--workers", "0", "--transform", "imagenet", "--image-size",
                        "32"))
    p = pathways(tmp_path / "o" / "pathways.pt")
    assert len(p["ids"]) == 25 and "c2/zz_gray.jpg" in p["ids"]
    row = p["ids"].index("c2/zz_gray.jpg")
    x = p["x"][p["x_rows"].tolist().index(row)]
    t = Transform.from_options("imagenet", image_size=32)
    raw = t.denormalize(x)  # the gray image as RGB: three equal channels
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_empty_class_folder(small, capsys, tmp_path):
    imgs = tmp_path / "imgs"
    shutil.copytree(small / "imgs", imgs)
    (imgs / "c1b").mkdir()
    (imgs / "c1b" / "notes.txt").write_text("not an image")
    fails(capsys, _explain(small, imgs, tmp_path / "o", "--workers", "0"), str(imgs / "c1b"), "holds no images")
    assert not (tmp_path / "o").exists()


RAISING = '''
def make(**kwargs):
    raise KeyError("boom")

def plain(num_classes=3):
    from gencnp_fast.models import mnist_vgg
    return mnist_vgg(num_classes=num_classes, in_channels=3, width=8)
'''


def test_bad_model_factories_and_kwargs(small, capsys, tmp_path, monkeypatch):
    (tmp_path / "wl_factory.py").write_text(RAISING)
    monkeypatch.syspath_prepend(str(tmp_path))
    sd = tmp_path / "sd.pt"
    torch.save(load_target(str(small / "t.pt")).state_dict(), sd)
    ex = ["--generator", small / "plain.pt", "--test-data", small / "imgs", "--out", tmp_path / "o", "--quiet",
          "--workers", "0"]
    ok(capsys, ["explain", "--target", sd, "--model", "wl_factory:plain"] + ex)  # the module itself works
    fails(capsys, ["explain", "--target", sd, "--model", "wl_factory:make"] + ex, "wl_factory:make", "KeyError",
          "boom")
    fails(capsys, ["explain", "--target", sd, "--model", "wl_factory:make", "--model-kwargs", '{"a": 1}'] + ex,
          "wl_factory:make", "boom")
    fails(capsys, ["explain", "--target", sd, "--model", "wl_factory:plain", "--model-kwargs", "{not json"] + ex,
          "--model-kwargs", "JSON")
    fails(capsys, ["explain", "--target", sd, "--model", "wl_factory:plain", "--model-kwargs", "[3]"] + ex,
          "--model-kwargs", "JSON object")
    fails(capsys, ["explain", "--target", sd, "--model", "wl_factory:plain", "--model-kwargs", '"x"'] + ex,
          "--model-kwargs", "JSON object")
    fails(capsys, ["explain", "--target", sd, "--model", "wl_factory:plain", "--model-kwargs",
                   '{"no_such_arg": 1}'] + ex, "wl_factory:plain", "no_such_arg")
    fails(capsys, ["explain", "--target", sd, "--model", "mnist_vgg", "--model-kwargs", '{"depth": 7}'] + ex,
          "mnist_vgg", "depth")
    fails(capsys, ["explain", "--target", sd, "--model-kwargs", '{"num_classes": 3}'] + ex, "--model-kwargs",
          "--model")
    fails(capsys, ["train-target", "--model", "wl_factory:make", "--data", small / "imgs", "--out",
                   tmp_path / "tt.pt", "--quiet"], "wl_factory:make", "boom")
    assert not (tmp_path / "tt.pt").exists()


@pytest.mark.parametrize("option, words", [
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--device", "cuda:x"], ["--device", "'cuda:x'"]),
    (["--precision", "bf16", "--device", "cpu"], ["--precision bf16", "GPU"]),
    (["--precision", "fp16", "--device", "cpu"], ["--precision fp16", "GPU"]),
    (["--precision", "fp8"], ["--precision", "fp8"]),
    (["--workers", "-1"], ["--workers", "-1"]),
])
def test_bad_device_and_precision(small, capsys, tmp_path, option, words):
    for cmd in ("explain", "evaluate", "train"):
        if cmd == "train":
            argv = ["train", "--target", small / "t.pt", "--data", small / "imgs", "--out", tmp_path / "o",
                    "--epochs", "1", "--quiet"] + option
        else:
            argv = _explain(small, small / "imgs", tmp_path / "o", *option)
            argv[0] = cmd
        fails(capsys, argv, *words)
        assert not (tmp_path / "o").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "auto-bf16"])
def test_gpu_options_without_cuda(small, capsys, tmp_path, device):
    option = ["--precision", "bf16"] if device == "auto-bf16" else ["--device", device]
    words = ["--precision bf16", "GPU"] if device == "auto-bf16" else [f"--device {device}", "no CUDA device"]
    for cmd in ("explain", "evaluate"):
        argv = _explain(small, small / "imgs", tmp_path / "o", *option)
        argv[0] = cmd
        fails(capsys, argv, *words)
    fails(capsys, ["train-target", "--model", "mnist_vgg", "--data", small / "imgs", "--out", tmp_path / "t.pt",
                   "--quiet"] + option, *words)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.pt").exists()


# ---------------------------------------------------------------------------------------------------------------
# 7. --device cpu and --device auto

@pytest.mark.skipif(HAS_CUDA, reason="--device auto is the GPU here")
def test_device_cpu_and_auto_give_the_same_pathways(small, capsys, tmp_path):
    out = {}
    for dev in ("cpu", "auto"):
        ok(capsys, _explain(small, small / "imgs", tmp_path / dev, "--device", dev, "--workers", "0",
                            "--batch-size-eval", "7"))
        out[dev] = pathways(tmp_path / dev / "pathways.pt")
    a, b = out["cpu"], out["auto"]
    assert a["packed"]["bits"].shape[0] == 24 and bool((a["packed"]["bits"] != 0).any())
    assert torch.equal(a["packed"]["bits"], b["packed"]["bits"])
    assert a["ids"] == b["ids"] and torch.equal(a["pred"], b["pred"]) and torch.equal(a["path_pred"], b["path_pred"])
    assert torch.equal(a["x"], b["x"])


def test_reduced_precision_plumbing_runs_with_the_reference_backend():
    """--precision bf16 is GPU-only in the CLI (the CPU kernels are float32), but its plumbing is device-agnostic:
    the target converted to bfloat16, the generator in float32 under autocast (training and explaining), the
    captured bfloat16 features cast for the generator. Run it here on the CPU with the reference pathway forward."""
    from gencnp_fast.data import ImageData
    from gencnp_fast.generator import GenCNP, TrainConfig, train_gencnp
    from gencnp_fast.models import mnist_vgg
    from gencnp_fast.placement import Placement
    from gencnp_fast.stream import explain_set

    torch.manual_seed(0)
    target = mnist_vgg(num_classes=3, in_channels=1, width=8).eval()
    x, y = torch.rand(24, 1, 28, 28), torch.arange(24) % 3
    data = ImageData(x, y)
    gen = GenCNP(target, x[:2], d=8, code_dim=8)
    place = Placement(torch.device("cpu"), "bf16")
    res = train_gencnp(gen, data, data, TrainConfig(epochs=1, batch_size=8, backend="reference"), place=place,
                       quiet=True)
    assert next(target.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in gen.parameters())
    assert 0.0 <= res["best"]["fidelity"] <= 1.0
    ex = explain_set(gen, data, 8, place, backend="reference", keep=torch.arange(4))
    assert len(ex) == 24 and ex.x.dtype == torch.float32 and torch.equal(ex.x, x[:4])
    assert ex.full_logits.dtype == torch.float32 and bool(torch.isfinite(ex.full_logits).all())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expect = gen(x[:8].to(torch.bfloat16), mode="hard").pathway
    assert all(torch.equal(ex.packed.unpack(slice(0, 8))[n], expect[n]) for n in gen.unit_names)


def test_demo_takes_the_device_options(capsys, tmp_path):
    """gencnp demo has --device / --precision like every command: refused with one line where they cannot run."""
    if not torch.cuda.is_available():
        fails(capsys, ["demo", "--out", tmp_path / "d", "--device", "cuda", "--quick"], "--device cuda")
    fails(capsys, ["demo", "--out", tmp_path / "d", "--device", "cpu", "--precision", "bf16"], "--precision bf16")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("option, value, word", [("--mean", "0.5,0.5", "1 or 3 values"), ("--std", "nan", "finite"),
                                                 ("--std", "0", "--std"), ("--mean", "a,b", "--mean")])
def test_bad_mean_std_on_the_command_line(small, capsys, tmp_path, option, value, word):
    """--mean / --std are checked by the data layer's Transform: one line naming the option, nothing written."""
    fails(capsys, ["explain", "--target", small / "t.pt", "--generator", small / "run" / "generator.pt",
                   "--test-data", small / "imgs", "--out", tmp_path / "o", option, value, "--quiet"], option, word)
    assert not (tmp_path / "o").exists()
