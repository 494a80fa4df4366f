"""The gathered convolution op on every backend: one test body per behaviour, run once per backend.

Backends (the ``backend`` fixture of tests/conftest.py, skipped with the reason where one cannot run here):
  * ``cpu``: ``torch.ops.gencnp_fast.gathered_conv2d`` on CPU tensors (csrc/cpu/, float32);
  * ``torch``: ``gathered_conv2d_reference``, the plain-torch implementation (kernels/contract.py, any dtype);
  * ``triton``: ``torch.ops.gencnp_fast.gathered_conv2d_triton`` (kernels/triton_conv.py) on a GPU, or on CPU
    tensors in the ``TRITON_INTERPRET=1`` child of tests/test_triton_interpreter.py (~3000x slower: the sizes below
    stay tiny there, the layer-size tests are GPU-only, and bfloat16 is not interpreted);
  * ``cuda``: ``torch.ops.gencnp_fast.gathered_conv2d`` on CUDA tensors (csrc/cuda/).

Oracle: ``dense_oracle`` (float64 F.conv2d on the densely scattered input, independent of the op code) on the inputs
rounded to the tested dtype, with the tolerance rule ``assert_close_to_fp64``: the op's error is at most twice the
error of torch's own computation in that dtype (``gathered_conv2d_reference`` on CPU tensors; for the ``torch``
backend itself, the dense conv in that dtype) plus a few units of rounding. Padded output channels must be exact
zeros.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import (INTERPRET, assert_close_to_fp64, backend_device, dense_oracle, magnitude_oracle, make_problem,
                      rel_err, skip_reason)
from gencnp_fast.kernels.contract import gathered_conv2d_reference, pair, problem_list

FLOATS = ("x", "weight", "bias", "residual")
INDICES = ("in_idx", "out_idx", "sample_group", "problems", "residual_take")
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _triton_rule_configs():
    """On a GPU, Triton tile sizes by rule (no timing of every candidate for every test shape); the autotuned
    launch has its own test in tests/test_triton_kernel.py."""
    old = os.environ.get("GENCNP_FAST_TRITON_AUTOTUNE")
    os.environ["GENCNP_FAST_TRITON_AUTOTUNE"] = "0"
    yield
    if old is None:
        os.environ.pop("GENCNP_FAST_TRITON_AUTOTUNE", None)
    else:
        os.environ["GENCNP_FAST_TRITON_AUTOTUNE"] = old


# ---------------------------------------------------------------------------------------------------------------
# helpers: the op of each backend, problems moved to its device, the check against the float64 oracle

def interpreted(backend: str) -> bool:
    """The Triton kernel runs in the (slow) interpreter: keep the problem tiny."""
    return backend == "triton" and INTERPRET


def dtypes_of(backend: str):
    """The dtypes the backend computes in."""
    if backend == "cpu":
        return [torch.float32]
    if interpreted(backend):
        return [torch.float32, torch.float16]  # the interpreter gets bfloat16 tl.dot wrong
    return ALL_DTYPES


def require(backend: str) -> None:
    """Skip a test that is specific to one backend where that backend cannot run."""
    reason = skip_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")


def backend_op(backend: str):
    """The callable under test (the op's positional arguments, strides as lists)."""
    if backend == "torch":
        return gathered_conv2d_reference
    if backend == "triton":
        from gencnp_fast.kernels import triton_conv  # noqa: F401  (registers gencnp_fast::gathered_conv2d_triton)

        return torch.ops.gencnp_fast.gathered_conv2d_triton.default
    import gencnp_fast.ops  # noqa: F401  (loads the extension: the schema and the CPU/CUDA kernels)

    return torch.ops.gencnp_fast.gathered_conv2d.default


def moved(p, device, dtype=None):
    """``p`` with every tensor on ``device`` and the floating ones in ``dtype`` (unchanged if None)."""
    q = dict(p)
    for k in FLOATS:
        if q.get(k) is not None:
            q[k] = q[k].to(device=device, dtype=dtype or q[k].dtype)
    for k in INDICES:
        if q.get(k) is not None:
            q[k] = q[k].to(device)
    return q


def with_problems(p):
    """``p`` with its planned problem list (on the CPU; moved with the rest)."""
    problems, max_group = problem_list(p["sample_group"])
    return dict(p, problems=problems, max_group=max_group)


def op_args(p):
    """The op's positional arguments in schema order."""
    return (p["x"], p["in_idx"], p["weight"], p["bias"], p["out_idx"], p["sample_group"], p["residual"],
            list(pair(p["stride"], "stride")), list(pair(p["padding"], "padding")),
            list(pair(p["dilation"], "dilation")), bool(p["relu"]), p.get("problems"), int(p.get("max_group", -1)),
            bool(p.get("check_indices", True)), p.get("residual_take"))


def run(backend, p, dtype=None):
    """The backend's op on ``p`` (moved to the backend's device, floats in ``dtype``)."""
    return backend_op(backend)(*op_args(moved(p, backend_device(backend), dtype)))


def dense_in(p, dtype):
    """The dense masked conv in ``dtype`` on CPU tensors: torch's own computation for the ``torch`` backend."""
    q = moved(p, "cpu", dtype)
    x, in_idx, out_idx = q["x"], q["in_idx"].long(), q["out_idx"].long()
    B, Kin, H, W = x.shape
    C_in = q["weight"].shape[1]
    dense = x.new_zeros(B, C_in + 1, H, W)
    dense.scatter_(1, torch.where(in_idx >= 0, in_idx, C_in)[:, :, None, None].expand(B, Kin, H, W), x)
    y = F.conv2d(dense[:, :C_in], q["weight"], q["bias"], q["stride"], q["padding"], q["dilation"])
    out = y.gather(1, out_idx.clamp_min(0)[:, :, None, None].expand(B, out_idx.shape[1], *y.shape[2:]))
    if q["residual"] is not None:
        out = out + q["residual"]
    if q["relu"]:
        out = out.relu()
    return out * (out_idx >= 0).to(out.dtype)[:, :, None, None]


def check(backend, p, dtype=torch.float32, what=""):
    """The backend's output vs the float64 dense oracle on the dtype-rounded inputs (the tolerance rule); padded
    output channels exact zeros. Returns the output (on the backend's device)."""
    out = run(backend, p, dtype)
    assert out.dtype == dtype
    assert out.device.type == torch.device(backend_device(backend)).type
    rounded = moved(p, "cpu", dtype)
    ref64 = dense_oracle(rounded)
    assert tuple(out.shape) == tuple(ref64.shape)
    torch_out = dense_in(p, dtype) if backend == "torch" else gathered_conv2d_reference(**rounded)
    assert_close_to_fp64(out, torch_out, ref64, f"{backend} {what}", magnitude_oracle(rounded))
    pad = p["out_idx"] < 0
    if bool(pad.any()):
        assert bool((out.cpu()[pad] == 0).all()), "padded output channels must be exact zeros"
    return out


def assert_nans_as_reference(backend, p, what):
    """The op's NaN outputs are exactly the reference's (a NaN input reaches only the outputs that read it)."""
    got, ref = run(backend, p).cpu(), gathered_conv2d_reference(**p)
    assert torch.equal(got.isnan(), ref.isnan()), what


def problem(*args, **kw):
    """make_problem with the weight scaled by 1/sqrt(fan-in) (activations stay O(1) in half precision)."""
    return make_problem(*args, scale_weight=True, **kw)


# ---------------------------------------------------------------------------------------------------------------
# values

@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 0, 1), (1, 1, 0, 1), (1, 2, 0, 1),
    (5, 1, 2, 1), (5, 2, 2, 1), (7, 2, 3, 1), (5, 2, 1, 2),
])
def test_geometry(backend, sharing, k, stride, padding, dilation):
    seed = k * 100 + stride * 10 + padding + dilation
    check(backend, problem(4, 7, 8, 6, 6, 9, 7, k, sharing, stride, padding, dilation, seed=seed))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_epilogue_variants(backend, relu, residual, bias):
    check(backend, problem(4, 8, 24, 6, 20, 6, 6, 3, "class", relu=relu, residual=residual, bias=bias, seed=1))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
