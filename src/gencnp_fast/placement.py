"""Where a command runs: the device (``--device``), the precision (``--precision``) and the data-loading workers
(``--workers``) of ``gencnp train`` / ``explain`` / ``evaluate`` / ``train-target`` (docs/design.md §7).

- ``--device auto`` is the local GPU when CUDA is available, else the CPU. Under ``torchrun`` every process uses
  its own GPU (``cuda:LOCAL_RANK``) with NCCL, or the CPU with gloo when ``--device cpu`` is given.
- ``--precision fp32`` (the default) runs everything in float32. ``bf16`` / ``fp16`` need a GPU: the target model
  is converted to that dtype (its dense forward and the pathway forward then run in it: the CUDA kernel and the
  Triton kernel take float16 / bfloat16 inputs and accumulate in float32), and the generator keeps float32 weights
  and runs under ``torch.autocast``. The CPU kernels are float32 only, so the CPU refuses both.
- ``--workers N`` decodes images in N background processes (a ``torch.utils.data.DataLoader``), with pinned memory
  when the device is a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["PRECISIONS", "Placement", "resolve_placement", "parse_device"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Placement:
    """A resolved device, precision and worker count (see the module docstring); build it with
    :func:`resolve_placement`."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    workers: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the target model and of its inputs."""
        return PRECISIONS[self.precision]

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """The context the generator runs in: ``torch.autocast`` at reduced precision, else nothing."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def target(self, model: nn.Module) -> nn.Module:
        """``model`` moved to the device (and converted to the precision's dtype), in place; returned."""
        model.to(self.device)
        if self.precision != "fp32":
            model.to(self.dtype)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device, in the target's dtype."""
        return x.to(self.device, dtype=self.dtype, non_blocking=self.pin_memory)

    def describe(self) -> str:
        what = str(self.device)
        if self.device.type == "cuda":
            what += f" ({torch.cuda.get_device_name(self.device)})"
        return f"{what}, {self.precision}" + (f", {self.workers} data workers" if self.workers else "")


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the syntax only; :func:`resolve_placement` checks it exists)."""
    t = str(text).strip().lower()
    if t in ("auto", "cpu", "cuda"):
        return t
    if t.startswith("cuda:") and t[5:].isdigit():
        return t
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")


def resolve_placement(device: str = "auto", precision: str = "fp32", workers: int = 0,
                      distributed_device: Optional[torch.device] = None) -> Placement:
    """Check ``--device`` / ``--precision`` / ``--workers`` against this machine and return the :class:`Placement`.

    ``distributed_device``: under ``torchrun``, this process's device (:func:`gencnp_fast.distributed.device`); it
    replaces ``cuda`` / ``cuda:N`` / ``auto`` (each process keeps its local GPU). One-line ``ValueError`` when a GPU
    is asked for and none is there, the index is out of range, or a reduced precision is asked for on the CPU.
    """
    device = parse_device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be an integer >= 0, got {workers!r}")
    if distributed_device is not None:
        if device == "cpu" and distributed_device.type != "cpu":
            raise ValueError("--device cpu under torchrun: the process group already uses the GPUs (NCCL); "
                             "launch with --device cpu on every process before the group starts")
        dev = distributed_device
    elif device == "auto":
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if precision != "fp32" and dev.type != "cuda":
        raise ValueError(f"--precision {precision} needs a GPU (--device cuda): the CPU kernels run in float32 only")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(dev)} has no bfloat16 support; use fp16")
    return Placement(dev, precision, workers)
