"""The evaluation suite end to end: numbers for metrics.json, PNGs and a report.html whose images render."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from gencnp_fast import Pathway, models, pathway_units
from gencnp_fast.evaluation.report import Figure, write_report
from gencnp_fast.evaluation.suite import SuiteConfig, run_suite

GENCNP_KEYS = {"fidelity", "mDC", "mIC", "density_mean", "density_std", "density_per_unit", "acIOU",
               "inter_class_iou", "explain_ms_per_image"}
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and os.path.exists(p)), None)


def tiny_model():
    torch.manual_seed(0)
    m = models.mnist_vgg(num_classes=3, width=4)
    models.randomize_bn(m, torch.Generator().manual_seed(0))
    return m.eval()


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("suite"))
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(36, 1, 28, 28, generator=g)
    y = torch.arange(36) % 3
    units = pathway_units(m, x[:1])
    cls = Pathway.random(units, 0.4, 36, groups=y, generator=g)
    noise = Pathway.random(units, 0.1, 36, generator=g)
    pw = {u.name: cls[u.name] | noise[u.name] for u in units}
    ty = torch.arange(30) % 3
    tcls = Pathway.random(units, 0.4, 30, groups=ty, generator=g)
    tpw = {u.name: tcls[u.name] for u in units}
    scores = {u.name: torch.rand(36, u.channels, generator=g) for u in units}
    cfg = SuiteConfig(cdrp_max_samples=12, cdrp_steps=2, sweep_densities=(0.1, 0.4), transfer_js=(1, "all"),
                      cam_images=3, batch_size=16)
    res = run_suite(m, x, y, pw, out, train_y=ty, train_pathway=tpw, gencnp_explain_ms=0.01, gencnp_scores=scores,
                    config=cfg, meta={"model": "tiny"},
                    pathway_fn=lambda _m, xb: {u.name: torch.ones(xb.shape[0], u.channels, dtype=torch.bool)
                                               for u in units})
    return out, res


def test_suite_returns_metrics_json_ready(suite_run):
    out, res = suite_run
    assert set(res["baselines"]) == {"cdrp", "neuron_mct", "random"}
    for name, r in res["baselines"].items():
        assert GENCNP_KEYS <= set(r), name
    for rule in ("majority", "union", "intersection"):
        assert {"fidelity", "mDC", "mIC", "density_mean"} <= set(res["transfer"][rule])
        assert list(res["transfer"][rule]["by_j"]) == ["1", "all"]
    suite = res["suite"]
    assert "gencnp" in suite["density_sweep"] and "cdrp" in suite["density_sweep"]
    assert [c["claim"] for c in suite["checks"]]
    assert suite["gencnp"]["explain_ms_per_image"] == 0.01  # the caller's number is kept
    assert suite["gencnp"]["explain_ms_per_image_same_run"] > 0  # pathway_fn timed beside the baselines
    json.dumps({"baselines": res["baselines"], "transfer": res["transfer"], "suite": suite})  # JSON-ready


def test_suite_config_quick_settings(suite_run):
    q = SuiteConfig(quick=True).effective()
    assert (q.cdrp_max_samples, q.sweep_samples, q.cam_images) == (128, 128, 4)
    assert q.sweep_densities == (0.05, 0.15, 0.3, 0.6)
    assert SuiteConfig().effective() == SuiteConfig()
    _, res = suite_run  # the settings a run used are recorded
    assert res["suite"]["settings"]["cdrp_max_samples"] == 12 and res["suite"]["settings"]["quick"] is False


def test_suite_writes_pngs_and_self_contained_report(suite_run):
    out, res = suite_run
    figs = res["suite"]["figures"]
    assert len(figs) >= 6
    for f in figs:
        with open(os.path.join(out, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(res["suite"]["report"], encoding="utf-8").read()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(srcs) == len(figs)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # no sibling files needed
    for word in ("CDRP/DGR", "NeuronMCT", "Random", "acIOU", "Transfer of class pathways", "<figcaption>"):
        assert word in page


def render_dom(path: str) -> str:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
               "file://" + os.path.abspath(path)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def body_data(dom: str) -> dict:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run .ci/install_chromium.sh)")
def test_report_images_render_in_headless_chromium(suite_run):
    out, res = suite_run
    data = body_data(render_dom(res["suite"]["report"]))
    assert data.get("images-ok") == "true", data
    assert int(data["images-total"]) == len(res["suite"]["figures"]) and data["images-broken"] == "0"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run .ci/install_chromium.sh)")
def test_headless_check_detects_a_broken_image(tmp_path):
    broken = Figure("broken.png", "broken", "an image that does not decode", b"\x89PNG not really")
    path = write_report(str(tmp_path), [broken], {"gencnp": {"fidelity": 1.0}})
    data = body_data(render_dom(path))
    assert data.get("images-ok") == "false" and data.get("images-broken") == "1", data


def test_run_suite_from_demo_dir_merges_metrics(tmp_path):
    from gencnp_fast.evaluation.suite import run_suite_from_dir

    m = tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 28, 28, generator=g)
    y = torch.arange(24) % 3
    units = pathway_units(m, x[:1])
    pw = Pathway.random(units, 0.5, 24, generator=g)
    from gencnp_fast.target import save_target

    save_target(m, str(tmp_path / "target_model.pt"))  # the safe format: nothing is unpickled when it is read
    torch.save({"x": x, "y": y, "pathway": {n: pw[n] for n in pw}, "units": [u.name for u in units]},
               tmp_path / "pathways.pt")
    (tmp_path / "metrics.json").write_text(json.dumps({"target": {"accuracy": 0.5},
                                                       "gencnp": {"explain_ms_per_image": 0.01}}))
    cfg = SuiteConfig(make_report=False, cdrp_max_samples=6, cdrp_steps=1, sweep_densities=(0.3,),
                      transfer_js=("all",))
    res = run_suite_from_dir(str(tmp_path), config=cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["target"] == {"accuracy": 0.5} and saved["gencnp"]["explain_ms_per_image"] == 0.01
    assert set(saved["baselines"]) == {"cdrp", "neuron_mct", "random"}
    assert set(saved["transfer"]) >= {"majority", "union", "intersection"}
    assert res["suite"]["transfer_source"].startswith("test split")
    # a whole-module pickle is refused unless trusted
    torch.save(m, tmp_path / "target_model.pt")
    with pytest.raises(ValueError, match="trust-pickle"):
        run_suite_from_dir(str(tmp_path), config=cfg)
    run_suite_from_dir(str(tmp_path), config=cfg, trust_pickle=True)


def test_speed_checks_are_explanation_costs():
    """The suite's speed checks are GEN-CNP's explanation cost in dense forwards (batched: <= 1.2, one image at a
    time: <= 2); the baselines' times are reported against GEN-CNP's as measured, not as pass / fail."""
    from gencnp_fast.evaluation.suite import claim_checks

    g = {"mDC": 1.0, "acIOU": 0.9, "explain_ms_per_image": 0.2, "explain_cost_ratio": 1.1,
         "explain_cost_ratio_b1": 2.5}
    b = {"cdrp": {"mDC": 2.0, "acIOU": 0.8, "explain_ms_per_image": 15.0},
         "neuron_mct": {"mDC": 50.0, "acIOU": 0.7, "explain_ms_per_image": 0.5}}
    checks = {c["claim"]: c for c in claim_checks(g, b, None)}
    batched = checks["GEN-CNP explanation cost, batched, in dense forwards of the target"]
    single = checks["GEN-CNP explanation cost, one image at a time, in dense forwards of the target"]
    assert batched["passed"] is True and single["passed"] is False and single["measured"] == "2.50"
    assert checks["cdrp explanation time / GEN-CNP's"]["passed"] is None
    assert checks["cdrp explanation time / GEN-CNP's"]["measured"].startswith("75.0×")
    assert not any("100×" in c for c in checks)
