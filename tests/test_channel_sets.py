"""Channel sets of the CPU engine: the compiled mask compaction and the channel remap, against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gencnp_fast import _C
from gencnp_fast.plan.channel_sets import ChannelSet, remap_channels


def _masks(b, c, seed, p=0.3, dup=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, c, generator=g) < p
    if dup and b >= 6:
        m[1] = m[0]  # equal rows share a group
        m[4] = m[0]
        m[2] = False  # an empty row
        m[3] = True  # a full row
        m[5] = m[2]
    return m


def _same(a: ChannelSet, b: ChannelSet) -> None:
    assert a.full == b.full and a.ngroups == b.ngroups and a.channels == b.channels
    assert torch.equal(a.idx, b.idx) and torch.equal(a.gid, b.gid) and torch.equal(a.counts, b.counts)


def _naive(mask: torch.Tensor):
    """idx / gid / counts the slow, obvious way."""
    rows = [tuple(r.tolist()) for r in mask]
    first, gid = {}, []
    for r in rows:
        gid.append(first.setdefault(r, len(first)))
    counts = mask.sum(1)
    k = int(counts.max()) if len(rows) else 0
    idx = torch.full((mask.shape[0], k), -1, dtype=torch.int32)
    for i, r in enumerate(mask):
        a = r.nonzero().flatten()
        idx[i, : a.numel()] = a.to(torch.int32)
    return idx, torch.tensor(gid, dtype=torch.int64), len(first), counts


@pytest.mark.parametrize("b,c", [(64, 512), (1, 5), (7, 1), (9, 13), (33, 100), (16, 8), (5, 0)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_compiled_compaction_matches_numpy_and_naive(b, c, p):
    m = _masks(b, c, seed=b * 1000 + c, p=p)
    got = ChannelSet._from_mask_cpu(m)
    _same(got, ChannelSet._from_mask_numpy(m))
    if not got.full:
        idx, gid, ngroups, counts = _naive(m)
        assert torch.equal(got.idx, idx) and torch.equal(got.gid, gid) and got.ngroups == ngroups
        assert torch.equal(got.counts, counts)
    else:
        assert bool(m.all())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_compaction_of_non_bool_masks(dtype):
    m = _masks(12, 37, seed=3)
    _same(ChannelSet._from_mask_cpu(m.to(dtype)), ChannelSet._from_mask_cpu(m))


def test_compaction_groups_by_first_appearance():
    m = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    cs = ChannelSet._from_mask_cpu(m)
    assert cs.gid.tolist() == [0, 1, 0, 2, 1] and cs.ngroups == 3
    assert cs.idx.tolist() == [[1, 2], [0, -1], [1, 2], [-1, -1], [0, -1]]


def test_compact_masks_rejects_short_buffers():
    m = np.zeros(12, dtype=np.uint8)
    with pytest.raises(ValueError, match="idx must hold 12 items"):
        _C.compact_masks(m, 3, 4, np.zeros(11, np.int32), np.zeros(3, np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="gid must hold 3 items of 8 bytes"):
        _C.compact_masks(m, 3, 4, np.zeros(12, np.int32), np.zeros(3, np.int32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="B and C"):
        _C.compact_masks(m, -1, 4, np.zeros(12, np.int32), np.zeros(3, np.int64), np.zeros(3, np.int64))


def _set(kind: str, b: int, c: int, seed: int) -> ChannelSet:
    g = torch.Generator().manual_seed(seed)
    if kind == "full":
        return ChannelSet.dense(b, c, "cpu")
    if kind == "empty":
        return ChannelSet.from_mask(torch.zeros(c, dtype=torch.bool), b)
    if kind == "shared":
        return ChannelSet.from_mask(torch.rand(c, generator=g) < 0.4, b)
    return ChannelSet.from_mask(_masks(b, c, seed, p=0.4), b)


def _expand(x: torch.Tensor, cs: ChannelSet) -> torch.Tensor:
    """[B, K, ...] stored for cs -> the full [B, C, ...] activation (absent channels zero)."""
    full = x.new_zeros((x.shape[0], cs.channels) + tuple(x.shape[2:]))
    for i in range(x.shape[0]):
        for j, ch in enumerate(cs.idx[i].tolist()):
            if ch >= 0:
                full[i, ch] = x[i, j]
    return full


KINDS = ["full", "empty", "shared", "per_sample"]


@pytest.mark.parametrize("src_kind", KINDS)
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("spatial", [(), (3, 2)])
def test_remap_channels_matches_dense_reference(src_kind, dst_kind, spatial):
    b, c = 7, 11
    src, dst = _set(src_kind, b, c, 1), _set(dst_kind, b, c, 2)
    x = torch.randn((b, src.width) + spatial)
    x = x * (src.idx >= 0).to(x.dtype).reshape((b, src.width) + (1,) * len(spatial))  # padding holds zeros
    full = _expand(x, src)
    want = torch.zeros((b, dst.width) + spatial)
    for i in range(b):
        for j, ch in enumerate(dst.idx[i].tolist()):
            if ch >= 0:
                want[i, j] = full[i, ch]
    got = remap_channels(x, src, dst)
    assert got.shape == want.shape
    assert torch.equal(got, want)
