"""The run's index planning: the masks of one forward turned into every index list its kernels read.

Per plan, :func:`run_requests` lists once what a run needs (the channel sets its steps name, the conv groups of
each conv, the re-compactions of residuals, unit inputs and the output) as a ``gencnp_fast._C.RunProgram``. Per
call, :func:`plan_run` answers it in one call into the compiled planner (``csrc/run_indices.cpp``) from one host
copy of the masks, and sends the three index buffers to the run's device in one asynchronous copy each: the forward
itself never waits on the device (docs/design.md §3). The result, :class:`RunIndices`, is what the interpreter
(:mod:`gencnp_fast.plan.interpreter`) and the cost model read; ``tests/planner_oracle.py`` builds the same object in
plain torch, the reference the compiled planner is tested against.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from .sets import ChannelSetRef, FlatFeatures, UnitChannels
from .steps import ConvStep, Plan, RemapStep

__all__ = ["ChannelIndex", "ConvGroups", "RemapIndex", "RunIndices", "RunRequests", "run_requests", "plan_run",
           "apply_remap", "masks_to_host", "compiled", "small_map_eligible"]


def compiled():
    """The compiled extension ``gencnp_fast._C`` (its import error says how to build it)."""
    from .. import ops  # noqa: F401  (raises an ImportError that says how to build the extension)
    from .. import _C

    return _C


@dataclasses.dataclass
class ChannelIndex:
    """A channel set resolved for one run: ``idx`` int32 ``[B, K]`` on the run's device (ascending channels, then
    -1; a view expanded from one row when every sample has the same row, i.e. ``ngroups == 1``)."""

    idx: torch.Tensor
    full: bool
    channels: int
    ngroups: int


@dataclasses.dataclass
class ConvGroups:
    """The samples of a conv that share both its input and output rows (one weight tile per group):
    ``sample_group`` int32 ``[B]`` and the kernels' problem list ``problems`` int32 ``[B + 2G]`` (samples sorted by
    group, group starts, group sizes), ``max_group`` the largest group."""

    sample_group: torch.Tensor
    problems: torch.Tensor
    ngroups: int
    max_group: int


@dataclasses.dataclass
class RemapIndex:
    """How to re-compact a tensor stored for one set to another (``kind``: a ``_C.RemapKind``; see
    :func:`apply_remap` and ``csrc/run_indices.h``): ``take`` int64 ``[R, width]`` and ``keep`` uint8 ``[R, width]``
    (None: every entry present), ``R = 1`` for ``ROW`` (one set for the batch), the batch for ``ROWS``."""

    kind: object
    width: int = 0
    take: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None
    fused_take: Optional[torch.Tensor] = None  # fused_residual_take's result, kept with the run's indices


@dataclasses.dataclass
class RunIndices:
    """Every index list of one run of a plan, by request. ``reused``: these indices served an earlier run with the
    same masks (:func:`plan_run`); ``packed``: per conv step, its weight gathered to the active channels of a
    one-mask run, kept with the indices (:func:`packed_conv`)."""

    sets: Dict[ChannelSetRef, ChannelIndex]
    conv_groups: Dict[Tuple[ChannelSetRef, ChannelSetRef], ConvGroups]
    remaps: Dict[Tuple[ChannelSetRef, ChannelSetRef], RemapIndex]
    reused: bool = False
    packed: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict)


@dataclasses.dataclass
class RunRequests:
    """What a run of a plan needs planned, in the order of ``program``'s entries."""

    program: object  # gencnp_fast._C.RunProgram
    set_refs: List[ChannelSetRef]
    mask_names: List[str]
    group_keys: List[Tuple[ChannelSetRef, ChannelSetRef]]
    remap_keys: List[Tuple[ChannelSetRef, ChannelSetRef]]


def small_map_eligible(st: ConvStep) -> bool:
    """Whether ``st`` is cheaper as a dense linear map of its whole input map: a conv whose input map has fewer
    pixels than the kernel has taps (a 3x3 conv on a 2x2 map: 5 of 9 taps read padding), whose linear map is at
    most 4x the weight's size, and in which every output pixel reads every input pixel (so the map has no
    structural zeros: ``0 * NaN`` would spread a NaN the conv never reads)."""
    if st.linear or len(st.in_shape) != 3 or len(st.out_shape) != 3:
        return False
    kh, kw = st.weight.shape[2], st.weight.shape[3]
    (_, h, w), (_, ho, wo) = st.in_shape, st.out_shape
    if not (h * w < kh * kw and h * w * ho * wo <= 4 * kh * kw):
        return False
    return _reads_every_pixel(ho, h, kh, st.stride[0], st.padding[0], st.dilation[0]) and _reads_every_pixel(
        wo, w, kw, st.stride[1], st.padding[1], st.dilation[1])


def _reads_every_pixel(n_out: int, n_in: int, k: int, stride: int, pad: int, dil: int) -> bool:
    """Along one axis: every output position's taps cover every input position."""
    for o in range(n_out):
        taps = {o * stride - pad + t * dil for t in range(k)}
        if not all(i in taps for i in range(n_in)):
            return False
    return True


