"""Triton kernels of the gathered ("compacted") convolution: one launch for a whole batch of per-sample masks.

The op (the contract of ``gencnp_fast::gathered_conv2d``, :mod:`gencnp_fast.kernels.contract`)::

    out[b, j] = act(bias[o] + sum_{j' < n_in(b)} conv(x[b, j'], weight[o, in_idx[b, j']]) + residual[b, j])
    o = out_idx[b, j];  out[b, j] = 0 exactly where out_idx[b, j] == -1

How the kernel maps it to an implicit GEMM
------------------------------------------
The batch is split into *problems*: one per group of samples sharing a mask (``sample_group``; per-sample masks give
one problem per sample). Problem ``g`` with ``cnt_g`` samples, ``n_in`` active inputs and ``n_out`` active
outputs is the GEMM

    C[M, N] = A[M, K] @ W[K, N],   M = cnt_g * Ho * Wo,  N = n_out,  K = n_in * kh * kw

- rows ``m`` of ``A`` are the output pixels of every sample of the group (so one weight tile is reused by all of
  them), columns ``k = j * kh*kw + r * kw + s`` walk the group's list of active input channels: ``A[m, k]`` is
  ``x[b, j, oh*sh - ph + r*dh, ow*sw - pw + s*dw]`` (the im2col gather is fused into the load, out-of-image
  taps are masked to 0). The compact input already holds only active channels, so ``j`` is a position in
  ``x``; the weight row is ``in_idx[b, j]``.
- columns ``n`` of ``W`` are active output channels: ``W[k, n] = weight[out_idx[b, n], in_idx[b, j], r, s]``,
  gathered from the plain ``[C_out, C_in, kh, kw]`` layout in place (no per-sample weight copies; contiguous
  along ``k`` whenever active input channels are consecutive).
- the epilogue adds ``bias[out_idx]`` and the residual, applies ReLU, casts, and stores to the compact output
  position ``out[b, n, oh, ow]`` (the scatter is fused into the store). Columns ``n >= n_out`` (the ``-1``
  padding) are stored as exact zeros, so the output needs no memset.

One launch covers every problem: grid = (M tiles of the largest problem, N tiles of ``Kout``, problems);
programs outside their problem's ragged ``M``/``N`` return at once, boundary tiles use masks. Accumulation is
float32 for float32/float16/bfloat16 inputs (float32 dots use IEEE precision, not TF32, so the float32 result
matches the dense model to ~1e-6). Tile sizes are autotuned on the GPU among the candidates that fit the shape
(``GENCNP_FAST_TRITON_AUTOTUNE=0``: one configuration picked by rule, no timing); under ``TRITON_INTERPRET=1``
(CPU, for tests) a single small configuration is used.
"""
from __future__ import annotations

import inspect
import os
from typing import List, Optional

import torch

import triton
import triton.language as tl

from .contract import check_gathered_conv, check_index_values, compact_residual, pair, problem_list

__all__ = ["gathered_conv2d_triton", "gathered_linear_triton", "autotune_enabled", "heuristic_config", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

AUTOTUNE_ENV = "GENCNP_FAST_TRITON_AUTOTUNE"

if INTERPRET:
    # The interpreter runs every program in numpy on the CPU (~3000x slower): one small tile, no tuning.
    _CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=1, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
        for (bm, bn, bk, w, s) in [
            (128, 128, 32, 8, 3),
            (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (64, 64, 32, 4, 4),
            (64, 64, 64, 4, 3),
            (32, 64, 32, 4, 4),
            (64, 32, 32, 4, 4),
            (32, 32, 32, 2, 4),
            (16, 64, 64, 4, 3),  # small M: late layers at 2x2..4x4, linear layers
            (16, 32, 64, 2, 3),
            (128, 16, 32, 4, 4),  # 16 active outputs (a 64-channel layer per sample at density 0.25)
            (256, 16, 32, 8, 3),
        ]
    ]


def autotune_enabled() -> bool:
    """Whether tile sizes are timed per shape on the GPU (the default) or picked by :func:`heuristic_config`.

    ``GENCNP_FAST_TRITON_AUTOTUNE=0`` turns the timing off: no compile and benchmark of every candidate on the
    first call of each new shape (useful for test suites and short GPU sessions). The interpreter never tunes.
    """
    return not INTERPRET and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _m_rows(max_cnt: int, howo: int) -> int:
    return int(max_cnt) * int(howo)


def heuristic_config(max_cnt: int, howo: int, kout: int) -> "triton.Config":
    """One tile configuration from the problem's shape: GEMM rows ``M = largest group x Ho*Wo``, columns ``Kout``.

    Small ``M`` (late 2x2..8x8 layers of a per-sample mask, linear layers) gets 16-row tiles with a long ``BK``;
    layers with at most 16 active outputs 16-column tiles, other narrow layers 32-column tiles; large maps with
    wide outputs 128x128 tiles; otherwise 64x64.
    """
    if INTERPRET:
        return _CONFIGS[0]
    m = _m_rows(max_cnt, howo)
    if m <= 64:
        bm, bn, bk, w, s = (16, 64, 64, 4, 3) if kout > 32 else (16, 32, 64, 2, 3)
    elif kout <= 16:
        bm, bn, bk, w, s = (128, 16, 32, 4, 4)
    elif kout <= 32:
        bm, bn, bk, w, s = (64, 32, 32, 4, 4)
    elif m >= 4096 and kout >= 128:
        bm, bn, bk, w, s = (128, 128, 32, 8, 3)
    else:
        bm, bn, bk, w, s = (64, 64, 32, 4, 4)
    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)