def test_dtypes(backend, dtype, sharing):
    if dtype not in dtypes_of(backend):
        pytest.skip(f"{backend} does not compute in {dtype}" + (" under the interpreter" if INTERPRET else ""))
    check(backend, problem(3, 8, 20, 8, 18, 8, 8, 3, sharing, seed=3), dtype)


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("Cin,Cout,Kin,Kout,H", [
    (64, 64, 16, 16, 32), (128, 128, 32, 32, 16), (256, 256, 64, 64, 8), (512, 512, 128, 128, 4),
    (512, 512, 128, 128, 2), (3, 64, 3, 16, 32),
])
def test_layer_shapes(backend, sharing, Cin, Cout, Kin, Kout, H):
    """The benchmark models' layer sizes: several M, N and K tiles per problem."""
    if interpreted(backend):
        pytest.skip("too large for the interpreter (runs on a GPU)")
    check(backend, problem(8, Cin, Cout, Kin, Kout, H, H, 3, sharing, seed=Cin + H, n_in=Kin, n_out=Kout))


@pytest.mark.parametrize("sharing", ["shared", "sample"])
@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 4, 2), (7, 2, 3, 1)])
def test_large_maps(backend, sharing, k, stride, padding, dilation):
    """224-class maps: the CPU kernel's column blocks end inside a sample and copy only the padded rows they
    read; blocks starting and ending mid-map, several blocks per sample."""
    if interpreted(backend):
        pytest.skip("too large for the interpreter (runs on a GPU)")
    check(backend, problem(3, 20, 24, 16, 18, 75, 69, k, sharing, stride, padding, dilation, seed=k * 7 + stride,
                           n_in=16))


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("Kin,H,W,stride,residual", [(16, 13, 10, 1, True), (64, 16, 16, 1, False),
                                                    (128, 12, 11, 1, True), (7, 40, 33, 1, True),
                                                    (24, 33, 29, 2, True), (12, 26, 40, (2, 3), False)])
def test_pointwise_layers(backend, sharing, Kin, H, W, stride, residual):
    """1x1 convs on maps of 128+ output pixels (the CPU kernel's pixel-vectorised path; a strided one subsamples
    its input first): ragged 16-pixel tiles at the end of every sample, tiles of several samples in one block,
    empty and full rows."""
    if interpreted(backend):
        pytest.skip("too large for the interpreter (runs on a GPU)")
    check(backend, problem(5, Kin + 9, 40, Kin, 36, H, W, 1, sharing, stride=stride, padding=0, residual=residual,
                           seed=Kin * H + W))


# (C_in, Kin, Kout, H, W, stride, padding, dilation, residual, n_in; n_out random unless n_in is given): output rows of 16 or 32 pixels (the CPU
# kernel's pixel tiles along rows, K = n_in * 9 <= 576), one just past that K (the channel-vectorised kernel), and a
# 48 x 64 map whose column blocks end inside a row
PIXEL_ROW_CASES = {
    "w32_pad1": (20, 16, 24, 9, 32, 1, 1, 1, True, None),
    "w16_pad0": (12, 10, 20, 7, 18, 1, 0, 1, False, None),
    "w16_dil2": (12, 10, 20, 8, 16, 1, 2, 2, True, None),
    "stride_2x1": (12, 10, 20, 11, 32, (2, 1), 1, 1, True, None),
    "k576": (80, 64, 18, 5, 16, 1, 1, 1, True, 64),
    "k585": (80, 65, 18, 5, 16, 1, 1, 1, True, 65),
    "blocks_mid_row": (24, 16, 20, 48, 64, 1, 1, 1, True, 16),
}


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("case", list(PIXEL_ROW_CASES))
def test_pixel_row_tiles(backend, sharing, case):
    """3x3 convs of horizontal stride 1 on rows of a multiple of 16 output pixels: ragged row counts per tile (rows
    past the group's outputs), several samples and row bands per column block, empty and full rows."""
    if interpreted(backend):
        pytest.skip("too large for the interpreter (runs on a GPU)")
    C_in, Kin, Kout, H, W, stride, padding, dilation, residual, n_in = PIXEL_ROW_CASES[case]
    B = 2 if case == "blocks_mid_row" else 4
    check(backend, problem(B, C_in, Kout + 3, Kin, Kout, H, W, 3, sharing, stride, padding, dilation,
                           residual=residual, seed=H * W + Kin, n_in=n_in, n_out=None if n_in is None else Kout - 1),
          what=case)


