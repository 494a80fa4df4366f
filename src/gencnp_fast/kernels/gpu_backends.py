"""Registers the GPU conv backends with the plan engine (imported at the end of ``gencnp_fast.plan.engine``).

``"triton"``  :func:`gencnp_fast.kernels.triton_conv.gathered_conv2d_triton`; needs triton and a CUDA GPU, or
              ``TRITON_INTERPRET=1`` (then it also accepts CPU tensors: the same kernel source, interpreted).
``"cuda"``    ``torch.ops.gencnp_fast.gathered_conv2d`` dispatched to the kernels of ``csrc/cuda/`` (present when
              the extension was built with CUDA) on CUDA tensors; the problem list the engine planned on the host
              is passed along (:func:`with_planned_problems`), so that the kernel sizes its launch without a
              device-to-host synchronisation.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..plan.channel_sets import planned_problems
from ..plan.engine import register_conv_backend

__all__ = ["triton_available", "cuda_kernels_available", "with_planned_problems", "TRITON_INTERPRET"]

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """triton is installed and can run here (a CUDA GPU, or the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if TRITON_INTERPRET:
        return True
    return torch.cuda.is_available()


def _triton_loader():
    from .triton_conv import gathered_conv2d_triton

    return gathered_conv2d_triton


def cuda_kernels_available() -> bool:
    """The compiled extension loads and has a CUDA kernel for the op, and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        from .. import ops  # noqa: F401  (loads gencnp_fast._C, which registers the kernels)
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("gencnp_fast::gathered_conv2d", "CUDA")


def with_planned_problems(op):
    """The conv backend ``op`` (the contract of ``gencnp_fast::gathered_conv2d``), given the ``problems`` /
    ``max_group`` arguments wherever the ``groups`` tensor carries a host-planned problem list (engine._Sets)."""

    def conv(x, in_idx, weight, bias, out_idx, groups, residual, stride, padding, dilation, relu):
        planned = planned_problems(groups)
        if planned is None:
            return op(x, in_idx, weight, bias, out_idx, groups, residual, stride, padding, dilation, relu)
        return op(x, in_idx, weight, bias, out_idx, groups, residual, stride, padding, dilation, relu,
                  planned[0], planned[1])

    return conv


def _cuda_loader():
    from .. import ops  # noqa: F401

    return with_planned_problems(torch.ops.gencnp_fast.gathered_conv2d)


register_conv_backend("triton", triton_available, _triton_loader, ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",))
register_conv_backend("cuda", cuda_kernels_available, _cuda_loader, ("cuda",))
