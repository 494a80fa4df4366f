"""Python face of the compiled ops (``torch.ops.gencnp_fast.*``).

Importing this module loads the compiled extension ``gencnp_fast._C`` (which registers the
schemas and the CPU / CUDA kernels with the dispatcher) and registers the fake (meta) kernels
used by ``torch.compile`` / FakeTensor tracing.

Op
--
``torch.ops.gencnp_fast.gathered_conv2d(x, in_idx, weight, bias, out_idx, groups, residual,
stride, padding, dilation, relu, problems=None, max_group=-1) -> Tensor``: a 2-D convolution (groups=1) that only reads the
active input channels and only computes the active output channels of every sample. See
:func:`gathered_conv2d` for the contract and :func:`gathered_conv2d_reference` for a plain-torch
implementation of the same contract (the oracle of the tests, and a slow fallback).

Weights are passed in the plain ``[C_out, C_in, kh, kw]`` layout (BN folded by the caller); no
pre-packing is needed: the CPU kernel gathers weight tiles into L2-sized packed panels itself
and reuses each tile over every sample of a group and every output pixel.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

try:
    from . import _C  # noqa: F401  (loads the library: registers torch.ops.gencnp_fast.*)
except ImportError as e:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "gencnp_fast._C (the compiled extension) could not be imported: %s\n"
        "Build it against the installed torch with\n"
        "    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)\n"
        "from the repository root." % (e,)
    ) from e

__all__ = [
    "gathered_conv2d",
    "gathered_conv2d_reference",
    "conv_output_size",
    "cpu_info",
]

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ValueError("%s must be an int or a pair of ints, got %r" % (name, v))
    return v  # type: ignore[return-value]


def conv_output_size(h: int, w: int, kh: int, kw: int, stride: IntPair = 1, padding: IntPair = 0,
                     dilation: IntPair = 1) -> Tuple[int, int]:
    """(Ho, Wo) of a conv2d, the same formula as ``torch.nn.functional.conv2d``."""
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def cpu_info() -> str:
    """ISA the CPU kernel was compiled for ('avx2+fma' or 'generic-vector')."""
    return _C.cpu_info()


# ----------------------------------------------------------------------------------------------
# fake (meta) kernel: shapes only
@torch.library.register_fake("gencnp_fast::gathered_conv2d")
def _gathered_conv2d_fake(x, in_idx, weight, bias, out_idx, groups, residual, stride, padding,
                          dilation, relu, problems=None, max_group=-1):
    torch._check(x.dim() == 4, lambda: "gathered_conv2d: x must be [B, Kin, H, W]")
    torch._check(weight.dim() == 4, lambda: "gathered_conv2d: weight must be [C_out, C_in, kh, kw]")
    # float32 everywhere; float16 / bfloat16 on CUDA (the CUDA kernel accumulates them in float32)
    ok_dtypes = (torch.float32,) if x.device.type == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    torch._check(x.dtype in ok_dtypes, lambda: f"gathered_conv2d: x must be one of {ok_dtypes} on {x.device.type}")
    torch._check(weight.dtype == x.dtype, lambda: "gathered_conv2d: weight must have x's dtype")
    torch._check(in_idx.dtype == torch.int32, lambda: "gathered_conv2d: in_idx must be int32")
    torch._check(out_idx.dtype == torch.int32, lambda: "gathered_conv2d: out_idx must be int32")
    torch._check(groups.dtype == torch.int32, lambda: "gathered_conv2d: groups must be int32")
    B, _, H, W = x.shape
    if problems is not None:
        torch._check(problems.dtype == torch.int32 and problems.dim() == 1,
                     lambda: "gathered_conv2d: problems must be int32 [B + 2G]")
    torch._check(in_idx.dim() == 2 and in_idx.shape[0] == B and in_idx.shape[1] == x.shape[1],
                 lambda: "gathered_conv2d: in_idx must be [B, Kin]")
    torch._check(out_idx.dim() == 2 and out_idx.shape[0] == B,
                 lambda: "gathered_conv2d: out_idx must be [B, Kout]")
    kh, kw = weight.shape[2], weight.shape[3]
    sh, sw = (stride[0], stride[-1])
    ph, pw = (padding[0], padding[-1])
    dh, dw = (dilation[0], dilation[-1])
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return x.new_empty((B, out_idx.shape[1], Ho, Wo))


# ----------------------------------------------------------------------------------------------
def gathered_conv2d(
    x: torch.Tensor,
    in_idx: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_idx: torch.Tensor,
    groups: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    relu: bool = False,
    problems: Optional[torch.Tensor] = None,
    max_group: int = -1,
) -> torch.Tensor:
    """Convolution over compacted (active-only) channels, per sample.

    Args:
        x: float32 ``[B, Kin, H, W]`` compact activations; channel ``j`` of sample ``b`` holds
            original input channel ``in_idx[b, j]``. Entries with ``in_idx[b, j] == -1`` are
            padding and are skipped (their data is never read).
        in_idx: int32 ``[B, Kin]``, values in ``[-1, C_in)``; per row the valid entries are
            strictly increasing and come first, then ``-1`` padding.
        weight: float32 ``[C_out, C_in, kh, kw]`` (BN folded in by the caller), plain layout.
        bias: float32 ``[C_out]`` or ``None``.
        out_idx: int32 ``[B, Kout]``, values in ``[-1, C_out)``, same row convention.
        groups: int32 ``[B]``; samples with equal ``groups[b]`` have identical ``in_idx`` and
            ``out_idx`` rows (one shared mask: all zeros; per-class masks: the class; per-sample
            masks: ``arange(B)``). Weight tiles are gathered once per group.
        residual: float32 ``[B, Kout, Ho, Wo]`` aligned with ``out_idx`` or ``None``; added
            before the activation.
        stride, padding, dilation: as in ``torch.nn.functional.conv2d`` (int or pair).
        relu: apply ReLU after bias + residual.
        problems, max_group: optional, the grouped-problem list of ``groups`` computed beforehand: int32
            ``[B + 2G]`` on ``x``'s device (samples sorted by group, start of each group, size of each group;
            :func:`gencnp_fast.plan.channel_sets.group_table`) and the largest group. The CUDA kernel then sizes
            its launch without synchronising with the device; the CPU kernel only checks them.

    Returns:
        float32 ``[B, Kout, Ho, Wo]`` with
        ``out[b, j] = act(bias[o] + sum_{j' valid} conv(x[b, j'], weight[o, in_idx[b, j']])
        + residual[b, j])``, ``o = out_idx[b, j]``, and ``out[b, j] == 0`` exactly where
        ``out_idx[b, j] == -1``. Linear layers are the case ``kh = kw = 1`` on ``[B, K, 1, 1]``.
    """
    return torch.ops.gencnp_fast.gathered_conv2d(
        x, in_idx, weight, bias, out_idx, groups, residual,
        list(_pair(stride, "stride")), list(_pair(padding, "padding")),
        list(_pair(dilation, "dilation")), bool(relu), problems, int(max_group),
    )


def gathered_conv2d_reference(
    x: torch.Tensor,
    in_idx: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_idx: torch.Tensor,
    groups: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    relu: bool = False,
) -> torch.Tensor:
    """Plain-torch implementation of :func:`gathered_conv2d` (same contract).

    Loops over the groups, gathers the group's weights with ``index_select`` and runs
    ``F.conv2d`` on the group's samples. The tests' oracle; also usable as a slow fallback
    on any device.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    B, Kin, H, W = x.shape
    Kout = out_idx.shape[1]
    kh, kw = weight.shape[2], weight.shape[3]
    Ho, Wo = conv_output_size(H, W, kh, kw, stride, padding, dilation)
    out = x.new_zeros((B, Kout, Ho, Wo))
    if B == 0 or Kout == 0:
        return out
    in_idx_l = in_idx.long()
    out_idx_l = out_idx.long()
    for g in torch.unique(groups):
        samples = (groups == g).nonzero().flatten()
        rep = int(samples[0])
        in_pos = (in_idx_l[rep] >= 0).nonzero().flatten()
        out_pos = (out_idx_l[rep] >= 0).nonzero().flatten()
        if out_pos.numel() == 0:
            continue
        och = out_idx_l[rep, out_pos]
        ich = in_idx_l[rep, in_pos]
        if in_pos.numel() > 0:
            w = weight.index_select(0, och).index_select(1, ich)
            xg = x.index_select(0, samples).index_select(1, in_pos)
            y = F.conv2d(xg, w, None, stride, padding, dilation)
        else:
            y = x.new_zeros((samples.numel(), out_pos.numel(), Ho, Wo))
        if bias is not None:
            y = y + bias.index_select(0, och).view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual.index_select(0, samples).index_select(1, out_pos)
        if relu:
            y = torch.relu(y)
        out[samples.view(-1, 1), out_pos.view(1, -1)] = y
    return out
