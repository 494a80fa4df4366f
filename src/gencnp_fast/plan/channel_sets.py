"""Runtime channel sets: which channels of a compacted activation are stored, per sample.

A compacted activation is ``[B, K, ...]``: channel ``j`` of sample ``b`` holds the original channel ``idx[b, j]``;
``idx[b, j] == -1`` marks padding (data zero) after the sample's last active channel. Samples whose rows are equal
share a group id, so kernels can reuse one gathered weight tile for the whole group.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["ChannelSet", "remap_channels", "conv_groups", "RemapIndex", "remap_index", "apply_remap", "group_table",
           "attach_group_table", "cached_group_table", "planned_problems"]

try:  # the compiled host helpers (csrc/compact_masks.cpp); torch / numpy do the same where the extension is missing
    from .._C import compact_masks as _compact_masks
    from .._C import remap_positions as _remap_positions
except ImportError:  # pragma: no cover - exercised only without a build
    _compact_masks = None
    _remap_positions = None


class ChannelSet:
    """Active channels per sample.

    Attributes:
        idx: int32 ``[B, K]``, valid entries ascending, then ``-1`` padding.
        gid: int64 ``[B]`` group id of each sample (equal rows, equal id); ``ngroups`` ids in all.
        counts: int64 ``[B]`` active channels per sample.
        channels: channel count of the full activation.
        (A device twin made by a host-planned run carries only ``idx``; its ``gid`` and ``counts`` are None: every
        decision that reads them was taken on the host.)
        full: every sample keeps every channel (``idx`` is ``arange(C)`` on every row).
    """

    __slots__ = ("idx", "gid", "ngroups", "channels", "full", "counts")

    def __init__(self, idx: torch.Tensor, gid: torch.Tensor, ngroups: int, channels: int, full: bool, counts: torch.Tensor):
        self.idx = idx
        self.gid = gid
        self.ngroups = ngroups
        self.channels = channels
        self.full = full
        self.counts = counts

    @property
    def width(self) -> int:
        return int(self.idx.shape[1])

    @classmethod
    def dense(cls, batch: int, channels: int, device) -> "ChannelSet":
        idx = torch.arange(channels, dtype=torch.int32, device=device).unsqueeze(0).expand(batch, channels)
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)
        return cls(idx, zeros, 1, channels, True, torch.full((batch,), channels, dtype=torch.int64, device=device))

    @classmethod
    def from_mask(cls, mask: torch.Tensor, batch: int) -> "ChannelSet":
        """From a bool mask ``[C]`` (shared) or ``[B, C]`` (per sample)."""
        channels = int(mask.shape[-1])
        device = mask.device
        if mask.dim() == 1:
            if device.type == "cpu":  # numpy: ~1 us per call instead of a few torch ops (a per-forward cost)
                active = torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int32))
            else:
                active = mask.nonzero().flatten().to(torch.int32)
            k = int(active.numel())
            if k == channels:
                return cls.dense(batch, channels, device)
            idx = active.unsqueeze(0).expand(batch, k)
            gid = torch.zeros(batch, dtype=torch.int64, device=device)
            return cls(idx, gid, 1, channels, False, torch.full((batch,), k, dtype=torch.int64, device=device))
        if device.type == "cpu":
            return cls._from_mask_cpu(mask)
        counts = mask.sum(1)
        k = int(counts.max())
        if int(counts.min()) == channels:
            return cls.dense(batch, channels, device)
        # Compaction by prefix sum: active channel c of sample b goes to column (#active before c); inactive ones to
        # a spill column k that is dropped.
        pos = torch.where(mask, mask.cumsum(1) - 1, torch.full_like(counts, k).unsqueeze(1))
        idx = torch.full((mask.shape[0], k + 1), -1, dtype=torch.int32, device=device)
        idx.scatter_(1, pos, torch.arange(channels, dtype=torch.int32, device=device).expand_as(mask))
        idx[:, k] = -1
        gid, ngroups = _row_groups(mask)
        return cls(idx[:, :k].contiguous(), gid, ngroups, channels, False, counts)

    @classmethod
    def _from_mask_cpu(cls, mask: torch.Tensor) -> "ChannelSet":
        """``from_mask`` for a per-sample CPU mask: one call into the compiled helper ``_C.compact_masks`` (exact row
        grouping by hash + comparison, each distinct row compacted once; group ids numbered by first appearance, so
        two units with the same partition of the batch get equal ``gid`` arrays). Same result as
        :meth:`_from_mask_numpy`, which is used where the extension is not built."""
        if _compact_masks is None:
            return cls._from_mask_numpy(mask)
        m = mask.contiguous()
        if m.dtype != torch.bool:
            m = m != 0
        b, c = m.shape
        idx = torch.empty(b * c, dtype=torch.int32)
        gid = torch.empty(b, dtype=torch.int64)
        counts = torch.empty(b, dtype=torch.int64)
        k, ngroups = _compact_masks(m.view(torch.uint8).numpy(), b, c, idx.numpy(), gid.numpy(), counts.numpy())
        if k == c and int(counts.min()) == c:
            return cls.dense(b, c, mask.device)
        return cls(idx[: b * k].view(b, k), gid, int(ngroups), c, False, counts)

    @classmethod
    def _from_mask_numpy(cls, mask: torch.Tensor) -> "ChannelSet":
        """``from_mask`` for a per-sample CPU mask, with numpy: exact row grouping by sorting the packed rows, then
        compaction of the distinct rows only (a per-class pathway compacts 10 rows, not B). Group ids are numbered
        by first appearance, so two units with the same partition of the batch get equal ``gid`` arrays."""
        m = mask.contiguous().numpy()
        b, c = m.shape
        counts = m.sum(1)
        if int(counts.min()) == c:
            return cls.dense(b, c, mask.device)
        packed = np.ascontiguousarray(np.packbits(m, axis=1))
        keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
        _, first, gid = np.unique(keys, return_index=True, return_inverse=True)
        gid = gid.ravel()
        order = np.argsort(first, kind="stable")  # groups in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        first = first[order]
        gid = rank[gid]
        rows_u = m[first]  # [G, C] distinct rows
        cnt_u = counts[first]
        k = int(cnt_u.max())
        rows, cols = np.nonzero(rows_u)  # row-major: ascending channels within each row
        starts = np.cumsum(cnt_u) - cnt_u
        idx_u = np.full((first.size, k), -1, dtype=np.int32)
        idx_u[rows, np.arange(rows.size) - np.repeat(starts, cnt_u)] = cols
        return cls(torch.from_numpy(idx_u[gid]), torch.from_numpy(gid.astype(np.int64)), int(first.size), c, False,
                   torch.from_numpy(counts.astype(np.int64)))

    def flattened(self, spatial: int) -> "ChannelSet":
        """The set of ``torch.flatten(x, 1)`` features of a ``[B, C, H, W]`` activation with ``H*W = spatial``."""
        if spatial == 1:
            return self
        if self.full:
            return ChannelSet.dense(self.idx.shape[0], self.channels * spatial, self.idx.device)
        b = self.idx.shape[0]
        rows = self.idx[:1] if self.ngroups == 1 else self.idx  # one mask for the batch: one row, expanded
        s = torch.arange(spatial, dtype=torch.int32, device=self.idx.device)
        flat = rows.unsqueeze(2) * spatial + s
        flat = torch.where(rows.unsqueeze(2) < 0, torch.full_like(flat, -1), flat).reshape(rows.shape[0], -1)
        return ChannelSet(
            flat.expand(b, -1) if self.ngroups == 1 else flat, self.gid, self.ngroups, self.channels * spatial,
            False, self.counts * spatial,
        )


_HASH_WEIGHTS: Dict[Tuple[int, str], torch.Tensor] = {}


def _row_groups(mask: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Group id per row of a bool ``[B, C]`` mask (equal rows, equal id) and the number of groups.

    Rows are hashed by a random projection; the grouping is then verified against each group's first row and
    recomputed exactly with ``torch.unique(dim=0)`` in the (astronomically rare) case of a collision.
    """
    b, c = mask.shape
    key = (c, str(mask.device))
    w = _HASH_WEIGHTS.get(key)
    if w is None:
        w = torch.rand(c, generator=torch.Generator().manual_seed(c), dtype=torch.float64).to(mask.device)
        _HASH_WEIGHTS[key] = w
    uniq, gid = torch.unique(mask.to(torch.float64) @ w, return_inverse=True)
    rep = torch.zeros(len(uniq), dtype=torch.int64, device=mask.device).scatter_reduce_(
        0, gid, torch.arange(b, device=mask.device), reduce="amin", include_self=False
    )
    if not bool((mask == mask[rep[gid]]).all()):
        uniq, gid = torch.unique(mask, dim=0, return_inverse=True)
    return gid, int(uniq.shape[0])