# (H, W, k, padding, dilation, residual, relu): maps of Pi input and Po output pixels with 8 <= Pi * Po <= 16 (the CPU
# kernel's tiny-map path: one Po x Pi matrix of taps per channel pair, rows of Pi rounded up to 2, 4, 8 or 16 lanes),
# some pairs reading no tap
TINY_MAP_CASES = {
    "2x2_pad1": (2, 2, 3, 1, 1, True, True),
    "2x2_pad1_plain": (2, 2, 3, 1, 1, False, False),
    "2x2_dil2": (2, 2, 3, 2, 2, True, True),
    "3x1_pad1": (3, 1, 3, 1, 1, True, True),
    "4x1_pad1": (4, 1, 3, 1, 1, False, True),
    "1x4_pad1": (1, 4, 3, 1, 1, True, False),
    "2x1_k2_pad1": (2, 1, 2, 1, 1, True, True),
    "3x2_k2": (3, 2, 2, 0, 1, True, False),
    "3x3_k3": (3, 3, 3, 0, 1, False, True),
    "4x4_k4": (4, 4, 4, 0, 1, True, True),
}


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("case", list(TINY_MAP_CASES))
def test_tiny_maps(backend, sharing, case):
    """Convs on maps of 2 to 16 pixels (groups of 1 to 9 samples, empty and full rows)."""
    H, W, k, padding, dilation, residual, relu = TINY_MAP_CASES[case]
    B = 4 if interpreted(backend) else 9
    p = problem(B, 40, 36, 24, 20, H, W, k, sharing, 1, padding, dilation, relu=relu, residual=residual,
                seed=H * 10 + W + k)
    check(backend, p, what=case)
    # a NaN pixel reaches only the outputs whose taps read it (with dilation 2 on 2x2 each output reads one pixel)
    p["x"][:, :, 0, 0] = float("nan")
    assert_nans_as_reference(backend, p, case)


# (H, W, k, stride, padding, dilation, residual, relu): output maps of 13 to 16 pixels (the CPU kernel's vector-map
# path: a sample's pixels in the lanes of one vector, weights broadcast from their rows). Inputs of at most 16 pixels
# permute a channel's pixels per tap (3x3 / 1x1 / dilated 5x5 on 4x4, 3x5 and 13x1 maps: partial vectors); 17 to 64
# build an im2col per tile (stride 2 from 8x8 and 7x7, a 2x2 kernel on 5x5); a 1x1 stride-2 conv from 8x8 keeps the
# GEMM path.
VECTOR_MAP_CASES = {
    "4x4_3x3_pad1": (4, 4, 3, 1, 1, 1, True, True),
    "4x4_3x3_pad1_plain": (4, 4, 3, 1, 1, 1, False, False),
    "4x4_1x1": (4, 4, 1, 1, 0, 1, True, True),
    "4x4_5x5_dil2_pad4": (4, 4, 5, 1, 4, 2, True, True),
    "3x5_3x3_pad1": (3, 5, 3, 1, 1, 1, True, True),
    "13x1_3x3_pad1": (13, 1, 3, 1, 1, 1, False, True),
    "8x8_3x3_stride2": (8, 8, 3, 2, 1, 1, True, True),
    "7x7_3x3_stride2": (7, 7, 3, 2, 1, 1, False, True),
    "5x5_2x2": (5, 5, 2, 1, 0, 1, True, False),
    "8x8_1x1_stride2": (8, 8, 1, 2, 0, 1, True, False),
}


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("case", list(VECTOR_MAP_CASES))
def test_vector_maps(backend, sharing, case):
    """Convs with 13 to 16 output pixels: groups of 1 to 9 samples, more kept outputs than one 16-row tile (a
    partial second tile), empty and full rows."""
    H, W, k, stride, padding, dilation, residual, relu = VECTOR_MAP_CASES[case]
    B = 4 if interpreted(backend) else 9
    p = problem(B, 40, 36, 24, 20, H, W, k, sharing, stride, padding, dilation, relu=relu, residual=residual,
                seed=H * 10 + W + k * 3 + stride)
    check(backend, p, what=case)
    # a NaN pixel reaches only the outputs whose taps read it
    p["x"][:, :, 1, 0] = float("nan")
    assert_nans_as_reference(backend, p, case)


# One-pixel layers at least 4096 weights wide (the CPU kernel's one-pixel path): (C_in, k, stride, padding, dilation,
# bias, residual, relu). Rows of C_in not a multiple of 16 end inside a 16-float block; a 3x3 conv on a 1x1 map reads
# the pixel through its centre tap, a 2x2 stride-2 one through tap (1, 1), and a dilated 2x2 through none (bias only).
WIDE_ONE_PIXEL_CASES = {
    "linear_4096": (4096, 1, 1, 0, 1, True, False, False),
    "linear_4100_relu": (4100, 1, 1, 0, 1, True, False, True),
    "linear_residual_no_bias": (4120, 1, 1, 0, 1, False, True, True),
    "3x3_pad1": (512, 3, 1, 1, 1, True, True, True),
    "2x2_stride2_pad1": (1024, 2, 2, 1, 1, True, False, False),
    "2x2_dil3_no_tap": (1024, 2, 2, 2, 3, True, False, True),
}


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("case", list(WIDE_ONE_PIXEL_CASES))
def test_wide_one_pixel_layers(backend, sharing, case):
    """Wide layers on one pixel: groups of 1 to 9 samples, random kept sets (empty and full ones included)."""
    c_in, k, stride, padding, dilation, bias, residual, relu = WIDE_ONE_PIXEL_CASES[case]
    small = interpreted(backend)
    B, c_out = (3, 12) if small else (9, 70)
    full = sharing == "shared" and case == "linear_4096"  # every input kept: one run of whole 16-float blocks
    kin = c_in if full else c_in // 3
    p = problem(B, c_in, c_out, kin, 40, 1, 1, k, sharing, stride, padding, dilation, relu=relu, residual=residual,
                bias=bias, seed=len(case) + c_in, n_in=kin if full else None)
    check(backend, p, what=case)
    # a NaN input reaches exactly the outputs of its samples (where some tap reads the pixel)
    p["x"][0, 0] = float("nan")
    assert_nans_as_reference(backend, p, case)


