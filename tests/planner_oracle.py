"""The run index planner in plain torch: the oracle the compiled planner (csrc/run_indices.cpp, reached through
gencnp_fast.plan.indices.plan_run) is checked against, bit for bit (tests/test_run_indices.py).

It answers the same requests (gencnp_fast.plan.indices.run_requests: which channel sets, conv groups and remaps a
plan's run needs) with the semantics written out directly (csrc/run_indices.h):
  * a unit's set: its mask's kept channels per sample, ascending, -1 padded to the largest count; one row for the
    batch when every sample has the same row; "full" when every sample keeps every channel;
  * a flat set: channel c of its base becomes features c * spatial + t;
  * conv groups: samples numbered by the first appearance of their (input row, output row) pair; the problem list
    sorts them stably by group;
  * a remap: for every column of dst, the column of src holding its channel (absent: 0, and zeroed).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from gencnp_fast import _C
from gencnp_fast.plan.indices import ChannelIndex, ConvGroups, RemapIndex, RunIndices, run_requests
from gencnp_fast.plan.sets import AllChannels, FlatFeatures, UnitChannels

Kind = _C.RemapKind


def _first_appearance(keys: List) -> torch.Tensor:
    """int64 ids of ``keys``, numbered by first appearance."""
    ids: Dict = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.int64)


class _Set:
    """A set on the host: rows [B, K] (-1 padded), the group id of each sample, full or not."""

    def __init__(self, rows: torch.Tensor, channels: int, full: bool):
        self.rows, self.channels, self.full = rows, channels, full
        self.gid = torch.zeros(rows.shape[0], dtype=torch.int64) if full else _first_appearance(
            [tuple(r.tolist()) for r in rows])
        self.ngroups = 1 if full else int(self.gid.max()) + 1 if rows.shape[0] else 1

    @property
    def k(self) -> int:
        return self.channels if self.full else int(self.rows.shape[1])


def _unit_set(mask: torch.Tensor, batch: int) -> _Set:
    m = mask.bool().cpu()
    m = m.unsqueeze(0).expand(batch, -1) if m.dim() == 1 else m
    channels = m.shape[1]
    counts = m.sum(1)
    if int(counts.min()) == channels:
        return _Set(torch.arange(channels, dtype=torch.int32).expand(batch, channels), channels, True)
    k = int(counts.max())
    rows = torch.full((batch, k), -1, dtype=torch.int32)
    for b in range(batch):
        kept = m[b].nonzero().flatten().to(torch.int32)
        rows[b, : kept.numel()] = kept
    return _Set(rows, channels, False)


def _flat_set(base: _Set, spatial: int) -> _Set:
    channels = base.channels * spatial
    if base.full:
        return _Set(torch.arange(channels, dtype=torch.int32).expand(base.rows.shape[0], channels), channels, True)
    t = torch.arange(spatial, dtype=torch.int32)
    flat = base.rows.unsqueeze(2) * spatial + t
    flat = torch.where(base.rows.unsqueeze(2) < 0, torch.full_like(flat, -1), flat)
    return _Set(flat.reshape(base.rows.shape[0], -1), channels, False)


def _conv_groups(a: _Set, b: _Set, batch: int) -> ConvGroups:
    gid = _first_appearance(list(zip(a.gid.tolist(), b.gid.tolist())))
    counts = torch.bincount(gid)
    samples = torch.sort(gid, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    problems = torch.cat([samples, starts, counts]).to(torch.int32)
    return ConvGroups(gid.to(torch.int32), problems, int(counts.numel()), int(counts.max()))


def _remap(src: _Set, dst: _Set, same_ref: bool) -> RemapIndex:
    if same_ref or (src.full and dst.full):
        return RemapIndex(Kind.SAME, dst.k)
    if src.k == 0 or dst.k == 0:
        return RemapIndex(Kind.ZEROS, dst.k)
    single = src.ngroups == 1 and dst.ngroups == 1
    batch = dst.rows.shape[0]
    take = torch.zeros(batch, dst.k, dtype=torch.int64)
    keep = torch.zeros(batch, dst.k, dtype=torch.uint8)
    for b in range(batch):
        where = {int(c): j for j, c in enumerate(src.rows[b].tolist()) if c >= 0}
        for j, c in enumerate(dst.rows[b].tolist()):
            if c >= 0 and c in where:
                take[b, j], keep[b, j] = where[c], 1
    if single:
        take, keep = take[:1], keep[:1]
    return RemapIndex(Kind.ROW if single else Kind.ROWS, dst.k, take, None if bool(keep.all()) else keep)


def oracle_plan_run(plan, masks: Dict[str, torch.Tensor], batch: int) -> RunIndices:
    """The :class:`~gencnp_fast.plan.indices.RunIndices` of one run of ``plan``, on the CPU, in plain torch."""
    req = run_requests(plan)
    host: Dict = {}
    for ref in req.set_refs:  # bases come before the sets that flatten them
        if isinstance(ref, UnitChannels):
            host[ref] = _unit_set(masks[ref.unit], batch)
        elif isinstance(ref, FlatFeatures):
            host[ref] = _flat_set(host[ref.base], ref.spatial)
        else:
            assert isinstance(ref, AllChannels)
            c = plan.set_channels[ref]
            host[ref] = _Set(torch.arange(c, dtype=torch.int32).expand(batch, c), c, True)
    sets = {ref: ChannelIndex(s.rows, s.full, s.channels, s.ngroups) for ref, s in host.items()}
    groups = {(a, b): _conv_groups(host[a], host[b], batch) for a, b in req.group_keys}
    remaps: Dict[Tuple, RemapIndex] = {(a, b): _remap(host[a], host[b], a == b) for a, b in req.remap_keys}
    return RunIndices(sets, groups, remaps)
