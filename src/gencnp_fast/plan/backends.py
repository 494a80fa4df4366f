"""The conv backends the interpreter can run a plan with, and how ``backend="auto"`` picks one.

    ``"cpu"``     C++/OpenMP kernel (``torch.ops.gencnp_fast.gathered_conv2d``), float32, CPU tensors.
    ``"cuda"``    the same op's CUDA kernel (an extension built with CUDA, and a GPU); float32 / float16 / bfloat16.
    ``"triton"``  ``torch.ops.gencnp_fast.gathered_conv2d_triton`` (triton and a GPU, or ``TRITON_INTERPRET=1``).
    ``"torch"``   the same plan with a plain-torch gathered conv (slow; for checking; any device and dtype).
    ``"reference"``  :func:`~gencnp_fast.model.reference_pathway_forward`, the dense masked model (no plan).

Every backend but ``"reference"`` runs a plan, whose indices come from the compiled run index planner, so it needs
the compiled extension. ``"auto"`` takes the first available of :data:`AUTO_ORDER` for the input's device that
computes in its dtype; when it has to fall back (no extension, a dtype no kernel takes) it says so once per reason.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from typing import Callable, Dict, List, Tuple

import torch

from .interpreter import ConvFn

__all__ = ["ConvBackend", "BACKENDS", "AUTO_ORDER", "available_backends", "pick_backend", "conv_backend"]

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def extension_error() -> str:
    """Why the compiled extension does not load ('' when it does)."""
    try:
        from .. import ops  # noqa: F401
    except ImportError as exc:
        return str(exc).splitlines()[0]
    return ""


def _cuda_kernels() -> bool:
    return (torch.cuda.is_available() and not extension_error()
            and torch._C._dispatch_has_kernel_for_dispatch_key("gencnp_fast::gathered_conv2d", "CUDA"))


def _triton_runs() -> bool:
    if importlib.util.find_spec("triton") is None or extension_error():
        return False
    return TRITON_INTERPRET or torch.cuda.is_available()


def _load_op() -> ConvFn:
    from .. import ops  # noqa: F401  (registers torch.ops.gencnp_fast.*)

    return torch.ops.gencnp_fast.gathered_conv2d


def _load_triton() -> ConvFn:
    from ..kernels import triton_conv  # noqa: F401  (registers torch.ops.gencnp_fast.gathered_conv2d_triton)

    return torch.ops.gencnp_fast.gathered_conv2d_triton


def _load_torch() -> ConvFn:
    from ..kernels.contract import gathered_conv2d_reference

    return gathered_conv2d_reference


@dataclasses.dataclass(frozen=True)
class ConvBackend:
    """A kernel backend: the devices and dtypes it computes in, whether it runs here, and its conv function."""

    name: str
    dtypes: Dict[str, Tuple[torch.dtype, ...]]  # device type -> dtypes
    available: Callable[[], bool]
    load: Callable[[], ConvFn]
    needs: str  # what it needs, for the error when it is not available


_HALF = (torch.float32, torch.float16, torch.bfloat16)
_ANY = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

BACKENDS: Dict[str, ConvBackend] = {
    "cpu": ConvBackend("cpu", {"cpu": (torch.float32,)}, lambda: not extension_error(), _load_op,
                       "the compiled extension"),
    "cuda": ConvBackend("cuda", {"cuda": _HALF}, _cuda_kernels, _load_op,
                        "a GPU and the extension built with its CUDA kernels (docs/gpu.md)"),
    "triton": ConvBackend("triton", {"cuda": _HALF, **({"cpu": _HALF} if TRITON_INTERPRET else {})}, _triton_runs,
                          _load_triton, "triton, a GPU (or TRITON_INTERPRET=1) and the compiled extension"),
    "torch": ConvBackend("torch", {"cpu": _ANY, "cuda": _ANY}, lambda: not extension_error(), _load_torch,
                         "the compiled extension (its run index planner)"),
}

AUTO_ORDER: Dict[str, Tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


def available_backends(device="cpu") -> List[str]:
    """Backends that can run on ``device`` here (``"reference"`` always can)."""
    dev = torch.device(device).type
    return [n for n, b in BACKENDS.items() if dev in b.dtypes and b.available()] + ["reference"]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def pick_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs ``x``: ``backend`` itself (checked: it exists, runs here, takes ``x``'s device and
    dtype), or for ``"auto"`` the first of :data:`AUTO_ORDER` that does, else ``"reference"``, with a warning
    (once) whenever that is a slow path."""
    dev, dtype = x.device.type, x.dtype
    if backend == "auto":
        avail = available_backends(dev)
        for name in AUTO_ORDER.get(dev, ()):
            if name in avail and dtype in BACKENDS[name].dtypes[dev]:
                if name == "torch":
                    _warn_once(f"gencnp_fast: no compiled kernel computes {dtype} on {dev}; fast_pathway_forward "
                               "runs the plan with plain-torch convolutions (slow)")
                return name
        reason = extension_error() or f"no backend computes {dtype} on {dev}"
        _warn_once(f"gencnp_fast: {reason}; fast_pathway_forward runs the slow dense reference "
                   "(reference_pathway_forward) instead of skipping pruned channels")
        return "reference"
    if backend == "reference":
        return backend
    b = BACKENDS.get(backend)
    if b is None:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS) + ['reference', 'auto']}")
    if dev not in b.dtypes:
        raise ValueError(f"backend {backend!r} runs on {'/'.join(b.dtypes)} tensors, x is on {x.device}")
    if not b.available():
        why = extension_error()
        raise RuntimeError(f"backend {backend!r} is not available here: it needs {b.needs}"
                           + (f" ({why})" if why else "") + f"; available: {available_backends(dev)}")
    if dtype not in b.dtypes[dev]:
        raise ValueError(f"backend {backend!r} computes in {', '.join(str(d) for d in b.dtypes[dev])} on {dev}, x "
                         f"is {dtype}; convert x or use backend='reference'")
    return backend


def conv_backend(name: str) -> ConvFn:
    """The conv function of backend ``name`` (loaded on first use)."""
    return BACKENDS[name].load()