def _prune_configs(configs, named_args, **kwargs):
    """Autotune only the candidates that fit the shape: row tiles no taller than needed for small ``M``, no
    16/32-row tiles for large ``M``, no 128-column tiles for narrow layers, 16-column tiles only for at most 16
    outputs. Keeps at least one."""
    m = _m_rows(named_args["MAX_CNT"], named_args["HOWO"])
    kout = int(named_args["KOUT"])
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BM"], c.kwargs["BN"]
        if m <= 64 and bm > 32:
            continue
        if m >= 1024 and bm < 64:
            continue
        if kout <= 64 and bn > 64:
            continue
        if bn == 16 and (kout > 16 or m <= 64):
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])]


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: 5 ms of warm-up and 25 ms of repetitions per candidate (Triton's default 25 + 100 ms
    made the first forward of a model spend seconds per layer shape)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def _gathered_conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    in_idx_ptr, out_idx_ptr, n_in_ptr, n_out_ptr,
    samples_ptr, gstart_ptr, gcount_ptr,
    KIN, KOUT, H, W, HO, WO, HOWO, C_IN, MAX_CNT, DTYPE_KEY,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    gstart = tl.load(gstart_ptr + g)
    cnt = tl.load(gcount_ptr + g)
    m_total = cnt * HOWO
    if pid_m * BM < m_total:
        rep = tl.load(samples_ptr + gstart)  # every sample of the group has the same index rows
        n_in = tl.load(n_in_ptr + rep)
        n_out = tl.load(n_out_ptr + rep)
        KK: tl.constexpr = KH * KW

        # ---- rows: output pixels of the group's samples --------------------------------------------------------
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < m_total
        s_local = offs_m // HOWO
        pix = offs_m - s_local * HOWO
        oh = pix // WO
        ow = pix - oh * WO
        b = tl.load(samples_ptr + gstart + s_local, mask=m_ok, other=0).to(tl.int64)
        x_base = b * KIN * H * W  # int64: large batches of large maps stay in range
        ih0 = oh * SH - PH
        iw0 = ow * SW - PW

        # ---- columns: active output channels ---------------------------------------------------------------
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < n_out
        o = tl.load(out_idx_ptr + rep * KOUT + offs_n, mask=n_ok, other=0)
        w_col = o.to(tl.int64) * (C_IN * KK)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # Reduction over the group's active input channels x taps; empty when no output column is active.
        k_total = n_in * KK
        if pid_n * BN >= n_out:
            k_total = 0
        for k0 in range(0, k_total, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < k_total
            j = offs_k // KK
            rs = offs_k - j * KK
            r = rs // KW
            s = rs - r * KW
            c = tl.load(in_idx_ptr + rep * KIN + j, mask=k_ok, other=0)  # original input channel

            ih = ih0[:, None] + (r * DH)[None, :]
            iw = iw0[:, None] + (s * DW)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = x_base[:, None] + (j * (H * W))[None, :] + ih * W + iw
            a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)

            w_off = w_col[None, :] + (c * KK + rs).to(tl.int64)[:, None]
            wt = tl.load(w_ptr + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, wt, acc=acc, input_precision=DOT_PRECISION)

        # ---- epilogue: bias + residual + ReLU, zero padding columns, store to compact positions ---------------
        if HAS_BIAS:
            bv = tl.load(bias_ptr + o, mask=n_ok, other=0.0).to(tl.float32)
            acc += bv[None, :]
        out_off = (b * KOUT * HOWO + pix)[:, None] + (offs_n * HOWO)[None, :]
        st_ok = m_ok[:, None] & (offs_n < KOUT)[None, :]
        if HAS_RES:
            rv = tl.load(res_ptr + out_off, mask=st_ok & n_ok[None, :], other=0.0).to(tl.float32)
            acc += rv
        if RELU:
            acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu
        acc = tl.where(n_ok[None, :], acc, 0.0)
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=st_ok)


def _autotuned(kernel):
    kw = dict(configs=_CONFIGS, key=["KOUT", "KIN", "HOWO", "KH", "KW", "MAX_CNT", "DTYPE_KEY"],
              prune_configs_by={"early_config_prune": _prune_configs})
    if "do_bench" in inspect.signature(triton.autotune).parameters:  # Triton >= 3.2; older ones time 25 + 100 ms
        kw["do_bench"] = _quick_bench
    return triton.autotune(**kw)(kernel)


