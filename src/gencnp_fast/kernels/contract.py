"""The contract of the gathered convolution, in Python: one argument check shared by the fake kernels and the Triton
launcher, the problem-list helper, and the plain-torch implementation (the ``"torch"`` backend and the tests'
oracle). Needs no compiled code. The compiled kernels check the same contract in ``csrc/gathered_conv_params.cpp``.

``gathered_conv2d(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding, dilation, relu,
problems=None, max_group=-1, check_indices=True, residual_take=None)`` (docs/design.md §3)::

    out[b, j] = act(bias[o] + sum_{j' valid} conv(x[b, j'], weight[o, in_idx[b, j']]) + residual[b, j])
    o = out_idx[b, j];  out[b, j] = 0 exactly where out_idx[b, j] == -1

- ``x`` ``[B, Kin, H, W]``: compacted activations; channel ``j`` of sample ``b`` holds input channel
  ``in_idx[b, j]``; entries with ``in_idx[b, j] == -1`` are padding and never read.
- ``in_idx`` int32 ``[B, Kin]``, ``out_idx`` int32 ``[B, Kout]``: per row the valid entries ascend and come first,
  then ``-1``.
- ``weight`` ``[C_out, C_in, kh, kw]`` (BN folded, plain layout), ``bias`` ``[C_out]`` or None.
- ``sample_group`` int32 ``[B]``: samples with equal values have identical ``in_idx`` and ``out_idx`` rows (one
  shared mask: all equal; per-class masks: the class; per-sample masks: all distinct); one weight tile is gathered
  per group.
- ``residual`` ``[B, Kout, Ho, Wo]`` aligned with ``out_idx``, added before the ReLU.
- ``residual_take`` int64 ``[Kout]`` (one row for the whole batch) or ``[B, Kout]`` (a row per sample), optional:
  the residual is stored for another channel set, ``[B, Kres, Ho, Wo]``, and position ``j`` of sample ``b`` adds
  ``residual[b, t]`` with ``t = residual_take[j]`` (or ``residual_take[b, j]``), nothing where ``t == -1``
  (:func:`compact_residual`; the CPU kernel reads it in place, the others re-compact first).
- ``problems`` int32 ``[B + 2G]`` and ``max_group``: the grouped-problem list of ``sample_group`` (samples sorted by
  group, start of each group, size of each group) and the largest group, planned beforehand; without them each
  backend derives them (the CUDA kernel and the Triton launcher then synchronise with the device).
- ``check_indices``: check the index values before any is used (:func:`check_index_values`): on the host for CPU
  tensors, with device-side asserts (raised at the next synchronisation) on a GPU. The engine passes ``False``: its
  indices come from the run index planner, which builds them valid.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["IntPair", "pair", "conv_output_size", "check_gathered_conv", "check_index_values", "problem_list",
           "compact_residual", "gathered_conv2d_reference"]

IntPair = Union[int, Sequence[int]]


def pair(v: IntPair, name: str) -> Tuple[int, int]:
    """``v`` as a pair of ints (an int, or a sequence of 1 or 2)."""
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(e) for e in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"gathered_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def conv_output_size(h: int, w: int, kh: int, kw: int, stride: IntPair = 1, padding: IntPair = 0,
                     dilation: IntPair = 1) -> Tuple[int, int]:
    """(Ho, Wo) of a conv2d, the same formula as ``torch.nn.functional.conv2d``."""
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def check_gathered_conv(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding, dilation,
                        problems=None, max_group=-1, dtypes=(torch.float32,),
                        residual_take=None) -> Tuple[int, int, int, int]:
    """Check the shapes, dtypes and devices of the op's arguments (``torch._check``: works on fake tensors too) and
    return the output shape ``(B, Kout, Ho, Wo)``. Values are not read here."""
    op = "gathered_conv2d: "
    torch._check(x.dim() == 4, lambda: op + f"x must be [B, Kin, H, W], got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 4, lambda: op + f"weight must be [C_out, C_in, kh, kw], got {tuple(weight.shape)}")
    torch._check(x.dtype in dtypes, lambda: op + f"x must be one of {dtypes} on {x.device.type}, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None:
            torch._check(t.dtype == x.dtype, lambda: op + f"{name} must be {x.dtype} like x, got {t.dtype}")
    for name, t in (("in_idx", in_idx), ("out_idx", out_idx), ("sample_group", sample_group),
                    ("problems", problems)):
        if t is not None:
            torch._check(t.dtype == torch.int32, lambda: op + f"{name} must be int32, got {t.dtype}")
    for name, t in (("in_idx", in_idx), ("weight", weight), ("bias", bias), ("out_idx", out_idx),
                    ("sample_group", sample_group), ("residual", residual), ("problems", problems),
                    ("residual_take", residual_take)):
        if t is not None:
            torch._check(t.device == x.device, lambda: op + f"{name} is on {t.device}, x is on {x.device}")
    B, KIN, H, W = x.shape
    C_OUT, _, KH, KW = weight.shape
    torch._check(in_idx.dim() == 2 and in_idx.shape[0] == B and in_idx.shape[1] == KIN,
                 lambda: op + f"in_idx must be [B, Kin] = [{B}, {KIN}], got {tuple(in_idx.shape)}")
    torch._check(out_idx.dim() == 2 and out_idx.shape[0] == B,
                 lambda: op + f"out_idx must be [B, Kout] with B = {B}, got {tuple(out_idx.shape)}")
    torch._check(sample_group.dim() == 1 and sample_group.shape[0] == B,
                 lambda: op + f"sample_group must be [B] = [{B}], got {tuple(sample_group.shape)}")
    torch._check(bias is None or tuple(bias.shape) == (C_OUT,),
                 lambda: op + f"bias must be [C_out] = [{C_OUT}], got {tuple(bias.shape)}")
    (sh, sw), (ph, pw), (dh, dw) = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    torch._check(min(sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0,
                 lambda: op + "stride and dilation must be >= 1, padding >= 0")
    torch._check(H + 2 * ph - dh * (KH - 1) - 1 >= 0 and W + 2 * pw - dw * (KW - 1) - 1 >= 0,
                 lambda: op + f"input {H}x{W} is smaller than the (dilated) kernel {KH}x{KW} with padding {padding}")
    HO, WO = conv_output_size(H, W, KH, KW, stride, padding, dilation)
    KOUT = out_idx.shape[1]
    if residual_take is None:
        torch._check(residual is None or tuple(residual.shape) == (B, KOUT, HO, WO),
                     lambda: op + f"residual must be [B, Kout, Ho, Wo] = {[B, KOUT, HO, WO]}, got "
                     f"{tuple(residual.shape)}")
    else:
        torch._check(residual is not None, lambda: op + "residual_take is given without a residual")
        torch._check(residual.dim() == 4 and residual.shape[0] == B and tuple(residual.shape[2:]) == (HO, WO),
                     lambda: op + f"residual must be [B, Kres, Ho, Wo] = [{B}, any, {HO}, {WO}], got "
                     f"{tuple(residual.shape)}")
        torch._check(residual_take.dtype == torch.int64,
                     lambda: op + f"residual_take must be int64, got {residual_take.dtype}")
        torch._check(tuple(residual_take.shape) in ((KOUT,), (B, KOUT)),
                     lambda: op + f"residual_take must be [Kout] = [{KOUT}] or [B, Kout] = [{B}, {KOUT}], got "
                     f"{tuple(residual_take.shape)}")
    if problems is not None:
        torch._check(problems.dim() == 1 and problems.shape[0] >= B and (problems.shape[0] - B) % 2 == 0,
                     lambda: op + f"problems must be [B + 2G] with B = {B}, got {tuple(problems.shape)}")
        torch._check(B == 0 or 1 <= max_group <= B, lambda: op + f"max_group must be in 1..{B}, got {max_group}")
    else:
        torch._check(max_group == -1, lambda: op + "max_group is given without problems")
    return B, KOUT, HO, WO


def check_index_values(in_idx: torch.Tensor, out_idx: torch.Tensor, c_in: int, c_out: int,
                       problems: Optional[torch.Tensor], max_group: int,
                       sample_group: Optional[torch.Tensor] = None, residual_take: Optional[torch.Tensor] = None,
                       k_res: int = 0) -> None:
    """The index values of a call: ``in_idx`` in ``[-1, c_in)`` and ``out_idx`` in ``[-1, c_out)``, each row's
    valid entries strictly increasing and before its -1 padding, samples of one group with identical rows, a problem
    list whose groups tile the batch with ``max_group`` the largest, ``residual_take`` (if given) in ``[-1, k_res)``.
    CPU tensors: a ``ValueError`` naming the problem; GPU tensors: ``torch._assert_async`` (no synchronisation; a bad
    value is reported at the next one)."""
    B = in_idx.shape[0]

    def ordered(t):  # each adjacent pair (a, b): b is padding, or a is valid and b > a
        a, b = t[:, :-1], t[:, 1:]
        return ((b == -1) | ((a >= 0) & (b > a))).all()

    def grouped(sample_group):  # samples with one sample_group value have identical rows
        order = torch.argsort(sample_group, stable=True)
        g = sample_group[order]
        same = g[1:] == g[:-1]
        i, o = in_idx[order], out_idx[order]
        rows_eq = (i[1:] == i[:-1]).all(1) & (o[1:] == o[:-1]).all(1)
        return (~same | rows_eq).all()

    checks = [(((in_idx >= -1) & (in_idx < c_in)).all(), f"an in_idx value is out of range [-1, {c_in})"),
              (((out_idx >= -1) & (out_idx < c_out)).all(), f"an out_idx value is out of range [-1, {c_out})"),
              (ordered(in_idx), "an in_idx row is not strictly increasing before its -1 padding"),
              (ordered(out_idx), "an out_idx row is not strictly increasing before its -1 padding")]
    if sample_group is not None and B > 1:
        checks.append((grouped(sample_group), "samples in one group (equal sample_group) have different in_idx/out_idx "
                       "rows"))
    G = 0 if problems is None else (problems.shape[0] - B) // 2
    if G > 0:
        samples, starts, sizes = problems[:B], problems[B:B + G], problems[B + G:]
        ends = torch.cumsum(sizes, 0)
        checks.append((((samples >= 0) & (samples < B)).all(), "problems: a sample is out of range"))
        # every sample once: a sample left out would leave its output rows unwritten
        listed = torch.zeros(B, dtype=torch.int32, device=samples.device).index_add_(
            0, samples.clamp(0, B - 1).long(), torch.ones_like(samples))
        checks.append(((listed == 1).all(), "problems: a sample is listed twice or not at all"))
        checks.append(((sizes >= 1).all() & (starts == ends - sizes).all() & (ends[-1] == B)
                       & (sizes.max() == max_group), "problems: the groups do not tile the batch, or max_group is "
                       "not the largest"))
        if sample_group is not None and B > 1:  # a problem's samples share one sample_group value
            first = torch.zeros(B, dtype=torch.bool, device=samples.device)
            first[starts.clamp(0, B - 1).long()] = True
            sg = sample_group[samples.clamp(0, B - 1).long()]
            checks.append(((first[1:] | (sg[1:] == sg[:-1])).all(), "problems: a group mixes samples of different "
                           "sample_group values"))
    if residual_take is not None:
        checks.append((((residual_take >= -1) & (residual_take < k_res)).all(),
                       f"a residual_take value is out of range [-1, {k_res})"))
    for ok, what in checks:
        if in_idx.device.type == "cpu":
            if not bool(ok):
                raise ValueError("gathered_conv2d: " + what)
        else:
            torch._assert_async(ok, "gathered_conv2d: " + what)


def compact_residual(residual: torch.Tensor, residual_take: torch.Tensor) -> torch.Tensor:
    """``residual`` ``[B, Kres, Ho, Wo]`` re-compacted by ``residual_take`` ``[Kout]`` or ``[B, Kout]``:
    ``[B, Kout, Ho, Wo]``, channel ``j`` of sample ``b`` = ``residual[b, t]`` with ``t = residual_take[j]`` (or
    ``residual_take[b, j]``), zeros where ``t == -1``."""
    b, k_res, k_out = residual.shape[0], residual.shape[1], residual_take.shape[-1]
    if k_res == 0:
        return residual.new_zeros((b, k_out) + tuple(residual.shape[2:]))
    rows = residual_take.view(-1, k_out, 1, 1)
    take = rows.clamp(0, k_res - 1).expand((b, k_out) + tuple(residual.shape[2:]))
    return residual.gather(1, take).masked_fill_(rows < 0, 0).contiguous()


def problem_list(sample_group: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(problems, max_group)`` of ``sample_group``: int32 ``[B + 2G]`` (samples stably sorted by group id, start
    of each group, size of each group) on its device, and the largest group (one synchronisation on a GPU)."""
    _, inverse, counts = torch.unique(sample_group, return_inverse=True, return_counts=True)
    samples = torch.sort(inverse, stable=True).indices.to(torch.int32)
    start = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    problems = torch.cat([samples, start, counts.to(torch.int32)])
    return problems, int(counts.max()) if counts.numel() else -1


