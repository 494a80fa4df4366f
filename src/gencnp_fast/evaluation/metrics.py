"""Pathway metrics (docs/design.md §5).

With ŷ = argmax H(x), y = softmax(H(x))_ŷ and o = softmax(H(x; m))_ŷ over N samples:

- **mDC** (mean decrease in confidence, %, lower is better) = 100 · mean(max(0, y − o) / y)
- **mIC** (mean increase in confidence, %, higher is better) = 100 · mean(1[o > y])
- **fidelity** = mean(argmax H(x; m) == ŷ)
- **density**: kept fraction of channels, per unit and overall; mean ± std over samples
- **acIOU**: for each class, the mean IoU over pairs of same-class pathways (IoU over all channels of all units),
  averaged over classes; **inter_class_iou** is the mean IoU over pairs of pathways of different classes.

Every function here returns plain Python floats (JSON-ready). The ``*_sums`` helpers return sums and counts, so that
metrics over shards (batches, processes) combine exactly.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

__all__ = [
    "confidence_sums",
    "confidence_metrics",
    "density_stats",
    "flatten_pathway",
    "class_iou",
    "iou_matrix",
    "finish_confidence",
    "class_iou_sums",
]


def confidence_sums(full_logits: torch.Tensor, path_logits: torch.Tensor) -> Dict[str, float]:
    """Sums behind mDC, mIC and fidelity for one shard: ``{"n", "dc_sum", "ic_sum", "agree_sum"}``."""
    if full_logits.shape != path_logits.shape or full_logits.dim() != 2:
        raise ValueError(
            f"logits must both be [N, classes], got {tuple(full_logits.shape)} and {tuple(path_logits.shape)}"
        )
    full = full_logits.detach().double()
    path = path_logits.detach().double()
    pred = full.argmax(1)
    y = full.softmax(1).gather(1, pred[:, None]).squeeze(1)
    o = path.softmax(1).gather(1, pred[:, None]).squeeze(1)
    return {
        "n": float(full.shape[0]),
        "dc_sum": float(((y - o).clamp(min=0) / y).sum()),
        "ic_sum": float((o > y).double().sum()),
        "agree_sum": float((path.argmax(1) == pred).double().sum()),
    }


def confidence_metrics(full_logits: torch.Tensor, path_logits: torch.Tensor) -> Dict[str, float]:
    """``{"fidelity", "mDC", "mIC"}`` of pathway logits against the full model's logits."""
    return finish_confidence(confidence_sums(full_logits, path_logits))


def finish_confidence(s: Mapping[str, float]) -> Dict[str, float]:
    """mDC / mIC / fidelity from (possibly summed over shards) :func:`confidence_sums`."""
    n = max(s["n"], 1.0)
    return {"fidelity": s["agree_sum"] / n, "mDC": 100.0 * s["dc_sum"] / n, "mIC": 100.0 * s["ic_sum"] / n}


def flatten_pathway(pathway: Mapping[str, torch.Tensor], units: Optional[Sequence[str]] = None) -> torch.Tensor:
    """bool ``[N, D]``: every sample's masks of all units concatenated (units in ``units`` order)."""
    names = list(units) if units is not None else list(pathway)
    if not names:
        raise ValueError("the pathway has no units")
    rows = []
    n = None
    for name in names:
        m = pathway[name]
        if m.dim() != 2:
            raise ValueError(f"mask of unit {name!r} is shared ([C]); per-sample masks [N, C] are needed here")
        n = m.shape[0] if n is None else n
        rows.append(m.bool())
    return torch.cat(rows, 1)


def density_stats(pathway: Mapping[str, torch.Tensor], units: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """``{"density_mean", "density_std", "density_per_unit"}`` over samples (channel-weighted over units)."""
    names = list(units) if units is not None else list(pathway)
    flat = flatten_pathway(pathway, names).double()
    per_sample = flat.mean(1)
    return {
        "density_mean": float(per_sample.mean()),
        "density_std": float(per_sample.std(unbiased=False)) if per_sample.numel() > 1 else 0.0,
        "density_per_unit": {n: float(pathway[n].double().mean()) for n in names},
    }


def iou_matrix(flat: torch.Tensor, other: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pairwise IoU between rows of bool ``[N, D]`` (and ``[M, D]``): ``[N, M]``; two empty rows have IoU 1."""
    a = flat.double()
    b = a if other is None else other.double()
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1).unsqueeze(0) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def class_iou_sums(flat: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Dict[str, torch.Tensor]:
    """Per-class sums of same-class pair IoUs (and pair counts), and the sum over different-class pairs."""
    labels = labels.long().cpu()
    iou = iou_matrix(flat.cpu())
    same = labels[:, None] == labels[None, :]
    offdiag = ~torch.eye(len(labels), dtype=torch.bool)
    intra_sum = torch.zeros(num_classes, dtype=torch.float64)
    intra_cnt = torch.zeros(num_classes, dtype=torch.float64)
    pair_same = same & offdiag
    intra_sum.index_add_(0, labels, (iou * pair_same).sum(1))
    intra_cnt.index_add_(0, labels, pair_same.double().sum(1))
    diff = ~same
    return {
        "intra_sum": intra_sum,
        "intra_cnt": intra_cnt,
        "inter_sum": (iou * diff).sum(),
        "inter_cnt": diff.double().sum(),
    }


def class_iou(
    pathway: Mapping[str, torch.Tensor], labels: torch.Tensor, units: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
) -> Dict[str, float]:
    """``{"acIOU", "inter_class_iou"}``: class-wise pathway similarity (classes with one sample are skipped)."""
    flat = flatten_pathway(pathway, units)
    labels = torch.as_tensor(labels)
    if labels.shape != (flat.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({flat.shape[0]},)")
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    s = class_iou_sums(flat, labels, k)
    has = s["intra_cnt"] > 0
    ac = float((s["intra_sum"][has] / s["intra_cnt"][has]).mean()) if bool(has.any()) else float("nan")
    inter = float(s["inter_sum"] / s["inter_cnt"]) if float(s["inter_cnt"]) > 0 else float("nan")
    return {"acIOU": ac, "inter_class_iou": inter}
