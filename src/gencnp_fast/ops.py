"""Python face of the compiled ops (``torch.ops.gencnp_fast.*``).

Importing this module loads the compiled extension ``gencnp_fast._C`` (which registers the schema, csrc/ops.cpp,
and the CPU / CUDA kernels with the dispatcher) and registers the fake kernel used by ``torch.compile`` /
FakeTensor tracing. The contract of the op is stated in :mod:`gencnp_fast.kernels.contract`.

Op
--
``torch.ops.gencnp_fast.gathered_conv2d(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding,
dilation, relu, problems=None, max_group=-1, check_indices=True) -> Tensor``: a 2-D convolution (groups=1) that only reads the active
input channels and only computes the active output channels of every sample. CPU: float32; CUDA: float32, float16,
bfloat16 (float32 accumulation). Weights in the plain ``[C_out, C_in, kh, kw]`` layout: the CPU kernel gathers
weight tiles into packed panels itself and reuses each over every sample of a group and every output pixel.

``torch.ops.gencnp_fast.gather_channels(x, take, keep) -> Tensor``: re-compaction of a compacted activation to
another channel set, ``out[b, j] = keep[r, j] ? x[b, take[r, j]] : 0`` (``r = 0`` when ``take`` has one row, else
``b``); whole planes copied.

``torch.ops.gencnp_fast.max_pool2d(x, kernel, stride, padding) -> Tensor``: ``F.max_pool2d`` without dilation or
ceil mode, CPU float32, one pass over the input (the plan's pooling steps).
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels.contract import IntPair, check_gathered_conv, conv_output_size, gathered_conv2d_reference, pair

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "gencnp_fast._C (the compiled extension) could not be imported: %s\n"
        "Build it against the installed torch with\n"
        "    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)\n"
        "from the repository root." % (e,)
    ) from e

__all__ = ["gathered_conv2d", "gathered_conv2d_reference", "conv_output_size", "cpu_info"]


def cpu_info() -> str:
    """ISA the CPU kernel was compiled for ('avx2+fma' or 'generic-vector')."""
    return _C.cpu_info()


def _dtypes(device: torch.device):
    return (torch.float32,) if device.type == "cpu" else (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("gencnp_fast::gathered_conv2d")
def _gathered_conv2d_fake(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding, dilation, relu,
                          problems=None, max_group=-1, check_indices=True, residual_take=None):
    shape = check_gathered_conv(x, in_idx, weight, bias, out_idx, sample_group, residual, stride, padding, dilation,
                                problems, max_group, _dtypes(x.device), residual_take)
    return x.new_empty(shape)


@torch.library.register_fake("gencnp_fast::gather_channels")
def _gather_channels_fake(x, take, keep=None):
    torch._check(x.dim() >= 2, lambda: f"gather_channels: x must be [B, K, ...], got shape {tuple(x.shape)}")
    torch._check(take.dtype == torch.int64 and take.dim() == 2, lambda: "gather_channels: take must be int64 [R, W]")
    torch._check(take.shape[0] in (1, x.shape[0]), lambda: "gather_channels: take must have 1 or B rows")
    torch._check(keep is None or (keep.dtype == torch.uint8 and keep.shape == take.shape),
                 lambda: "gather_channels: keep must be uint8 shaped like take")
    return x.new_empty((x.shape[0], take.shape[1]) + tuple(x.shape[2:]))


@torch.library.register_fake("gencnp_fast::max_pool2d")
def _max_pool2d_fake(x, kernel, stride, padding):
    torch._check(x.dim() == 4, lambda: f"max_pool2d: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel, "kernel"), pair(stride, "stride"), pair(padding, "padding")
    return x.new_empty((x.shape[0], x.shape[1], (x.shape[2] + 2 * ph - kh) // sh + 1,
                        (x.shape[3] + 2 * pw - kw) // sw + 1))


def gathered_conv2d(
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
    """``torch.ops.gencnp_fast.gathered_conv2d`` with int-or-pair ``stride`` / ``padding`` / ``dilation`` (the
    contract: :mod:`gencnp_fast.kernels.contract`)."""
    return torch.ops.gencnp_fast.gathered_conv2d(
        x, in_idx, weight, bias, out_idx, sample_group, residual, list(pair(stride, "stride")),
        list(pair(padding, "padding")), list(pair(dilation, "dilation")), bool(relu), problems, int(max_group),
        bool(check_indices), residual_take)
