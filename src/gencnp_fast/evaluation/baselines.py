"""Baseline pathway methods at matched density (docs/design.md §5): CDRP/DGR, NeuronMCT and Random.

Every baseline produces a per-sample pathway (unit name -> bool ``[N, C]``) and is scored with the same metrics as
GEN-CNP (:func:`evaluate_pathway`): its pathway forward runs through :func:`gencnp_fast.fast_pathway_forward`.

Methods
-------
- **CDRP / DGR** (Wang et al., "Interpret neural networks by identifying critical data routing paths", CVPR 2018):
  per-sample, per-channel control gates after every unit, initialised to 1, optimised by SGD (lr 0.1, momentum 0.9,
  30 steps by default) on ``CE(softmax(H(x)), softmax(H(x; g))) + l1 * sum|g|`` — the cross-entropy against the
  model's own *soft* prediction plus an L1 penalty on each sample's gates (the loss is summed over the batch so a
  sample's gradient does not depend on the batch size). Gates are clamped to ``>= 0`` after every step (CDRP's
  non-negativity constraint). The gates are then binarised: **per sample, one threshold across all units**, the one
  that keeps ``k_i`` channels (the top-``k_i`` gates).
- **NeuronMCT**: score of channel c of unit l = ``sum_hw |a_lc * dz_ŷ / da_lc|`` (activation times the gradient of
  the predicted logit, absolute value, summed over the channel's positions), from one forward + backward of the dense
  model. **One global percentile threshold across units per sample**: the top-``k_i`` scores over all units' channels.
- **Random**: for every sample and every unit, the same number of kept channels as the pathway it is compared with
  (so the same per-unit and per-sample density), chosen uniformly.

Matched density
---------------
``k_i = round(d_i * D)`` where ``D`` is the number of channels over all units and ``d_i`` the density of sample i's
GEN-CNP pathway (channel-weighted over units, as :func:`~gencnp_fast.evaluation.metrics.density_stats` counts it).
CDRP and NeuronMCT therefore match GEN-CNP's density *per sample* (hence also its mean and std), but they choose
how to spread the kept channels over units themselves; Random also copies the per-unit split. Ties between equal
scores are broken by a fixed random permutation (seeded), not by channel index, so no unit is favoured.

Both CDRP's gates and NeuronMCT's scores do not depend on the target density, so :func:`density_sweep` computes them
once and thresholds them at every density of the sweep.

Timing (``explain_ms_per_image``): wall clock (``time.perf_counter``) of producing the binary pathways of a batched
run (batches of ``batch_size``), divided by the number of images — the way GEN-CNP's explanation time is measured.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import capture_units, pathway_units, soft_pathway_forward
from ..plan import fast_pathway_forward
from .metrics import class_iou, confidence_metrics, density_stats, flatten_pathway

__all__ = [
    "unit_channels",
    "per_sample_keep_counts",
    "topk_per_sample",
    "split_flat",
    "cdrp_gates",
    "cdrp_pathways",
    "neuron_mct_scores",
    "neuron_mct_pathways",
    "random_pathways",
    "full_logits",
    "pathway_logits",
    "evaluate_pathway",
    "run_baselines",
    "density_sweep",
]

Masks = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def unit_channels(model: nn.Module, x: torch.Tensor, units: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """``{unit name: channels}`` in execution order (restricted to ``units`` when given, in that order)."""
    all_units = {u.name: u.channels for u in pathway_units(model, x[:1])}
    if units is None:
        return dict(all_units)
    missing = [u for u in units if u not in all_units]
    if missing:
        raise ValueError(f"{missing[0]!r} is not a unit of this model; its units are: {', '.join(all_units)}")
    return {u: all_units[u] for u in units}


def per_sample_keep_counts(pathway: Mapping[str, torch.Tensor], units: Sequence[str]) -> torch.Tensor:
    """``[N]`` long: number of kept channels over all ``units`` for every sample of a per-sample pathway."""
    return flatten_pathway(pathway, units).sum(1).long()


def _tie_break(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(d, generator=g, dtype=torch.float64) * 1e-9


def topk_per_sample(scores: torch.Tensor, k: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """bool ``[N, D]``: for each row i the ``k[i]`` highest scores (ties broken by a fixed random order)."""
    n, d = scores.shape
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1)
    if k.numel() == 1 and n != 1:
        k = k.expand(n)
    if k.shape[0] != n:
        raise ValueError(f"k has {k.shape[0]} entries for {n} rows")
    s = scores.detach().double().cpu()
    s = s / s.abs().amax(1, keepdim=True).clamp(min=1e-300)  # scale-free, so the jitter only breaks exact ties
    s = s + _tie_break(d, seed)
    order = s.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d).expand(n, d).contiguous())
    return ranks < k.clamp(0, d)[:, None]


def split_flat(flat: torch.Tensor, channels: Mapping[str, int]) -> Masks:
    """Inverse of :func:`flatten_pathway`: ``[N, D]`` -> ``{unit: [N, C]}``."""
    out = {}
    o = 0
    for name, c in channels.items():
        out[name] = flat[:, o : o + c].contiguous()
        o += c
    if o != flat.shape[1]:
        raise ValueError(f"flat pathway has {flat.shape[1]} columns, the units have {o} channels")
    return out


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


def _keep_counts(density, n: int, d: int) -> torch.Tensor:
    """``density``: a float (all samples), a ``[N]`` tensor of densities, or a pathway to match (per sample)."""
    if isinstance(density, Mapping):
        raise TypeError("pass per_sample_keep_counts(pathway, units) / d, or a float")
    t = torch.as_tensor(density, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.shape[0] != n:
        raise ValueError(f"density has {t.shape[0]} entries for {n} samples")
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError("densities must lie in [0, 1]")
    return torch.floor(t * d + 0.5).long()


# ----------------------------------------------------------------------------------------------------------------
# CDRP / DGR
# ----------------------------------------------------------------------------------------------------------------
def cdrp_gates(
    model: nn.Module,
    x: torch.Tensor,
    units: Optional[Sequence[str]] = None,
    steps: int = 30,
    lr: float = 0.1,
    momentum: float = 0.9,
    l1: float = 0.05,
    batch_size: int = 128,
) -> Dict[str, torch.Tensor]:
    """CDRP control gates ``{unit: float [N, C]}`` (see the module docstring), optimised batch by batch."""
    model.eval()
    channels = unit_channels(model, x, units)
    out: Dict[str, List[torch.Tensor]] = {n: [] for n in channels}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)  # only the gates are optimised
    try:
        for sl in _batches(x.shape[0], batch_size):
            xb = x[sl]
            with torch.no_grad():
                target = model(xb).softmax(1)
            gates = {n: torch.ones(xb.shape[0], c, requires_grad=True) for n, c in channels.items()}
            opt = torch.optim.SGD(list(gates.values()), lr=lr, momentum=momentum)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                logits = soft_pathway_forward(model, gates, xb)
                ce = -(target * F.log_softmax(logits, 1)).sum()
                penalty = sum(g.abs().sum() for g in gates.values())
                (ce + l1 * penalty).backward()
                opt.step()
                with torch.no_grad():
                    for g in gates.values():
                        g.clamp_(min=0.0)
            for n, g in gates.items():
                out[n].append(g.detach())
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    return {n: torch.cat(v) for n, v in out.items()}


def _binarise(scores: Mapping[str, torch.Tensor], channels: Mapping[str, int], k: torch.Tensor, seed: int) -> Masks:
    flat = torch.cat([scores[n] for n in channels], 1)
    return split_flat(topk_per_sample(flat, k, seed), channels)


def cdrp_pathways(
    model: nn.Module, x: torch.Tensor, density, units: Optional[Sequence[str]] = None, seed: int = 0, **gate_kwargs
) -> Masks:
    """CDRP pathway ``{unit: bool [N, C]}`` at ``density`` (a float, or per-sample ``[N]`` densities)."""
    channels = unit_channels(model, x, units)
    gates = cdrp_gates(model, x, list(channels), **gate_kwargs)
    d = sum(channels.values())
    return _binarise(gates, channels, _keep_counts(density, x.shape[0], d), seed)


# ----------------------------------------------------------------------------------------------------------------
# NeuronMCT
# ----------------------------------------------------------------------------------------------------------------
def neuron_mct_scores(
    model: nn.Module, x: torch.Tensor, units: Optional[Sequence[str]] = None, batch_size: int = 128,
    target: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """``{unit: float [N, C]}``: ``sum_hw |a * d z_t / d a|`` with ``t`` the predicted class (or ``target``)."""
    model.eval()
    channels = unit_channels(model, x, units)
    out: Dict[str, List[torch.Tensor]] = {n: [] for n in channels}
    for sl in _batches(x.shape[0], batch_size):
        # the input requires grad so the unit outputs are in the graph even when the target is frozen
        xb = x[sl].detach().requires_grad_(True)
        with torch.enable_grad():
            logits, feats = capture_units(model, xb)
            t = logits.argmax(1) if target is None else torch.as_tensor(target)[sl].long()
            sel = logits.gather(1, t[:, None]).sum()
            names = list(channels)
            grads = torch.autograd.grad(sel, [feats[n] for n in names])
        for n, g in zip(names, grads):
            a = feats[n].detach()
            s = (a * g).abs()
            out[n].append(s.flatten(2).sum(2) if s.dim() > 2 else s)
    return {n: torch.cat(v) for n, v in out.items()}


def neuron_mct_pathways(
    model: nn.Module, x: torch.Tensor, density, units: Optional[Sequence[str]] = None, batch_size: int = 128,
    seed: int = 0,
) -> Masks:
    """NeuronMCT pathway ``{unit: bool [N, C]}`` at ``density`` (a float, or per-sample ``[N]`` densities)."""
    channels = unit_channels(model, x, units)
    scores = neuron_mct_scores(model, x, list(channels), batch_size)
    d = sum(channels.values())
    return _binarise(scores, channels, _keep_counts(density, x.shape[0], d), seed)


# ----------------------------------------------------------------------------------------------------------------
# Random
# ----------------------------------------------------------------------------------------------------------------
def random_pathways(
    like: Mapping[str, torch.Tensor], units: Optional[Sequence[str]] = None,
    generator: Optional[torch.Generator] = None,
) -> Masks:
    """Random pathway with, for every sample and unit, as many kept channels as ``like`` (``[N, C]`` or ``[C]``)."""
    names = list(units) if units is not None else list(like)
    out = {}
    for n in names:
        m = like[n].bool().cpu()
        shared = m.dim() == 1
        m2 = m[None] if shared else m
        k = m2.sum(1)
        r = torch.rand(m2.shape, generator=generator)
        ranks = r.argsort(1).argsort(1)
        keep = ranks < k[:, None]
        out[n] = keep[0] if shared else keep
    return out


# ----------------------------------------------------------------------------------------------------------------
# evaluation through the fast engine
# ----------------------------------------------------------------------------------------------------------------
def full_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[sl]) for sl in _batches(x.shape[0], batch_size)])


def pathway_logits(
    model: nn.Module, pathway: Mapping[str, torch.Tensor], x: torch.Tensor, batch_size: int = 256,
    backend: str = "auto",
) -> torch.Tensor:
    """Logits of ``H(x; m)`` through :func:`fast_pathway_forward`, batched (masks ``[N, C]`` or shared ``[C]``)."""
    outs = []
    for sl in _batches(x.shape[0], batch_size):
        mb = {n: (m if m.dim() == 1 else m[sl]).to(x.device) for n, m in pathway.items()}
        outs.append(fast_pathway_forward(model, mb, x[sl].contiguous(), backend=backend))
    return torch.cat(outs)


def evaluate_pathway(
    model: nn.Module,
    x: torch.Tensor,
    pathway: Mapping[str, torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    units: Optional[Sequence[str]] = None,
    full: Optional[torch.Tensor] = None,
    batch_size: int = 256,
    explain_ms_per_image: Optional[float] = None,
    backend: str = "auto",
    num_classes: Optional[int] = None,
) -> Dict[str, object]:
    """The metrics GEN-CNP is reported with: ``fidelity, mDC, mIC, density_mean, density_std, density_per_unit,
    acIOU, inter_class_iou, explain_ms_per_image`` (acIOU over ``labels``; the predicted classes when ``None``)."""
    names = list(units) if units is not None else list(pathway)
    full = full_logits(model, x, batch_size) if full is None else full
    path = pathway_logits(model, {n: pathway[n] for n in names}, x, batch_size, backend)
    res: Dict[str, object] = dict(confidence_metrics(full, path))
    res.update(density_stats(pathway, names))
    lab = full.argmax(1) if labels is None else torch.as_tensor(labels).long().cpu()
    res.update(class_iou(pathway, lab, names, num_classes=num_classes))
    res["explain_ms_per_image"] = None if explain_ms_per_image is None else float(explain_ms_per_image)
    return res


def _timed(fn: Callable[[], Masks]) -> Tuple[Masks, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_baselines(
    model: nn.Module,
    x: torch.Tensor,
    reference: Mapping[str, torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    units: Optional[Sequence[str]] = None,
    methods: Sequence[str] = ("cdrp", "neuron_mct", "random"),
    batch_size: int = 128,
    cdrp_max_samples: Optional[int] = 256,
    cdrp_steps: int = 30,
    cdrp_lr: float = 0.1,
    cdrp_momentum: float = 0.9,
    cdrp_l1: float = 0.05,
    full: Optional[torch.Tensor] = None,
    seed: int = 0,
    backend: str = "auto",
    num_classes: Optional[int] = None,
) -> Tuple[Dict[str, Dict[str, object]], Dict[str, object]]:
    """Every baseline at the per-sample density of ``reference`` (GEN-CNP's pathway ``{unit: bool [N, C]}``).

    CDRP runs on ``cdrp_max_samples`` samples drawn at random (seeded; all when ``None``); its metrics are over
    those samples and include ``reference_mDC`` / ``reference_fidelity`` / ``reference_acIOU``: the reference
    pathway's metrics on the same samples, for a like-for-like comparison. ``n_samples`` is recorded for every
    method.

    Returns ``(metrics, artifacts)``: ``metrics[method]`` has the keys of :func:`evaluate_pathway`;
    ``artifacts`` holds the pathways (``"<method>_pathway"``), the raw scores (``"cdrp_gates"``,
    ``"neuron_mct_scores"``) and ``"cdrp_index"`` (the samples CDRP ran on), for sweeps and figures.
    """
    model.eval()
    names = list(units) if units is not None else list(reference)
    channels = unit_channels(model, x, names)
    full = full_logits(model, x) if full is None else full
    k = per_sample_keep_counts(reference, names)
    lab = None if labels is None else torch.as_tensor(labels).long().cpu()
    ctx = _BaselineRun(model, x, reference, lab, names, channels, k, full, seed,
                       dict(units=names, batch_size=256, backend=backend, num_classes=num_classes))
    gen = torch.Generator().manual_seed(seed)
    metrics: Dict[str, Dict[str, object]] = {}
    art: Dict[str, object] = {}
    for method in methods:
        if method == "cdrp":
            gate_kwargs = dict(steps=cdrp_steps, lr=cdrp_lr, momentum=cdrp_momentum, l1=cdrp_l1, batch_size=batch_size)
            metrics[method] = _run_cdrp(ctx, cdrp_max_samples, gate_kwargs, art)
        elif method == "neuron_mct":
            metrics[method] = _run_neuron_mct(ctx, batch_size, art)
        elif method == "random":
            pw, sec = _timed(lambda: random_pathways(reference, names, gen))
            metrics[method] = ctx.score(pw, sec)
            art["random_pathway"] = pw
        else:
            raise ValueError(f"unknown baseline {method!r}; choose from cdrp, neuron_mct, random")
    return metrics, art


@dataclasses.dataclass
class _BaselineRun:
    """What every baseline of :func:`run_baselines` needs: the inputs, the reference and its keep counts."""

    model: nn.Module
    x: torch.Tensor
    reference: Mapping[str, torch.Tensor]
    labels: Optional[torch.Tensor]
    names: List[str]
    channels: Dict[str, int]
    k: torch.Tensor                    # kept channels per sample (the reference's)
    full: torch.Tensor                 # the model's logits on x
    seed: int
    eval_kwargs: Dict[str, object]     # for evaluate_pathway

    def score(self, pw: Masks, seconds: float) -> Dict[str, object]:
        """The metrics of a pathway of all samples, produced in ``seconds``."""
        n = self.x.shape[0]
        res = evaluate_pathway(self.model, self.x, pw, self.labels, full=self.full,
                               explain_ms_per_image=1000 * seconds / n, **self.eval_kwargs)
        res["n_samples"] = n
        return res


def _run_cdrp(ctx: _BaselineRun, max_samples: Optional[int], gate_kwargs, art: Dict[str, object]):
    """CDRP on ``max_samples`` samples drawn at random (seeded), with the reference's metrics on them."""
    n = ctx.x.shape[0]
    m = n if max_samples is None else min(n, int(max_samples))
    # a seeded random subset (datasets are often sorted by class: the first m would miss classes)
    idx = torch.arange(n) if m == n else torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))[:m]
    idx = idx.sort().values
    xs = ctx.x[idx]

    def go():
        gates = cdrp_gates(ctx.model, xs, ctx.names, **gate_kwargs)
        return gates, _binarise(gates, ctx.channels, ctx.k[idx], ctx.seed)

    (gates, pw), sec = _timed(go)
    sub_lab = None if ctx.labels is None else ctx.labels[idx]
    res = evaluate_pathway(ctx.model, xs, pw, sub_lab, full=ctx.full[idx], explain_ms_per_image=1000 * sec / m,
                           **ctx.eval_kwargs)
    ref_sub = {u: ctx.reference[u][idx] for u in ctx.names}
    ref_res = evaluate_pathway(ctx.model, xs, ref_sub, sub_lab, full=ctx.full[idx], **ctx.eval_kwargs)
    res.update({"n_samples": m, "reference_mDC": ref_res["mDC"], "reference_fidelity": ref_res["fidelity"],
                "reference_acIOU": ref_res["acIOU"]})
    art.update(cdrp_gates=gates, cdrp_pathway=pw, cdrp_index=idx)
    return res