class RemapIndex:
    """How to re-compact a tensor stored for one channel set to another: ``kind`` is

    - ``"same"``: nothing to do (the same set, or both full);
    - ``"zeros"``: all zeros of ``width`` channels (nothing to read, or nothing to write);
    - ``"row"``: one row for the whole batch: ``out = x.index_select(1, take)``, then channels ``cols`` zeroed
      (``cols`` is None when there are none);
    - ``"rows"``: per sample: ``out[b, j] = x[b, take[b, j]]``, then multiplied by ``keep`` (0/1; None when every
      entry is kept).

    Built from the two sets with :func:`remap_index` (on the host or on the sets' device), applied with
    :func:`apply_remap`.
    """

    __slots__ = ("kind", "width", "take", "cols", "keep")

    def __init__(self, kind: str, width: int = 0, take: Optional[torch.Tensor] = None,
                 cols: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None):
        self.kind, self.width, self.take, self.cols, self.keep = kind, width, take, cols, keep


def remap_index(src: ChannelSet, dst: ChannelSet) -> RemapIndex:
    """The indices that re-compact a tensor stored for ``src`` to ``dst`` (channels absent from ``src`` become
    zeros). Decides on the data (any padding to zero?), so on a GPU call it with the sets' host twins."""
    if src is dst or (src.full and dst.full):
        return RemapIndex("same")
    if src.width == 0 or dst.width == 0:  # nothing to read (or to write): all zeros
        return RemapIndex("zeros", dst.width)
    single = src.ngroups == 1 and dst.ngroups == 1  # one row for the whole batch: a plain channel gather
    d = dst.idx[:1] if single else dst.idx
    d = d.long()
    if src.full:
        take = d
        fill = d < 0
    elif _remap_positions is not None and d.device.type == "cpu":  # one compiled pass over the rows
        s_rows = (src.idx[:1] if single else src.idx).contiguous()
        d32 = (dst.idx[:1] if single else dst.idx).contiguous()
        b, kd = d32.shape
        take = torch.empty(b, kd, dtype=torch.int64)
        keep = torch.empty(b, kd, dtype=torch.uint8)
        zeros = _remap_positions(s_rows.numpy(), d32.numpy(), b, s_rows.shape[1], kd, src.channels, take.numpy(),
                                 keep.numpy())
        if single:
            cols = (keep[0] == 0).nonzero().flatten() if zeros else None
            return RemapIndex("row", dst.width, take[0], cols)
        return RemapIndex("rows", dst.width, take, None, keep if zeros else None)
    else:
        # position of each wanted channel in src's ascending rows (padding -1 -> channels, so rows stay sorted);
        # a channel src does not hold is "not found"
        s_rows = src.idx[:1] if single else src.idx
        s_rows = torch.where(s_rows < 0, src.channels, s_rows.long())
        take = torch.searchsorted(s_rows, d.clamp(min=0)).clamp_(max=src.width - 1)
        fill = (d < 0) | (s_rows.gather(1, take) != d)
    take = take.clamp(0, src.width - 1)  # one gather copy; the fill positions are zeroed after it
    if single:
        cols = fill[0].nonzero().flatten()
        return RemapIndex("row", dst.width, take[0], cols if cols.numel() else None)
    keep = (~fill).to(torch.uint8) if bool(fill.any()) else None
    return RemapIndex("rows", dst.width, take, None, keep)


