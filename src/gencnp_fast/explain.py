"""Explain a dataset with a trained GEN-CNP generator and evaluate the pathways (docs/design.md §5).

:func:`evaluate_gencnp` is the one entry point the CLI (``gencnp evaluate`` / ``gencnp demo``) uses: it returns an
:class:`ExplainResult` holding the metrics dict *and* the objects behind it (target, generator, test data, pathways,
logits), so that later evaluation code (baselines, class-pathway transfer, reports) can add keys to
``result.metrics`` before :func:`write_outputs` writes ``metrics.json`` and ``pathways.pt``.

``pathways.pt`` is a dict: ``"x"`` the test inputs ``[N, C, H, W]``, ``"y"`` their labels ``[N]``, ``"pathway"`` unit
name → bool ``[N, C]``, ``"units"`` the unit names in execution order. :func:`recompute_metrics` recomputes every
pathway metric from that file and ``target_model.pt`` with the reference (dense masked) forward.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .data import ImageData, check_labels
from .evaluation.metrics import class_iou, confidence_metrics, density_stats
from .generator.gencnp import GenCNP
from .model.pathway import Pathway
from .model.reference import reference_pathway_forward
from .plan import fast_pathway_forward

__all__ = [
    "ExplainResult",
    "explain_batched",
    "time_explain",
    "explain_timings",
    "pathway_metrics",
    "evaluate_gencnp",
    "save_pathways",
    "load_pathways",
    "write_outputs",
    "recompute_metrics",
    "check_pathways_fit",
    "register_evaluation_hook",
    "run_evaluation_hooks",
]

# Callables ``hook(result: ExplainResult) -> None`` that add keys to ``result.metrics`` (baselines, class-pathway
# transfer, reports...). ``gencnp evaluate`` and ``gencnp demo`` run them after the GEN-CNP metrics, before writing.
EVALUATION_HOOKS: List = []


def register_evaluation_hook(hook) -> None:
    """Add ``hook(result)`` to the evaluation run by ``gencnp evaluate`` / ``gencnp demo`` (once per hook)."""
    if hook not in EVALUATION_HOOKS:
        EVALUATION_HOOKS.append(hook)


def run_evaluation_hooks(result: "ExplainResult", hooks=None) -> "ExplainResult":
    """Run the registered hooks (or ``hooks``) on ``result``; each may add keys to ``result.metrics``."""
    for hook in (EVALUATION_HOOKS if hooks is None else hooks):
        hook(result)
    return result


@dataclasses.dataclass
class ExplainResult:
    """Metrics and the objects they were computed from (for code that extends the evaluation)."""

    metrics: Dict[str, dict]
    target: nn.Module
    generator: GenCNP
    data: ImageData
    pathway: Pathway
    full_logits: torch.Tensor
    path_logits: torch.Tensor


@torch.no_grad()
def explain_batched(gen: GenCNP, x: torch.Tensor, batch_size: int = 256,
                    backend: str = "auto") -> Tuple[Pathway, torch.Tensor, torch.Tensor]:
    """Hard pathways of all of ``x`` (one dense forward + generator per batch), the target's logits and the
    pathway logits (``fast_pathway_forward``). Returns ``(pathway [N, C] per unit, full_logits, path_logits)``."""
    gen.eval()
    gen.check_input(x)
    names = gen.unit_names
    masks: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    full, path = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        out = gen(xb, mode="hard")
        full.append(out.target_logits)
        path.append(fast_pathway_forward(gen.target, out.pathway, xb, backend=backend))
        for n in names:
            masks[n].append(out.pathway[n])
    pathway = Pathway({n: torch.cat(v) for n, v in masks.items()}, {u.name: u.channels for u in gen.units})
    return pathway, torch.cat(full), torch.cat(path)


@torch.no_grad()
def time_explain(gen: GenCNP, x: torch.Tensor, batch_size: int = 256, backend: str = "auto",
                 repeats: int = 5) -> Dict[str, float]:
    """Wall time per image (``time.perf_counter``) of explaining — dense forward with feature capture + generator +
    ``fast_pathway_forward`` — against one plain dense forward of the target, both batched.

    After a warm-up pass, every batch is timed ``repeats`` times, dense and explain interleaved (so load on the
    machine hits both alike), and each batch counts with its fastest time (robust to bursts of load from other
    processes). Returns ``explain_ms_per_image``, ``dense_ms_per_image`` and their ratio ``explain_cost_ratio``.
    """
    gen.eval()
    target = gen.target
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    for xb in batches:  # warm-up pass: plans, caches and buffers for every batch shape
        target(xb)
        fast_pathway_forward(target, gen(xb, mode="hard").pathway, xb, backend=backend)
    t_dense = t_explain = 0.0
    for xb in batches:
        best_d, best_e = math.inf, math.inf
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            target(xb)
            t1 = time.perf_counter()
            out = gen(xb, mode="hard")
            fast_pathway_forward(target, out.pathway, xb, backend=backend)
            t2 = time.perf_counter()
            best_d, best_e = min(best_d, t1 - t0), min(best_e, t2 - t1)
        t_dense += best_d
        t_explain += best_e
    n = len(x)
    return {"explain_ms_per_image": 1e3 * t_explain / n, "dense_ms_per_image": 1e3 * t_dense / n,
            "explain_cost_ratio": t_explain / t_dense}


def explain_timings(gen: GenCNP, x: torch.Tensor, batch_size: int = 256, backend: str = "auto",
                    repeats: int = 5, single: int = 32) -> Dict[str, float]:
    """:func:`time_explain` batched (``batch_size``) and one image at a time (the first ``single`` images, the keys
    suffixed ``_b1``): what explaining costs in dense forwards of the target, both ways."""
    out = time_explain(gen, x, batch_size, backend, repeats)
    if single > 0 and len(x):
        b1 = time_explain(gen, x[:single], 1, backend, max(1, repeats // 2))
        out.update({f"{k}_b1": v for k, v in b1.items()})
    return out


def pathway_metrics(full_logits: torch.Tensor, path_logits: torch.Tensor, pathway, y: torch.Tensor,
                    units: Sequence[str], num_classes: Optional[int] = None) -> Dict[str, object]:
    """The docs/design.md §5 metrics of per-sample pathways: fidelity, mDC, mIC, density (mean, std, per unit), acIOU and
    inter-class IoU (classes: the labels ``y``)."""
    m: Dict[str, object] = dict(confidence_metrics(full_logits, path_logits))
    m.update(density_stats(pathway, units))
    m.update(class_iou(pathway, y, units, num_classes=num_classes))
    return m


def evaluate_gencnp(target: nn.Module, gen: GenCNP, test: ImageData, batch_size: int = 256, backend: str = "auto",
                    timing: bool = True, repeats: int = 5) -> ExplainResult:
    """Explain ``test`` and compute ``{"target": {"accuracy"}, "gencnp": {...}}`` (see :func:`pathway_metrics`;
    plus ``explain_ms_per_image``, ``dense_ms_per_image`` and ``explain_cost_ratio`` when ``timing``)."""
    from .data import check_finite
    from .target import check_input_dtype

    check_input_dtype(gen.target, test.x, test.name)
    gen.check_input(test.x[:1])
    check_finite(test.x, test.name)
    check_labels(test.y, gen.num_classes, test.name)
    pathway, full, path = explain_batched(gen, test.x, batch_size, backend)
    acc = float((full.argmax(1) == test.y).double().mean())
    g = pathway_metrics(full, path, pathway, test.y, gen.unit_names, gen.num_classes)
    if timing:
        g.update(explain_timings(gen, test.x, batch_size, backend, repeats))
    metrics = {"target": {"accuracy": acc, "n_test": len(test)}, "gencnp": g}
    return ExplainResult(metrics, target, gen, test, pathway, full, path)


def save_pathways(path: str, x: torch.Tensor, y: torch.Tensor, pathway, units: Sequence[str]) -> None:
    """Write ``pathways.pt``: ``{"x", "y", "pathway": {unit: bool [N, C]}, "units": [names]}``, atomically."""
    from .io import atomic_save

    atomic_save({"x": x.cpu(), "y": y.cpu(), "pathway": {n: pathway[n].bool().cpu() for n in units},
                 "units": list(units)}, path)


def load_pathways(path: str) -> dict:
    """Read ``pathways.pt`` (``weights_only=True``) and check its structure; one-line ``ValueError`` naming the
    file and the first problem (corrupt, missing keys, shapes or dtypes that do not agree)."""
    from .io import safe_load

    d = safe_load(path, "pathways file")
    if not isinstance(d, dict) or not {"x", "y", "pathway", "units"} <= set(d):
        raise ValueError(f"{path} is not a pathways file (keys 'x', 'y', 'pathway', 'units' expected)")
    x, y, pw, units = d["x"], d["y"], d["pathway"], d["units"]
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{path}: 'x' must be a tensor of inputs [N, ...] with N >= 1")
    n = x.shape[0]
    if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{path}: 'y' must be an integer tensor of {n} labels, got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {int(y.min())}")
    if not isinstance(units, (list, tuple)) or not units or not all(isinstance(u, str) for u in units) \
            or len(set(units)) != len(units):
        raise ValueError(f"{path}: 'units' must be a non-empty list of distinct unit names")
    if not isinstance(pw, dict) or set(pw) != set(units):
        extra = sorted(set(pw) ^ set(units)) if isinstance(pw, dict) else []
        raise ValueError(f"{path}: 'pathway' must map exactly the names of 'units' to masks"
                         + (f" (differs in {extra[:4]})" if extra else ""))
    for u in units:
        m = pw[u]
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != n:
            raise ValueError(f"{path}: the mask of unit {u!r} must be a tensor [N={n}, C], got "
                             f"{tuple(getattr(m, 'shape', ()))}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{path}: the mask of unit {u!r} holds values other than 0 and 1")
    return d


def write_outputs(out_dir: str, result: ExplainResult) -> None:
    """``metrics.json`` (``result.metrics``, strict JSON: see :func:`gencnp_fast.io.write_json`) and
    ``pathways.pt`` into ``out_dir``, each written atomically."""
    from .io import write_json

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "metrics.json"), result.metrics)
    save_pathways(os.path.join(out_dir, "pathways.pt"), result.data.x, result.data.y, result.pathway,
                  result.generator.unit_names)


def check_pathways_fit(d: dict, target: nn.Module, source: str) -> None:
    """A one-line error when a pathways file does not fit ``target``: inputs of another dtype or shape, a unit
    name the model lacks, or another channel count."""
    from .model.reference import cached_units
    from .target import check_model_input

    from .data import check_finite

    check_model_input(target, d["x"], f"{source}: 'x'")
    check_finite(d["x"], f"{source}: 'x'")
    ours = {u.name: u.channels for u in cached_units(target, d["x"][:1])}
    for u in d["units"]:
        if u not in ours:
            raise ValueError(f"{source} names unit {u!r}, which the target model does not have (its units: "
                             f"{', '.join(list(ours)[:12])}{', ...' if len(ours) > 12 else ''})")
        if d["pathway"][u].shape[1] != ours[u]:
            raise ValueError(f"{source}: unit {u!r} has {d['pathway'][u].shape[1]} channels in the file, "
                             f"{ours[u]} in the target model")


@torch.no_grad()
def recompute_metrics(pathways_path: str, target: nn.Module, batch_size: int = 256,
                      trust_pickle: bool = False) -> Dict[str, object]:
    """Recompute the pathway metrics of ``pathways.pt`` with :func:`reference_pathway_forward` (the oracle).

    ``target`` is the model (or the path of a target file, loaded by :func:`gencnp_fast.target.load_target` with
    ``trust_pickle``). Returns the ``"gencnp"`` metrics without timing and ``"accuracy"`` of the target on the
    file's labels.
    """
    if isinstance(target, (str, os.PathLike)):
        from .target import load_target

        target = load_target(os.fspath(target), trust_pickle=trust_pickle)
    target.eval()
    d = load_pathways(pathways_path)
    check_pathways_fit(d, target, pathways_path)
    x, y, units = d["x"], d["y"], list(d["units"])
    full, path = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        full.append(target(xb))
        path.append(reference_pathway_forward(target, {n: d["pathway"][n][i:i + batch_size] for n in units}, xb))
    full_l, path_l = torch.cat(full), torch.cat(path)
    check_labels(y, int(full_l.shape[1]), pathways_path)
    m = pathway_metrics(full_l, path_l, d["pathway"], y, units, int(full_l.shape[1]))
    m["accuracy"] = float((full_l.argmax(1) == y).double().mean())
    return m
