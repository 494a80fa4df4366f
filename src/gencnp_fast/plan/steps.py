"""The steps of a compiled plan: what runs, on which value slots and channel sets (docs/design.md §3)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .sets import ChannelSetRef

__all__ = ["ConvStep", "ChannelwiseStep", "FlattenStep", "RemapStep", "Step", "Plan"]


@dataclasses.dataclass
class ConvStep:
    """``out = act(conv(x[in_set], W[out_set, in_set]) + bias + residual)`` on compacted tensors.

    The unit's mask takes effect here: ``out_set`` is the mask's channels when the conv feeds a masked unit, so
    only those output channels are computed, and the epilogue adds the bias, the residual (re-compacted to
    ``out_set``) and the ReLU for them alone.
    """

    name: str
    src: str  # value slot of the input
    in_set: ChannelSetRef
    out_set: ChannelSetRef
    weight: torch.Tensor  # folded, [C_out, C_in, kh, kw] (Linear: [C_out, C_in, 1, 1])
    bias: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    relu: bool
    linear: bool
    out_shape: Tuple[int, ...]  # per sample, dense: (C_out, Ho, Wo) or (C_out,)
    in_shape: Tuple[int, ...] = ()  # per sample, dense
    residual: Optional[Tuple[str, ChannelSetRef]] = None  # (slot, its set) added before the ReLU
    dst: str = ""
    # the conv as one dense linear map of its whole input map, built on first use (interpreter.small_map_weights)
    small_map: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None


@dataclasses.dataclass
class ChannelwiseStep:
    """A channel-wise op (pooling, dropout, identity, ReLU of an unmasked unit) on a compacted tensor."""

    name: str
    src: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    out_shape: Tuple[int, ...]  # per sample, dense
    dst: str = ""


@dataclasses.dataclass
class FlattenStep:
    """``[B, K, H, W] -> [B, K * H * W]``: its features are the set's ``FlatFeatures``."""

    name: str
    src: str
    dst: str = ""


@dataclasses.dataclass
class RemapStep:
    """Re-compact ``src`` from ``src_set`` to ``dst_set`` (zeros where absent), optionally adding another value
    and applying ReLU: units fed by non-conv ops, adds of two non-conv values, the model's output."""

    name: str
    src: str
    src_set: ChannelSetRef
    dst_set: ChannelSetRef
    relu: bool = False
    add: Optional[Tuple[str, ChannelSetRef]] = None
    dst: str = ""


Step = Union[ConvStep, ChannelwiseStep, FlattenStep, RemapStep]


@dataclasses.dataclass
class Plan:
    """A model compiled for one input shape and one set of masked units (:func:`~gencnp_fast.plan.lowering.
    compile_plan`): its steps over value slots, and what the run's index planning needs to know."""

    steps: List[Step]
    input_slot: str
    input_channels: int
    output_slot: str
    set_channels: Dict[ChannelSetRef, int]  # channel count of every set the steps name
    units: Dict[str, int]  # unit name -> channels, for the units whose masks this plan reads
    output_dense_shape: Tuple[int, ...]
    unit_slots: Dict[str, str] = dataclasses.field(default_factory=dict)  # unit name -> value slot of its output
    run_program: object = None  # indices.RunRequests: what a run needs planned (built on first use)
    last_run: object = None  # indices.plan_run: the masks of the previous run and its indices
    # releases[i]: the slots no step after i reads (never the output), dropped by a run once step i is done
    releases: List[Tuple[str, ...]] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.releases = last_reads(self.steps, keep=self.output_slot)


def reads(st: Step) -> Tuple[str, ...]:
    """The value slots step ``st`` reads: its input, and the residual or the added value if it has one."""
    extra = st.residual if isinstance(st, ConvStep) else st.add if isinstance(st, RemapStep) else None
    return (st.src,) if extra is None else (st.src, extra[0])


def last_reads(steps: List[Step], keep: str) -> List[Tuple[str, ...]]:
    """Per step, the slots it is the last to read (``keep`` excepted). A run that drops them there holds only live
    values, so torch's allocator hands each new output memory a dropped value just left warm in the cache, as the
    model's own forward does: keeping every value alive made each output land in memory not touched for a whole
    forward (ResNet-50 224² batch 8, shared mask, paired per-step rounds: 35.8 → 33.3 ms)."""
    last: Dict[str, int] = {}
    for i, st in enumerate(steps):
        for slot in reads(st):
            last[slot] = i
    out: List[List[str]] = [[] for _ in steps]
    for slot, i in last.items():
        if slot != keep:
            out[i].append(slot)
    return [tuple(r) for r in out]
