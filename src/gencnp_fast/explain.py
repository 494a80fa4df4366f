"""Explain a data set with a trained GEN-CNP generator and evaluate the pathways (docs/design.md §5).

:func:`evaluate_gencnp` is the one entry point the CLI (``gencnp evaluate`` / ``gencnp demo``) uses: it streams the
test set once (:func:`gencnp_fast.stream.explain_set`), computes every metric over all of it, and returns an
:class:`ExplainResult` holding the metrics dict *and* the objects behind it (target, generator, the report sample of
the test data with its pathways and logits, the packed pathways of every sample), so that later evaluation code
(baselines, class-pathway transfer, reports) can add keys to ``result.metrics`` before :func:`write_outputs` writes
``metrics.json`` and ``pathways.pt``.

``pathways.pt`` (format ``gencnp_fast.pathways/2``) holds every sample's pathway as packed bits
(:class:`~gencnp_fast.evaluation.packed.PackedPathways`), its label, identity (file path or index), the target's and
the pathway's predicted class, and the inputs of the report sample only (all of them when they fit in
:data:`REPORT_BYTES`, or with ``--save-inputs``): ``"x"`` the inputs, ``"x_rows"`` their rows. :func:`load_pathways`
reads it (and the dense format 1 of earlier versions); :func:`recompute_metrics` recomputes the pathway metrics of
the rows with inputs from that file and ``target_model.pt`` with the reference (dense masked) forward.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .data import ImageData, ImageSet, check_labels
from .evaluation.metrics import class_iou, confidence_metrics, density_stats
from .evaluation.packed import PackedPathways
from .generator.gencnp import GenCNP
from .model.pathway import Pathway
from .model.reference import reference_pathway_forward
from .placement import Placement
from .plan import fast_pathway_forward
from .stream import SetExplanation, check_set, explain_set, report_rows

__all__ = [
    "ExplainResult",
    "REPORT_BYTES",
    "EXPLAIN_BYTES",
    "explain_batch",
    "time_explain",
    "explain_timings",
    "pathway_metrics",
    "evaluate_gencnp",
    "explain_to_file",
    "save_pathways",
    "load_pathways",
    "write_outputs",
    "recompute_metrics",
    "check_pathways_fit",
    "register_evaluation_hook",
    "run_evaluation_hooks",
]

PATHWAYS_FORMAT = "gencnp_fast.pathways/2"
# Inputs kept for the report (figures, baselines, transfer) and written to pathways.pt: every test image when they
# fit in this many bytes (the embedded MNIST test set takes 3 MB), else as many as fit, spread over the set.
REPORT_BYTES = 256 << 20
# gencnp explain writes the inputs of fewer samples (they serve `evaluate --pathways` and the suite run from a
# directory): every image while they fit in this many bytes.
EXPLAIN_BYTES = 64 << 20

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
    """Metrics and the objects they were computed from (for code that extends the evaluation).

    ``data``, ``pathway``, ``full_logits`` and ``path_logits`` are those of the report sample (every test image
    when their inputs fit in :data:`REPORT_BYTES`); ``explained`` holds every sample's packed pathway, label and
    predictions; ``ids`` the report sample's identities."""

    metrics: Dict[str, dict]
    target: nn.Module
    generator: GenCNP
    data: ImageData
    pathway: Pathway
    full_logits: torch.Tensor
    path_logits: torch.Tensor
    explained: Optional[SetExplanation] = None
    ids: Optional[List[str]] = None
    source: Optional[ImageSet] = None


@torch.no_grad()
def explain_batch(gen: GenCNP, xb: torch.Tensor, backend: str = "auto"):
    """One batch: the hard pathways (a dense forward with feature capture + the generator), the target's logits and
    the pathway's logits (``fast_pathway_forward``). Returns ``(pathway, full_logits, path_logits)``."""
    out = gen(xb, mode="hard")
    return out.pathway, out.target_logits, fast_pathway_forward(gen.target, out.pathway, xb, backend=backend)


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