def gathered_conv2d_reference(
    x: torch.Tensor,
    in_idx: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_idx: torch.Tensor,
    sample_group: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    relu: bool = False,
    problems: Optional[torch.Tensor] = None,
    max_group: int = -1,
    check_indices: bool = True,
    residual_take: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-torch implementation of the contract: per group, the group's weights gathered with ``index_select`` and
    ``F.conv2d`` on the group's samples. The tests' oracle and the ``"torch"`` backend (slow; any device)."""
    B, _, HO, WO = check_gathered_conv(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding,
                                       dilation, problems, max_group, dtypes=(x.dtype,), residual_take=residual_take)
    if check_indices:
        check_index_values(in_idx, out_idx, weight.shape[1], weight.shape[0], problems, max_group, sample_group,
                           residual_take, 0 if residual is None else residual.shape[1])
    if residual_take is not None:
        residual = compact_residual(residual, residual_take)
    out = x.new_zeros((B, out_idx.shape[1], HO, WO))
    if B == 0 or out_idx.shape[1] == 0:
        return out
    in_idx_l, out_idx_l = in_idx.long(), out_idx.long()
    for g in torch.unique(sample_group):
        samples = (sample_group == g).nonzero().flatten()
        rep = int(samples[0])
        in_pos = (in_idx_l[rep] >= 0).nonzero().flatten()
        out_pos = (out_idx_l[rep] >= 0).nonzero().flatten()
        if out_pos.numel() == 0:
            continue
        och = out_idx_l[rep, out_pos]
        if in_pos.numel() > 0:
            w = weight.index_select(0, och).index_select(1, in_idx_l[rep, in_pos])
            xg = x.index_select(0, samples).index_select(1, in_pos)
            y = F.conv2d(xg, w, None, pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"))
        else:
            y = x.new_zeros((samples.numel(), out_pos.numel(), HO, WO))
        if bias is not None:
            y = y + bias.index_select(0, och).view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual.index_select(0, samples).index_select(1, out_pos)
        if relu:
            y = torch.relu(y)
        out[samples.view(-1, 1), out_pos.view(1, -1)] = y
    return out
