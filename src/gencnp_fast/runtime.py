"""Process-level settings that make CPU inference fast: the C allocator.

Why
---
PyTorch allocates every CPU activation with ``malloc``. glibc serves blocks above its *mmap threshold* (128 KiB at
start, raised dynamically up to 32 MiB only after a large block is freed) with a fresh ``mmap``: every such tensor
is page-faulted and zeroed by the kernel on first touch and unmapped when it dies. A 128×128×7×7 float32 activation
is 3 MiB, so a small CNN at batch 128 pays that on every layer. On the 2-core development VM this made the same
``F.conv2d`` (batch 128, 128→128 channels, 7×7) take 15–27 ms or 11.7 ms depending only on the allocator's history
in the process (the README's "CPU allocator" section has the command and figures). :func:`tune_allocator` fixes
the threshold high and keeps freed memory in the heap, so steady-state forwards reuse warm pages.

Raising the thresholds alone leaves a warm-up: the heap grows page by page over the first few dozen forwards
(ResNet-18, batch 64: 845 → 480 ms over 15 s). ``reserve_bytes`` pre-faults that much heap once, so the first
forward already runs warm.

It changes a process-wide setting, so the library never calls it on import: the ``gencnp`` CLI and the benchmarks
call it (``GENCNP_FAST_TUNE_MALLOC=0`` turns that off); call it yourself before timing or serving on CPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Dict, Optional

__all__ = ["tune_allocator", "allocator_settings", "maybe_tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # what glibc < 2.35 accepts on 64-bit (HEAP_MAX_SIZE / 2)

_settings: Dict[str, int] = {}


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def tune_allocator(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30,
                   reserve_bytes: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    Args:
        mmap_threshold: blocks up to this many bytes come from the heap instead of a fresh ``mmap`` (default 256 MiB;
            glibc older than 2.35 refuses more than 32 MiB, which is then used instead).
        trim_threshold: free memory at the top of the heap kept for reuse instead of returned to the OS (default
            1 GiB; the process's peak memory is unchanged, it is just not given back between batches).
        reserve_bytes: heap to fault in now and keep (default 256 MiB; 0: none); at most ``trim_threshold``.

    Returns ``True`` when applied, ``False`` where there is no glibc ``mallopt`` (macOS, Windows, musl): nothing is
    changed there. Safe to call more than once.
    """
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**31:
            raise ValueError(f"{name} must be a positive number of bytes below 2 GiB, got {v!r}")
    if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or not 0 <= reserve_bytes <= trim_threshold:
        raise ValueError(f"reserve_bytes must be a number of bytes in [0, trim_threshold = {trim_threshold}], "
                         f"got {reserve_bytes!r}")
    fn = _mallopt()
    if fn is None:
        return False
    applied_mmap = mmap_threshold
    if not fn(_M_MMAP_THRESHOLD, mmap_threshold):
        applied_mmap = min(mmap_threshold, _GLIBC_MAX_MMAP_THRESHOLD)
        if not fn(_M_MMAP_THRESHOLD, applied_mmap):
            return False
    if not fn(_M_TRIM_THRESHOLD, trim_threshold):
        return False
    _reserve(reserve_bytes, applied_mmap)
    _settings.update(mmap_threshold=applied_mmap, trim_threshold=trim_threshold, reserve_bytes=reserve_bytes)
    return True


def _reserve(nbytes: int, mmap_threshold: int) -> None:
    """Fault in ``nbytes`` of heap: blocks below the mmap threshold, all alive at once, written, then freed (they
    merge into the top of the heap, which stays mapped while it is below the trim threshold)."""
    if nbytes <= 0:
        return
    import torch

    chunk = max(1 << 20, min(32 << 20, mmap_threshold // 2))
    blocks = []
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        blocks.append(torch.ones(n // 4 or 1, dtype=torch.float32))
        left -= n
    del blocks


def allocator_settings() -> Optional[Dict[str, int]]:
    """What :func:`tune_allocator` last applied in this process (``None`` if it was never applied)."""
    return dict(_settings) if _settings else None


def maybe_tune_allocator() -> bool:
    """:func:`tune_allocator` unless the environment sets ``GENCNP_FAST_TUNE_MALLOC=0`` (what the CLI calls)."""
    if os.environ.get("GENCNP_FAST_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return tune_allocator()