def run_requests(plan: Plan) -> RunRequests:
    """The requests of ``plan`` (built once, kept on the plan): taken whatever the masks hold, since fullness and
    sharing are decided per run."""
    if plan.run_program is not None:
        return plan.run_program
    req = RunRequests(compiled().RunProgram(), [], [], [], [])
    set_id: Dict[ChannelSetRef, int] = {}

    def sid(ref: ChannelSetRef) -> int:
        if ref not in set_id:
            if isinstance(ref, UnitChannels):
                set_id[ref] = req.program.add_unit_set(len(req.mask_names))
                req.mask_names.append(ref.unit)
            elif isinstance(ref, FlatFeatures):
                set_id[ref] = req.program.add_flat_set(sid(ref.base), ref.spatial)
            else:
                set_id[ref] = req.program.add_all_set(plan.set_channels[ref])
            req.set_refs.append(ref)
        return set_id[ref]

    def need(keys: List, add, a: ChannelSetRef, b: ChannelSetRef) -> None:
        if (a, b) not in keys:
            add(sid(a), sid(b))
            keys.append((a, b))

    for st in plan.steps:
        if isinstance(st, ConvStep):
            need(req.group_keys, req.program.add_conv_groups, st.in_set, st.out_set)
            if st.residual is not None:
                need(req.remap_keys, req.program.add_remap, st.residual[1], st.out_set)
            if small_map_eligible(st):
                sid(FlatFeatures(st.in_set, st.in_shape[1] * st.in_shape[2]))
                sid(FlatFeatures(st.out_set, st.out_shape[1] * st.out_shape[2]))
        elif isinstance(st, RemapStep):
            need(req.remap_keys, req.program.add_remap, st.src_set, st.dst_set)
            if st.add is not None:
                need(req.remap_keys, req.program.add_remap, st.add[1], st.dst_set)
    plan.run_program = req
    return req


