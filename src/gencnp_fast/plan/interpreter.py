"""The interpreter: runs a plan's steps with a conv backend and the run's planned indices (docs/design.md §3).

Every step reads and writes compacted tensors; a conv step calls the backend with explicit index lists, conv
groups and problem list (the backend contract, :mod:`gencnp_fast.kernels.contract`). Nothing here decides on data:
every decision that depends on the masks was taken by the index planning (:mod:`gencnp_fast.plan.indices`).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .indices import (ChannelIndex, RunIndices, apply_remap, compiled, fused_residual_take, packed_conv,
                      small_map_eligible)
from .sets import FlatFeatures
from .steps import ChannelwiseStep, ConvStep, FlattenStep, Plan, RemapStep

__all__ = ["run_plan", "ConvFn", "small_map_weights"]

# The small-map path needs this many samples under one mask to beat the taps (VGG-16-BN for CIFAR, density 0.25,
# paired with the reference on the 2-core VM: batch 1 2.49 ms with taps vs 2.89 ms, 16 on par, 64 23.0 vs 20.5 ms)
SMALL_MAP_MIN_BATCH = 16

# A layer with nothing pruned runs as torch's dense conv, except on the CPU where its whole work (batch x
# multiply-adds of one sample) is at most this: there torch's conv2d costs more in its fixed per-call work than the
# compiled op (3x3 convs at batch 1, paired medians on the 2-core Zen 4 VM: 32->64 on 14x14 (3.6 M) 93 vs 52 us,
# 64->128 on 7x7 (3.6 M) 87 vs 64 us, 128->128 on 7x7 (7.2 M) 159 vs 117 us; from ~15 M on torch wins: 128->128 on
# 16x16 (38 M) 0.87x, batch 4 of 64->128 on 7x7 (14 M) 0.85x). Explaining one image (dense capture) and pathways
# that keep some layers whole at batch 1 take this path.
DENSE_OP_MAX_MACS = 8_000_000

# A conv backend: (x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding, dilation, relu,
# problems, max_group, check_indices, residual_take) -> out  (the contract of torch.ops.gencnp_fast.gathered_conv2d;
# the interpreter passes check_indices=False: the run index planner builds valid indices)
ConvFn = Callable[..., torch.Tensor]


def small_map_weights(st: ConvStep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(W2 [C_out*Po, C_in*Pi, 1, 1], bias2)`` with ``W2[(o, q), (c, p)] = weight[o, c, tap]`` for the tap that
    reads input pixel ``p`` at output pixel ``q`` (0 where none does). Built once per plan, on first use."""
    if st.small_map is None:
        w = st.weight
        cout, cin, kh, kw = w.shape
        _, h, wd = st.in_shape
        _, ho, wo = st.out_shape
        (sh, sw), (ph, pw), (dh, dw) = st.stride, st.padding, st.dilation
        w2 = w.new_zeros(cout, ho, wo, cin, h, wd)
        for oy in range(ho):
            for ox in range(wo):
                for ty in range(kh):
                    iy = oy * sh - ph + ty * dh
                    if not 0 <= iy < h:
                        continue
                    for tx in range(kw):
                        ix = ox * sw - pw + tx * dw
                        if 0 <= ix < wd:
                            w2[:, oy, ox, :, iy, ix] = w[:, :, ty, tx]
        b2 = None if st.bias is None else st.bias.repeat_interleave(ho * wo)
        st.small_map = (w2.reshape(cout * ho * wo, cin * h * wd, 1, 1).contiguous(), b2)
    return st.small_map


def _on_cpu_op(x: torch.Tensor, conv: Optional[ConvFn]) -> bool:
    return conv is not None and x.device.type == "cpu" and x.dtype == torch.float32 and conv is _compiled_op()


def _dense_on_op(st: ConvStep, x: torch.Tensor, conv: Optional[ConvFn]) -> bool:
    """A layer with nothing pruned runs on the compiled CPU op (:data:`DENSE_OP_MAX_MACS`)."""
    if not _on_cpu_op(x, conv):
        return False
    pixels = 1 if st.linear else st.out_shape[1] * st.out_shape[2]
    return x.shape[0] * st.weight.numel() * pixels <= DENSE_OP_MAX_MACS