def _kept_rows(gen: GenCNP, data: ImageSet, keep_all: bool, budget_bytes: int) -> torch.Tensor:
    """The rows whose inputs a pass keeps: all with ``keep_all``, else the report sample of ``budget_bytes``."""
    if keep_all:
        return torch.arange(len(data))
    c, h, w = gen.input_shape
    return report_rows(len(data), 4 * c * h * w, budget_bytes)


def _sample_result(gen: GenCNP, data: ImageSet, ex: SetExplanation):
    """The report sample of ``ex`` as an :class:`ImageData`, its pathway (unpacked) and identities."""
    rows = ex.kept
    sample = ImageData(ex.x, ex.y[rows], data.classes, data.name)
    pathway = Pathway(ex.packed.unpack(rows), {u.name: u.channels for u in gen.units})
    return sample, pathway, data.ids(ex.index[rows])


def evaluate_gencnp(target: nn.Module, gen: GenCNP, test: ImageSet, batch_size: int = 256, backend: str = "auto",
                    timing: bool = True, repeats: int = 5, place: Optional[Placement] = None,
                    progress: Optional[str] = None, report_bytes: int = REPORT_BYTES,
                    keep_all: bool = False) -> ExplainResult:
    """Explain ``test`` (any :class:`~gencnp_fast.data.ImageSet`, streamed; dealt out over ranks under
    ``torchrun``) and compute ``{"target": {"accuracy", "n_test"}, "gencnp": {...}}`` over every image: fidelity,
    mDC, mIC, density (mean, std, per unit), acIOU and inter-class IoU from the packed pathways (inter-class IoU from
    sampled pairs beyond 2 million pairs, flagged), the pass's throughput (``"throughput"``: images, seconds,
    images/s, device, precision) and, when ``timing``, the explain
    cost in dense forwards measured on the report sample (``explain_ms_per_image``, ``dense_ms_per_image``,
    ``explain_cost_ratio`` and their ``_b1`` batch-1 versions). ``keep_all``: keep every input (``--save-inputs``).
    """
    place = place or Placement()
    check_set(gen, test)
    ex = explain_set(gen, test, batch_size, place, backend, keep=_kept_rows(gen, test, keep_all, report_bytes),
                     progress=progress)
    g: Dict[str, object] = dict(ex.confidence())
    g.update(ex.packed.density_stats())
    iou = ex.packed.class_iou(ex.y, gen.num_classes)
    g.update({"acIOU": iou["acIOU"], "inter_class_iou": iou["inter_class_iou"]})
    if not iou.get("inter_class_exact", True):
        g["inter_class_iou_pairs"] = iou["inter_class_pairs"]
    sample, pathway, ids = _sample_result(gen, test, ex)
    if timing and len(sample):
        from . import distributed as D

        t = explain_timings(gen, place.inputs(sample.x), batch_size, backend, repeats) if D.is_main() else None
        g.update(D.broadcast_object(t) or {})
    metrics = {"target": {"accuracy": ex.accuracy(), "n_test": len(test)}, "gencnp": g,
               "throughput": {"images": len(ex), "seconds": ex.seconds, "images_per_s": ex.images_per_second,
                              "device": str(place.device), "precision": place.precision,
                              "batch_size": batch_size}}
    return ExplainResult(metrics, target, gen, sample, pathway, ex.full_logits, ex.path_logits, ex, ids, test)


def explain_to_file(gen: GenCNP, data: ImageSet, out_path: str, batch_size: int = 256,
                    place: Optional[Placement] = None, backend: str = "auto", progress: Optional[str] = None,
                    save_inputs: bool = False, report_bytes: int = EXPLAIN_BYTES) -> SetExplanation:
    """``gencnp explain``: explain every image of ``data`` (streamed) and write ``out_path`` (``pathways.pt``, on
    rank 0 under ``torchrun``). Inputs are written for a sample of at most ``report_bytes`` (every image while they
    fit), or for every image with ``save_inputs``."""
    from . import distributed as D

    check_set(gen, data)
    ex = explain_set(gen, data, batch_size, place, backend, keep=_kept_rows(gen, data, save_inputs, report_bytes),
                     progress=progress)
    if D.is_main():
        save_pathways(out_path, ex, data.ids(ex.index), data.transform.to_dict())
    return ex