def test_a_sample_s_output_does_not_depend_on_its_batch():
    """The CPU kernel sums every output in an order set by its sample's own rows: a sample run alone, in a batch of
    other samples, or in a group shared with others gives the same bits (narrow layers, the GEMM path, 4x4 maps (the
    vector-map path) and wide one-pixel layers alike; distributed evaluation relies on it)."""
    require("cpu")
    for c_in, h in ((256, 1), (4096, 1), (40, 6), (64, 4)):
        for sharing in ("sample", "class", "shared"):
            p = problem(7, c_in, 50, c_in // 4, 30, h, h, 1 if h == 1 else 3, sharing, padding=0 if h == 1 else 1,
                        seed=c_in + h)
            out = run("cpu", p)
            for i in range(7):
                alone = {k: (v[i:i + 1] if k in ("x", "in_idx", "out_idx", "sample_group", "residual") else v)
                         for k, v in p.items()}
                assert torch.equal(run("cpu", alone)[0], out[i]), (c_in, h, sharing, i)


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
def test_linear_and_downsample(backend, sharing):
    small = interpreted(backend)
    # a linear layer 128 -> 10 as a 1x1 conv on [B, K, 1, 1]
    B, C_in, Kin = (6, 40, 24) if small else (64, 512, 128)
    lin = problem(B, C_in, 10, Kin, 10, 1, 1, 1, sharing, padding=0, relu=False, residual=False, seed=2,
                  n_in=Kin, n_out=10)
    out = check(backend, lin, what="linear")
    if backend == "triton":
        from gencnp_fast.kernels.triton_conv import gathered_linear_triton

        q = moved(lin, backend_device(backend))
        y = gathered_linear_triton(q["x"].reshape(B, -1), q["in_idx"], q["weight"].reshape(10, -1), q["bias"],
                                   q["out_idx"], q["sample_group"])
        assert torch.equal(y, out.reshape(B, -1))
    # a ResNet 1x1 stride-2 downsample
    args = (4, 12, 16, 6, 8, 6, 6) if small else (16, 128, 256, 32, 64, 16, 16)
    check(backend, problem(*args, 1, sharing, stride=2, padding=0, relu=False, seed=3), what="downsample")


def test_ragged_tiles_many_m_and_n_tiles(backend):
    """More than one M tile (64 pixels x 2 samples per group) and N tile (Kout 40) per problem, ragged edges."""
    check(backend, problem(5, 9, 45, 9, 40, 8, 8, 3, "class", seed=2))
    check(backend, problem(5, 9, 45, 9, 40, 8, 8, 3, "shared", seed=4, n_in=9, n_out=40))


def test_kin_zero_is_bias_plus_residual(backend):
    p = problem(3, 4, 5, 3, 4, 5, 5, 3, "sample", n_in=0, n_out=4, seed=5)  # every input channel is padding
    out = check(backend, p).cpu()
    o = p["out_idx"].long()
    torch.testing.assert_close(out, torch.relu(p["bias"][o][:, :, None, None] + p["residual"]))
    check(backend, problem(2, 4, 5, 0, 4, 5, 5, 3, "sample", n_in=0, seed=5))  # Kin == 0: an empty x
    check(backend, problem(4, 8, 8, 4, 5, 4, 4, 3, "class", n_in=0, seed=6))  # all padding, per class


def test_kout_zero_and_all_padding_outputs(backend):
    out = run(backend, problem(3, 4, 5, 3, 0, 5, 5, 3, "sample", seed=6))
    assert out.shape == (3, 0, 5, 5)
    out = check(backend, problem(4, 4, 5, 3, 4, 5, 5, 3, "sample", n_out=0, seed=7))
    assert bool((out == 0).all())


def test_empty_batch(backend):
    p = problem(1, 4, 4, 2, 2, 3, 3, 3, "shared")
    p = dict(p, **{k: p[k][:0] for k in ("x", "in_idx", "out_idx", "sample_group", "residual")})
    assert run(backend, p).shape == (0, 2, 3, 3)
    q = with_problems(p)
    assert q["problems"].shape == (0,) and q["max_group"] == -1
    assert run(backend, q).shape == (0, 2, 3, 3)


def test_batch_one_and_odd_sizes(backend):
    for H, W in [(1, 1), (1, 7), (5, 3), (13, 17)]:
        check(backend, problem(1, 7, 9, 5, 6, H, W, 3, "shared", seed=H * W), what=f"{H}x{W}")


def test_rectangular_kernels_and_asymmetric_params(backend):
    check(backend, problem(4, 6, 5, 4, 4, 9, 8, 3, "sample", stride=(2, 1), padding=(1, 2), dilation=(1, 2), kw=2))
    check(backend, problem(1, 3, 4, 3, 4, 7, 5, 3, "sample", kw=1, padding=1, seed=8))
    check(backend, problem(2, 5, 3, 5, 3, 9, 6, 2, "shared", kw=3, stride=2, padding=0, seed=9))