def apply_remap(x: torch.Tensor, r: RemapIndex) -> torch.Tensor:
    """``x`` re-compacted by ``r`` (see :class:`RemapIndex`); no host synchronisation."""
    if r.kind == "same":
        return x
    b = x.shape[0]
    spatial = tuple(x.shape[2:])
    if r.kind == "zeros":
        return x.new_zeros((b, r.width) + spatial)
    if r.kind == "row":
        out = x.index_select(1, r.take)
        if r.cols is not None:
            out.index_fill_(1, r.cols, 0)
        return out
    out = x[torch.arange(b, device=x.device).unsqueeze(1), r.take]
    if r.keep is not None:
        out.mul_(r.keep.to(out.dtype).reshape(tuple(r.keep.shape) + (1,) * len(spatial)))
    return out


def remap_channels(x: torch.Tensor, src: ChannelSet, dst: ChannelSet) -> torch.Tensor:
    """Re-compact ``x`` (stored for ``src``) to ``dst``: channels absent from ``src`` become zeros."""
    return apply_remap(x, remap_index(src, dst))


def group_table(groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """The grouped-problem list of a kernel launch: ``(samples sorted by group (stable), start of each group,
    size of each group, number of groups, largest group)``, int32 tensors on ``groups``' device."""
    if groups.device.type == "cpu":  # numpy: a few microseconds for a batch's ids (the host-planned run's case)
        _, inverse, cnt = np.unique(groups.numpy(), return_inverse=True, return_counts=True)
        order = np.argsort(inverse.ravel(), kind="stable").astype(np.int32)
        first = (np.cumsum(cnt) - cnt).astype(np.int32)
        return (torch.from_numpy(order), torch.from_numpy(first), torch.from_numpy(cnt.astype(np.int32)),
                int(cnt.size), int(cnt.max()))
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    samples = torch.sort(inverse, stable=True).indices.to(torch.int32)
    start = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return samples, start, counts.to(torch.int32), int(counts.numel()), int(counts.max())


def attach_group_table(groups: torch.Tensor, table: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int],
                       problems: Optional[torch.Tensor] = None) -> None:
    """Remember ``table`` (see :func:`group_table`) on the ``groups`` tensor, so that a launcher reads it instead of
    computing it (on a GPU that would synchronise); ``problems`` is the same list as one int32 tensor
    ``[B + 2G]`` (samples, starts, sizes), the form the compiled op takes. Invalidated if ``groups`` is modified in
    place."""
    try:
        groups._gencnp_group_table = (groups._version, table, problems)
    except (AttributeError, RuntimeError):  # pragma: no cover - e.g. a tensor subclass without a __dict__
        pass