def save_pathways(path: str, ex: SetExplanation, ids: Sequence[str], transform: Optional[dict] = None) -> None:
    """Write ``pathways.pt`` (format ``gencnp_fast.pathways/2``, see the module docstring) atomically: the packed
    pathways of every sample of ``ex``, labels, identities, predictions, and the inputs of its kept rows."""
    from .io import atomic_save

    atomic_save({"format": PATHWAYS_FORMAT, "units": list(ex.packed.units), "packed": ex.packed.state_dict(),
                 "y": ex.y.cpu(), "ids": list(ids), "pred": ex.pred.cpu(), "path_pred": ex.path_pred.cpu(),
                 "x": ex.x.cpu(), "x_rows": ex.kept.cpu(), "transform": transform}, path)


def _dense_format(d: dict, path: str) -> dict:
    """Format 1 (every input, dense bool masks) as format 2 reads: the checks of its keys and shapes."""
    if not {"x", "y", "pathway", "units"} <= set(d):
        raise ValueError(f"{path} is not a pathways file (keys 'x', 'y', 'pathway', 'units' expected)")
    x, pw, units = d["x"], d["pathway"], d["units"]
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{path}: 'x' must be a tensor of inputs [N, ...] with N >= 1")
    _check_units(units, path)
    if not isinstance(pw, dict) or set(pw) != set(units):
        extra = sorted(set(pw) ^ set(units)) if isinstance(pw, dict) else []
        raise ValueError(f"{path}: 'pathway' must map exactly the names of 'units' to masks"
                         + (f" (differs in {extra[:4]})" if extra else ""))
    n = x.shape[0]
    for u in units:
        m = pw[u]
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != n:
            raise ValueError(f"{path}: the mask of unit {u!r} must be a tensor [N={n}, C], got "
                             f"{tuple(getattr(m, 'shape', ()))}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{path}: the mask of unit {u!r} holds values other than 0 and 1")
    packed = PackedPathways.from_pathway({u: pw[u].bool() for u in units}, units)
    return {"x": x, "x_rows": torch.arange(n), "y": d["y"], "packed": packed, "units": list(units),
            "ids": [f"{os.path.basename(path)}[{i}]" for i in range(n)], "transform": None}


def _check_units(units, path: str) -> None:
    if not isinstance(units, (list, tuple)) or not units or not all(isinstance(u, str) for u in units) \
            or len(set(units)) != len(units):
        raise ValueError(f"{path}: 'units' must be a non-empty list of distinct unit names")


def _packed_format(d: dict, path: str) -> dict:
    """Format 2: the checks of its keys, the packed pathways and the rows with inputs."""
    need = {"units", "packed", "y", "ids", "x", "x_rows"}
    if not need <= set(d):
        raise ValueError(f"{path} is an incomplete pathways file: {sorted(need - set(d))} missing")
    _check_units(d["units"], path)
    packed = PackedPathways.from_state(d["packed"], path)
    if list(packed.units) != list(d["units"]):
        raise ValueError(f"{path}: 'units' differ from the packed pathways' units")
    n = len(packed)
    x, rows, ids = d["x"], d["x_rows"], d["ids"]
    if not isinstance(ids, (list, tuple)) or len(ids) != n or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path}: 'ids' must be {n} strings (one per pathway)")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.is_floating_point() or \
            (len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n)):
        raise ValueError(f"{path}: 'x_rows' must be row numbers in [0, {n})")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != len(rows):
        raise ValueError(f"{path}: 'x' must hold the inputs of the {len(rows)} rows of 'x_rows'")
    return {"x": x, "x_rows": rows.long(), "y": d["y"], "packed": packed, "units": list(d["units"]),
            "ids": list(ids), "transform": d.get("transform")}


