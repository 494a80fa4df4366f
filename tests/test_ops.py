"""Tests of the compiled op torch.ops.gencnp_fast.gathered_conv2d (CPU kernel + fake kernel).

Oracles: gencnp_fast.ops.gathered_conv2d_reference (plain torch, per group) and plain F.conv2d
on densely scattered inputs. Float32 tolerance: ||a - b|| / ||b|| <= 1e-4.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

ops = pytest.importorskip("gencnp_fast.ops")
from gencnp_fast.ops import gathered_conv2d, gathered_conv2d_reference  # noqa: E402

from conv_problems import make_problem  # noqa: E402  (tests/conv_problems.py)

RTOL = 1e-4


def rel_err(a, b):
    a, b = a.double(), b.double()
    den = b.norm()
    num = (a - b).norm()
    if den == 0:
        return float(num)
    return float(num / den)


def dense_oracle(p):
    """F.conv2d on the densely scattered input, then gather the active outputs."""
    x, in_idx, weight, out_idx = p["x"], p["in_idx"].long(), p["weight"], p["out_idx"].long()
    B, Kin, H, W = x.shape
    C_in = weight.shape[1]
    dense = torch.zeros(B, C_in + 1, H, W, dtype=torch.float64)
    idx = torch.where(in_idx >= 0, in_idx, C_in)  # padding goes to a dummy channel
    dense.scatter_(1, idx[:, :, None, None].expand(B, Kin, H, W), x.double())
    y = F.conv2d(dense[:, :C_in], weight.double(), None if p["bias"] is None else p["bias"].double(),
                 p["stride"], p["padding"], p["dilation"])
    Kout = out_idx.shape[1]
    oidx = out_idx.clamp_min(0)
    out = y.gather(1, oidx[:, :, None, None].expand(B, Kout, y.shape[2], y.shape[3]))
    if p["residual"] is not None:
        out = out + p["residual"].double()
    if p["relu"]:
        out = out.relu()
    return out * (out_idx >= 0).double()[:, :, None, None]


def run_op(p):
    return gathered_conv2d(**p)


def check(p):
    out = run_op(p)
    ref = gathered_conv2d_reference(**p)
    dense = dense_oracle(p)
    assert out.shape == ref.shape == dense.shape
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= RTOL, rel_err(out, ref)
    assert rel_err(out, dense) <= RTOL, rel_err(out, dense)
    # padded output rows are exact zeros
    pad = (p["out_idx"] < 0)
    if pad.any():
        assert (out[pad] == 0).all()
    return out


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 0, 1), (1, 1, 0, 1), (1, 2, 0, 1),
    (5, 1, 2, 1), (7, 2, 3, 1), (5, 2, 1, 2),
])
def test_matches_reference_and_dense(sharing, k, stride, padding, dilation):
    g = torch.Generator().manual_seed(k * 100 + stride * 10 + padding + dilation)
    p = make_problem(6, 12, 10, 8, 7, 11, 9, k, sharing, stride, padding, dilation, gen=g)
    check(p)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_epilogue_variants(relu, residual, bias):
    p = make_problem(5, 20, 40, 12, 33, 6, 6, 3, "sample", relu=relu, residual=residual, bias=bias,
                     gen=torch.Generator().manual_seed(1))
    check(p)


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("Cin,Cout,Kin,Kout,H", [
    (64, 64, 16, 16, 32), (128, 128, 32, 32, 16), (256, 256, 64, 64, 8), (512, 512, 128, 128, 4),
    (512, 512, 128, 128, 2), (3, 64, 3, 16, 32),
])
def test_layer_shapes(sharing, Cin, Cout, Kin, Kout, H):
    g = torch.Generator().manual_seed(Cin + H)
    p = make_problem(12, Cin, Cout, Kin, Kout, H, H, 3, sharing, gen=g, n_in=Kin, n_out=Kout)
    check(p)


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
def test_linear_and_downsample(sharing):
    g = torch.Generator().manual_seed(2)
    # Linear 128 -> 10 as 1x1 conv on [B, K, 1, 1]
    p = make_problem(64, 512, 10, 128, 10, 1, 1, 1, sharing, padding=0, relu=False, residual=False, gen=g,
                     n_in=128, n_out=10)
    check(p)
    # ResNet 1x1 stride-2 downsample
    p = make_problem(16, 128, 256, 32, 64, 16, 16, 1, sharing, stride=2, padding=0, relu=False, gen=g)
    check(p)


def test_kin_zero_is_bias_plus_residual():
    p = make_problem(3, 8, 8, 0, 5, 4, 4, 3, "sample", n_in=0, n_out=5)
    out = check(p)
    o = p["out_idx"].long()
    expect = torch.relu(p["bias"][o][:, :, None, None] + p["residual"])
    torch.testing.assert_close(out, expect)


def test_all_inputs_padding():
    p = make_problem(3, 8, 8, 4, 5, 4, 4, 3, "class", n_in=0)
    check(p)


def test_kout_zero_and_all_padding_outputs():
    p = make_problem(3, 8, 8, 4, 0, 5, 5, 3, "sample")
    out = run_op(p)
    assert out.shape == (3, 0, 5, 5)
    p = make_problem(3, 8, 8, 4, 6, 5, 5, 3, "sample", n_out=0)
    out = check(p)
    assert (out == 0).all()


def test_batch_one_and_odd_sizes():
    for H, W in [(1, 1), (1, 7), (5, 3), (13, 17)]:
        p = make_problem(1, 7, 9, 5, 6, H, W, 3, "shared", gen=torch.Generator().manual_seed(H * W))
        check(p)


def test_rectangular_kernel_and_asymmetric_params():
    p = make_problem(4, 6, 5, 4, 4, 9, 8, 3, "sample", stride=(2, 1), padding=(1, 2), dilation=(1, 2), kw=2)
    check(p)


def test_empty_batch():
    p = make_problem(1, 4, 4, 2, 2, 3, 3, 3, "shared")
    p["x"], p["in_idx"], p["out_idx"] = p["x"][:0], p["in_idx"][:0], p["out_idx"][:0]
    p["groups"], p["residual"] = p["groups"][:0], p["residual"][:0]
    assert run_op(p).shape == (0, 2, 3, 3)


def test_non_contiguous_inputs():
    p = make_problem(4, 10, 12, 6, 7, 8, 8, 3, "class", gen=torch.Generator().manual_seed(5))
    ref = gathered_conv2d_reference(**p)
    q = dict(p)
    q["x"] = p["x"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    q["x"] = q["x"].contiguous(memory_format=torch.channels_last)
    q["weight"] = p["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    q["in_idx"] = p["in_idx"].t().contiguous().t()
    q["residual"] = p["residual"].contiguous(memory_format=torch.channels_last)
    assert not q["x"].is_contiguous() and not q["weight"].is_contiguous()
    assert rel_err(run_op(q), ref) <= RTOL


def test_padding_channels_are_never_read():
    p = make_problem(4, 10, 12, 8, 7, 6, 6, 3, "sample", gen=torch.Generator().manual_seed(6))
    ref = gathered_conv2d_reference(**p)
    q = dict(p)
    q["x"] = p["x"] + 1e6 * (p["in_idx"] < 0).float()[:, :, None, None]  # garbage in padding
    assert rel_err(run_op(q), ref) <= RTOL


def test_arbitrary_group_ids():
    p = make_problem(6, 10, 12, 8, 7, 5, 5, 3, "class", gen=torch.Generator().manual_seed(7))
    q = dict(p)
    q["groups"] = (p["groups"] * 1000 - 7).to(torch.int32)  # any int32 labels work
    assert rel_err(run_op(q), gathered_conv2d_reference(**p)) <= RTOL


def test_threads_agree():
    p = make_problem(16, 64, 64, 16, 16, 8, 8, 3, "class", gen=torch.Generator().manual_seed(8))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run_op(p)
    finally:
        torch.set_num_threads(n)
    b = run_op(p)
    assert torch.equal(a, b)  # same reduction order whatever the thread count


# ---------------------------------------------------------------------------------------------
# bad input
def _ok():
    return make_problem(2, 6, 6, 4, 4, 5, 5, 3, "sample", gen=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p.update(x=p["x"].double()), "x must be float32"),
    (lambda p: p.update(weight=p["weight"].half()), "weight must be float32"),
    (lambda p: p.update(in_idx=p["in_idx"].long()), "in_idx must be int32"),
    (lambda p: p.update(out_idx=p["out_idx"].long()), "out_idx must be int32"),
    (lambda p: p.update(groups=p["groups"].long()), "groups must be int32"),
    (lambda p: p.update(in_idx=p["in_idx"][:, :3]), "in_idx must be"),
    (lambda p: p.update(x=p["x"][:, :, :, :, None]), "x must be"),
    (lambda p: p.update(bias=torch.zeros(5)), "bias must be"),
    (lambda p: p.update(residual=p["residual"][:, :, :2]), "residual must be"),
    (lambda p: p.update(groups=torch.zeros(3, dtype=torch.int32)), "groups must be"),
    (lambda p: p["in_idx"].__setitem__((0, 0), 6), "out of range"),
    (lambda p: p["out_idx"].__setitem__((1, 0), -2), "out of range"),
    (lambda p: p.update(groups=torch.zeros(2, dtype=torch.int32)), "different in_idx/out_idx"),
])
def test_bad_input_raises(mutate, match):
    p = _ok()
    p["in_idx"][:, 0] = 1
    p["out_idx"][:, 0] = 1
    p["in_idx"][1, 1] = 2 if p["in_idx"][0, 1] != 2 else 3  # rows of the two samples differ
    mutate(p)
    with pytest.raises((RuntimeError, ValueError), match=match):
        run_op(p)


def test_kernel_larger_than_input_raises():
    p = make_problem(1, 3, 3, 2, 2, 2, 2, 5, "shared", padding=0, residual=False)
    with pytest.raises(RuntimeError, match="smaller than"):
        run_op(p)


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile integration
def _op_args(p):
    return (p["x"], p["in_idx"], p["weight"], p["bias"], p["out_idx"], p["groups"], p["residual"],
            list(ops._pair(p["stride"], "stride")), list(ops._pair(p["padding"], "padding")),
            list(ops._pair(p["dilation"], "dilation")), p["relu"])


@pytest.mark.parametrize("case", [
    dict(B=3, C_in=8, C_out=6, Kin=5, Kout=4, H=6, W=6, k=3, sharing="sample"),
    dict(B=4, C_in=8, C_out=6, Kin=5, Kout=4, H=7, W=5, k=1, sharing="shared", padding=0, residual=False),
    dict(B=2, C_in=8, C_out=6, Kin=5, Kout=4, H=9, W=9, k=3, sharing="class", stride=2, dilation=2,
         bias=False, relu=False),
])
def test_opcheck(case):
    p = make_problem(**case)
    torch.library.opcheck(torch.ops.gencnp_fast.gathered_conv2d.default, _op_args(p))


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = make_problem(3, 8, 6, 5, 4, 9, 7, 3, "sample", stride=2, padding=2, dilation=2)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _op_args(p)]
        out = torch.ops.gencnp_fast.gathered_conv2d(*args)
    assert tuple(out.shape) == tuple(run_op(p).shape)


def test_torch_compile_fullgraph():
    p = make_problem(4, 8, 6, 5, 4, 6, 6, 3, "class", gen=torch.Generator().manual_seed(3))
    args = _op_args(p)

    def f(x, in_idx, weight, bias, out_idx, groups, residual):
        y = torch.ops.gencnp_fast.gathered_conv2d(x, in_idx, weight, bias, out_idx, groups, residual,
                                                  [1, 1], [1, 1], [1, 1], True)
        return y * 2.0 + 1.0

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    got = cf(*args[:7])
    expect = gathered_conv2d_reference(**p) * 2.0 + 1.0
    assert rel_err(got, expect) <= RTOL


# ---------------------------------------------------------------------------------------------
# fuzz
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    C_in=st.integers(1, 9),
    C_out=st.integers(1, 9),
    extra_in=st.integers(0, 2),
    extra_out=st.integers(0, 2),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    k=st.sampled_from([1, 2, 3, 5]),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    sharing=st.sampled_from(["shared", "class", "sample"]),
    relu=st.booleans(),
    residual=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz(B, C_in, C_out, extra_in, extra_out, H, W, k, stride, padding, dilation, sharing, relu,
              residual, bias, seed):
    from hypothesis import assume

    assume(H + 2 * padding - dilation * (k - 1) - 1 >= 0 and W + 2 * padding - dilation * (k - 1) - 1 >= 0)
    p = make_problem(B, C_in, C_out, C_in + extra_in, C_out + extra_out, H, W, k, sharing, stride, padding,
                     dilation, relu=relu, residual=residual, bias=bias, gen=torch.Generator().manual_seed(seed))
    check(p)
