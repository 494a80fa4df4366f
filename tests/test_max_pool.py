"""The compiled pooling op ``gencnp_fast::max_pool2d`` (its CPU float32 kernel; ATen's for other dtypes) against
``F.max_pool2d``: exact values, NaN and infinities as torch gives them, every kernel / stride / padding of a plan's
pools, the vectorised stride-2 path and its edges, odd and tiny sizes, empty batches, non-contiguous inputs, clear
errors; and the plan's pooling step (``StridedMaxPool``) on both of its paths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gencnp_fast.ops  # noqa: F401  (registers the op)
from gencnp_fast.plan.lowering import StridedMaxPool


def pool(x, k, s, p):
    return torch.ops.gencnp_fast.max_pool2d(x, list(k), list(s), list(p))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN, equal shapes."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.nan_to_num(a, nan=0.0, posinf=1e30, neginf=-1e30), torch.nan_to_num(b, nan=0.0, posinf=1e30, neginf=-1e30))


def specials(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` with a few NaN, +inf and -inf values at random places."""
    g = torch.Generator().manual_seed(seed)
    flat = x.view(-1)
    if flat.numel():
        for v in (float("nan"), float("inf"), float("-inf")):
            flat[torch.randint(flat.numel(), (max(1, flat.numel() // 200),), generator=g)] = v
    return x


@pytest.mark.parametrize("shape,k,s,p", [
    ((8, 16, 112, 112), (3, 3), (2, 2), (1, 1)),   # ResNet stem
    ((2, 16, 224, 224), (2, 2), (2, 2), (0, 0)),   # VGG block pools
    ((3, 5, 56, 56), (2, 2), (2, 2), (0, 0)),
    ((3, 5, 28, 28), (2, 2), (2, 2), (0, 0)),
    ((2, 3, 57, 75), (3, 3), (2, 2), (1, 1)),      # odd sizes: vector blocks plus scalar tails
    ((2, 3, 70, 97), (2, 2), (2, 2), (0, 0)),
    ((1, 2, 41, 66), (3, 2), (2, 2), (1, 1)),      # kw = 2, kh = 3
    ((1, 2, 9, 40), (3, 3), (1, 1), (1, 1)),
    ((1, 2, 9, 11), (5, 5), (3, 2), (2, 2)),
    ((1, 1, 1, 1), (1, 1), (1, 1), (0, 0)),
    ((1, 1, 3, 3), (3, 3), (1, 1), (0, 0)),        # one output
    ((2, 1, 2, 35), (2, 3), (2, 2), (1, 1)),
    # 2x2 stride-2 pools over the whole tensor (W = 2 ... 32): VGG-16-BN's maps, a last partial
    # block of 16 outputs, outputs only in the tail, odd H (the row path)
    ((3, 5, 32, 32), (2, 2), (2, 2), (0, 0)),
    ((3, 7, 16, 16), (2, 2), (2, 2), (0, 0)),
    ((2, 5, 8, 8), (2, 2), (2, 2), (0, 0)),
    ((3, 3, 4, 4), (2, 2), (2, 2), (0, 0)),
    ((5, 3, 2, 2), (2, 2), (2, 2), (0, 0)),
    ((1, 3, 10, 32), (2, 2), (2, 2), (0, 0)),
    ((1, 3, 6, 16), (2, 2), (2, 2), (0, 0)),
    ((2, 3, 6, 4), (2, 2), (2, 2), (0, 0)),
    ((1, 1, 2, 2), (2, 2), (2, 2), (0, 0)),
    ((2, 3, 7, 16), (2, 2), (2, 2), (0, 0)),
])
def test_matches_torch(shape, k, s, p):
    x = specials(torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))), seed=len(shape))
    assert same(pool(x, k, s, p), F.max_pool2d(x, k, s, p))


@settings(max_examples=150, deadline=None)
@given(b=st.integers(0, 3), c=st.integers(1, 4), h=st.integers(1, 40), w=st.integers(1, 80),
       kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 2), pw=st.integers(0, 2), seed=st.integers(0, 10 ** 6), nan=st.booleans())
def test_random_geometry(b, c, h, w, kh, kw, sh, sw, ph, pw, seed, nan):
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    if nan:
        specials(x, seed)
    assert same(pool(x, (kh, kw), (sh, sw), (ph, pw)), F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw)))


def test_non_contiguous_and_all_equal_inputs():
    x = torch.randn(2, 6, 30, 48).permute(0, 1, 3, 2)  # not contiguous
    assert same(pool(x, (3, 3), (2, 2), (1, 1)), F.max_pool2d(x, 3, 2, 1))
    x = torch.randn(2, 8, 30, 40).to(memory_format=torch.channels_last)
    assert same(pool(x, (2, 2), (2, 2), (0, 0)), F.max_pool2d(x, 2, 2, 0))
    x = torch.full((1, 2, 9, 64), float("-inf"))
    assert same(pool(x, (3, 3), (2, 2), (1, 1)), F.max_pool2d(x, 3, 2, 1))
    x = torch.full((1, 2, 9, 64), float("nan"))
    assert pool(x, (2, 2), (2, 2), (0, 0)).isnan().all()


@pytest.mark.parametrize("threads", [1, 2])
def test_same_result_on_any_thread_count(threads):
    x = specials(torch.randn(4, 7, 37, 53), seed=3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = pool(x, (3, 3), (2, 2), (1, 1))
    finally:
        torch.set_num_threads(old)
    assert same(got, F.max_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("x,k,s,p,match", [
    (torch.randn(2, 8, 8), (2, 2), (2, 2), (0, 0), r"\[B, C, H, W\]"),
    (torch.randn(1, 2, 8, 8), (2, 2), (2, 2), (2, 2), "at most half the kernel"),
    (torch.randn(1, 2, 8, 8), (0, 2), (2, 2), (0, 0), "kernel must be >= 1"),
    (torch.randn(1, 2, 8, 8), (2, 2), (0, 2), (0, 0), "stride must be >= 1"),
    (torch.randn(1, 2, 8, 8), (2, 2), (2, 2), (-1, 0), "padding must be >= 0"),
    (torch.randn(1, 2, 3, 8), (5, 3), (1, 1), (0, 1), "smaller than the kernel"),
])
def test_bad_input_raises(x, k, s, p, match):
    with pytest.raises(RuntimeError, match=match):
        pool(x, k, s, p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_atens_max_pool(dtype):
    x = specials(torch.randn(2, 3, 17, 20), seed=5).to(dtype)
    for k, s, p in [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0))]:
        got = pool(x, k, s, p)
        assert got.dtype == dtype and same(got.float(), F.max_pool2d(x, k, s, p).float())


def test_opcheck():
    x = torch.randn(2, 3, 17, 21)
    torch.library.opcheck(torch.ops.gencnp_fast.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plan_pooling_step_both_paths(dtype):
    """The plan's pooling step: the compiled op for CPU float32, strided maxima otherwise; both exact."""
    x = specials(torch.randn(3, 5, 33, 46, dtype=dtype), seed=7)
    for k, s, p in [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 3), (1, 0))]:
        assert same(StridedMaxPool(k, s, p)(x), F.max_pool2d(x, k, s, p))