def test_non_contiguous_inputs(backend):
    p = problem(4, 10, 12, 6, 7, 8, 8, 3, "class", seed=5)
    expect = run(backend, p)
    dev = backend_device(backend)
    q = moved(p, dev)
    q["x"] = q["x"].contiguous(memory_format=torch.channels_last)
    q["weight"] = q["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    q["in_idx"] = q["in_idx"].t().contiguous().t()
    q["out_idx"] = torch.stack([q["out_idx"], q["out_idx"]], 2)[:, :, 0]
    q["residual"] = q["residual"].contiguous(memory_format=torch.channels_last)
    q["bias"] = torch.stack([q["bias"], q["bias"]], 1)[:, 0]
    assert not (q["x"].is_contiguous() or q["weight"].is_contiguous() or q["in_idx"].is_contiguous()
                or q["out_idx"].is_contiguous() or q["residual"].is_contiguous() or q["bias"].is_contiguous())
    assert torch.equal(q["out_idx"], moved(p, dev)["out_idx"])
    out = backend_op(backend)(*op_args(q))
    assert rel_err(out, expect) <= 1e-6


def test_padding_channels_are_never_read(backend):
    """NaN in every padded input channel: a kernel that read (or multiplied) them would produce NaN."""
    p = problem(4, 6, 7, 6, 6, 6, 6, 3, "sample", seed=11)
    x = p["x"].clone()
    x[p["in_idx"] < 0] = float("nan")
    out = run(backend, dict(p, x=x))
    assert not bool(torch.isnan(out).any())
    clean = dict(p, x=torch.nan_to_num(x, nan=0.0))
    assert_close_to_fp64(out, gathered_conv2d_reference(**clean), dense_oracle(clean), backend)


@pytest.mark.parametrize("group_ids", [[17, 3, 250], [-7, 2**31 - 1, -2**31]])
def test_arbitrary_group_ids(backend, group_ids):
    """Any int32 labels, in any order, the samples of a group not adjacent in the batch."""
    p = problem(6, 10, 12, 8, 7, 5, 5, 3, "class", group_ids=group_ids, seed=10)
    check(backend, p)
    assert torch.equal(run(backend, p), run(backend, with_problems(p)))


@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
def test_problem_list_given_or_derived(backend, sharing):
    """The planned problem list (problems, max_group) gives the same result as the backend deriving it."""
    p = problem(5, 8, 9, 6, 7, 6, 6, 3, sharing, seed=12)
    q = with_problems(p)
    assert q["problems"].shape[0] == 5 + 2 * {"shared": 1, "class": 3, "sample": 5}[sharing]
    assert torch.equal(run(backend, p), run(backend, q))


def with_residual_take(p, k_res, seed, nan_elsewhere=False, per_sample=False):
    """``p`` with its residual stored for another channel set: ``[B, k_res, Ho, Wo]`` and an int64 ``residual_take``
    ``[Kout]`` (``per_sample``: ``[B, Kout]``, a different row per sample) of random distinct channels, about a
    quarter -1; channels no position takes hold NaN with ``nan_elsewhere``. Returns (that problem, the same problem
    with the residual re-compacted, without the take)."""
    from gencnp_fast.kernels.contract import compact_residual

    gen = torch.Generator().manual_seed(seed)
    B, kout = p["out_idx"].shape
    ho, wo = p["residual"].shape[2:]  # make_problem draws a residual unless told not to
    take = torch.full((B if per_sample else 1, kout), -1, dtype=torch.int64)
    for row in take:
        if k_res > 0:
            chosen = torch.randperm(k_res, generator=gen)[:kout]
            row[: chosen.numel()] = chosen
            row[torch.randperm(kout, generator=gen)[: kout // 4]] = -1
    res = torch.randn(B, k_res, ho, wo, generator=gen)
    if nan_elsewhere and k_res > 0:
        for b in range(B):
            unused = torch.ones(k_res, dtype=torch.bool)
            unused[take[b if per_sample else 0][take[b if per_sample else 0] >= 0]] = False
            res[b, unused] = float("nan")
    take = take if per_sample else take[0]
    fused = dict(p, residual=res, residual_take=take)
    return fused, dict(p, residual=compact_residual(res, take))


@pytest.mark.parametrize("take", ["row", "per_sample"])
@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("shape", ["3x3", "3x3_pixel_rows", "3x3_tiny_map", "3x3_vector_map", "pointwise", "linear",
                                   "wide_linear", "no_residual_channels"])
def test_residual_take_is_the_recompacted_residual(backend, sharing, shape, take):
    """residual_take (the residual stored for another channel set, re-compacted in the epilogue; one row for the
    batch or a row per sample, which differs between the samples of one group) gives exactly the result of the op
    on the re-compacted residual, on every path of the CPU kernel (channel-vectorised 3x3, pixel tiles along 3x3
    rows, tiny maps, vector maps, pixel-vectorised 1x1, linear, whose micro-tiles span samples, and the one-pixel path
    of wide linear layers), also where the residual has no
    channels; channels that no position takes are never read (NaN there stays out)."""
    small = interpreted(backend)
    if shape == "3x3":
        p = problem(4, 9, 10, 7, 8, 6, 7, 3, sharing, seed=11)
    elif shape == "3x3_pixel_rows":  # rows of 16 output pixels: the CPU kernel's pixel tiles along rows
        p = problem(3, 12, 10, 9, 8, 4 if small else 7, 16, 3, sharing, seed=16)
    elif shape == "3x3_tiny_map":  # 2 x 2 maps: the CPU kernel's tiny-map path
        p = problem(5, 12, 10, 9, 8, 2, 2, 3, sharing, seed=17)
    elif shape == "pointwise":  # >= 128 output pixels: the CPU kernel's pixel-vectorised path
        p = problem(3, 20, 24, 12, 16, 6 if small else 13, 5 if small else 11, 1, sharing, padding=0, seed=12)
    elif shape == "linear":
        p = problem(5, 30, 12, 20, 10, 1, 1, 1, sharing, padding=0, seed=13)
    elif shape == "wide_linear":  # >= 4096 inputs: the CPU kernel's one-pixel path
        p = problem(5, 4104, 12, 600, 10, 1, 1, 1, sharing, padding=0, seed=18)
    elif shape == "3x3_vector_map":  # 4 x 4 maps: the CPU kernel's vector-map path
        p = problem(5, 30, 24, 20, 18, 4, 4, 3, sharing, seed=19)
    else:
        p = problem(3, 8, 6, 5, 4, 5, 5, 3, sharing, seed=14)
    k_res = 0 if shape == "no_residual_channels" else p["out_idx"].shape[1] + 5
    fused, plain = with_residual_take(p, k_res, seed=15, nan_elsewhere=True, per_sample=take == "per_sample")
    out = check(backend, plain, what="re-compacted residual")
    got = run(backend, fused)
    assert torch.equal(got, out), "residual_take must give the re-compacted residual's result exactly"


def test_threads_agree():
    """The CPU kernel's result does not depend on the thread count (same reduction order)."""
    require("cpu")
    p = problem(16, 64, 64, 16, 16, 8, 8, 3, "class", seed=8)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run("cpu", p)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, run("cpu", p))


# ---------------------------------------------------------------------------------------------------------------
# bad input: refused on the host, the message naming the argument

def _ok():
    """Two samples in different groups whose rows differ."""
    p = problem(2, 6, 6, 4, 4, 5, 5, 3, "sample", seed=9)
    p["in_idx"][:, 0] = 1
    p["out_idx"][:, 0] = 1
    p["in_idx"][1, 1] = 2 if p["in_idx"][0, 1] != 2 else 3
    return p


def _x_dtype(p, backend):
    if backend == "torch":
        pytest.skip("the torch backend computes in any dtype")
    p["x"] = p["x"].half() if backend == "cpu" else p["x"].double()


BAD_INPUTS = {
    # name: (mutate(p, backend), message, backends that check it (None: all))
    "x_dtype": (_x_dtype, r"x must be one of", None),
    "weight_dtype": (lambda p, b: p.update(weight=p["weight"].double()), r"weight must be", None),
    "bias_dtype": (lambda p, b: p.update(bias=p["bias"].double()), r"bias must be", None),
    "residual_dtype": (lambda p, b: p.update(residual=p["residual"].double()), r"residual must be", None),
    "in_idx_dtype": (lambda p, b: p.update(in_idx=p["in_idx"].long()), r"in_idx must be int32", None),
    "out_idx_dtype": (lambda p, b: p.update(out_idx=p["out_idx"].long()), r"out_idx must be int32", None),
    "sample_group_dtype": (lambda p, b: p.update(sample_group=p["sample_group"].long()),
                           r"sample_group must be int32", None),
    "x_dim": (lambda p, b: p.update(x=p["x"][..., None]), r"\bx must (be|have)", None),
    "weight_dim": (lambda p, b: p.update(weight=p["weight"][:, :, 0]), r"weight must (be|have)", None),
    "in_idx_shape": (lambda p, b: p.update(in_idx=p["in_idx"][:, :3]), r"in_idx must be", None),
    "out_idx_shape": (lambda p, b: p.update(out_idx=p["out_idx"][:1]), r"out_idx must be", None),
    "sample_group_shape": (lambda p, b: p.update(sample_group=p["sample_group"].new_zeros(3)),
                           r"sample_group must be", None),
    "bias_shape": (lambda p, b: p.update(bias=p["bias"].new_zeros(5)), r"bias must be", None),
    "residual_shape": (lambda p, b: p.update(residual=p["residual"][:, :, :2]), r"residual must be", None),
    "kernel_larger_than_input": (lambda p, b: p.update(padding=0, dilation=4), r"smaller than", None),
    "stride_zero": (lambda p, b: p.update(stride=(0, 1)), r"stride", None),
    "padding_negative": (lambda p, b: p.update(padding=-1), r"padding", None),
    "device": (lambda p, b: p.update(in_idx=p["in_idx"].to("meta")), r"in_idx is on meta", None),
    "max_group_without_problems": (lambda p, b: p.update(max_group=1), r"max_group is given without problems",
                                   None),
    "problems_dtype": (lambda p, b: p.update(**with_problems(p)) or p.update(problems=p["problems"].long()),
                       r"problems must be int32", None),
    "problems_shape": (lambda p, b: p.update(**with_problems(p)) or p.update(problems=p["problems"][:-1]),
                       r"problems must be \[B \+ 2G\]", None),
    "max_group_range": (lambda p, b: p.update(**with_problems(p)) or p.update(max_group=3), r"max_group must be",
                        None),
    # index values (check_indices, the default): on the host for CPU tensors (a GPU raises a device-side assert at
    # the next synchronisation, which would end this process's CUDA context: not tested here)
    "in_idx_range": (lambda p, b: p["in_idx"].__setitem__((0, 0), 6),
                     r"in_idx(\[0, 0\] = 6 is| value is) out of range", ("cpu", "torch", "triton")),
    "out_idx_range": (lambda p, b: p["out_idx"].__setitem__((1, 0), -2),
                      r"out_idx(\[1, 0\] = -2 is| value is) out of range", ("cpu", "torch", "triton")),
    "group_rows_differ": (lambda p, b: p.update(sample_group=p["sample_group"].new_zeros(2)),
                          r"different in_idx/out_idx rows", ("cpu", "torch", "triton")),
    "row_not_ascending": (lambda p, b: p["in_idx"].__setitem__((0, slice(0, 2)), torch.tensor([2, 1])),
                          r"in_idx(\[0, 1\] = 1 after 2| row is not strictly increasing)", ("cpu", "torch", "triton")),
    "padding_before_valid": (lambda p, b: p["out_idx"].__setitem__((1, slice(0, 2)), torch.tensor([-1, 3])),
                             r"out_idx(\[1, 1\] = 3 after -1| row is not strictly increasing)",
                             ("cpu", "torch", "triton")),
    "residual_take_dtype": (lambda p, b: p.update(residual_take=torch.zeros(p["out_idx"].shape[1],
                                                                          dtype=torch.int32, device=p["x"].device)),
                            r"residual_take must be int64", None),
    "residual_take_shape": (lambda p, b: p.update(residual_take=torch.zeros(1, dtype=torch.int64,
                                                                          device=p["x"].device)),
                            r"residual_take must be \[Kout\]", None),
    "residual_take_without_residual": (lambda p, b: p.update(residual=None, residual_take=torch.zeros(
        p["out_idx"].shape[1], dtype=torch.int64, device=p["x"].device)), r"residual_take is given without", None),
    "residual_take_range": (lambda p, b: p.update(residual_take=torch.full((p["out_idx"].shape[1],), 7,
                                                                         dtype=torch.int64, device=p["x"].device)),
                            r"residual_take( holds 7 \(flat entry 0\),| value is) out of range",
                            ("cpu", "torch", "triton")),
    "residual_take_rows_range": (lambda p, b: p.update(residual_take=torch.tensor(
        [[0] * p["out_idx"].shape[1], [-2] + [0] * (p["out_idx"].shape[1] - 1)], dtype=torch.int64,
        device=p["x"].device)), r"residual_take( holds -2 \(flat entry \d+\),| value is) out of range",
        ("cpu", "torch", "triton")),
    "residual_take_rows_batch": (lambda p, b: p.update(residual_take=torch.zeros(3, p["out_idx"].shape[1],
                                                                               dtype=torch.int64,
                                                                               device=p["x"].device)),
                                 r"residual_take must be \[Kout\] = \[\d+\] or \[B, Kout\]", None),
    # a problem list that names one sample twice and leaves the other out (one group of both): the left-out
    # sample's output would never be written (the Triton launcher once computed garbage there)
    "problems_sample_twice": (lambda p, b: p.update(sample_group=p["sample_group"].new_zeros(2), **_same_rows(p))
                              or p.update(problems=torch.tensor([0, 0, 0, 2], dtype=torch.int32), max_group=2),
                              r"listed twice", ("cpu", "torch", "triton")),
}


def _same_rows(p):
    """Sample 1 with sample 0's index rows (so that one group of both is valid)."""
    in_idx, out_idx = p["in_idx"].clone(), p["out_idx"].clone()
    in_idx[1], out_idx[1] = in_idx[0], out_idx[0]
    return {"in_idx": in_idx, "out_idx": out_idx}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises(backend, case):
    mutate, match, backends = BAD_INPUTS[case]
    if backends is not None and backend not in backends:
        pytest.skip(f"values are checked by the {'/'.join(backends)} backend only")
    if backends is not None and backend_device(backend) != "cpu":
        # a GPU reports a bad index value with a device-side assert, which ends the process's CUDA context (every
        # later test would fail): checked on CPU tensors only
        pytest.skip("index values on a GPU: device-side assert, not testable in-process")
    p = moved(_ok(), backend_device(backend))
    mutate(p, backend)  # on the backend's device
    with pytest.raises((RuntimeError, ValueError), match=match):
        backend_op(backend)(*op_args(p))


def test_extension_shares_the_process_libstdcxx():
    """The extension defines no libstdc++ of its own (setup.py links the process's by path): a second, static copy
    breaks the number formatting of every error message (a segfault on one GPU machine, messages cut at the first
    number on another; test_bad_input_raises sees the latter)."""
    import shutil
    import subprocess

    require("cpu")
    import gencnp_fast._C as C

    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", C.__file__], capture_output=True, text=True, check=True).stdout
    # std::locale, std::basic_ostream<char>::_M_insert<long>, std::__codecvt_utf16_base: only a libstdc++ defines them
    own = [line.split()[-1] for line in out.splitlines()
           if any(m in line for m in ("_ZNSt6locale", "_ZNSo9_M_insert", "__codecvt_utf16_base"))]
    assert not own, f"{C.__file__} carries its own libstdc++ (a static copy): {own[:5]}"


@pytest.mark.parametrize("case", ["in_idx_range", "row_not_ascending"])
def test_bad_index_value_on_a_gpu_is_a_device_assert_naming_it(backend, case):
    """On a GPU the index values are checked without a synchronisation: a bad value is a device-side assert whose
    message names it (run in a child process: the assert ends that process's CUDA context)."""
    import subprocess
    import sys

    if backend_device(backend) == "cpu" or backend not in ("cuda", "triton"):
        pytest.skip("GPU backends only")
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r})\n"
            "import torch, test_ops as t\n"
            f"p = t.moved(t._ok(), {backend_device(backend)!r})\n"
            f"t.BAD_INPUTS[{case!r}][0](p, {backend!r})\n"
            f"t.backend_op({backend!r})(*t.op_args(p))\n"
            "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=here)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "gathered_conv2d: " in r.stderr and "in_idx" in r.stderr, r.stderr[-3000:]