def planned_problems(groups: torch.Tensor) -> Optional[Tuple[torch.Tensor, int]]:
    """``(problems [B + 2G], largest group)`` attached to ``groups`` by a host-planned run, or None."""
    hit = getattr(groups, "_gencnp_group_table", None)
    if hit is None or hit[0] != groups._version or hit[2] is None:
        return None
    return hit[2], hit[1][4]


def cached_group_table(groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """:func:`group_table` of ``groups``, remembered on the tensor (the engine reuses one groups tensor for every
    layer with the same pair of channel sets, and attaches host-computed tables on a GPU)."""
    hit = getattr(groups, "_gencnp_group_table", None)
    if hit is not None and hit[0] == groups._version:
        return hit[1]
    table = group_table(groups)
    attach_group_table(groups, table)
    return table


_GroupCache = Dict[Tuple[int, int], torch.Tensor]


def conv_groups(a: ChannelSet, b: ChannelSet, cache: Optional[_GroupCache] = None) -> torch.Tensor:
    """int32 ``[B]`` ids of samples sharing both ``a``'s and ``b``'s rows (the weight tile a kernel can reuse)."""
    key = (id(a), id(b))
    if cache is not None and key in cache:
        return cache[key]
    if a.ngroups == 1:
        g = b.gid
    elif b.ngroups == 1:
        g = a.gid
    elif a.ngroups == b.ngroups and torch.equal(a.gid, b.gid):  # the same partition of the batch
        g = a.gid
    elif a.gid.device.type == "cpu":
        g = torch.from_numpy(np.unique((a.gid * b.ngroups + b.gid).numpy(), return_inverse=True)[1].ravel())
    else:
        g = torch.unique(a.gid * b.ngroups + b.gid, return_inverse=True)[1]
    g = g.to(torch.int32)
    if cache is not None:
        cache[key] = g
    return g