def _compiled_op() -> Optional[ConvFn]:
    ops = getattr(torch.ops, "gencnp_fast", None)
    return getattr(ops, "gathered_conv2d", None) if ops is not None else None


def _linear_on_union(st: ConvStep, x: torch.Tensor, in_ch: ChannelIndex, out_ch: ChannelIndex,
                     conv: Optional[ConvFn]) -> Optional[torch.Tensor]:
    """A linear layer that computes every output (a classifier's logits) from inputs kept per sample or per class,
    on the CPU op: the compact inputs scattered into a zero-filled dense row per sample, and one call of the op with
    every input listed for the whole batch, which gathers each weight tile once for all samples. Called per group,
    the op gathers, for each group, its input columns of every weight row; columns of one feature each lie 4 bytes
    apart, so each group reads nearly every cache line of the weight (ResNet-50's 2048 -> 1000 head, 8 MB, per-sample
    masks at batch 8: 1.9 ms). Taken where the groups' kept columns add up to at least the weight's width
    (``groups x K_in >= C_in``: the per-group calls would read at least the weight's bytes) and the layer is
    narrower than the op's one-pixel path (``_C.one_pixel_min_width()``, 4096 with AVX-512), which reads each
    weight row once per call anyway and whose sums would not be the per-group call's bits here. The result is
    bit-equal to the per-group call: the micro-kernel sums over the listed inputs in ascending order, and each
    pruned input adds ``w * 0`` (exactly 0 for a finite weight) to its sum; so a sample's logits do not depend on
    the batch it came in. None where not taken."""
    c_in = st.weight.shape[1]
    if (not st.linear or st.residual is not None or not out_ch.full or in_ch.full
            or in_ch.ngroups * x.shape[1] < c_in or not _on_cpu_op(x, conv)
            or c_in >= compiled().one_pixel_min_width()):
        return None
    b = x.shape[0]
    idx = in_ch.idx.long()
    dense_in = x.new_zeros(b, c_in + 1)  # column c_in takes the -1 padding entries (zeros)
    dense_in.scatter_(1, idx.masked_fill(idx < 0, c_in), x.reshape(b, -1))
    every = torch.arange(c_in, dtype=torch.int32).expand(b, c_in)
    one_group = torch.zeros(b, dtype=torch.int32)
    y = conv(dense_in[:, :c_in].reshape(b, c_in, 1, 1), every, st.weight, st.bias, out_ch.idx, one_group, None,
             [1, 1], [0, 0], [1, 1], st.relu, None, -1, False, None)
    return y.reshape(b, -1)