def _run_neuron_mct(ctx: _BaselineRun, batch_size: int, art: Dict[str, object]):
    def go():
        scores = neuron_mct_scores(ctx.model, ctx.x, ctx.names, batch_size)
        return scores, _binarise(scores, ctx.channels, ctx.k, ctx.seed)

    (scores, pw), sec = _timed(go)
    art.update(neuron_mct_scores=scores, neuron_mct_pathway=pw)
    return ctx.score(pw, sec)


def density_sweep(
    model: nn.Module,
    x: torch.Tensor,
    densities: Sequence[float],
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    units: Sequence[str],
    full: Optional[torch.Tensor] = None,
    seed: int = 0,
    backend: str = "auto",
    thresholds: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
    threshold_grid: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
) -> Dict[str, List[Dict[str, float]]]:
    """mDC / fidelity against density for every method.

    Args:
        scores: ``{method: {unit: float [N, C]}}``: channel scores that are cut at the top-``round(d*D)`` per
            sample for every density ``d`` (CDRP gates, NeuronMCT scores). ``"random"`` is added (uniform scores).
        thresholds: ``{method: {unit: float [N, C] in [0, 1]}}``: soft scores cut at every value of
            ``threshold_grid`` (GEN-CNP's scores with the DAQ threshold shifted).

    Returns ``{method: [{"density", "mDC", "mIC", "fidelity"}, ...]}`` sorted by density.
    """
    full = full_logits(model, x) if full is None else full
    n = x.shape[0]
    channels = unit_channels(model, x, units)
    d_total = sum(channels.values())
    g = torch.Generator().manual_seed(seed)
    all_scores = dict(scores)
    all_scores.setdefault("random", {u: torch.rand(n, c, generator=g) for u, c in channels.items()})
    out: Dict[str, List[Dict[str, float]]] = {}
    for method, sc in all_scores.items():
        sc = {u: sc[u][:n] for u in channels}
        flat = torch.cat([sc[u] for u in channels], 1)
        rows = []
        for d in densities:
            k = torch.full((n,), int(math.floor(d * d_total + 0.5)), dtype=torch.long)
            pw = split_flat(topk_per_sample(flat, k, seed), channels)
            r = confidence_metrics(full[:n], pathway_logits(model, pw, x, backend=backend))
            rows.append({"density": float(flatten_pathway(pw, units).double().mean()), **r})
        out[method] = sorted(rows, key=lambda r: r["density"])
    for method, sc in (thresholds or {}).items():
        rows = []
        for t in threshold_grid:
            pw = {u: sc[u][:n] >= t for u in channels}
            r = confidence_metrics(full[:n], pathway_logits(model, pw, x, backend=backend))
            rows.append({"density": float(flatten_pathway(pw, units).double().mean()), "threshold": float(t), **r})
        out[method] = sorted(rows, key=lambda r: r["density"])
    return out
