"""Cost counting: the work of the dense model and of a pathway, per conv/linear layer (docs/design.md §6)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..model.pathway import MaskLike, normalize_masks
from ..model.reference import cached_units, check_model_and_input
from .cache import get_plan
from .indices import ChannelIndex, ConvGroups, masks_to_host, plan_run
from .steps import ConvStep

__all__ = ["pathway_flops"]


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _counts(ch: ChannelIndex) -> torch.Tensor:
    """Stored channels per sample, float64 ``[B]``."""
    if ch.full:
        return torch.full((ch.idx.shape[0],), float(ch.channels), dtype=torch.float64)
    return (ch.idx >= 0).sum(1).double()


def _layer_cost(st: ConvStep, in_ch: ChannelIndex, out_ch: ChannelIndex, groups: ConvGroups,
                b: int) -> Dict[str, float]:
    cout, cin, kh, kw = st.weight.shape
    kk, spatial_in, spatial_out = kh * kw, _prod(st.in_shape[1:]), _prod(st.out_shape[1:])
    cnt_in, cnt_out = _counts(in_ch), _counts(out_ch)
    starts = groups.problems[b: b + groups.ngroups].long()
    first = groups.problems[starts].long()  # one representative sample per group
    return dict(
        name=st.name,
        dense_macs=b * cout * cin * kk * spatial_out,
        pathway_macs=float((cnt_in * cnt_out).sum()) * kk * spatial_out,
        dense_weight_bytes=cout * cin * kk * 4,
        pathway_weight_bytes=float((cnt_in[first] * cnt_out[first]).sum()) * kk * 4,
        dense_act_bytes=4 * b * (cin * spatial_in + cout * spatial_out),
        pathway_act_bytes=4 * float((cnt_in * spatial_in + cnt_out * spatial_out).sum()),
    )


def pathway_flops(model: nn.Module, mask: Optional[MaskLike], x: torch.Tensor) -> Dict[str, object]:
    """Work of the dense model and of the pathway, per conv/linear layer and in total.

    Returns a dict with ``layers`` (per layer: ``dense_macs``, ``pathway_macs``, ``dense_weight_bytes``,
    ``pathway_weight_bytes``: bytes of the weight slices each group of samples sharing masks must read) and the totals
    ``dense_macs``, ``pathway_macs``, ``ideal_flop_ratio``, ``dense_bytes``, ``pathway_bytes``, ``ideal_bytes_ratio``
    (bytes = weights read + activations read and written, float32).
    """
    fp = check_model_and_input(model, x)
    masks = normalize_masks(cached_units(model, x, fp), mask, x)
    plan = get_plan(model, x, frozenset(masks), fp)
    b = x.shape[0]
    ix = plan_run(plan, masks_to_host(masks), b, torch.device("cpu"))
    layers: List[Dict[str, float]] = []
    for st in plan.steps:
        if isinstance(st, ConvStep):
            layers.append(_layer_cost(st, ix.sets[st.in_set], ix.sets[st.out_set],
                                      ix.conv_groups[(st.in_set, st.out_set)], b))
    tot = dict(dense_macs=sum(c["dense_macs"] for c in layers), pathway_macs=sum(c["pathway_macs"] for c in layers),
               dense_bytes=sum(c["dense_weight_bytes"] + c.pop("dense_act_bytes") for c in layers),
               pathway_bytes=sum(c["pathway_weight_bytes"] + c.pop("pathway_act_bytes") for c in layers))
    return dict(
        layers=layers,
        **tot,
        ideal_flop_ratio=tot["dense_macs"] / max(tot["pathway_macs"], 1.0),
        ideal_bytes_ratio=tot["dense_bytes"] / max(tot["pathway_bytes"], 1.0),
    )
