"""Class pathways and their transfer to other samples of the class (docs/design.md §4, §5).

- **Class pathway** of class k from ``j`` pathways of class k (the first ``j`` training samples of the class in
  dataset order, or a seeded random choice with ``pick="random"``; ``j=None``/``"all"`` uses every one):

  * ``majority``:     M_k = 1[mean_j m ≥ 0.5]
  * ``union``:        M_k = OR_j m
  * ``intersection``: M_k = AND_j m

- **Transfer**: every test sample of class k is run with the class mask M_k instead of its own pathway (the engine
  groups the samples that share a mask, so a class runs as one group). "Class" is whatever class the caller gives
  each sample (its label, or the full model's predicted class).
- The comparison: *own* (each sample's own pathway), *transfer* (M_k), and *random* (a random class pathway per
  class with the same per-unit density as M_k, also shared by the class), all with the same metrics
  (fidelity, mDC, mIC, density_mean).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .baselines import full_logits, pathway_logits, random_pathways
from .metrics import confidence_metrics, density_stats

__all__ = ["RULES", "class_pathways", "apply_class_pathways", "evaluate_transfer", "transfer_study"]

RULES = ("majority", "union", "intersection")
JLike = Union[int, str, None]


def _j_key(j: JLike) -> str:
    return "all" if j is None or j == "all" else str(int(j))


def _pick(idx: torch.Tensor, j: JLike, pick: str, gen: Optional[torch.Generator]) -> torch.Tensor:
    if j is None or j == "all":
        return idx
    j = int(j)
    if j < 1:
        raise ValueError(f"j must be >= 1 or 'all', got {j}")
    if pick == "first":
        return idx[:j]
    if pick == "random":
        return idx[torch.randperm(len(idx), generator=gen)[:j]]
    raise ValueError(f"pick must be 'first' or 'random', got {pick!r}")


def class_pathways(
    pathway: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    j: JLike = None,
    rule: str = "majority",
    num_classes: Optional[int] = None,
    units: Optional[Sequence[str]] = None,
    pick: str = "first",
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """``{unit: bool [K, C]}``: row k is class k's pathway from ``j`` of its pathways (see module docstring).

    A class with no sample gets an all-kept row (a unit missing from a pathway is kept whole, docs/design.md §2).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    names = list(units) if units is not None else list(pathway)
    labels = torch.as_tensor(labels).long().cpu()
    k = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    out = {}
    chosen = []
    for c in range(k):
        idx = (labels == c).nonzero().flatten()
        chosen.append(_pick(idx, j, pick, generator) if len(idx) else idx)
    for n in names:
        m = pathway[n].bool().cpu()
        if m.dim() != 2 or m.shape[0] != labels.shape[0]:
            raise ValueError(f"mask of unit {n!r} must be [N, C] with N = {labels.shape[0]}, got {tuple(m.shape)}")
        rows = []
        for sel in chosen:
            if len(sel) == 0:
                rows.append(torch.ones(m.shape[1], dtype=torch.bool))
                continue
            s = m[sel]
            if rule == "majority":
                rows.append(s.double().mean(0) >= 0.5)
            elif rule == "union":
                rows.append(s.any(0))
            else:
                rows.append(s.all(0))
        out[n] = torch.stack(rows)
    return out


def apply_class_pathways(class_pw: Mapping[str, torch.Tensor], classes: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample pathway ``{unit: bool [N, C]}``: sample i gets row ``classes[i]`` of the class pathways."""
    classes = torch.as_tensor(classes).long().cpu()
    return {n: m[classes] for n, m in class_pw.items()}


def _class_logits(model: nn.Module, class_pw: Mapping[str, torch.Tensor], x: torch.Tensor, classes: torch.Tensor,
                  batch_size: int, backend: str) -> torch.Tensor:
    """Logits with each sample's class pathway (the engine groups the samples that share a class's mask)."""
    return pathway_logits(model, apply_class_pathways(class_pw, classes), x, batch_size, backend)


def evaluate_transfer(
    model: nn.Module,
    x: torch.Tensor,
    class_pw: Mapping[str, torch.Tensor],
    classes: torch.Tensor,
    full: Optional[torch.Tensor] = None,
    batch_size: int = 512,
    backend: str = "auto",
) -> Dict[str, float]:
    """``{"fidelity", "mDC", "mIC", "density_mean"}`` of the class pathways applied to ``x`` (class ``classes``)."""
    classes = torch.as_tensor(classes).long().cpu()
    full = full_logits(model, x) if full is None else full
    lg = _class_logits(model, class_pw, x, classes, batch_size, backend)
    res = dict(confidence_metrics(full, lg))
    res["density_mean"] = float(density_stats(apply_class_pathways(class_pw, classes))["density_mean"])
    return res


def transfer_study(
    model: nn.Module,
    test_x: torch.Tensor,
    test_classes: torch.Tensor,
    own_pathway: Optional[Mapping[str, torch.Tensor]],
    train_pathway: Mapping[str, torch.Tensor],
    train_y: torch.Tensor,
    js: Sequence[JLike] = (1, 5, 20, "all"),
    rules: Sequence[str] = RULES,
    units: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
    full: Optional[torch.Tensor] = None,
    batch_size: int = 512,
    seed: int = 0,
    backend: str = "auto",
) -> Dict[str, object]:
    """Transfer vs own vs random for every rule and every ``j``.

    Returns::

        {"majority": {"fidelity", "mDC", "mIC", "density_mean",          # j = all (or the largest j given)
                      "random": {...same keys...},                    # random class pathways, same density
                      "by_j": {"1": {..., "random": {...}}, "5": ..., "20": ..., "all": ...}},
         "union": ..., "intersection": ...,
         "own": {"fidelity", "mDC", "mIC", "density_mean"}}           # each sample's own pathway
    """
    names = list(units) if units is not None else list(train_pathway)
    test_classes = torch.as_tensor(test_classes).long().cpu()
    train_y = torch.as_tensor(train_y).long().cpu()
    k = num_classes if num_classes is not None else int(max(int(train_y.max()), int(test_classes.max()))) + 1
    full = full_logits(model, test_x) if full is None else full
    gen = torch.Generator().manual_seed(seed)
    out: Dict[str, object] = {}
    for rule in rules:
        by_j: Dict[str, Dict[str, object]] = {}
        for j in js:
            cp = class_pathways(train_pathway, train_y, j, rule, k, names)
            res: Dict[str, object] = evaluate_transfer(model, test_x, cp, test_classes, full, batch_size, backend)
            rnd = random_pathways(cp, names, gen)  # [K, C] rows: same per-unit count as each class pathway
            res["random"] = evaluate_transfer(model, test_x, rnd, test_classes, full, batch_size, backend)
            by_j[_j_key(j)] = res
        last = by_j["all"] if "all" in by_j else by_j[_j_key(js[-1])]
        out[rule] = {**{key: last[key] for key in ("fidelity", "mDC", "mIC", "density_mean")},
                     "random": last["random"], "by_j": by_j}
    if own_pathway is not None:
        own = {n: own_pathway[n] for n in names}
        res = dict(confidence_metrics(full, pathway_logits(model, own, test_x, batch_size, backend)))
        res["density_mean"] = float(density_stats(own, names)["density_mean"])
        out["own"] = res
    return out
