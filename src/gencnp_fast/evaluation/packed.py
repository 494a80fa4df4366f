"""Packed-bit pathway store and the §5 pathway metrics computed from it (docs/design.md §5).

A pathway holds, per unit, a bool mask ``[N, C]``. :class:`PackedPathways` keeps them flattened (units in the
given order, each unit's ``C`` channels, ``D = sum C``) and packed to ``uint8 [N, W]`` with ``W = ceil(D / 8)``.

- **Bit order** (LSB first): flattened channel ``j`` of a row is bit ``j % 8`` of byte ``j // 8``, i.e.
  ``(bits[n, j // 8] >> (j % 8)) & 1``. The ``8·W − D`` padding bits at the end of each row are always 0.
- **Metrics**, equal to :mod:`.metrics` (``density_stats``, ``class_iou``) without the dense ``[N, N]`` IoU matrix
  or the dense ``[N, D]`` pathway:

  * ``density_stats``: popcounts per row and column sums of unpacked row chunks.
  * ``class_iou``: acIOU is exact, class by class, over upper-triangular blocks of ``chunk_rows()`` rows. The
    intersections of a block come either from NumPy's ``bitwise_count`` (hardware popcount) of ANDed packed
    words or from a float32 matmul of unpacked rows (0/1 products, integer sums below 2**24: exact; float64 for
    wider rows), whichever :func:`_use_popcount` expects to be cheaper. Measured at N = 2,000, D = 26,000,
    50 classes on 2 CPU cores: acIOU took 0.04–0.07 s by popcount, 0.1–0.2 s by unpack + matmul (and up to 2 s
    when other work shared the cores), 0.39 s by an int64 SWAR popcount in torch and 0.63 s by a 256-entry
    lookup table; all 2M pairs took 1.0 s by popcount, 1.3 s by matmul on 2 threads (3.6 s on 1). Matmul wins
    only for large blocks on many threads. The inter-class IoU is exact (all pairs, the same blocks) up to
    ``max_pairs`` different-class pairs; above that, it is the mean over ``max_pairs`` seeded, uniformly drawn
    different-class pairs (with replacement), by popcounts of the ANDed packed rows (torch SWAR without NumPy's
    ``bitwise_count``, NumPy < 2.0).

Memory: two blocks of ``chunk_rows()`` rows (about ``CHUNK_ELEMS`` floats each when unpacked), O(N) counts and
labels, and, for sampled pairs, ``PAIR_DRAW`` pairs and ``PAIR_BATCH_BYTES`` of gathered packed rows per side at a
time. Never ``[N, N]`` or ``[N, D]`` floats.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

try:  # NumPy ≥ 2.0 has a vectorised hardware popcount; torch has none (SWAR on int64 words instead)
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is a dependency of the package
    _np = None
_NP_COUNT = getattr(_np, "bitwise_count", None)

__all__ = ["FORMAT", "PackedPathways", "iou_rows", "popcount_rows"]

FORMAT = "gencnp_fast.packed/1"
CHUNK_ELEMS = 1 << 22  # unpacked values per row chunk (16 MiB as float32)
PAIR_BATCH_BYTES = 1 << 20  # gathered packed bytes per side of a batch of sampled pairs
PAIR_DRAW = 1 << 16  # sampled pairs drawn at a time (part of the seeded sequence: changing it changes the pairs)
_EXACT_F32 = 1 << 24  # float32 sums of 0/1 products are exact below this row width

_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F

Index = Union[None, slice, torch.Tensor, Sequence[int], int]


def _shifts(device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def _pack_flat(flat: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 ``[b, W]`` of bool ``[b, D]`` (on ``flat``'s device), in the module's bit order."""
    b, d = flat.shape
    x = F.pad(flat.to(torch.uint8), (0, 8 * width - d)).view(b, width, 8)
    return (x << _shifts(flat.device)).sum(-1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """``[n, 8·W]`` of packed ``[n, W]`` (padding columns included, they are 0)."""
    x = bits.unsqueeze(-1) >> _shifts(bits.device)
    x &= 1
    return x.reshape(bits.shape[0], 8 * bits.shape[1]).to(dtype)


def _as_words(bits: torch.Tensor) -> torch.Tensor:
    """int64 ``[n, ceil(W / 8)]`` view (or zero-padded copy) of packed rows."""
    pad = (-bits.shape[1]) % 8
    if pad or not bits.is_contiguous():
        bits = F.pad(bits, (0, pad)).contiguous()
    return bits.view(torch.int64)


def _popcount_words_(x: torch.Tensor) -> torch.Tensor:
    """Set bits per row of int64 ``[n, w]`` (SWAR popcount, in place on ``x``): int64 ``[n]``."""
    y = (x >> 1) & _M1
    x -= y
    y = (x >> 2) & _M2
    x &= _M2
    x += y
    x += x >> 4
    x &= _M4  # every byte now holds its own popcount (≤ 8)
    return x.view(torch.uint8).view(x.shape[0], -1).sum(1, dtype=torch.int64)


def _popcount_u8(x: torch.Tensor) -> torch.Tensor:
    """Set bits per row of a CPU ``uint8 [n, W]`` (NumPy's ``bitwise_count`` when there is one): int64 ``[n]``."""
    if _NP_COUNT is not None:
        return torch.from_numpy(_NP_COUNT(x.numpy()).sum(1, dtype=_np.int64))
    return _popcount_words_(_as_words(x).clone())


def popcount_rows(bits: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Set bits per row of packed CPU ``uint8 [n, W]``: int64 ``[n]`` (in row chunks)."""
    out = torch.empty(bits.shape[0], dtype=torch.int64)
    for s in range(0, bits.shape[0], chunk):
        out[s:s + chunk] = _popcount_u8(bits[s:s + chunk])
    return out


def _iou_from_inter(inter: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """IoU of intersection counts and set sizes, as :func:`.metrics.iou_matrix` (two empty rows: 1)."""
    union = ca.double().unsqueeze(-1) + cb.double().unsqueeze(0) - inter if inter.dim() == 2 \
        else ca.double() + cb.double() - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _matmul_dtype(bits: torch.Tensor) -> torch.dtype:
    return torch.float32 if 8 * bits.shape[1] < _EXACT_F32 else torch.float64


def iou_rows(a_bits: torch.Tensor, b_bits: torch.Tensor, a_counts: Optional[torch.Tensor] = None,
             b_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 ``[n, m]`` IoU between packed rows ``uint8 [n, W]`` and ``[m, W]`` (one unpack and matmul: the
    caller chunks). ``a_counts`` / ``b_counts`` are the rows' popcounts when known."""
    if a_bits.dim() != 2 or b_bits.dim() != 2 or a_bits.shape[1] != b_bits.shape[1]:
        raise ValueError(f"packed rows must be [n, W] and [m, W], got {tuple(a_bits.shape)} and {tuple(b_bits.shape)}")
    dt = _matmul_dtype(a_bits)
    a = _unpack_bits(a_bits, dt)
    b = a if b_bits is a_bits else _unpack_bits(b_bits, dt)
    ca = a.sum(1) if a_counts is None else a_counts
    cb = b.sum(1) if b_counts is None else b_counts
    return _iou_from_inter((a @ b.T).double(), ca, cb)


def _as_int(c: object) -> object:
    """``c`` as a Python int when it is an integer (not a bool; e.g. a 0-dim int tensor), else unchanged."""
    if isinstance(c, bool):
        return c
    if isinstance(c, torch.Tensor) and (c.dim() or c.is_floating_point() or c.dtype == torch.bool):
        return c
    try:
        return operator.index(c)
    except TypeError:
        return c


def _layout_problem(units: object, channels: object) -> Optional[str]:
    """The first problem of a (units, channels) layout, or None."""
    if not isinstance(units, (list, tuple)) or not all(isinstance(u, str) for u in units):
        return "'units' must be a list of str"
    if not isinstance(channels, (list, tuple)) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in channels):
        return "'channels' must be a list of int"
    if len(units) != len(channels):
        return f"{len(units)} units but {len(channels)} channel counts"
    if not units:
        return "the pathway has no units"
    seen = set()
    for u, c in zip(units, channels):
        if u in seen:
            return f"duplicate unit {u!r}"
        seen.add(u)
        if c < 0:
            return f"unit {u!r} has a negative channel count ({c})"
    return None


def _labels(labels, n: int, num_classes: Optional[int]) -> Tuple[torch.Tensor, int]:
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({n},)")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = labels.long().cpu()
    k = (int(labels.max()) + 1 if n else 0) if num_classes is None else int(num_classes)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels, k


def _use_popcount(a: int, b: int) -> bool:
    """Whether an ``a × b`` block of IoUs is cheaper by NumPy popcounts of ANDed rows than by unpack + matmul.

    Cost per packed byte, measured at D = 26,000 (one core): popcount 0.15 ns per pair; unpacking 6.2 ns per row;
    float32 matmul 0.46 ns per pair, divided by the torch threads. With 2 threads popcount always wins; with 16,
    only for blocks under about 100 × 100 rows (small classes)."""
    if _NP_COUNT is None:
        return False
    return a * b * (0.15 - 0.46 / max(torch.get_num_threads(), 1)) < 6.2 * (a + b)


def _words_np(bits: torch.Tensor, rows: torch.Tensor):
    """NumPy uint64 ``[len(rows), ceil(W / 8)]``: the packed rows, zero-padded to whole words."""
    x = bits[rows].numpy()
    pad = (-x.shape[1]) % 8
    return (_np.pad(x, ((0, 0), (0, pad))) if pad else x).view(_np.uint64)


def _popcount_inter(a, b) -> torch.Tensor:
    """int64 ``[len(a), len(b)]``: set bits of ``a[r] & b[s]`` (NumPy uint64 word rows), one row of ``a`` at a
    time into reused buffers."""
    out = _np.empty((a.shape[0], b.shape[0]), dtype=_np.int64)
    x = _np.empty_like(b)
    c = _np.empty(b.shape, dtype=_np.uint8)
    for r in range(a.shape[0]):
        _np.bitwise_and(a[r], b, out=x)
        _NP_COUNT(x, out=c)
        c.sum(-1, dtype=_np.int64, out=out[r])
    return torch.from_numpy(out)


def _block_sums(bits: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, lab: torch.Tensor, k: int,
                chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sums of IoU over the unordered pairs of ``rows``: per class of the same-class pairs (float64 ``[k]``) and
    over the different-class pairs (float64 scalar). Upper-triangular blocks of ``chunk`` rows each; intersections
    by popcount or by matmul (:func:`_use_popcount`)."""
    intra = torch.zeros(k, dtype=torch.float64)
    inter = torch.zeros((), dtype=torch.float64)
    n = rows.shape[0]
    if _use_popcount(min(n, chunk), min(n, chunk)):
        load, product = (lambda r: _words_np(bits, r)), _popcount_inter
    else:
        dt = _matmul_dtype(bits)
        load, product = (lambda r: _unpack_bits(bits[r], dt)), (lambda x, y: x @ y.T)
    for a0 in range(0, n, chunk):
        ia = rows[a0:a0 + chunk]
        a, la = load(ia), lab[ia]
        for b0 in range(a0, n, chunk):
            ib = rows[b0:b0 + chunk]
            b = a if b0 == a0 else load(ib)
            iou = _iou_from_inter(product(a, b).double(), counts[ia], counts[ib])
            same = la.unsqueeze(1) == lab[ib].unsqueeze(0)
            if b0 == a0:
                iou = iou * torch.ones_like(same).triu_(1)
            intra.index_add_(0, la, torch.where(same, iou, 0.0).sum(1))
            inter += torch.where(same, 0.0, iou).sum()
            del b
    return intra, inter


def _sample_pairs(lab: torch.Tensor, k: int, m: int, seed: int):
    """Yield batches ``(i, j)`` of ``m`` ordered different-class pairs in all, uniform and independent (with
    replacement), seeded: the same pairs for the same labels, ``m`` and ``seed``.

    A draw ``r`` uniform in ``[0, S)`` (``S`` = the number of ordered different-class pairs) picks ``i`` by the
    cumulative partner counts ``N − n_{class(i)}`` and, with the remainder, one of ``i``'s partners ``j`` in the
    label-sorted order (skipping ``i``'s own class), so every ordered pair has probability exactly ``1 / S``.
    Memory: ``PAIR_DRAW`` pairs at a time, plus O(N)."""
    n = lab.shape[0]
    cnt = torch.bincount(lab, minlength=k)
    start = torch.cumsum(cnt, 0) - cnt
    order = torch.argsort(lab, stable=True)
    partners = n - cnt[lab]
    cum = torch.cumsum(partners, 0)
    gen = torch.Generator().manual_seed(int(seed))
    for s in range(0, m, PAIR_DRAW):
        r = torch.randint(0, int(cum[-1]), (min(PAIR_DRAW, m - s),), generator=gen, dtype=torch.int64)
        i = torch.searchsorted(cum, r, right=True)
        u = r - (cum[i] - partners[i])  # in [0, partners[i])
        ci = lab[i]
        pos = u + (u >= start[ci]).long() * cnt[ci]
        yield i, order[pos]


def _pair_intersections(bits: torch.Tensor, i: torch.Tensor, j: torch.Tensor, batch: int):
    """Yield ``(s, inter)`` per batch of pairs: int64 popcounts of ``bits[i[p]] & bits[j[p]]`` for the pairs
    ``p`` in ``[s, s + len(inter))``. NumPy gathers into zero-padded word buffers and counts with
    ``bitwise_count``; without it, torch gathers and counts with SWAR."""
    w = bits.shape[1]
    if _NP_COUNT is None:
        for s in range(0, i.shape[0], batch):
            x = bits.index_select(0, i[s:s + batch])
            x &= bits.index_select(0, j[s:s + batch])
            yield s, _popcount_words_(_as_words(x))
        return
    rows, ii, jj = bits.numpy(), i.numpy(), j.numpy()
    wide = w + (-w) % 8
    buf_a = _np.zeros((batch, wide), dtype=_np.uint8)
    buf_b = _np.zeros((batch, wide), dtype=_np.uint8)
    for s in range(0, ii.shape[0], batch):
        b = min(batch, ii.shape[0] - s)
        buf_a[:b, :w] = rows[ii[s:s + b]]
        buf_b[:b, :w] = rows[jj[s:s + b]]
        x = buf_a[:b].view(_np.uint64)
        x &= buf_b[:b].view(_np.uint64)
        yield s, torch.from_numpy(_NP_COUNT(x).sum(1, dtype=_np.int64))


def _pairs_iou_sum(bits: torch.Tensor, counts: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> float:
    """Sum of the IoU of the row pairs ``(i[p], j[p])``, popcounting ANDed packed rows in batches."""
    batch = max(1, PAIR_BATCH_BYTES // max(bits.shape[1], 1))
    total = torch.zeros((), dtype=torch.float64)
    for s, inter in _pair_intersections(bits, i, j, batch):
        n = inter.shape[0]
        total += _iou_from_inter(inter.double(), counts[i[s:s + n]], counts[j[s:s + n]]).sum()
    return float(total)


def _mean_or_nan(s: float, n: int) -> float:
    return s / n if n > 0 else float("nan")


class PackedPathways:
    """Per-sample pathways (bool ``[N, C]`` per unit) packed one row of ``W = ceil(D / 8)`` bytes per sample.

    Rows live on the CPU, appended in chunks and concatenated on first use of :attr:`bits`. See the module
    docstring for the layout and bit order."""

    def __init__(self, units: Sequence[str], channels: Sequence[int]):
        units, channels = list(units), [_as_int(c) for c in channels]
        problem = _layout_problem(units, channels)
        if problem:
            raise ValueError(problem)
        self._units: Tuple[str, ...] = tuple(units)
        self._channels: Tuple[int, ...] = tuple(channels)
        self._offsets: List[int] = [0]
        for c in channels:
            self._offsets.append(self._offsets[-1] + c)
        self._width = (self._offsets[-1] + 7) // 8
        self._chunks: List[torch.Tensor] = []
        self._n = 0

    # --- layout --------------------------------------------------------------------------------------------------

    @property
    def units(self) -> List[str]:
        return list(self._units)

    @property
    def channels(self) -> List[int]:
        return list(self._channels)

    @property
    def num_channels(self) -> int:
        """``D``: channels over all units."""
        return self._offsets[-1]

    @property
    def width(self) -> int:
        """``W = ceil(D / 8)``: bytes per packed row."""
        return self._width

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed rows."""
        return sum(c.numel() for c in self._chunks)

    @property
    def bits(self) -> torch.Tensor:
        """The packed rows, ``uint8 [N, W]`` (CPU, contiguous)."""
        if not self._chunks:
            return torch.zeros(0, self._width, dtype=torch.uint8)
        if len(self._chunks) > 1:
            self._chunks = [torch.cat(self._chunks, 0)]
        return self._chunks[0]

    def chunk_rows(self) -> int:
        """Rows per unpacked chunk in the metrics: about ``CHUNK_ELEMS`` values per chunk, at least 1."""
        return max(1, CHUNK_ELEMS // max(8 * self._width, 1))

    def __repr__(self) -> str:
        return f"PackedPathways(N={self._n}, units={len(self._units)}, D={self.num_channels}, nbytes={self.nbytes})"

    # --- building ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pathway(cls, pathway: Mapping[str, torch.Tensor],
                     units: Optional[Sequence[str]] = None) -> "PackedPathways":
        """A store holding ``pathway`` (per-sample masks ``[N, C]``; units in ``units`` order, default all)."""
        names = list(pathway) if units is None else list(units)
        for name in names:
            if name not in pathway:
                raise ValueError(f"the pathway has no unit {name!r}")
            if pathway[name].dim() != 2:
                raise ValueError(f"mask of unit {name!r} is shared ([C]); per-sample masks [N, C] are needed here")
        store = cls(names, [int(pathway[n].shape[1]) for n in names])
        store.append(pathway)
        return store

    def append(self, pathway: Mapping[str, torch.Tensor]) -> None:
        """Pack a batch of per-sample masks (bool, or 0/1 numbers read as ``mask != 0``; ``[b, C]`` per unit, any
        device; other keys are ignored) and keep the packed rows on the CPU."""
        rows, b, device = [], None, None
        for name, c in zip(self._units, self._channels):
            if name not in pathway:
                raise ValueError(f"the pathway has no unit {name!r}")
            m = pathway[name]
            if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[1] != c:
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"mask of unit {name!r} must be [b, {c}], got {shape}")
            b = m.shape[0] if b is None else b
            if m.shape[0] != b:
                raise ValueError(f"mask of unit {name!r} has {m.shape[0]} rows, the others {b}")
            device = m.device if device is None else device
            rows.append(m.to(device).bool())
        packed = _pack_flat(torch.cat(rows, 1), self._width).cpu()
        if b:
            self._chunks.append(packed.contiguous())
            self._n += b

    # --- reading -------------------------------------------------------------------------------------------------

    def _rows(self, idx: Index) -> torch.Tensor:
        if idx is None:
            return self.bits
        rows = self.bits[idx]
        return rows.unsqueeze(0) if rows.dim() == 1 else rows

    def unpack(self, idx: Index = None) -> Dict[str, torch.Tensor]:
        """Bool masks ``{unit: [n, C]}`` of all rows, or of the rows ``idx`` (LongTensor, slice, list or int)."""
        flat = _unpack_bits(self._rows(idx))
        return {u: flat[:, a:z].contiguous() for u, a, z in zip(self._units, self._offsets, self._offsets[1:])}

    def density_per_sample(self) -> torch.Tensor:
        """float64 ``[N]``: each sample's fraction of kept channels over all units."""
        return popcount_rows(self.bits).double() / self.num_channels

    def density_stats(self) -> Dict[str, object]:
        """Equal to :func:`.metrics.density_stats` of the unpacked pathway (in row chunks)."""
        bits, n = self.bits, self._n
        col = torch.zeros(8 * self._width, dtype=torch.int64)
        step = self.chunk_rows()
        for s in range(0, n, step):
            col += _unpack_bits(bits[s:s + step]).sum(0, dtype=torch.int64)
        per_sample = self.density_per_sample()
        per_unit = {}
        for u, a, z in zip(self._units, self._offsets, self._offsets[1:]):
            total = n * (z - a)
            per_unit[u] = int(col[a:z].sum()) / total if total else float("nan")
        return {
            "density_mean": float(per_sample.mean()),
            "density_std": float(per_sample.std(unbiased=False)) if n > 1 else 0.0,
            "density_per_unit": per_unit,
        }

    def class_iou(self, labels, num_classes: Optional[int] = None, max_pairs: Optional[int] = 2_000_000,
                  seed: int = 0) -> Dict[str, object]:
        """``{"acIOU", "inter_class_iou", "acIOU_pairs", "inter_class_pairs", "inter_class_exact"}``.

        acIOU is exact: the mean over classes (those with ≥ 2 samples) of the mean IoU of their same-class pairs.
        inter_class_iou is the exact mean over all different-class pairs when there are at most ``max_pairs`` of
        them (``None``: always exact), otherwise the mean over ``max_pairs`` different-class pairs drawn
        uniformly with replacement (seeded by ``seed``, deterministic). Pair counts are unordered pairs (i < j),
        or the number of drawn pairs when sampled. Equal to :func:`.metrics.class_iou` on the exact paths."""
        n = self._n
        lab, k = _labels(labels, n, num_classes)
        cnt = torch.bincount(lab, minlength=k) if n else torch.zeros(k, dtype=torch.int64)
        same_pairs = int((cnt * (cnt - 1) // 2).sum())
        diff_pairs = n * (n - 1) // 2 - same_pairs
        exact = max_pairs is None or diff_pairs <= max_pairs
        if not exact and max_pairs < 1:
            raise ValueError(f"max_pairs must be ≥ 1 or None, got {max_pairs}")
        bits, counts, chunk = self.bits, popcount_rows(self.bits), self.chunk_rows()
        if exact:
            intra, inter = _block_sums(bits, counts, torch.arange(n), lab, k, chunk)
            inter_mean, inter_n = _mean_or_nan(float(inter), diff_pairs), diff_pairs
        else:
            intra = torch.zeros(k, dtype=torch.float64)
            order = torch.argsort(lab, stable=True)
            ends = torch.cumsum(cnt, 0).tolist()
            for c in range(k):
                if int(cnt[c]) > 1:
                    rows = order[ends[c] - int(cnt[c]):ends[c]]
                    intra += _block_sums(bits, counts, rows, lab, k, chunk)[0]
            total = sum(_pairs_iou_sum(bits, counts, i, j) for i, j in _sample_pairs(lab, k, int(max_pairs), seed))
            inter_mean, inter_n = total / int(max_pairs), int(max_pairs)
        has = cnt > 1
        class_pairs = (cnt * (cnt - 1) // 2).double()
        ac = float((intra[has] / class_pairs[has]).mean()) if bool(has.any()) else float("nan")
        return {"acIOU": ac, "inter_class_iou": inter_mean, "acIOU_pairs": same_pairs,
                "inter_class_pairs": inter_n, "inter_class_exact": bool(exact)}

    # --- saving --------------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        """Plain tensors and lists, loadable with ``torch.load(weights_only=True)``; see :meth:`from_state`."""
        return {"format": FORMAT, "units": list(self._units), "channels": list(self._channels), "bits": self.bits}

    @classmethod
    def from_state(cls, d: object, source: str) -> "PackedPathways":
        """The store saved by :meth:`state_dict`, checked: a one-line ValueError naming ``source`` and the first
        problem (not a dict, wrong format tag, wrong types, duplicate units, negative channel counts, ``bits`` not
        ``uint8 [N, ceil(D / 8)]``, nonzero padding bits)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a dict (a packed pathway store), got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: format tag is {d.get('format')!r}, expected {FORMAT!r}")
        for key in ("units", "channels", "bits"):
            if key not in d:
                raise ValueError(f"{source}: missing key {key!r}")
        problem = _layout_problem(d["units"], d["channels"])
        if problem:
            raise ValueError(f"{source}: {problem}")
        store = cls(d["units"], d["channels"])
        bits, w, dim = d["bits"], store.width, store.num_channels
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8:
            got = bits.dtype if isinstance(bits, torch.Tensor) else type(bits).__name__
            raise ValueError(f"{source}: 'bits' must be a uint8 tensor, got {got}")
        if bits.dim() != 2 or bits.shape[1] != w:
            raise ValueError(f"{source}: 'bits' has shape {tuple(bits.shape)}, expected [N, {w}] for {dim} channels")
        if dim % 8 and bits.shape[0]:
            bad = int(((bits[:, -1] >> (dim % 8)) != 0).sum())
            if bad:
                raise ValueError(f"{source}: {bad} row(s) have nonzero padding bits (bits {dim} to {8 * w - 1})")
        if bits.shape[0]:
            store._chunks = [bits.detach().cpu().contiguous()]
            store._n = bits.shape[0]
        return store