def load_pathways(path: str) -> dict:
    """Read ``pathways.pt`` (``weights_only=True``) and check its structure; one-line ``ValueError`` naming the
    file and the first problem (corrupt, missing keys, shapes or dtypes that do not agree).

    Returns ``{"packed", "y", "ids", "units", "transform"}`` of every sample and, for the rows with inputs,
    ``"x"``, ``"x_rows"``, their labels ``"y_x"`` and unpacked ``"pathway"`` (unit → bool ``[n, C]``). Reads the
    formats 1 (dense, every input) and 2 (packed)."""
    from .io import safe_load

    d = safe_load(path, "pathways file")
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a pathways file (a dict expected)")
    out = _packed_format(d, path) if d.get("format") == PATHWAYS_FORMAT else _dense_format(d, path)
    y, n = out["y"], len(out["packed"])
    if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{path}: 'y' must be an integer tensor of {n} labels, got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if n and int(y.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {int(y.min())}")
    out["y_x"] = y[out["x_rows"]]
    out["pathway"] = out["packed"].unpack(out["x_rows"])
    return out


def write_outputs(out_dir: str, result: ExplainResult) -> None:
    """``metrics.json`` (``result.metrics``, strict JSON: see :func:`gencnp_fast.io.write_json`) and
    ``pathways.pt`` into ``out_dir``, each written atomically."""
    from .io import write_json

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "metrics.json"), result.metrics)
    ex = result.explained
    src = result.source
    ids = src.ids(ex.index) if src is not None else [str(int(i)) for i in ex.index]
    save_pathways(os.path.join(out_dir, "pathways.pt"), ex, ids,
                  src.transform.to_dict() if src is not None else result.generator.transform)


def check_pathways_fit(d: dict, target: nn.Module, source: str) -> None:
    """A one-line error when a pathways file does not fit ``target``: inputs of another dtype or shape, a unit
    name the model lacks, or another channel count."""
    from .data import check_finite
    from .model.reference import cached_units
    from .target import check_model_input

    if len(d["x"]) == 0:
        raise ValueError(f"{source} holds no inputs (explain again with --save-inputs to recompute its metrics)")
    check_model_input(target, d["x"], f"{source}: 'x'")
    check_finite(d["x"], f"{source}: 'x'")
    ours = {u.name: u.channels for u in cached_units(target, d["x"][:1])}
    for u, c in zip(d["packed"].units, d["packed"].channels):
        if u not in ours:
            raise ValueError(f"{source} names unit {u!r}, which the target model does not have (its units: "
                             f"{', '.join(list(ours)[:12])}{', ...' if len(ours) > 12 else ''})")
        if c != ours[u]:
            raise ValueError(f"{source}: unit {u!r} has {c} channels in the file, {ours[u]} in the target model")


@torch.no_grad()
def recompute_metrics(pathways_path: str, target: nn.Module, batch_size: int = 256,
                      trust_pickle: bool = False) -> Dict[str, object]:
    """Recompute the pathway metrics of ``pathways.pt`` with :func:`reference_pathway_forward` (the oracle), over
    the rows the file holds inputs for (every row when they fit in :data:`REPORT_BYTES` or with
    ``--save-inputs``; ``"n_recomputed"`` says how many).

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
    x, y, units, pw = d["x"], d["y_x"], list(d["units"]), d["pathway"]
    full, path = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        full.append(target(xb))
        path.append(reference_pathway_forward(target, {n: pw[n][i:i + batch_size] for n in units}, xb))
    full_l, path_l = torch.cat(full), torch.cat(path)
    check_labels(y, int(full_l.shape[1]), pathways_path)
    m = pathway_metrics(full_l, path_l, pw, y, units, int(full_l.shape[1]))
    m["accuracy"] = float((full_l.argmax(1) == y).double().mean())
    m["n_recomputed"] = int(len(x))
    m["n_pathways"] = len(d["packed"])
    return m
