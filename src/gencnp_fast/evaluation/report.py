"""Figures (matplotlib PNGs) and one self-contained ``report.html`` that shows them.

Every figure is written as a PNG into the output directory *and* embedded in ``report.html`` as a base64 data URI,
so the report is one file that opens anywhere (no network, no sibling files needed). The page carries a small
inline script that, after ``load``, sets ``document.body.dataset.imagesOk`` to ``"true"`` when every ``<img>``
decoded (``naturalWidth > 0``) — the report test reads it back from headless Chromium.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
from typing import List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = [
    "Figure",
    "METHOD_LABELS",
    "fig_class_frequency",
    "fig_density",
    "fig_gradcam",
    "fig_pathway_grad",
    "fig_mdc_vs_density",
    "fig_transfer",
    "metrics_table_html",
    "write_report",
]

METHOD_LABELS = {
    "gencnp": "GEN-CNP",
    "cdrp": "CDRP/DGR",
    "neuron_mct": "NeuronMCT",
    "random": "Random",
}
COLORS = {"gencnp": "#d62728", "cdrp": "#1f77b4", "neuron_mct": "#2ca02c", "random": "#7f7f7f"}


class Figure:
    """A rendered figure: file name, caption (HTML allowed), PNG bytes."""

    def __init__(self, name: str, title: str, caption: str, png: bytes):
        self.name, self.title, self.caption, self.png = name, title, caption, png

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _render(fig, name: str, title: str, caption: str) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Figure(name, title, caption, buf.getvalue())


def _mpl(text) -> str:
    """``text`` as literal matplotlib text: every ``$`` escaped, so a name such as ``$\\frac$`` is drawn as written
    instead of being parsed (and failing) as mathtext."""
    return str(text).replace("$", r"\$")


def _label(m: str) -> str:
    return _mpl(METHOD_LABELS.get(m, m))


def _short(unit: str, maxlen: int = 22) -> str:
    return _mpl(unit if len(unit) <= maxlen else "…" + unit[-(maxlen - 1):])


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def fig_class_frequency(
    pathway: Mapping[str, torch.Tensor], labels: torch.Tensor, units: Sequence[str], num_classes: int,
    method: str = "gencnp", class_names: Optional[Sequence[str]] = None,
) -> Figure:
    """Per unit: a [class × channel] heatmap of how often each channel is kept by the class's samples."""
    labels = torch.as_tensor(labels).long().cpu()
    n = len(units)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.6 * rows), squeeze=False)
    im = None
    for i, u in enumerate(units):
        ax = axes[i // cols][i % cols]
        m = pathway[u].float().cpu()
        freq = torch.zeros(num_classes, m.shape[1])
        for k in range(num_classes):
            sel = labels == k
            if bool(sel.any()):
                freq[k] = m[sel].mean(0)
        order = freq.mean(0).argsort(descending=True)
        im = ax.imshow(freq[:, order].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_title(f"{_short(u)}  ({m.shape[1]} ch, density {float(m.mean()):.2f})", fontsize=9)
        ax.set_yticks(range(num_classes))
        known = list(class_names or [])
        ax.set_yticklabels([_mpl(known[k]) if k < len(known) else str(k) for k in range(num_classes)], fontsize=7)
        ax.set_xlabel("channel (sorted by overall frequency)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("class", fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"{_label(method)}: per-class channel frequency", fontsize=11)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="fraction of the class's samples keeping it")
    caption = (
        f"Each panel is one unit of the target model; row <i>k</i>, column <i>c</i> is the fraction of class-<i>k</i> "
        f"test samples whose {_label(method)} pathway keeps channel <i>c</i> (channels sorted by how often they are "
        "kept overall). Bright columns shared by all rows are class-agnostic channels; a class-relevant pathway shows "
        "rows with different bright channels, and values near 0 or 1 (not 0.5) mean the class's samples agree."
    )
    return _render(fig, f"class_frequency_{method}.png", f"Per-class channel frequency ({_label(method)})", caption)


def fig_density(
    per_sample: Mapping[str, torch.Tensor], per_unit: Mapping[str, Mapping[str, float]], units: Sequence[str],
    labels: Optional[torch.Tensor] = None,
) -> Figure:
    """Left: histogram of GEN-CNP's per-sample density (and per class); right: per-unit density of every method."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    gd = per_sample.get("gencnp")
    if gd is not None:
        gd = gd.double().cpu().numpy()
        a1.hist(gd, bins=30, color=COLORS["gencnp"], alpha=0.85)
        a1.axvline(gd.mean(), color="k", ls="--", lw=1, label=f"mean {gd.mean():.3f} ± {gd.std():.3f}")
        if labels is not None:
            lab = torch.as_tensor(labels).long().cpu().numpy()
            ks = np.unique(lab)
            med = [np.median(gd[lab == k]) for k in ks]
            ymax = a1.get_ylim()[1]
            a1.scatter(med, [ymax * 0.95] * len(ks), marker="v", color="k", s=18, zorder=3, label="per-class median")
            for k, mv in zip(ks, med):
                a1.annotate(str(k), (mv, ymax * 0.97), fontsize=6, ha="center", va="bottom")
        a1.legend(fontsize=8)
    a1.set_xlabel("pathway density of a sample (kept fraction of all channels)")
    a1.set_ylabel("samples")
    a1.set_title("GEN-CNP: instance-specific sparsity", fontsize=10)
    methods = list(per_unit)
    w = 0.8 / max(1, len(methods))
    xs = np.arange(len(units))
    for i, m in enumerate(methods):
        a2.bar(xs + (i - (len(methods) - 1) / 2) * w, [per_unit[m].get(u, np.nan) for u in units], w,
               label=_label(m), color=COLORS.get(m))
    a2.set_xticks(xs)
    a2.set_xticklabels([_short(u, 16) for u in units], rotation=30, ha="right", fontsize=8)
    a2.set_ylabel("mean density of the unit")
    a2.set_ylim(0, 1)
    a2.set_title("density per unit (same overall density for every method)", fontsize=10)
    a2.legend(fontsize=8)
    fig.tight_layout()
    caption = (
        "Left: the distribution of per-sample pathway density of GEN-CNP (no fixed budget: every image keeps as many "
        "channels as it needs; triangles mark each class's median). A wide histogram is instance-specific sparsity. "
        "Right: how each method spreads its channels over the units. The baselines are matched to GEN-CNP's density "
        "sample by sample, so only the split over units differs (Random copies GEN-CNP's split exactly)."
    )
    return _render(fig, "density.png", "Density: instance-specific sparsity and per-unit density", caption)


def _img(ax, x: torch.Tensor):
    x = x.detach().cpu().float()
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray")
    else:
        v = x.permute(1, 2, 0).numpy()
        v = (v - v.min()) / max(1e-12, float(v.max() - v.min()))
        ax.imshow(v)
    ax.set_xticks([])
    ax.set_yticks([])


def fig_gradcam(
    x: torch.Tensor, cams: Mapping[str, torch.Tensor], preds: torch.Tensor, labels: Optional[torch.Tensor] = None,
    unit: str = "",
) -> Figure:
    """Rows: images; columns: the input, then Grad-CAM of each model in ``cams`` (``"full"`` first)."""
    cols = 1 + len(cams)
    n = x.shape[0]
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    for i in range(n):
        _img(axes[i][0], x[i])
        t = f"pred {int(preds[i])}" + ("" if labels is None else f" (label {int(labels[i])})")
        axes[i][0].set_ylabel(t, fontsize=8)
        for j, (name, cam) in enumerate(cams.items(), start=1):
            ax = axes[i][j]
            _img(ax, x[i])
            ax.imshow(cam[i].cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[0][0].set_title("input", fontsize=9)
    for j, name in enumerate(cams, start=1):
        axes[0][j].set_title("full model" if name == "full" else f"{_label(name)} pathway", fontsize=9)
    fig.tight_layout()
    caption = (
        f"Grad-CAM at unit <code>{html.escape(unit)}</code> for the full model's predicted class, computed on the full "
        "model and on each pathway model H(x; m) (the same network with every channel outside the pathway set to "
        "zero). Red = high. A faithful pathway looks at the same strokes as the full model; a pathway that dropped "
        "the evidence shows a shifted or empty map."
    )
    return _render(fig, "gradcam.png", "Grad-CAM: full model vs pathway model", caption)


def fig_pathway_grad(x: torch.Tensor, grads: Mapping[str, torch.Tensor], preds: torch.Tensor) -> Figure:
    """Rows: images; columns: the input, then |PathwayGrad| summed over channels for each model in ``grads``."""
    cols = 1 + len(grads)
    n = x.shape[0]
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    for i in range(n):
        _img(axes[i][0], x[i])
        axes[i][0].set_ylabel(f"pred {int(preds[i])}", fontsize=8)
        for j, (name, g) in enumerate(grads.items(), start=1):
            s = g[i].abs().sum(0).cpu().numpy()
            s = s / max(1e-12, float(np.percentile(s, 99.5)))
            axes[i][j].imshow(np.clip(s, 0, 1), cmap="inferno", vmin=0, vmax=1)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
    axes[0][0].set_title("input", fontsize=9)
    for j, name in enumerate(grads, start=1):
        axes[0][j].set_title("full model (gradient)" if name == "full" else f"PathwayGrad {_label(name)}",
                             fontsize=9)
    fig.tight_layout()
    caption = (
        "PathwayGrad: |∂ logit<sub>ŷ</sub> / ∂ x| of the pathway model H(x; m) (summed over input channels, clipped at "
        "the 99.5th percentile per image); the first map is the plain gradient of the full model. It shows which "
        "pixels the pathway itself is sensitive to: a sparse, faithful pathway gives a cleaner map concentrated on "
        "the digit."
    )
    return _render(fig, "pathway_grad.png", "PathwayGrad: input gradients through the pathway", caption)


def fig_mdc_vs_density(
    sweep: Mapping[str, Sequence[Mapping[str, float]]], points: Mapping[str, Tuple[float, float]],
    fid_points: Optional[Mapping[str, Tuple[float, float]]] = None,
) -> Figure:
    """mDC (left) and fidelity (right) against density: curves from the sweep, points at matched density."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for m, rows in sweep.items():
        d = [r["density"] for r in rows]
        a1.plot(d, [r["mDC"] for r in rows], "-o", ms=3, color=COLORS.get(m), label=_label(m) + " (sweep)")
        a2.plot(d, [r["fidelity"] for r in rows], "-o", ms=3, color=COLORS.get(m), label=_label(m) + " (sweep)")
    for m, (d, v) in points.items():
        a1.scatter([d], [v], marker="*" if m == "gencnp" else "D", s=160 if m == "gencnp" else 45,
                   color=COLORS.get(m), edgecolor="k", zorder=5, label=f"{_label(m)} @ matched density")
    for m, (d, v) in (fid_points or {}).items():
        a2.scatter([d], [v], marker="*" if m == "gencnp" else "D", s=160 if m == "gencnp" else 45,
                   color=COLORS.get(m), edgecolor="k", zorder=5)
    a1.set_xlabel("density (kept fraction of channels)")
    a1.set_ylabel("mDC (%) — lower is better")
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.set_xlabel("density (kept fraction of channels)")
    a2.set_ylabel("fidelity — higher is better")
    a2.set_ylim(0, 1.02)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    caption = (
        "Mean decrease in confidence (left) and fidelity (right) of the pathway model against its density. Baseline "
        "curves threshold each method's channel scores at a common density for every sample; markers are the "
        "matched-density results of the table (each baseline at GEN-CNP's per-sample density; the star is GEN-CNP, "
        "a curve for it appears when its soft scores were given, by shifting its quantisation threshold). Down and to "
        "the left is better: the same faithfulness with fewer channels."
    )
    return _render(fig, "mdc_vs_density.png", "Faithfulness against density", caption)


def fig_transfer(transfer: Mapping[str, object]) -> Figure:
    """Fidelity and mDC of transferred class pathways against j (pathways per class), per rule."""
    rules = [r for r in ("majority", "union", "intersection") if r in transfer]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    styles = {"majority": "#d62728", "union": "#9467bd", "intersection": "#8c564b"}
    for r in rules:
        by_j = transfer[r]["by_j"]
        keys = list(by_j)
        xs = np.arange(len(keys))
        a1.plot(xs, [by_j[k]["fidelity"] for k in keys], "-o", color=styles[r], label=f"transfer: {r}")
        a1.plot(xs, [by_j[k]["random"]["fidelity"] for k in keys], ":", color=styles[r], alpha=0.7,
                label=f"random, same density as {r}")
        a2.plot(xs, [by_j[k]["mDC"] for k in keys], "-o", color=styles[r], label=f"transfer: {r}")
        a2.plot(xs, [by_j[k]["random"]["mDC"] for k in keys], ":", color=styles[r], alpha=0.7)
        for a in (a1, a2):
            a.set_xticks(xs)
            a.set_xticklabels(keys)
    own = transfer.get("own")
    if own:
        a1.axhline(own["fidelity"], color="k", ls="--", lw=1, label="own pathways")
        a2.axhline(own["mDC"], color="k", ls="--", lw=1, label="own pathways")
    a1.axhline(0.9, color="#bbbbbb", lw=0.8)
    a1.set_ylim(0, 1.02)
    a1.set_xlabel("j: training pathways per class")
    a1.set_ylabel("fidelity")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.set_xlabel("j: training pathways per class")
    a2.set_ylabel("mDC (%)")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    caption = (
        "Class pathways built from j training pathways per class (majority vote, union, intersection) and applied to "
        "every test sample of that class instead of its own pathway. Solid: transferred class pathway; dotted: a "
        "random class pathway with the same per-unit density; dashed: each sample's own pathway. Transfer works when "
        "the solid line reaches the dashed one and stays far above the dotted one. Density (table) grows with j for "
        "union and shrinks for intersection."
    )
    return _render(fig, "transfer.png", "Transfer of class pathways", caption)


# ----------------------------------------------------------------------------------------------------------------
# tables and page
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, np.integer)):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if math.isnan(f):
        return "—"
    if abs(f) >= 100:
        return f"{f:.0f}"
    return f"{f:.{digits}f}"


def metrics_table_html(methods: Mapping[str, Mapping[str, object]]) -> str:
    """One row per method with the docs/design.md §5 metrics."""
    cols = [
        ("fidelity", "Fidelity ↑"), ("mDC", "mDC % ↓"), ("mIC", "mIC % ↑"), ("density_mean", "Density"),
        ("density_std", "Density std"), ("acIOU", "acIOU ↑"), ("inter_class_iou", "Inter-class IoU"),
        ("explain_ms_per_image", "Explain ms/img ↓"), ("n_samples", "Samples"),
    ]
    head = "".join(f"<th>{c[1]}</th>" for c in cols)
    rows = []
    for m, r in methods.items():
        cls = ' class="ours"' if m == "gencnp" else ""
        cells = "".join(f"<td>{_fmt(r.get(k), 4 if k == 'explain_ms_per_image' else 3)}</td>" for k, _ in cols)
        rows.append(f"<tr{cls}><th>{html.escape(_label(m))}</th>{cells}</tr>")
    return f'<table class="metrics"><thead><tr><th>Method</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def transfer_table_html(transfer: Mapping[str, object]) -> str:
    rows = []
    for r in ("majority", "union", "intersection"):
        if r not in transfer:
            continue
        for j, v in transfer[r]["by_j"].items():
            rv = v["random"]
            rows.append(
                f"<tr><th>{r}</th><td>{html.escape(j)}</td><td>{_fmt(v['fidelity'])}</td><td>{_fmt(v['mDC'])}</td>"
                f"<td>{_fmt(v['mIC'])}</td><td>{_fmt(v['density_mean'])}</td><td>{_fmt(rv['fidelity'])}</td>"
                f"<td>{_fmt(rv['mDC'])}</td></tr>"
            )
    own = transfer.get("own")
    if own:
        rows.append(
            f"<tr class=\"ours\"><th>own pathways</th><td>—</td><td>{_fmt(own['fidelity'])}</td><td>{_fmt(own['mDC'])}"
            f"</td><td>{_fmt(own['mIC'])}</td><td>{_fmt(own['density_mean'])}</td><td>—</td><td>—</td></tr>"
        )
    return (
        '<table class="metrics"><thead><tr><th>Rule</th><th>j</th><th>Fidelity ↑</th><th>mDC % ↓</th><th>mIC % ↑</th>'
        "<th>Density</th><th>Random fidelity</th><th>Random mDC %</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
    )


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:24px 40px}
header h1{margin:0 0 6px 0;font-size:26px} header p{margin:0;color:#c5cad6;font-size:14px}
main{max-width:1180px;margin:0 auto;padding:20px 40px 60px}
h2{margin-top:36px;border-bottom:2px solid #e1e4ea;padding-bottom:6px;font-size:20px}
.cards{display:flex;flex-wrap:wrap;gap:14px;margin:18px 0}
.card{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 18px;min-width:200px;flex:1}
.card .v{font-size:24px;font-weight:600} .card .k{font-size:12px;color:#5b6474;text-transform:uppercase;letter-spacing:.04em}
.card .s{font-size:12px;color:#5b6474;margin-top:4px}
.pass{color:#1a7f37} .fail{color:#cf222e}
table.metrics{border-collapse:collapse;background:#fff;width:100%;font-size:13px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
table.metrics th,table.metrics td{padding:7px 10px;border-bottom:1px solid #eceef2;text-align:right}
table.metrics thead th{background:#eef0f4;text-align:right} table.metrics tbody th{text-align:left}
tr.ours{background:#fff4f2;font-weight:600}
figure{background:#fff;margin:22px 0;padding:16px;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
figure img{max-width:100%;display:block;margin:0 auto}
figcaption{font-size:13.5px;color:#3d4556;margin-top:10px;line-height:1.45}
figcaption b{color:#1d2330}
.note{font-size:13px;color:#5b6474;line-height:1.5}
code{background:#eef0f4;padding:1px 4px;border-radius:3px}
"""

_SCRIPT = """
<script>
(function(){
  function check(){
    var imgs = Array.prototype.slice.call(document.images);
    var bad = imgs.filter(function(i){return !(i.complete && i.naturalWidth > 0);});
    document.body.dataset.imagesTotal = String(imgs.length);
    document.body.dataset.imagesBroken = String(bad.length);
    document.body.dataset.imagesOk = (imgs.length > 0 && bad.length === 0) ? "true" : "false";
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
</script>
"""


def _summary_html(methods: Mapping[str, Mapping[str, object]], transfer: Optional[Mapping[str, object]],
                  checks: Optional[Sequence[Mapping[str, object]]]) -> List[str]:
    """The report's summary section: GEN-CNP's headline numbers as cards, then the table of the checked claims."""
    cards = []
    g = methods.get("gencnp", {})
    if g:
        cards.append(("GEN-CNP fidelity", _fmt(g.get("fidelity")), f"mDC {_fmt(g.get('mDC'))} %"))
        cards.append(("GEN-CNP density", _fmt(g.get("density_mean")), f"± {_fmt(g.get('density_std'))} over samples"))
        cards.append(("GEN-CNP acIOU", _fmt(g.get("acIOU")), f"inter-class {_fmt(g.get('inter_class_iou'))}"))
        if g.get("explain_ms_per_image") is not None:
            cards.append(("GEN-CNP explain", f"{_fmt(g.get('explain_ms_per_image'), 3)} ms", "per image, batched"))
    if transfer and "majority" in transfer:
        cards.append(("Transferred class pathways", _fmt(transfer["majority"]["fidelity"]),
                      "fidelity, majority vote, j = all"))
    parts = ['<section><h2>Summary</h2><div class="cards">']
    for k, v, s in cards:
        parts.append(f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{v}</div>'
                     f'<div class="s">{html.escape(s)}</div></div>')
    parts.append("</div>")
    if checks:
        parts.append('<table class="metrics"><thead><tr><th>Claim</th><th>Measured</th><th>Target</th><th>Result</th>'
                     "</tr></thead><tbody>")
        for c in checks:
            ok = c.get("passed")
            res = '<span class="pass">✔ pass</span>' if ok else ('<span class="fail">✘ fail</span>' if ok is not None
                                                                  else "—")
            parts.append(f"<tr><th>{html.escape(str(c['claim']))}</th><td>{html.escape(str(c['measured']))}</td>"
                         f"<td>{html.escape(str(c['target']))}</td><td>{res}</td></tr>")
        parts.append("</tbody></table>")
    parts.append("</section>")
    return parts


def write_report(
    out_dir: str,
    figures: Sequence[Figure],
    methods: Mapping[str, Mapping[str, object]],
    transfer: Optional[Mapping[str, object]] = None,
    checks: Optional[Sequence[Mapping[str, object]]] = None,
    meta: Optional[Mapping[str, object]] = None,
    notes: Sequence[str] = (),
    title: str = "GEN-CNP pathway evaluation",
) -> str:
    """Write every figure as ``out_dir/<name>.png`` and the page ``out_dir/report.html`` (each atomically: an
    existing file is replaced only by a complete new one); return the page's path."""
    from ..io import write_bytes, write_text

    os.makedirs(out_dir, exist_ok=True)
    for f in figures:
        write_bytes(os.path.join(out_dir, f.name), f.png)
    meta = dict(meta or {})
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sub = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in meta.items())
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><p>{sub}{' · ' if sub else ''}generated {when}</p></header><main>",
    ]
    parts += _summary_html(methods, transfer, checks)
    parts.append("<section><h2>All metrics at matched density</h2>")
    parts.append(metrics_table_html(methods))
    parts.append(
        '<p class="note">Fidelity: fraction of samples whose pathway model predicts the full model\'s class. '
        "mDC: mean relative decrease of the predicted class's softmax probability (%). mIC: % of samples whose "
        "confidence increases. Density: kept fraction of all channels (mean, std over samples). acIOU: mean IoU of "
        "same-class pathways; inter-class IoU: mean IoU of pathways of different classes (lower = more "
        "class-specific). Explain time: wall clock per image of producing the pathways, batched, on this machine. "
        "Every baseline keeps, for each sample, as many channels as GEN-CNP's pathway of that sample.</p>"
    )
    for n in notes:
        parts.append(f'<p class="note">{n}</p>')
    parts.append("</section>")
    if transfer:
        parts.append("<section><h2>Transfer of class pathways</h2>")
        parts.append(transfer_table_html(transfer))
        parts.append("</section>")
    parts.append("<section><h2>Figures</h2>")
    for i, f in enumerate(figures, start=1):
        parts.append(
            f'<figure id="{html.escape(f.name)}"><img src="{f.data_uri()}" alt="{html.escape(f.title)}">'
            f"<figcaption><b>Figure {i}. {html.escape(f.title)}.</b> {f.caption}</figcaption></figure>"
        )
    parts.append("</section></main>")
    parts.append(_SCRIPT)
    parts.append("</body></html>")
    path = os.path.join(out_dir, "report.html")
    write_text(path, "\n".join(parts))
    return path
