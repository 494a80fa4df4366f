"""The packed-bit pathway store (gencnp_fast.evaluation.packed): packing round trips, metrics equal to the dense
ones in gencnp_fast.evaluation.metrics, the saved form and its checks, and bounded memory."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from gencnp_fast.evaluation import metrics
from gencnp_fast.evaluation import packed as packed_mod
from gencnp_fast.evaluation.packed import FORMAT, PackedPathways, iou_rows, popcount_rows

CHANNELS = [1, 3, 7, 8, 9, 64, 513]
UNITS = [f"layer{i}" for i in range(len(CHANNELS))]


def _pathway(n, seed=0, channels=CHANNELS, units=UNITS, p=0.4):
    g = torch.Generator().manual_seed(seed)
    pw = {u: torch.rand(n, c, generator=g) < p for u, c in zip(units, channels)}
    pw[units[1]][:] = False  # a unit that keeps nothing
    pw[units[3]][:] = True  # a unit that keeps everything
    return pw


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=[False, True], ids=["numpy-popcount", "swar-popcount"])
def popcount_impl(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(packed_mod, "_NP_COUNT", None)
    elif packed_mod._NP_COUNT is None:
        pytest.skip("this NumPy has no bitwise_count")
    return request.param


# --- packing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 37])
def test_round_trip_bool_and_float(n):
    pw = _pathway(n, seed=n)
    for source in (pw, {u: m.float() for u, m in pw.items()}, {u: m.double() for u, m in pw.items()}):
        store = PackedPathways.from_pathway(source, UNITS)
        d = sum(CHANNELS)
        assert len(store) == n and store.units == UNITS and store.channels == CHANNELS
        assert store.bits.dtype == torch.uint8 and store.bits.shape == (n, (d + 7) // 8)
        assert store.nbytes == n * ((d + 7) // 8)
        back = store.unpack()
        assert _equal(back, pw) and all(m.dtype == torch.bool for m in back.values())


def test_bit_order_is_lsb_first_and_padding_is_zero():
    channels = [3, 7]  # D = 10: byte 0 holds channels 0..7, byte 1 holds 8, 9 and six padding bits
    pw = {"a": torch.tensor([[True, False, False]]),
          "b": torch.tensor([[False, True, False, False, False, True, True]])}
    store = PackedPathways.from_pathway(pw, ["a", "b"])
    flat = metrics.flatten_pathway(pw, ["a", "b"])[0]
    expect = [sum(int(flat[8 * byte + k]) << k for k in range(8) if 8 * byte + k < 10) for byte in range(2)]
    assert store.bits[0].tolist() == expect == [0b00010001, 0b00000011]
    assert store.channels == channels


def test_chunked_appends_equal_one_shot():
    pw = _pathway(37, seed=3)
    one = PackedPathways.from_pathway(pw, UNITS)
    parts = PackedPathways(UNITS, CHANNELS)
    for a, z in [(0, 1), (1, 1), (1, 17), (17, 18), (18, 37)]:  # includes an empty batch
        parts.append({u: pw[u][a:z] for u in UNITS})
    assert len(parts) == 37 and len(parts._chunks) == 4
    assert torch.equal(parts.bits, one.bits) and len(parts._chunks) == 1
    assert _equal(parts.unpack(), pw)


def test_unpack_rows_and_empty_store():
    pw = _pathway(37, seed=4)
    store = PackedPathways.from_pathway(pw, UNITS)
    idx = torch.tensor([36, 0, 5, 5])
    assert _equal(store.unpack(idx), {u: m[idx] for u, m in pw.items()})
    assert _equal(store.unpack(slice(3, 9)), {u: m[3:9] for u, m in pw.items()})
    assert _equal(store.unpack(7), {u: m[7:8] for u, m in pw.items()})
    empty = PackedPathways(UNITS, CHANNELS)
    assert len(empty) == 0 and empty.bits.shape == (0, (sum(CHANNELS) + 7) // 8) and empty.nbytes == 0
    assert all(m.shape == (0, c) for m, c in zip(empty.unpack().values(), CHANNELS))


def test_append_and_constructor_errors():
    store = PackedPathways(["a", "b"], [3, 5])
    with pytest.raises(ValueError, match="no unit 'b'"):
        store.append({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"must be \[b, 5\]"):
        store.append({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match=r"must be \[b, 5\]"):
        store.append({"a": torch.zeros(2, 3), "b": torch.zeros(5)})
    with pytest.raises(ValueError, match="has 3 rows"):
        store.append({"a": torch.zeros(2, 3), "b": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="shared"):
        PackedPathways.from_pathway({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="duplicate unit 'a'"):
        PackedPathways(["a", "a"], [1, 2])
    with pytest.raises(ValueError, match="negative"):
        PackedPathways(["a"], [-1])
    with pytest.raises(ValueError, match="no units"):
        PackedPathways([], [])
    assert len(store) == 0


def test_popcounts_and_iou_rows(popcount_impl):
    pw = _pathway(37, seed=5)
    store = PackedPathways.from_pathway(pw, UNITS)
    flat = metrics.flatten_pathway(pw, UNITS)
    assert torch.equal(popcount_rows(store.bits), flat.sum(1))
    assert torch.equal(popcount_rows(store.bits, chunk=4), flat.sum(1))
    assert torch.equal(iou_rows(store.bits[:10], store.bits), metrics.iou_matrix(flat[:10], flat))


def test_popcount_or_matmul_choice(monkeypatch):
    if packed_mod._NP_COUNT is None:
        pytest.skip("this NumPy has no bitwise_count")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert packed_mod._use_popcount(50, 50) and packed_mod._use_popcount(1000, 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert packed_mod._use_popcount(50, 50) and not packed_mod._use_popcount(1000, 1000)
    monkeypatch.setattr(packed_mod, "_NP_COUNT", None)
    assert not packed_mod._use_popcount(50, 50)


# --- metrics --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 37])
def test_density_stats_equal_dense(n, monkeypatch):
    monkeypatch.setattr(packed_mod, "CHUNK_ELEMS", 8 * 80)  # 1 row per chunk: exercises the chunk loop
    pw = _pathway(n, seed=10 + n)
    store = PackedPathways.from_pathway(pw, UNITS)
    got, want = store.density_stats(), metrics.density_stats(pw, UNITS)
    assert set(got) == set(want)
    assert got["density_mean"] == pytest.approx(want["density_mean"], abs=1e-12)
    assert got["density_std"] == pytest.approx(want["density_std"], abs=1e-12)
    assert got["density_per_unit"] == want["density_per_unit"]
    flat = metrics.flatten_pathway(pw, UNITS).double()
    assert torch.allclose(store.density_per_sample(), flat.mean(1), rtol=0, atol=1e-15)


def _labels_with_singleton_and_empty(n, seed):
    """Classes 0..3 at random, class 4 with one sample, class 5 with none (num_classes = 6)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    labels[n // 2] = 4
    return labels


@pytest.mark.parametrize("chunk_elems", [1 << 22, 8 * 80 * 5])  # one chunk; 5-row chunks
def test_class_iou_equals_dense(chunk_elems, popcount_impl, monkeypatch):
    monkeypatch.setattr(packed_mod, "CHUNK_ELEMS", chunk_elems)
    pw = _pathway(37, seed=20)
    for u in UNITS:  # two empty rows (IoU 1) of different classes, and one of them with a same-class partner
        pw[u][[3, 4]] = False
    labels = _labels_with_singleton_and_empty(37, seed=21)
    labels[3], labels[4], labels[5] = 0, 1, 1
    store = PackedPathways.from_pathway(pw, UNITS)
    want = metrics.class_iou(pw, labels, UNITS, num_classes=6)
    got = store.class_iou(labels, num_classes=6)
    assert got["inter_class_exact"] is True
    assert got["acIOU"] == pytest.approx(want["acIOU"], abs=1e-12)
    assert got["inter_class_iou"] == pytest.approx(want["inter_class_iou"], abs=1e-12)
    counts = torch.bincount(labels, minlength=6)
    same = int((counts * (counts - 1) // 2).sum())
    assert got["acIOU_pairs"] == same and got["inter_class_pairs"] == 37 * 36 // 2 - same
    assert store.class_iou(labels.tolist())["acIOU"] == pytest.approx(want["acIOU"], abs=1e-12)  # num_classes=None
    json.dumps(got)


def test_class_iou_exact_up_to_max_pairs(popcount_impl):
    pw = _pathway(37, seed=30)
    labels = _labels_with_singleton_and_empty(37, seed=31)
    store = PackedPathways.from_pathway(pw, UNITS)
    diff = store.class_iou(labels, 6)["inter_class_pairs"]
    want = metrics.class_iou(pw, labels, UNITS, 6)
    at = store.class_iou(labels, 6, max_pairs=diff)
    below = store.class_iou(labels, 6, max_pairs=diff - 1)
    assert at["inter_class_exact"] and at["inter_class_iou"] == pytest.approx(want["inter_class_iou"], abs=1e-12)
    assert not below["inter_class_exact"] and below["inter_class_pairs"] == diff - 1
    assert below["acIOU"] == pytest.approx(want["acIOU"], abs=1e-12)  # acIOU stays exact
    assert store.class_iou(labels, 6, max_pairs=None)["inter_class_exact"]


def test_class_iou_sampled_is_close_and_deterministic(popcount_impl):
    n = 240
    g = torch.Generator().manual_seed(40)
    pw = {u: torch.rand(n, c, generator=g) < torch.rand(n, 1, generator=g) for u, c in zip(UNITS, CHANNELS)}
    labels = torch.randint(0, 7, (n,), generator=g)
    store = PackedPathways.from_pathway(pw, UNITS)
    exact = metrics.class_iou(pw, labels, UNITS, 7)
    flat = metrics.flatten_pathway(pw, UNITS)
    diff = labels[:, None] != labels[None, :]
    spread = float(metrics.iou_matrix(flat)[diff].std())
    m = 20_000
    got = store.class_iou(labels, 7, max_pairs=m, seed=3)
    assert got["inter_class_exact"] is False and got["inter_class_pairs"] == m
    assert got["acIOU"] == pytest.approx(exact["acIOU"], abs=1e-12)
    assert abs(got["inter_class_iou"] - exact["inter_class_iou"]) < 5 * spread / math.sqrt(m)
    assert store.class_iou(labels, 7, max_pairs=m, seed=3) == got
    assert store.class_iou(labels, 7, max_pairs=m, seed=4)["inter_class_iou"] != got["inter_class_iou"]


def test_sampled_pairs_are_uniform_over_different_class_pairs():
    labels = torch.tensor([2, 0, 2, 1, 2, 2, 1, 2])  # class sizes 1, 2, 5: 17 unordered different-class pairs
    batches = list(packed_mod._sample_pairs(labels, 3, 170_000, seed=0))
    assert [len(i) for i, _ in batches] == [65536, 65536, 38928]
    i, j = torch.cat([i for i, _ in batches]), torch.cat([j for _, j in batches])
    assert bool((labels[i] != labels[j]).all())
    pairs = torch.minimum(i, j) * 8 + torch.maximum(i, j)
    freq = torch.bincount(pairs, minlength=64)
    hit = freq[freq > 0]
    assert hit.numel() == 17
    assert int((hit - 10_000).abs().max()) < 600  # ± 6 σ of a binomial(170000, 1/17)


def test_class_iou_edge_cases():
    pw = _pathway(5, seed=50)
    store = PackedPathways.from_pathway(pw, UNITS)
    one_class = store.class_iou(torch.zeros(5, dtype=torch.long))
    assert math.isnan(one_class["inter_class_iou"]) and one_class["inter_class_pairs"] == 0
    assert one_class["inter_class_exact"] is True
    all_distinct = store.class_iou(torch.arange(5))
    assert math.isnan(all_distinct["acIOU"]) and all_distinct["acIOU_pairs"] == 0
    empty = PackedPathways(UNITS, CHANNELS).class_iou(torch.zeros(0, dtype=torch.long))
    assert math.isnan(empty["acIOU"]) and math.isnan(empty["inter_class_iou"])
    with pytest.raises(ValueError, match="shape"):
        store.class_iou(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        store.class_iou(torch.zeros(5))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        store.class_iou(torch.tensor([0, 1, 2, 0, 1]), num_classes=2)
    with pytest.raises(ValueError, match="max_pairs"):
        store.class_iou(torch.arange(5), max_pairs=0)


# --- saving ---------------------------------------------------------------------------------------------------------


def test_state_round_trip(tmp_path):
    pw = _pathway(37, seed=60)
    store = PackedPathways.from_pathway(pw, UNITS)
    path = tmp_path / "pathways.pt"
    state = store.state_dict()
    assert state["format"] == FORMAT == "gencnp_fast.packed/1" and state["bits"].dtype == torch.uint8
    torch.save(state, path)
    back = PackedPathways.from_state(torch.load(path, weights_only=True), str(path))
    assert back.units == UNITS and back.channels == CHANNELS and torch.equal(back.bits, store.bits)
    assert _equal(back.unpack(), pw)
    torch.save(PackedPathways(UNITS, CHANNELS).state_dict(), path)
    assert len(PackedPathways.from_state(torch.load(path, weights_only=True), str(path))) == 0


def _state(**changes):
    d = PackedPathways.from_pathway({"a": torch.ones(2, 3, dtype=torch.bool), "b": torch.ones(2, 2)}).state_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("state, problem", [
    ([1, 2], "expected a dict"),
    (_state(format="gencnp_fast.packed/0"), "format tag"),
    ({k: v for k, v in _state().items() if k != "bits"}, "missing key 'bits'"),
    (_state(units="ab"), "'units' must be a list of str"),
    (_state(units=["a", 2]), "'units' must be a list of str"),
    (_state(channels=[3.0, 2]), "'channels' must be a list of int"),
    (_state(channels=[3, True]), "'channels' must be a list of int"),
    (_state(channels=[3]), "2 units but 1 channel counts"),
    (_state(units=["a", "a"]), "duplicate unit 'a'"),
    (_state(units=["a", "b", "c"], channels=[3, 2, -1]), "negative channel count"),
    (_state(bits=[[31], [31]]), "'bits' must be a uint8 tensor"),
    (_state(bits=torch.full((2, 1), 31, dtype=torch.int64)), "'bits' must be a uint8 tensor"),
    (_state(bits=torch.full((2, 2), 31, dtype=torch.uint8)), r"expected \[N, 1\] for 5 channels"),
    (_state(bits=torch.full((2,), 31, dtype=torch.uint8)), r"expected \[N, 1\]"),
    (_state(bits=torch.tensor([[31], [32]], dtype=torch.uint8)), "1 row\\(s\\) have nonzero padding bits"),
])
def test_from_state_errors(state, problem, tmp_path):
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        PackedPathways.from_state(torch.load(path, weights_only=True), str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert re.search(problem, msg), msg


# --- memory ---------------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from gencnp_fast.evaluation import packed
    from gencnp_fast.evaluation.packed import PackedPathways
    n, d, k = 3000, 26000, 50
    g = torch.Generator().manual_seed(0)
    store = PackedPathways(["a", "b"], [d - 1000, 1000])
    w = store.width
    bits = torch.randint(0, 256, (n, w), dtype=torch.uint8, generator=g)
    store = PackedPathways.from_state(dict(store.state_dict(), bits=bits), "generated")
    part = PackedPathways.from_state(dict(store.state_dict(), bits=bits[:800].clone()), "generated")
    labels = torch.arange(n) % k
    small = PackedPathways.from_state(dict(store.state_dict(), bits=bits[:64].clone()), "generated")
    small.class_iou(labels[:64], k, max_pairs=None)  # warm up the allocator and the BLAS buffers
    small.class_iou(labels[:64], k, max_pairs=100)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base, growth, flags = rss(), {}, []
    for name, numpy_count in (("exact_popcount", True), ("exact_matmul", False)):
        packed._NP_COUNT = getattr(packed._np, "bitwise_count", None) if numpy_count else None
        # the exact all-pairs path on 800 rows: the same row chunks as N = 3,000, fewer of them
        flags.append(part.class_iou(labels[:800], k, max_pairs=None)["inter_class_exact"])
        growth[name] = rss() - base
    packed._NP_COUNT = getattr(packed._np, "bitwise_count", None)
    flags.append(store.class_iou(labels, k, max_pairs=1_000_000)["inter_class_exact"])  # 4.4M pairs: 1M sampled
    growth["sampled"] = rss() - base
    json.dump({"growth": growth, "flags": flags, "chunk_rows": store.chunk_rows(), "width": w}, sys.stdout)
""")


def test_class_iou_memory_is_bounded():
    """N = 3,000, D = 26,000: the dense [N, D] float32 pathway alone would be 312 MB. The exact all-pairs path
    runs on 800 of the rows (same chunk size, fewer chunks: its peak does not grow with N) to stay fast."""
    n, d = 3000, 26000
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["flags"] == [True, True, False]
    assert r["chunk_rows"] * 8 * r["width"] * 4 <= n * d * 4 / 16  # an unpacked chunk is ≤ 1/16 of [N, D] float32
    # peak growth (two unpacked chunks and the BLAS buffers for the matmul, about 70 MB) far below the dense
    # [N, D] float32 pathway (312 MB; 5.2 GB at N = 50,000, where these chunks stay the same)
    assert max(r["growth"].values()) < n * d * 4 / 3, r