# B = 4 in 3 groups (sample_group 0, 1, 2, 0): the good list is [0, 3, 1, 2 | 0, 2, 3 | 2, 1, 1], max_group 2
BAD_PROBLEM_LISTS = {
    "start_gap": ([0, 3, 1, 2, 0, 1, 3, 2, 1, 1], 2, r"does not follow the previous groups"),
    "zero_size": ([0, 3, 1, 2, 0, 2, 3, 2, 0, 1], 2, r"does not follow the previous groups"),
    "listed_twice": ([0, 0, 1, 2, 0, 2, 3, 2, 1, 1], 2, r"sample 0 is out of range or listed twice"),
    "out_of_range": ([0, 7, 1, 2, 0, 2, 3, 2, 1, 1], 2, r"sample 7 is out of range or listed twice"),
    "mixed_group": ([0, 1, 3, 2, 0, 2, 3, 2, 1, 1], 2, r"different sample_group values"),
    "split_group": ([0, 3, 1, 2, 0, 1, 2, 3, 1, 1, 1, 1], 1, r"have the same sample_group value"),
    "not_covering": ([0, 3, 1, 2, 0, 2, 2, 1], 2, r"the groups cover 3 of 4 samples"),
    "no_group": ([0, 3, 1, 2], -1, r"problems must list at least one group"),
    "max_group_wrong": ([0, 3, 1, 2, 0, 2, 3, 2, 1, 1], 1, r"max_group is 1, the largest group has 2"),
}