_gathered_conv2d_kernel_tuned = _autotuned(_gathered_conv2d_kernel)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_KEY = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@torch.library.custom_op("gencnp_fast::gathered_conv2d_triton", mutates_args=())
def gathered_conv2d_triton(
    x: torch.Tensor,
    in_idx: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_idx: torch.Tensor,
    sample_group: torch.Tensor,
    residual: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    relu: bool,
    problems: Optional[torch.Tensor] = None,
    max_group: int = -1,
    check_indices: bool = True,
    residual_take: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The gathered conv (the contract of ``gencnp_fast::gathered_conv2d``, :mod:`gencnp_fast.kernels.contract`)
    with the Triton kernel, registered as the op ``torch.ops.gencnp_fast.gathered_conv2d_triton``.

    float32, float16 or bfloat16 (x, weight, bias and residual in one dtype), float32 accumulation; CUDA tensors,
    or CPU tensors under ``TRITON_INTERPRET=1``. Without ``problems`` the problem list is derived from
    ``sample_group`` (one synchronisation). ``residual_take``: the residual is re-compacted first
    (:func:`~gencnp_fast.kernels.contract.compact_residual`), not read in place.
    """
    B, KOUT, HO, WO = check_gathered_conv(x, in_idx, weight, bias, out_idx, sample_group, residual, stride,
                                          padding, dilation, problems, max_group, _DTYPES, residual_take)
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"gathered_conv2d_triton: tensors must be on a CUDA device (got {x.device}); "
                         "CPU tensors run only under TRITON_INTERPRET=1")
    out = torch.empty((B, KOUT, HO, WO), dtype=x.dtype, device=x.device)
    if B == 0 or KOUT == 0:
        return out
    if problems is None:
        problems, max_group = problem_list(sample_group)
    if check_indices:
        check_index_values(in_idx, out_idx, weight.shape[1], weight.shape[0], problems, max_group, sample_group,
                           residual_take, 0 if residual is None else residual.shape[1])
    if residual_take is not None:
        residual = compact_residual(residual, residual_take)
    ngroups = (problems.shape[0] - B) // 2
    _launch(x.contiguous(), in_idx.contiguous(), weight.contiguous(), bias, out_idx.contiguous(), residual,
            out, problems.contiguous(), ngroups, max_group, pair(stride, "stride"), pair(padding, "padding"),
            pair(dilation, "dilation"), relu)
    return out


@gathered_conv2d_triton.register_fake
def _gathered_conv2d_triton_fake(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding,
                                 dilation, relu, problems=None, max_group=-1, check_indices=True,
                                 residual_take=None):
    shape = check_gathered_conv(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding, dilation,
                                problems, max_group, _DTYPES, residual_take)
    return x.new_empty(shape)


def _launch(x, in_idx, weight, bias, out_idx, residual, out, problems, ngroups, max_cnt, stride, padding, dilation,
            relu) -> None:
    B, KIN, H, W = x.shape
    C_OUT, C_IN, KH, KW = weight.shape
    _, KOUT, HO, WO = out.shape
    bias_t = bias.contiguous() if bias is not None else weight  # dummy pointer, never read
    res_t = residual.contiguous() if residual is not None else out  # dummy pointer, never read
    n_in = (in_idx >= 0).sum(1, dtype=torch.int32)
    n_out = (out_idx >= 0).sum(1, dtype=torch.int32)
    samples, gstart, gcount = problems[:B], problems[B:B + ngroups], problems[B + ngroups:]
    howo = HO * WO
    args = (
        x, weight, bias_t, res_t, out,
        in_idx, out_idx, n_in, n_out,
        samples, gstart, gcount,
        KIN, KOUT, H, W, HO, WO, howo, C_IN, max_cnt, _DTYPE_KEY[x.dtype],
        *stride, *padding, *dilation,
    )
    meta = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")

    def grid(m):
        return (triton.cdiv(max_cnt * howo, m["BM"]), triton.cdiv(KOUT, m["BN"]), ngroups)

    if autotune_enabled():
        _gathered_conv2d_kernel_tuned[grid](*args, **meta)
    else:
        cfg = heuristic_config(max_cnt, howo, KOUT)
        _gathered_conv2d_kernel[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                                   num_stages=cfg.num_stages)


def gathered_linear_triton(
    x: torch.Tensor,
    in_idx: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_idx: torch.Tensor,
    sample_group: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
) -> torch.Tensor:
    """Gathered linear layer: ``x [B, Kin]``, ``weight [C_out, C_in]``, ``residual [B, Kout]`` -> ``[B, Kout]``.

    The same kernel with a 1x1 "image": each group's samples are the GEMM rows, so a gathered weight tile is read
    once per group of samples that share a mask.
    """
    B = x.shape[0]
    y = gathered_conv2d_triton(
        x.reshape(B, -1, 1, 1), in_idx, weight.reshape(weight.shape[0], -1, 1, 1), bias, out_idx, sample_group,
        None if residual is None else residual.reshape(B, -1, 1, 1), [1, 1], [0, 0], [1, 1], relu,
    )
    return y.reshape(B, -1)
