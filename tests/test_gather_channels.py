"""The re-compaction op torch.ops.gencnp_fast.gather_channels: its CPU kernel (whole planes copied) and its ATen
implementation (CompositeExplicitAutograd: every other device) against a plain-torch oracle."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_GPU, skip_reason

pytestmark = pytest.mark.skipif(skip_reason("cpu") is not None, reason=f"cpu: {skip_reason('cpu')}")

IMPLS = ["cpu_kernel", "aten"] + (["aten_cuda"] if HAS_GPU else [])


def oracle(x, take, keep):
    out = x.new_zeros((x.shape[0], take.shape[1]) + tuple(x.shape[2:]))
    for b in range(x.shape[0]):
        r = 0 if take.shape[0] == 1 else b
        for j in range(take.shape[1]):
            if keep is None or keep[r, j]:
                out[b, j] = x[b, take[r, j]]
    return out


def call(impl, x, take, keep):
    op = torch.ops.gencnp_fast.gather_channels.default
    if impl == "cpu_kernel":
        return op(x, take, keep)
    if impl == "aten":
        return op._op_dk("CompositeExplicitAutograd", x, take, keep)
    dev = "cuda"
    return op(x.to(dev), take.to(dev), None if keep is None else keep.to(dev)).cpu()


def problem(b, k, w, spatial, rows, with_keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, k) + spatial, generator=g)
    take = torch.randint(0, max(k, 1), (rows, w), generator=g) if k else torch.zeros(rows, w, dtype=torch.long)
    keep = (torch.rand(rows, w, generator=g) < 0.7).to(torch.uint8) if with_keep or not k else None
    if not k:
        keep.zero_()
    return x, take, keep


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spatial", [(5, 7), (), (3,)])
@pytest.mark.parametrize("rows", ["one", "per_sample"])
@pytest.mark.parametrize("with_keep", [True, False])
@pytest.mark.parametrize("b,k,w", [(4, 6, 5), (1, 3, 8), (3, 0, 2), (2, 5, 0), (0, 4, 3)])
def test_matches_oracle(impl, spatial, rows, with_keep, b, k, w):
    x, take, keep = problem(b, k, w, spatial, 1 if rows == "one" or b == 0 else b, with_keep, seed=b * 10 + k + w)
    want = oracle(x, take, keep)
    got = call(impl, x, take, keep)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_absent_channels_are_exact_zeros(impl):
    """An absent entry is 0 even when its take points at a NaN or inf (no multiply by a 0/1 mask)."""
    x = torch.randn(2, 3, 4, 4)
    x[:, 0] = float("nan")
    x[:, 1] = float("inf")
    take = torch.tensor([[0, 1, 2], [1, 0, 2]])
    keep = torch.tensor([[0, 0, 1], [0, 1, 1]], dtype=torch.uint8)
    got = call(impl, x, take, keep)
    assert torch.equal(got[:, 0], torch.zeros(2, 4, 4)) and torch.equal(got[0, 1], torch.zeros(4, 4))
    assert bool(torch.isnan(got[1, 1]).all())


def test_bad_inputs_are_refused():
    op = torch.ops.gencnp_fast.gather_channels
    x = torch.randn(3, 4, 2, 2)
    with pytest.raises(RuntimeError, match=r"take\[1, 0\] = 4 is out of range"):
        op(x, torch.tensor([[0, 1], [4, 0], [1, 1]]), None)
    op(x, torch.tensor([[0, 1], [4, 0], [1, 1]]), torch.tensor([[1, 1], [0, 1], [1, 1]], dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="rows"):
        op(x, torch.zeros(2, 2, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match="int64"):
        op(x, torch.zeros(1, 2, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="keep must be uint8"):
        op(x, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3, dtype=torch.uint8))


def test_opcheck():
    x, take, keep = problem(3, 5, 4, (3, 3), 3, True)
    torch.library.opcheck(torch.ops.gencnp_fast.gather_channels.default, (x, take, keep))
    torch.library.opcheck(torch.ops.gencnp_fast.gather_channels.default, (x, take[:1], None))