@pytest.mark.parametrize("case", list(BAD_PROBLEM_LISTS))
def test_bad_problem_list_refused_on_cpu(case):
    """The CPU op checks the values of a given problem list (GPU backends trust the planner: no synchronisation)."""
    require("cpu")
    values, max_group, match = BAD_PROBLEM_LISTS[case]
    p = problem(4, 6, 6, 4, 4, 5, 5, 3, "class", seed=13)
    good = with_problems(p)
    assert good["problems"].tolist() == [0, 3, 1, 2, 0, 2, 3, 2, 1, 1] and good["max_group"] == 2
    run("cpu", good)
    with pytest.raises(RuntimeError, match=match):
        run("cpu", dict(p, problems=torch.tensor(values, dtype=torch.int32), max_group=max_group))


@pytest.mark.parametrize("case", ["zero_size", "out_of_range", "not_covering", "max_group_wrong"])
def test_bad_problem_list_refused_by_the_python_backends(backend, case):
    """The torch and Triton backends check a problem list's values too (check_index_values: on CPU tensors here;
    on a GPU with device-side asserts)."""
    if backend not in ("torch", "triton") or backend_device(backend) != "cpu":
        pytest.skip("checked on the host by the Python backends on CPU tensors")
    values, max_group, _ = BAD_PROBLEM_LISTS[case]
    p = problem(4, 6, 6, 4, 4, 5, 5, 3, "class", seed=13)
    with pytest.raises(ValueError, match=r"problems: |max_group"):
        run(backend, dict(p, problems=torch.tensor(values, dtype=torch.int32), max_group=max_group))


def test_unchecked_indices_give_the_same_result(backend):
    """check_indices=False (what the engine passes: its indices come from the planner) computes the same."""
    p = problem(5, 8, 9, 6, 7, 6, 6, 3, "class", seed=14)
    q = with_problems(p)
    checked = run(backend, q)
    assert torch.equal(run(backend, dict(q, check_indices=False)).cpu(), checked.cpu())


# ---------------------------------------------------------------------------------------------------------------
# torch.library / torch.compile integration