def _conv_step(st: ConvStep, x: torch.Tensor, env: Dict[str, torch.Tensor], ix: RunIndices,
               conv: ConvFn) -> torch.Tensor:
    in_ch, out_ch = ix.sets[st.in_set], ix.sets[st.out_set]
    b = x.shape[0]
    if st.linear:
        x = x.reshape(b, -1, 1, 1)
    dense = in_ch.full and out_ch.full
    y = None if dense else _linear_on_union(st, x, in_ch, out_ch, conv)
    if y is not None:
        return y
    small = (not dense and in_ch.ngroups == 1 and out_ch.ngroups == 1 and b >= SMALL_MAP_MIN_BATCH
             and small_map_eligible(st))
    residual = residual_take = None
    if st.residual is not None:
        res_slot, res_set = st.residual
        remap = ix.remaps[(res_set, st.out_set)]
        # The gathered conv re-compacts a residual stored for another channel set in its epilogue (residual_take,
        # one row for the batch or a row per sample); the dense and small-map paths take a re-compacted copy.
        residual_take = None if dense or small else fused_residual_take(remap)
        residual = env[res_slot] if residual_take is not None else apply_remap(env[res_slot], remap)
        if st.linear:
            residual = residual.reshape(b, -1, 1, 1)
    if dense and not _dense_on_op(st, x, conv):
        # Nothing pruned on either side: the dense conv (BN folded), torch's kernel for all but the tiniest work
        # (those take the gathered call below with every channel listed).
        y = F.conv2d(x, st.weight, st.bias, st.stride, st.padding, st.dilation)
        if residual is not None:
            y = y.add_(residual)
        if st.relu:
            y = y.relu_()
        return y.reshape(b, -1) if st.linear else y
    groups = ix.conv_groups[(st.in_set, st.out_set)]
    if small:
        # One mask for the whole batch on a tiny map: the conv as a dense linear map of the whole map (2.25x fewer
        # FLOPs for 3x3 on 2x2, same sums in the same order). It reads 2-4x the weight bytes of the 3x3 taps, so
        # it pays only where the FLOPs dominate: a large batch of one group. Several groups would gather the larger
        # slices once per group, and a small batch is bound by the weight bytes: those keep the 3x3 path.
        w2, b2 = small_map_weights(st)
        _, ho, wo = st.out_shape
        pi = st.in_shape[1] * st.in_shape[2]
        res2 = None if residual is None else residual.reshape(b, -1, 1, 1).contiguous()
        y = conv(x.reshape(b, -1, 1, 1).contiguous(), ix.sets[FlatFeatures(st.in_set, pi)].idx, w2, b2,
                 ix.sets[FlatFeatures(st.out_set, ho * wo)].idx, groups.sample_group, res2, [1, 1], [0, 0], [1, 1],
                 st.relu, groups.problems, groups.max_group, False)
        return y.reshape(b, -1, ho, wo)
    packed = None if dense else packed_conv(st, ix, in_ch, out_ch)
    weight, bias, in_idx, out_idx = packed if packed is not None else (st.weight, st.bias, in_ch.idx, out_ch.idx)
    y = conv(x.contiguous(), in_idx, weight, bias, out_idx, groups.sample_group,
             None if residual is None else residual.contiguous(), list(st.stride), list(st.padding),
             list(st.dilation), st.relu, groups.problems, groups.max_group, False, residual_take)
    return y.reshape(b, -1) if st.linear else y


def run_plan(plan: Plan, indices: RunIndices, x: torch.Tensor, conv: Optional[ConvFn],
             env_out: Optional[Dict[str, torch.Tensor]] = None,
             step_seconds: Optional[Dict[int, List[float]]] = None,
             sync: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Run ``plan`` on ``x`` with the run's ``indices`` (:func:`~gencnp_fast.plan.indices.plan_run`, or the tests'
    oracle planner) and the conv backend ``conv``; with ``env_out`` (a dict) every value slot is left in it, and
    with ``step_seconds`` (a dict) each step's wall time is appended under its index (``benchmarks/layer_profile.py``;
    on a GPU pass ``sync=torch.cuda.synchronize``, called around each timed step, else the times are launch
    times)."""
    b = x.shape[0]
    env: Dict[str, torch.Tensor] = {plan.input_slot: x}
    for i, st in enumerate(plan.steps):
        src = env[st.src]
        if step_seconds is not None and sync is not None:
            sync()
        t0 = time.perf_counter() if step_seconds is not None else 0.0
        if isinstance(st, ConvStep):
            y = _conv_step(st, src, env, indices, conv)
        elif isinstance(st, ChannelwiseStep):
            y = src.new_zeros((b, 0) + tuple(st.out_shape[1:])) if src.shape[1] == 0 else st.fn(src)
        elif isinstance(st, FlattenStep):
            y = src.reshape(b, -1)
        else:
            y = _remap_step(st, src, env, indices)
        if step_seconds is not None:
            if sync is not None:
                sync()
            step_seconds.setdefault(i, []).append(time.perf_counter() - t0)
        env[st.dst] = y
        if env_out is None:  # with env_out every value is the caller's
            for slot in plan.releases[i]:
                del env[slot]
    if env_out is not None:
        env_out.update(env)
    return env[plan.output_slot]


def _remap_step(st: RemapStep, src: torch.Tensor, env: Dict[str, torch.Tensor], ix: RunIndices) -> torch.Tensor:
    y = apply_remap(src, ix.remaps[(st.src_set, st.dst_set)])
    if st.add is not None:
        y = y + apply_remap(env[st.add[0]], ix.remaps[(st.add[1], st.dst_set)])
    return F.relu(y) if st.relu else y