def masks_to_host(masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The masks on the CPU, in one device-to-host copy (one synchronisation) for all units."""
    if not masks or all(m.device.type == "cpu" for m in masks.values()):
        return dict(masks)
    names = list(masks)
    flat = torch.cat([masks[n].reshape(-1) for n in names]).cpu()
    out, off = {}, 0
    for n in names:
        k = masks[n].numel()
        out[n] = flat[off: off + k].view(masks[n].shape)
        off += k
    return out


def plan_run(plan: Plan, host_masks: Dict[str, torch.Tensor], batch: int, device: torch.device) -> RunIndices:
    """Every index list of one run of ``plan``: planned on the host from ``host_masks`` (bool, CPU; see
    :func:`masks_to_host`), sent to ``device`` in one asynchronous copy per buffer; the previous run's answer when
    the masks are the same."""
    req = run_requests(plan)
    masks = []
    for name in req.mask_names:
        m = host_masks[name]
        m = m.unsqueeze(0) if m.dim() == 1 else m
        masks.append(m.contiguous().view(torch.uint8))
    # The same masks as the plan's previous run (a class pathway applied batch after batch, a benchmark): its
    # indices again. Compared exactly, on the host copy: a few microseconds against the planning.
    key = torch.cat([m.reshape(-1) for m in masks]) if masks else None
    last = plan.last_run
    if (last is not None and last[0] == batch and last[1] == device and last[2] == [tuple(m.shape) for m in masks]
            and (key is None or torch.equal(last[3], key))):
        last[4].reused = True
        return last[4]
    planned = compiled().plan_run_indices(req.program, masks, batch, device.type == "cuda")
    bufs = [planned.i32, planned.i64, planned.u8]
    if device.type != "cpu":
        bufs = [t.to(device, non_blocking=True) for t in bufs]
    indices = _views(req, planned, *bufs, batch=batch, device=device)
    plan.last_run = (batch, device, [tuple(m.shape) for m in masks], key, indices)
    return indices


def _views(req: RunRequests, planned, i32: torch.Tensor, i64: torch.Tensor, u8: torch.Tensor, batch: int,
           device: torch.device) -> RunIndices:
    """The planner's records as views of the device buffers."""
    sets: Dict[ChannelSetRef, ChannelIndex] = {}
    for ref, s in zip(req.set_refs, planned.sets):
        if s.full:
            idx = torch.arange(s.channels, dtype=torch.int32, device=device).expand(batch, s.channels)
        else:
            idx = i32.as_strided((s.rows, s.k), (s.k, 1), s.offset)
            idx = idx.expand(batch, s.k) if s.rows == 1 else idx
        sets[ref] = ChannelIndex(idx, s.full, s.channels, s.ngroups)
    groups: Dict[Tuple[ChannelSetRef, ChannelSetRef], ConvGroups] = {}
    by_offset: Dict[int, ConvGroups] = {}
    for key, g in zip(req.group_keys, planned.conv_groups):
        if g.ids_offset not in by_offset:  # one tensor (and problem list) per partition of the batch
            by_offset[g.ids_offset] = ConvGroups(i32.as_strided((batch,), (1,), g.ids_offset),
                                                 i32.as_strided((batch + 2 * g.ngroups,), (1,), g.problems_offset),
                                                 g.ngroups, g.max_group)
        groups[key] = by_offset[g.ids_offset]
    kinds = compiled().RemapKind
    remaps: Dict[Tuple[ChannelSetRef, ChannelSetRef], RemapIndex] = {}
    for key, r in zip(req.remap_keys, planned.remaps):
        out = RemapIndex(r.kind, r.width)
        if r.kind in (kinds.ROW, kinds.ROWS):
            out.take = i64.as_strided((r.rows, r.width), (r.width, 1), r.take_offset)
            out.keep = u8.as_strided((r.rows, r.width), (r.width, 1), r.keep_offset) if r.keep_offset >= 0 else None
        remaps[key] = out
    return RunIndices(sets, groups, remaps)


# Gather a one-mask conv's weight once its masks recur, unless that keeps more than this share of the weight.
PACK_MAX_SHARE = 0.25


def packed_conv(st: ConvStep, ix: RunIndices, in_ch: ChannelIndex,
                out_ch: ChannelIndex) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor,
                                                        torch.Tensor]]:
    """``(weight, bias, in_idx, out_idx)`` of ``st`` with its weight gathered to the run's active channels, for a
    conv whose input and output sets have one row for the batch, on the CPU, in a run whose masks were seen before
    (``ix.reused``: a class pathway applied batch after batch, one image at a time): the kernel then reads one
    contiguous block of ``n_out x n_in`` filters instead of rows scattered over the whole weight (at batch 1 it
    reads the weight from memory, where the scattered rows cost several times the bytes they use). The indices
    become positions ``0..n-1`` (then -1), so the op computes the same sums in the same order: bit-equal. Built on
    the second run with the same masks and kept with the indices; None where it does not apply."""
    if not ix.reused or in_ch.ngroups != 1 or out_ch.ngroups != 1 or st.weight.device.type != "cpu":
        return None
    key = id(st)
    hit = ix.packed.get(key)
    if hit is not None:
        return hit
    in_row, out_row = in_ch.idx[0], out_ch.idx[0]
    n_in, n_out = int((in_row >= 0).sum()), int((out_row >= 0).sum())
    c_out, c_in = st.weight.shape[:2]
    if n_in * n_out > PACK_MAX_SHARE * c_in * c_out:
        return None
    oc, ic = out_row[:n_out].long(), in_row[:n_in].long()
    weight = st.weight[oc[:, None], ic[None, :]].contiguous()
    bias = None if st.bias is None else st.bias[oc].contiguous()

    def positions(idx: torch.Tensor, n: int) -> torch.Tensor:
        row = torch.arange(idx.shape[1], dtype=torch.int32)
        row[n:] = -1
        return row.expand(idx.shape[0], -1)

    ix.packed[key] = (weight, bias, positions(in_ch.idx, n_in), positions(out_ch.idx, n_out))
    return ix.packed[key]


def fused_residual_take(r: RemapIndex) -> Optional[torch.Tensor]:
    """A ``ROW`` or ``ROWS`` remap as the ``residual_take`` of ``gencnp_fast::gathered_conv2d``: int64 ``[width]``
    (one set for the batch) or ``[B, width]`` (a set per sample), ``-1`` where ``keep`` is 0, so that a conv's
    epilogue reads the residual in place instead of a re-compacted copy (ResNet's identity shortcuts). None for
    ``SAME`` and ``ZEROS``."""
    kinds = compiled().RemapKind
    if r.kind not in (kinds.ROW, kinds.ROWS):
        return None
    if r.fused_take is None:
        take = r.take[0] if r.kind == kinds.ROW else r.take
        keep = None if r.keep is None else r.keep[0] if r.kind == kinds.ROW else r.keep
        r.fused_take = take.contiguous() if keep is None else take.masked_fill(keep == 0, -1)
    return r.fused_take


def apply_remap(x: torch.Tensor, r: RemapIndex) -> torch.Tensor:
    """``x`` re-compacted by ``r``; no host synchronisation. ``SAME``: ``x``; ``ZEROS``: zeros of ``r.width``
    channels; ``ROW`` / ``ROWS``: ``out[b, j] = x[b, take[r, j]]``, zero where ``keep`` is 0 (``r`` = 0 for one
    row, else ``b``): the op ``gencnp_fast::gather_channels`` (whole planes copied; on a GPU, ATen gathers)."""
    kinds = compiled().RemapKind
    if r.kind == kinds.SAME:
        return x
    if r.kind == kinds.ZEROS:
        return x.new_zeros((x.shape[0], r.width) + tuple(x.shape[2:]))
    return torch.ops.gencnp_fast.gather_channels(x, r.take, r.keep)