OPCHECK_CASES = [
    dict(B=3, C_in=8, C_out=6, Kin=5, Kout=4, H=6, W=6, k=3, sharing="sample"),
    dict(B=4, C_in=8, C_out=6, Kin=5, Kout=4, H=7, W=5, k=1, sharing="shared", padding=0, residual=False),
    dict(B=2, C_in=8, C_out=6, Kin=5, Kout=4, H=9, W=9, k=3, sharing="class", stride=2, dilation=2, bias=False,
         relu=False),
]


@pytest.mark.parametrize("planned", [False, True], ids=["derived", "planned"])
@pytest.mark.parametrize("case", range(len(OPCHECK_CASES)))
def test_opcheck(backend, case, planned):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch (dynamic shapes)."""
    if backend == "torch":
        pytest.skip("the torch backend is a plain function, not a registered op")
    p = make_problem(**OPCHECK_CASES[case])
    if planned:
        p = with_problems(p)
    torch.library.opcheck(backend_op(backend), op_args(moved(p, backend_device(backend))))


def test_fake_kernel_shape(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend == "torch":
        pytest.skip("the torch backend is a plain function (data-dependent per-group loop), not a registered op")
    p = make_problem(3, 8, 6, 5, 4, 9, 7, 3, "sample", stride=2, padding=2, dilation=2)
    expect = tuple(run(backend, p).shape)
    for q in (p, with_problems(p)):
        args = op_args(moved(q, backend_device(backend)))
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            out = backend_op(backend)(*fake)
        assert tuple(out.shape) == expect
        assert out.dtype == torch.float32 and out.device.type == torch.device(backend_device(backend)).type


def test_torch_compile_fullgraph():
    require("cpu")
    p = with_problems(make_problem(4, 8, 6, 5, 4, 6, 6, 3, "class", seed=3))
    max_group = p["max_group"]

    def f(x, in_idx, weight, bias, out_idx, sample_group, residual, problems):
        y = torch.ops.gencnp_fast.gathered_conv2d(x, in_idx, weight, bias, out_idx, sample_group, residual,
                                                  [1, 1], [1, 1], [1, 1], True, problems, max_group)
        return y * 2.0 + 1.0

    got = torch.compile(f, fullgraph=True, backend="inductor")(*op_args(p)[:7], p["problems"])
    assert rel_err(got, gathered_conv2d_reference(**p) * 2.0 + 1.0) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# fuzz

def test_fuzz(backend):
    """Random shapes, geometry, sharing, epilogue and dtype; tiny and fewer examples under the interpreter."""
    small = interpreted(backend)
    dim = 5 if small else 9

    @settings(max_examples=15 if small else 40, deadline=None, database=None)
    @given(
        B=st.integers(1, 3 if small else 4),
        C_in=st.integers(1, dim),
        C_out=st.integers(1, dim),
        extra_in=st.integers(0, 2),
        extra_out=st.integers(0, 2),
        H=st.integers(1, 7 if small else 9),
        W=st.integers(1, 7 if small else 9),
        k=st.sampled_from([1, 2, 3, 5]),
        stride=st.integers(1, 3),
        padding=st.integers(0, 2),
        dilation=st.integers(1, 2),
        sharing=st.sampled_from(["shared", "class", "sample"]),
        relu=st.booleans(),
        residual=st.booleans(),
        bias=st.booleans(),
        dtype=st.sampled_from(dtypes_of(backend)),
        seed=st.integers(0, 2**16),
    )
    def one(B, C_in, C_out, extra_in, extra_out, H, W, k, stride, padding, dilation, sharing, relu, residual, bias,
            dtype, seed):
        assume(H + 2 * padding - dilation * (k - 1) - 1 >= 0 and W + 2 * padding - dilation * (k - 1) - 1 >= 0)
        p = problem(B, C_in, C_out, C_in + extra_in, C_out + extra_out, H, W, k, sharing, stride, padding,
                    dilation, relu=relu, residual=residual, bias=bias, seed=seed)
        check(backend, p, dtype)

    one()


def _mutate(p, what, value, rng):
    """One argument of ``p`` made (possibly) invalid: an index value, a size, a dtype, a stride / padding."""
    q = dict(p)
    if what in ("in_idx", "out_idx", "sample_group"):
        t = q[what].clone()
        if t.numel():
            t.view(-1)[int(rng.integers(t.numel()))] = value
        q[what] = t
    elif what == "problems":
        q.update(with_problems(q))
        t = q["problems"].clone()
        t.view(-1)[int(rng.integers(t.numel()))] = value
        q["problems"] = t
    elif what == "max_group":
        q.update(with_problems(q))
        q["max_group"] = value
    elif what in ("stride", "padding", "dilation"):
        q[what] = (value, 1) if rng.integers(2) else value
    elif what == "x_channels":  # x no longer matches in_idx
        q["x"] = q["x"][:, : max(q["x"].shape[1] + value % 3 - 1, 0)]
    elif what == "dtype":
        q[["x", "weight", "in_idx", "out_idx", "sample_group"][value % 5]] = q[
            ["x", "weight", "in_idx", "out_idx", "sample_group"][value % 5]].to(
            [torch.float64, torch.int64, torch.float16, torch.int16][value % 4])
    return q


def test_fuzz_bad_arguments_are_refused_or_computed(backend):
    """Random invalid arguments (index values out of range, wrong sizes, dtypes, strides, problem lists): every
    backend either raises an error that names the problem (RuntimeError / ValueError / TypeError) or, where the
    change left the call valid, computes the right result. Never a crash, never an unchecked read (the process
    would die)."""
    import numpy as np

    small = interpreted(backend)

    @settings(max_examples=15 if small else int(os.environ.get("GENCNP_FUZZ_EXAMPLES", 60)), deadline=None,
              database=None)
    @given(what=st.sampled_from(["in_idx", "out_idx", "sample_group", "problems", "max_group", "stride",
                                 "padding", "dilation", "x_channels", "dtype"]),
           value=st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 12), seed=st.integers(0, 2**16))
    def one(what, value, seed):
        rng = np.random.default_rng(seed)
        p = problem(3, 5, 6, 4, 4, 5, 5, 3, ["shared", "class", "sample"][seed % 3], seed=seed)
        q = _mutate(p, what, value, rng)
        try:
            out = run(backend, q)
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:
            assert str(e).strip(), "an error without a message"
            return
        # accepted: the call must have been valid, so the result must be right
        check(backend, q)
        assert out.shape[0] == q["x"].shape[0]

    one()
