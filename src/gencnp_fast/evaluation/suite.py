"""One call that turns GEN-CNP's pathways into the paper's comparisons: baselines, transfer, figures and a report.

    from gencnp_fast.evaluation.suite import SuiteConfig, run_suite
    res = run_suite(model, test_x, test_y, gencnp_pathway, out_dir,
                    train_y=train_y, train_pathway=train_pathway, gencnp_explain_ms=0.12,
                    config=SuiteConfig(quick=True))
    metrics["baselines"] = res["baselines"]; metrics["transfer"] = res["transfer"]

What it does (docs/design.md §5; the details of every method are in :mod:`.baselines` and :mod:`.transfer`; the
tuning knobs named here are the fields of :class:`SuiteConfig`):

1. Baselines at matched density — CDRP/DGR (on ``cdrp_max_samples`` test samples drawn at random, seeded: it
   optimises gates per sample), NeuronMCT and Random (all test samples) — each keeping, per sample, as many
   channels as that sample's GEN-CNP pathway; scored with GEN-CNP's metrics through ``fast_pathway_forward``;
   explanation time measured batched (``batch_size``) with ``time.perf_counter``, the way GEN-CNP's
   ``explain_ms_per_image`` is measured: pass the same ``batch_size`` GEN-CNP was timed with.
2. mDC against density: baseline scores thresholded at every density of ``sweep_densities`` on
   ``sweep_samples`` samples of CDRP's subset; GEN-CNP is a point, or a curve when ``gencnp_scores`` (soft scores
   in [0, 1]) are given.
3. Transfer: class pathways from ``j`` training pathways per class (``transfer_js``; majority, union, intersection)
   applied to every test sample of the class, against own pathways and random class pathways at the same density.
   Training pathways come from ``train_pathway`` (+ ``train_y``); else from ``pathway_fn(model, train_x)``; else the
   test set is split in two (even indices build class pathways, odd ones are explained) and the result says so.
4. Figures and ``report.html`` in ``out_dir`` (see :mod:`.report`).

:func:`run_suite_from_dir` does the same from the files ``gencnp demo`` / ``gencnp evaluate`` write and merges the
results into their ``metrics.json``.

The claims checked (reported, never raised): GEN-CNP's mDC ≤ every baseline's at matched density (CDRP compared on
its own samples); GEN-CNP's acIOU above every baseline's; majority class pathways (j = all) with fidelity ≥ 0.9;
GEN-CNP's explanation (dense capture + generator + pathway forward) costs at most 1.2 dense forwards of the target
batched and at most 2 one image at a time. The explanation times of NeuronMCT and CDRP are reported against GEN-CNP's
as measured: CDRP's ratio is set by its step count (each step is a forward and a backward), not by the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .baselines import (
    _batches,
    density_sweep,
    evaluate_pathway,
    full_logits,
    run_baselines,
    unit_channels,
)
from .report import (
    Figure,
    fig_class_frequency,
    fig_density,
    fig_gradcam,
    fig_mdc_vs_density,
    fig_pathway_grad,
    fig_transfer,
    write_report,
)
from .saliency import default_cam_unit, grad_cam, pathway_grad
from .transfer import transfer_study

__all__ = ["SuiteConfig", "run_suite", "run_suite_from_dir", "claim_checks"]

BASELINES = ("cdrp", "neuron_mct", "random")


@dataclasses.dataclass
class SuiteConfig:
    """The suite's tuning knobs (defaults: docs/design.md §5).

    Attributes:
        batch_size: batch of the explanation timings (use GEN-CNP's) and of CDRP's gate optimisation.
        cdrp_max_samples: CDRP runs on this many test samples drawn at random, seeded (``None``: all).
        cdrp_steps, cdrp_lr, cdrp_momentum, cdrp_l1: CDRP's optimiser.
        sweep_densities, sweep_samples: the mDC-vs-density sweep.
        transfer_js: j values of the transfer study (``"all"`` = every training pathway of the class).
        cam_images: images in the Grad-CAM / PathwayGrad figures.
        quick: smaller CDRP subsample, sweep and figures (for ``gencnp demo --quick``; see :meth:`effective`).
        make_report: write PNGs and ``report.html`` (else numbers only).
        backend: ``fast_pathway_forward`` backend of every pathway forward.
        seed: seeds CDRP's subsample, the sweep's samples, the tie-breaking and the random pathways.
    """

    batch_size: int = 128
    cdrp_max_samples: Optional[int] = 256
    cdrp_steps: int = 30
    cdrp_lr: float = 0.1
    cdrp_momentum: float = 0.9
    cdrp_l1: float = 0.05
    sweep_densities: Sequence[float] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6)
    sweep_samples: int = 256
    transfer_js: Sequence = (1, 5, 20, "all")
    cam_images: int = 6
    quick: bool = False
    make_report: bool = True
    backend: str = "auto"
    seed: int = 0

    def effective(self) -> "SuiteConfig":
        """The settings a run uses: with ``quick``, at most 128 CDRP and sweep samples, every other sweep density
        (when more than 4) and at most 4 figure images."""
        if not self.quick:
            return self
        dens = tuple(self.sweep_densities)
        return dataclasses.replace(
            self, cdrp_max_samples=None if self.cdrp_max_samples is None else min(int(self.cdrp_max_samples), 128),
            sweep_samples=min(self.sweep_samples, 128), sweep_densities=dens[::2] if len(dens) > 4 else dens,
            cam_images=min(self.cam_images, 4))


def run_suite(model: nn.Module, test_x: torch.Tensor, test_y: Optional[torch.Tensor],
              gencnp_pathway: Mapping[str, torch.Tensor], out_dir: str, train_x: Optional[torch.Tensor] = None,
              train_y: Optional[torch.Tensor] = None, train_pathway: Optional[Mapping[str, torch.Tensor]] = None,
              units: Optional[Sequence[str]] = None, gencnp_explain_ms: Optional[float] = None, *,
              config: Optional[SuiteConfig] = None, gencnp_scores: Optional[Mapping[str, torch.Tensor]] = None,
              pathway_fn: Optional[Callable[[nn.Module, torch.Tensor], Mapping[str, torch.Tensor]]] = None,
              num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
              meta: Optional[Mapping[str, object]] = None,
              log: Optional[Callable[[str], None]] = None,
              gencnp_timing: Optional[Mapping[str, float]] = None) -> Dict[str, object]:
    """Baselines, transfer, figures and ``out_dir/report.html`` for GEN-CNP's pathways of ``test_x``.

    Args:
        model: the target model (eval mode is set).
        test_x, test_y: test inputs ``[N, ...]`` and labels ``[N]`` (``None``: the model's predictions).
        gencnp_pathway: GEN-CNP's test pathways ``{unit: bool [N, C]}`` (a ``Pathway`` or a dict).
        out_dir: where the PNGs and ``report.html`` go (created).
        train_x, train_y, train_pathway: training samples and their GEN-CNP pathways, for class pathways.
        units: unit names in order (default: the pathway's keys).
        gencnp_explain_ms: GEN-CNP's measured explanation time per image (for the speed comparison).
        gencnp_timing: GEN-CNP's explanation cost as :func:`gencnp_fast.explain.explain_timings` measured it
            (``explain_cost_ratio`` batched, ``explain_cost_ratio_b1`` one image at a time, ...): the cost checks.
        config: the tuning knobs (:class:`SuiteConfig`; default ``SuiteConfig()``).
        gencnp_scores: optional soft scores ``{unit: float [N, C]}`` in [0, 1] (GEN-CNP's mDC-vs-density curve).
        pathway_fn: optional ``(model, x) -> pathway`` (GEN-CNP's explainer, e.g. ``lambda m, x:
            generator.explain(x)``): used for ``train_x`` when ``train_pathway`` is not given, and timed on the test
            set with ``config.batch_size`` in this run (``explain_ms_per_image_same_run``; the speed checks use it).
        num_classes, class_names: the classes (default: from the labels and predictions; class indices).
        meta: extra "key: value" shown in the report header (model name, data, device...).
        log: a ``print``-like callable for progress (default: silent).

    Returns:
        ``{"baselines": {"cdrp", "neuron_mct", "random"}`` — each with ``fidelity, mDC, mIC, density_mean,
        density_std, density_per_unit, acIOU, inter_class_iou, explain_ms_per_image, n_samples`` (CDRP also
        ``reference_mDC, reference_fidelity, reference_acIOU``: GEN-CNP on CDRP's samples) —,
        ``"transfer": {"majority", "union", "intersection"}`` — each with ``fidelity, mDC, mIC, density_mean``
        (j = all), ``random`` (same keys) and ``by_j`` — plus ``"own"`` (each sample's own pathway),
        ``"suite": {"gencnp", "checks", "density_sweep", "transfer_source", "report", "figures", "seconds",
        "settings"}``}.
    """
    cfg = (config or SuiteConfig()).effective()
    say = log or (lambda s: None)
    t_all = time.perf_counter()
    secs: Dict[str, float] = {}
    model.eval()
    test_x = test_x.detach()
    pw = _as_masks(gencnp_pathway, units, n=test_x.shape[0])
    channels = unit_channels(model, test_x, list(pw))
    with _clock(secs, "gencnp_eval"):
        ts, gen_res = _evaluate_gencnp(model, test_x, test_y, pw, cfg, num_classes, gencnp_explain_ms, pathway_fn)
        gen_res.update({k: float(v) for k, v in (gencnp_timing or {}).items() if k != "explain_ms_per_image"})
    say(f"[suite] GEN-CNP: fidelity {gen_res['fidelity']:.3f} mDC {gen_res['mDC']:.2f} "
        f"density {gen_res['density_mean']:.3f} acIOU {gen_res['acIOU']:.3f}")
    with _clock(secs, "baselines"):
        baselines, art = _run_baselines(ts, cfg, say)
    with _clock(secs, "density_sweep"):
        sweep, sweep_n = _density_sweep(ts, art, gencnp_scores, cfg)
    with _clock(secs, "transfer"):
        transfer, source = _transfer(ts, train_x, train_y, train_pathway, pathway_fn, cfg)
    say(f"[suite] transfer (majority, j=all): fidelity {transfer['majority']['fidelity']:.3f} "
        f"mDC {transfer['majority']['mDC']:.2f}")
    checks = claim_checks(gen_res, baselines, transfer)
    figures, report_path = [], None
    if cfg.make_report:
        with _clock(secs, "report"):
            figures = _figures(ts, gen_res, baselines, art, sweep, transfer, cfg, class_names)
            header = {"test images": ts.n, "units": len(ts.names), "channels": sum(channels.values()),
                      "timing batch": cfg.batch_size, "threads": torch.get_num_threads(), **(meta or {})}
            report_path = write_report(out_dir, figures, {"gencnp": gen_res, **baselines}, transfer, checks, header,
                                       _report_notes(gen_res, baselines, source, cfg))
    secs["total"] = time.perf_counter() - t_all
    say(f"[suite] done in {secs['total']:.1f} s" + (f"; report: {report_path}" if report_path else ""))
    return {"baselines": baselines, "transfer": transfer,
            "suite": {"gencnp": gen_res, "checks": checks, "density_sweep": sweep, "transfer_source": source,
                      "report": report_path, "figures": [f.name for f in figures], "seconds": secs,
                      "settings": _settings(cfg, sweep_n)}}


def _evaluate_gencnp(model, test_x, test_y, pw, cfg: SuiteConfig, num_classes, gencnp_explain_ms,
                     pathway_fn) -> Tuple[_TestSet, Dict[str, object]]:
    """The model's logits and GEN-CNP's metrics (its explainer timed beside the baselines when ``pathway_fn``)."""
    full = full_logits(model, test_x)
    preds = full.argmax(1)
    labels = preds if test_y is None else torch.as_tensor(test_y).long().cpu()
    k = num_classes or int(max(int(labels.max()), int(preds.max()))) + 1
    ts = _TestSet(model, test_x, pw, list(pw), full, preds, labels, k)
    gen_res = evaluate_pathway(model, test_x, pw, labels, ts.names, full=full,
                               explain_ms_per_image=gencnp_explain_ms, backend=cfg.backend, num_classes=k)
    gen_res["n_samples"] = ts.n
    if pathway_fn is not None:
        # GEN-CNP timed in this run, with the baselines' batch size, next to them (same machine, same load)
        gen_res["explain_ms_per_image_same_run"] = _time_pathway_fn(pathway_fn, model, test_x, cfg.batch_size)
        if gencnp_explain_ms is None:
            gen_res["explain_ms_per_image"] = gen_res["explain_ms_per_image_same_run"]
    return ts, gen_res


def _run_baselines(ts: _TestSet, cfg: SuiteConfig, say) -> Tuple[Dict[str, Dict[str, object]], Dict[str, object]]:
    """CDRP, NeuronMCT and Random at GEN-CNP's per-sample density (:func:`.baselines.run_baselines`)."""
    baselines, art = run_baselines(
        ts.model, ts.x, ts.pw, ts.labels, ts.names, BASELINES, batch_size=cfg.batch_size,
        cdrp_max_samples=cfg.cdrp_max_samples, cdrp_steps=cfg.cdrp_steps, cdrp_lr=cfg.cdrp_lr,
        cdrp_momentum=cfg.cdrp_momentum, cdrp_l1=cfg.cdrp_l1, full=ts.full, seed=cfg.seed, backend=cfg.backend,
        num_classes=ts.k)
    for m, r in baselines.items():
        say(f"[suite] {m}: fidelity {r['fidelity']:.3f} mDC {r['mDC']:.2f} acIOU {r['acIOU']:.3f} "
            f"{r['explain_ms_per_image']:.3f} ms/img (n={r['n_samples']})")
    return baselines, art


def _density_sweep(ts: _TestSet, art: Mapping[str, object], gencnp_scores, cfg: SuiteConfig):
    """mDC against density on ``sweep_samples`` samples of CDRP's random subset, where every method has scores;
    returns ``(sweep, number of samples)``."""
    sub = art.get("cdrp_index", torch.arange(ts.n))
    s = min(int(cfg.sweep_samples), int(sub.numel()))
    sw_pos = torch.randperm(int(sub.numel()), generator=torch.Generator().manual_seed(cfg.seed))[:s].sort().values
    sw_idx = sub[sw_pos]
    scores = {}
    if "cdrp_gates" in art:
        scores["cdrp"] = {u: v[sw_pos] for u, v in art["cdrp_gates"].items()}
    if "neuron_mct_scores" in art:
        scores["neuron_mct"] = {u: v[sw_idx] for u, v in art["neuron_mct_scores"].items()}
    thresholds = None
    if gencnp_scores is not None:
        thresholds = {"gencnp": {u: torch.as_tensor(gencnp_scores[u]).detach().float().cpu()[sw_idx]
                                 for u in ts.names}}
    sweep = density_sweep(ts.model, ts.x[sw_idx], cfg.sweep_densities, scores, ts.names, full=ts.full[sw_idx],
                          seed=cfg.seed, backend=cfg.backend, thresholds=thresholds)
    return sweep, s


def _transfer(ts: _TestSet, train_x, train_y, train_pathway, pathway_fn, cfg: SuiteConfig):
    """The transfer study; returns ``(transfer, where the class pathways came from)``.

    Training pathways come from ``train_pathway`` (+ ``train_y``); else from ``pathway_fn(model, train_x)``; else
    the test set is split in two (even indices build class pathways, odd ones are explained).
    """
    names = ts.names
    eval_idx = torch.arange(ts.n)
    source = "train"
    if train_pathway is None and pathway_fn is not None and train_x is not None:
        parts: Dict[str, List[torch.Tensor]] = {u: [] for u in names}
        with torch.no_grad():
            for sl in _batches(train_x.shape[0], 256):
                p = pathway_fn(ts.model, train_x[sl])
                for u in names:
                    parts[u].append(p[u].detach().cpu().bool())
        train_pathway = {u: torch.cat(v) for u, v in parts.items()}
        source = "train (pathway_fn)"
    if train_pathway is not None:
        if train_y is None:
            raise ValueError("train_pathway needs train_y (the classes of the training pathways)")
        tp = _as_masks(train_pathway, names)
        ty = torch.as_tensor(train_y).long().cpu()
    else:
        build = torch.arange(0, ts.n, 2)
        eval_idx = torch.arange(1, ts.n, 2)
        tp = {u: ts.pw[u][build] for u in names}
        ty = ts.labels[build]
        source = "test split (no training pathways given: even test indices build, odd ones are explained)"
    transfer = transfer_study(
        ts.model, ts.x[eval_idx], ts.labels[eval_idx], {u: ts.pw[u][eval_idx] for u in names}, tp, ty,
        cfg.transfer_js, units=names, num_classes=ts.k, full=ts.full[eval_idx], seed=cfg.seed, backend=cfg.backend,
    )
    return transfer, source


def _figures(ts: _TestSet, gen_res, baselines, art, sweep, transfer, cfg: SuiteConfig, class_names) -> List[Figure]:
    """The report's figures; the Grad-CAM / PathwayGrad images are ``cam_images`` samples of CDRP's subset (one per
    class first), so that every method has a pathway for them."""
    names, pw, labels = ts.names, ts.pw, ts.labels
    sub = art.get("cdrp_index", torch.arange(ts.n))
    pos = _pick_images(labels[sub], int(sub.numel()), cfg.cam_images)  # positions within CDRP's subset
    idx = sub[pos]
    xi = ts.x[idx]
    masks = {"gencnp": {u: pw[u][idx] for u in names}}
    if "cdrp_pathway" in art:
        masks["cdrp"] = {u: art["cdrp_pathway"][u][pos] for u in names}
    if "neuron_mct_pathway" in art:
        masks["neuron_mct"] = {u: art["neuron_mct_pathway"][u][idx] for u in names}
    cam_unit = default_cam_unit(ts.model, ts.x)
    cams = {"full": grad_cam(ts.model, xi, unit=cam_unit)}
    target = ts.preds[idx]
    grads = {"full": pathway_grad(ts.model, xi, None, target)}
    for m, mk in masks.items():
        cams[m] = grad_cam(ts.model, xi, target, mask=mk, unit=cam_unit)
        grads[m] = pathway_grad(ts.model, xi, mk, target)
    points = {"gencnp": (gen_res["density_mean"], gen_res["mDC"])}
    fpoints = {"gencnp": (gen_res["density_mean"], gen_res["fidelity"])}
    for m, r in baselines.items():
        points[m] = (r["density_mean"], r["mDC"])
        fpoints[m] = (r["density_mean"], r["fidelity"])
    per_sample = {"gencnp": torch.cat([pw[u] for u in names], 1).double().mean(1)}
    per_unit = {"gencnp": gen_res["density_per_unit"]}
    per_unit.update({m: r["density_per_unit"] for m, r in baselines.items()})
    figures = [
        fig_mdc_vs_density(sweep, points, fpoints),
        fig_class_frequency(pw, labels, names, ts.k, "gencnp", class_names),
    ]
    if "neuron_mct_pathway" in art:
        figures.append(fig_class_frequency(art["neuron_mct_pathway"], labels, names, ts.k, "neuron_mct",
                                           class_names))
    figures += [
        fig_density(per_sample, per_unit, names, labels),
        fig_gradcam(xi, cams, target, labels[idx], cam_unit),
        fig_pathway_grad(xi, grads, target),
        fig_transfer(transfer),
    ]
    return figures


def _report_notes(gen_res, baselines, source: str, cfg: SuiteConfig) -> List[str]:
    """The notes under the report's metrics table: CDRP's setting, where the class pathways came from, timing."""
    notes = [f"Class pathways: {source}."]
    if "cdrp" in baselines:
        c = baselines["cdrp"]
        notes.insert(0, f"CDRP ran on {c['n_samples']} test samples drawn at random ({cfg.cdrp_steps} SGD steps, lr "
                        f"{cfg.cdrp_lr}, momentum {cfg.cdrp_momentum}, L1 {cfg.cdrp_l1}); on those samples GEN-CNP "
                        f"has mDC {c['reference_mDC']:.2f} %, fidelity {c['reference_fidelity']:.3f} and acIOU "
                        f"{c['reference_acIOU']:.3f}.")
    if "explain_ms_per_image_same_run" in gen_res:
        notes.append(f"GEN-CNP's explainer timed in this run beside the baselines (batch {cfg.batch_size}): "
                     f"{gen_res['explain_ms_per_image_same_run']:.4f} ms/image; the speed checks use it.")
    return notes


def _settings(cfg: SuiteConfig, sweep_n: int) -> Dict[str, object]:
    """The settings a run used, for ``metrics.json`` (``sweep_samples``: the samples the sweep ran on)."""
    return {"batch_size": cfg.batch_size, "cdrp_max_samples": cfg.cdrp_max_samples, "cdrp_steps": cfg.cdrp_steps,
            "cdrp_lr": cfg.cdrp_lr, "cdrp_momentum": cfg.cdrp_momentum, "cdrp_l1": cfg.cdrp_l1,
            "sweep_densities": list(cfg.sweep_densities), "sweep_samples": sweep_n,
            "transfer_js": [str(j) for j in cfg.transfer_js], "quick": cfg.quick}


@dataclasses.dataclass
class _TestSet:
    """What every phase of :func:`run_suite` works on: the test set, GEN-CNP's pathways and the model's outputs."""

    model: nn.Module
    x: torch.Tensor
    pw: Dict[str, torch.Tensor]        # GEN-CNP's pathways, bool [N, C] per unit
    names: List[str]                   # unit names in order
    full: torch.Tensor                 # the model's logits
    preds: torch.Tensor                # its predictions
    labels: torch.Tensor               # the classes (the labels, else the predictions)
    k: int                             # number of classes

    @property
    def n(self) -> int:
        return self.x.shape[0]


@contextlib.contextmanager
def _clock(secs: Dict[str, float], key: str):
    t0 = time.perf_counter()
    yield
    secs[key] = time.perf_counter() - t0


def _as_masks(pathway, units: Optional[Sequence[str]], n: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``{unit: bool [N, C]}`` on the CPU (units: ``units`` or the pathway's keys); ``n``: check there are N rows."""
    names = list(units) if units is not None else list(pathway)
    out = {}
    for u in names:
        m = pathway[u]
        if not isinstance(m, torch.Tensor):
            m = torch.as_tensor(m)
        out[u] = m.detach().cpu().bool()
        if n is not None and (out[u].dim() != 2 or out[u].shape[0] != n):
            raise ValueError(f"GEN-CNP's mask of unit {u!r} must be [N, C] with N = {n}, got {tuple(out[u].shape)}")
    return out


def claim_checks(gencnp: Mapping[str, object], baselines: Mapping[str, Mapping[str, object]],
                 transfer: Optional[Mapping[str, object]]) -> List[Dict[str, object]]:
    """The issue's "must reach" list, as ``[{"claim", "measured", "target", "passed"}]`` (``passed`` None = n/a)."""
    out: List[Dict[str, object]] = []

    def like(b: Mapping[str, object], key: str):
        # CDRP runs on a subsample; compare GEN-CNP on the same samples
        return b.get("reference_" + key, gencnp.get(key))

    if baselines:
        pairs = {m: (float(like(b, "mDC")), float(b["mDC"])) for m, b in baselines.items()}
        best = min(pairs, key=lambda m: pairs[m][1])
        out.append({
            "claim": "GEN-CNP mDC ≤ best baseline mDC (matched density)",
            "measured": "; ".join(f"GEN-CNP {g:.2f} vs {m} {b:.2f}" for m, (g, b) in pairs.items()),
            "target": f"≤ best baseline ({best})",
            "passed": all(g <= b for g, b in pairs.values()),
        })
        pairs = {m: (float(like(b, "acIOU")), float(b["acIOU"])) for m, b in baselines.items()}
        out.append({
            "claim": "GEN-CNP acIOU above every baseline",
            "measured": "; ".join(f"GEN-CNP {g:.3f} vs {m} {b:.3f}" for m, (g, b) in pairs.items()),
            "target": "> every baseline",
            "passed": all(g > b for g, b in pairs.values()),
        })
    if transfer and "majority" in transfer:
        f = float(transfer["majority"]["fidelity"])
        out.append({"claim": "Transferred majority class pathways (j = all): fidelity", "measured": f"{f:.3f}",
                    "target": "≥ 0.9", "passed": f >= 0.9})
    for key, what, limit in (("explain_cost_ratio", "batched", 1.2), ("explain_cost_ratio_b1", "one image at a time",
                                                                           2.0)):
        if gencnp.get(key) is not None:
            r = float(gencnp[key])
            out.append({"claim": f"GEN-CNP explanation cost, {what}, in dense forwards of the target",
                        "measured": f"{r:.2f}", "target": f"≤ {limit:g}", "passed": r <= limit})
    g_ms = gencnp.get("explain_ms_per_image_same_run", gencnp.get("explain_ms_per_image"))
    for m in ("neuron_mct", "cdrp"):  # as measured: CDRP's ratio is set by its step count (docs/design.md §5)
        b_ms = baselines.get(m, {}).get("explain_ms_per_image") if baselines else None
        if m in (baselines or {}) and g_ms is not None and b_ms is not None and float(g_ms) > 0:
            out.append({"claim": f"{m} explanation time / GEN-CNP's",
                        "measured": f"{float(b_ms) / float(g_ms):.1f}× ({float(g_ms):.3f} vs {float(b_ms):.3f} "
                                    "ms/image)", "target": "as measured", "passed": None})
    return out


def _time_pathway_fn(pathway_fn, model: nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """Wall-clock ms per image of ``pathway_fn`` over ``x`` in batches of ``batch_size`` (after one warm-up batch)."""
    with torch.no_grad():
        pathway_fn(model, x[:batch_size])
        t0 = time.perf_counter()
        for sl in _batches(x.shape[0], batch_size):
            pathway_fn(model, x[sl])
        return 1000.0 * (time.perf_counter() - t0) / x.shape[0]


def _pick_images(labels: torch.Tensor, limit: int, count: int) -> torch.Tensor:
    """Up to ``count`` indices among the first ``limit`` samples, one per class first."""
    labels = labels[:limit]
    seen, picks = set(), []
    for i, c in enumerate(labels.tolist()):
        if c not in seen:
            seen.add(c)
            picks.append(i)
        if len(picks) >= count:
            break
    for i in range(len(labels)):
        if len(picks) >= count:
            break
        if i not in picks:
            picks.append(i)
    return torch.tensor(sorted(picks[:count]), dtype=torch.long)


def _gencnp_outputs(generator, x: torch.Tensor, batch_size: int = 256):
    """Hard pathways and raw scores of a GEN-CNP generator on ``x`` (batched, no gradient)."""
    pws: Dict[str, List[torch.Tensor]] = {}
    scs: Dict[str, List[torch.Tensor]] = {}
    with torch.no_grad():
        for sl in _batches(x.shape[0], batch_size):
            out = generator(x[sl], mode="hard")
            for u in out.pathway:
                pws.setdefault(u, []).append(out.pathway[u].cpu())
                scs.setdefault(u, []).append(out.scores[u].detach().float().cpu())
    return {u: torch.cat(v) for u, v in pws.items()}, {u: torch.cat(v) for u, v in scs.items()}


def run_suite_from_dir(
    run_dir: str,
    out_dir: Optional[str] = None,
    train_x: Optional[torch.Tensor] = None,
    train_y: Optional[torch.Tensor] = None,
    generator=None,
    update_metrics: bool = True,
    config: Optional[SuiteConfig] = None,
    trust_pickle: bool = False,
    **kwargs,
) -> Dict[str, object]:
    """:func:`run_suite` on what ``gencnp demo`` / ``gencnp evaluate`` wrote into ``run_dir`` (``config`` and
    ``kwargs``, the other keyword arguments of :func:`run_suite`, go to it).

    Reads ``target_model.pt`` with :func:`gencnp_fast.target.load_target` (the safe format; a whole-module pickle
    only with ``trust_pickle``, for files you made), ``pathways.pt`` (:func:`gencnp_fast.explain.load_pathways`,
    ``weights_only=True``, checked against the model: the suite runs on the rows that hold inputs, the report
    sample) and ``metrics.json`` (GEN-CNP's ``explain_ms_per_image``
    under ``"gencnp"``). Nothing is unpickled. With ``train_x``/``train_y`` and a generator (a ``GenCNP`` instance,
    or ``run_dir/generator.pt`` loaded for the target), the class pathways are built from GEN-CNP's training
    pathways and GEN-CNP's soft scores give its mDC-vs-density curve. The report goes to ``out_dir`` (default
    ``run_dir``); ``"baselines"`` and ``"transfer"`` are merged into ``metrics.json`` (strict JSON, written
    atomically).
    """
    import json

    from ..explain import check_pathways_fit, load_pathways
    from ..io import write_json
    from ..target import load_target

    model = load_target(os.path.join(run_dir, "target_model.pt"), trust_pickle=trust_pickle)
    saved = load_pathways(os.path.join(run_dir, "pathways.pt"))
    check_pathways_fit(saved, model, os.path.join(run_dir, "pathways.pt"))
    metrics_path = os.path.join(run_dir, "metrics.json")
    metrics = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as fh:
            try:
                metrics = json.load(fh)
            except ValueError as exc:
                raise ValueError(f"{metrics_path} is not valid JSON: {exc}") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"{metrics_path} does not hold a JSON object")
    gencnp_ms = (metrics.get("gencnp") or {}).get("explain_ms_per_image")
    timing = {k: v for k, v in (metrics.get("gencnp") or {}).items()
              if k.startswith(("explain_", "dense_ms")) and isinstance(v, (int, float))}
    test_x, test_y = saved["x"], saved["y_x"]  # the rows with inputs (the report sample)
    units = saved.get("units") or list(saved["pathway"])
    if generator is None and train_x is not None and os.path.isfile(os.path.join(run_dir, "generator.pt")):
        from ..generator.gencnp import GenCNP

        generator = GenCNP.load(os.path.join(run_dir, "generator.pt"), model)
    train_pathway = kwargs.pop("train_pathway", None)
    gencnp_scores = kwargs.pop("gencnp_scores", None)
    if generator is not None:
        generator.eval()
        if train_pathway is None and train_x is not None:
            train_pathway, _ = _gencnp_outputs(generator, train_x)
        if gencnp_scores is None:
            _, gencnp_scores = _gencnp_outputs(generator, test_x)
    kwargs.setdefault("meta", {"run": os.path.basename(os.path.abspath(run_dir))})
    if generator is not None and "pathway_fn" not in kwargs:
        kwargs["pathway_fn"] = lambda _m, x: generator.explain(x)
    res = run_suite(model, test_x, test_y, saved["pathway"], out_dir or run_dir, train_x=train_x, train_y=train_y,
                    train_pathway=train_pathway, units=units, gencnp_explain_ms=gencnp_ms,
                    config=config, gencnp_scores=gencnp_scores, gencnp_timing=timing, **kwargs)
    if update_metrics:
        metrics["baselines"] = res["baselines"]
        metrics["transfer"] = res["transfer"]
        write_json(metrics_path, metrics)
    return res
