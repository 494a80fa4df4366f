"""``fast_pathway_forward``: run a compiled plan with a chosen kernel backend.

Backends:
    ``"cpu"``        C++/OpenMP kernels (``torch.ops.gencnp_fast.gathered_conv2d``), float32, CPU tensors.
    ``"torch"``      the same plan with a plain-torch gathered conv (slow; no compiled code needed).
    ``"reference"``  :func:`reference_pathway_forward` (the dense masked model).
    ``"cuda"``, ``"triton"``  GPU kernels (when built / installed and a GPU is present).
    ``"auto"``       the fastest available for ``x``'s device and dtype.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.pathway import MaskLike, normalize_masks
from ..model.units import UnsupportedModelError
from ..model.reference import cached_units, check_model_and_input, reference_pathway_forward
from .channel_sets import (
    ChannelSet, RemapIndex, apply_remap, attach_group_table, conv_groups, group_table, remap_index,
)
from .compiler import ChannelwiseStep, ConvStep, FlattenStep, Plan, RemapStep, SetRef, compile_plan

__all__ = [
    "fast_pathway_forward", "available_backends", "pathway_flops", "register_conv_backend", "get_plan", "dense_capture",
]

# A conv backend: (x, in_idx, weight, bias, out_idx, groups, residual, stride, padding, dilation, relu) -> out
ConvFn = Callable[..., torch.Tensor]
_CONV_BACKENDS: Dict[str, Tuple[Callable[[], bool], Callable[[], ConvFn], Tuple[str, ...]]] = {}


def register_conv_backend(name: str, available: Callable[[], bool], loader: Callable[[], ConvFn],
                          devices: Tuple[str, ...]) -> None:
    """Register a kernel backend for the plan's gathered convolutions."""
    _CONV_BACKENDS[name] = (available, loader, devices)


def _extension_available() -> bool:
    """Whether the compiled extension loads (``gencnp_fast.ops`` imports it and registers the ops)."""
    try:
        from .. import ops  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_loader() -> ConvFn:
    from .. import ops  # noqa: F401  (raises an ImportError that says how to build the extension)

    return torch.ops.gencnp_fast.gathered_conv2d


def _torch_loader() -> ConvFn:
    from ..ops import gathered_conv2d_reference

    return gathered_conv2d_reference


register_conv_backend("cpu", _extension_available, _cpu_loader, ("cpu",))
register_conv_backend("torch", _extension_available, _torch_loader, ("cpu", "cuda"))


def available_backends(device: str = "cpu") -> List[str]:
    """Backends that can run on ``device`` here (``"reference"`` always can)."""
    dev = torch.device(device).type
    names = [n for n, (ok, _, devs) in _CONV_BACKENDS.items() if dev in devs and ok()]
    return names + ["reference"]


_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


def _pick_backend(backend: str, x: torch.Tensor) -> str:
    dev = x.device.type
    if backend == "auto":
        avail = available_backends(dev)
        for name in _AUTO_ORDER.get(dev, ()):
            if name in avail and (name != "cpu" or x.dtype == torch.float32):
                return name
        return "reference"
    if backend == "reference":
        return backend
    if backend not in _CONV_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(_CONV_BACKENDS) + ['reference', 'auto']}")
    ok, _, devs = _CONV_BACKENDS[backend]
    if dev not in devs:
        raise ValueError(f"backend {backend!r} runs on {'/'.join(devs)} tensors, x is on {x.device}")
    if not ok():
        raise RuntimeError(f"backend {backend!r} is not available here (available: {available_backends(dev)})")
    if backend == "cpu" and x.dtype != torch.float32:
        raise ValueError(f"backend 'cpu' computes in float32, x is {x.dtype}; convert x or use backend='reference'")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# Plan cache: model -> {(input shape, dtype, device, masked units): (weights fingerprint, plan)}

_PLANS: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Tuple[tuple, Plan]]]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (optimizer step, load_state_dict)."""
    out = []
    stack = [model]
    while stack:  # a plain walk over the module tree: ~5x cheaper than parameters() + buffers() (batch-1 overhead)
        mod = stack.pop()
        for t in itertools.chain(mod._parameters.values(), mod._buffers.values()):
            if t is not None:
                out.append((id(t), t._version))
        stack.extend(m for m in mod._modules.values() if m is not None)
    return tuple(out)


def get_plan(model: nn.Module, x: torch.Tensor, masked: FrozenSet[str]) -> Plan:
    """The compiled plan for ``model`` on inputs shaped like ``x`` (cached; recompiled when weights change)."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, masked)
    per_model = _PLANS.setdefault(model, {})
    fp = _fingerprint(model)
    hit = per_model.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1]
    if hit is not None:  # weights changed: every cached plan of this model is stale
        per_model.clear()
    plan = compile_plan(model, x, masked)
    if x.dtype != torch.float32:
        for st in plan.steps:
            if isinstance(st, ConvStep):
                st.weight = st.weight.to(x.dtype)
                st.bias = st.bias.to(x.dtype) if st.bias is not None else None
    per_model[key] = (fp, plan)
    return plan


# Where a run's index work is done (see _Sets): None (default) plans it on the host before the first launch, in one
# compiled call, whenever the extension is built (always on a GPU); False resolves it lazily step by step (CPU
# tensors only: the reference the tests compare against); True always plans (with the Python planner if the
# extension is missing).
HOST_PLANNING: Optional[bool] = None


def _host_planned(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return True
    if HOST_PLANNING is not None:
        return HOST_PLANNING
    return _plan_indices_op() is not None


def masks_to_host(masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The masks on the CPU, in one device-to-host copy (one synchronisation) for all units."""
    if not masks or all(m.device.type == "cpu" for m in masks.values()):
        return dict(masks)
    names = list(masks)
    flat = torch.cat([masks[n].reshape(-1) for n in names]).cpu()
    out, off = {}, 0
    for n in names:
        k = masks[n].numel()
        out[n] = flat[off : off + k].view(masks[n].shape)
        off += k
    return out


class _Pack:
    """Small host index tensors sent to the device together: one pinned buffer and one asynchronous copy per
    dtype, then a view per tensor (instead of a synchronising copy each)."""

    def __init__(self):
        self.parts: Dict[torch.dtype, List[torch.Tensor]] = {}
        self.handles: List[Tuple[torch.dtype, int, Tuple[int, ...]]] = []
        self.sizes: Dict[torch.dtype, int] = {}
        self.views: List[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        off = self.sizes.get(t.dtype, 0)
        self.parts.setdefault(t.dtype, []).append(t.reshape(-1))
        self.sizes[t.dtype] = off + t.numel()
        self.handles.append((t.dtype, off, tuple(t.shape)))
        return len(self.handles) - 1

    def send(self, device: torch.device) -> None:
        bufs = {}
        for dtype, parts in self.parts.items():
            if device.type == "cpu":  # host planning forced on CPU tensors: the tensors are already there
                bufs[dtype] = torch.cat(parts)
                continue
            host = torch.empty(self.sizes[dtype], dtype=dtype, pin_memory=True)
            torch.cat(parts, out=host)
            bufs[dtype] = host.to(device, non_blocking=True)
        self.views = [bufs[d][off : off + _numel(shape)].view(shape) for d, off, shape in self.handles]

    def __getitem__(self, h: int) -> torch.Tensor:
        return self.views[h]


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _HostProgram:
    """What a run of a plan reads, as the program of ``gencnp_fast_host::plan_indices`` (built once per plan)."""

    __slots__ = ("program", "set_refs", "set_channels", "mask_names", "group_keys", "remap_keys")


def _host_program(plan: Plan) -> _HostProgram:
    if plan.host_program is not None:
        return plan.host_program
    set_id: Dict[SetRef, int] = {}
    sets: List[Tuple[int, int, int]] = []
    channels: List[int] = []
    refs: List[SetRef] = []
    mask_names: List[str] = []
    groups: List[Tuple[SetRef, SetRef]] = []
    remaps: List[Tuple[SetRef, SetRef]] = []

    def sid(ref: SetRef) -> int:
        i = set_id.get(ref)
        if i is not None:
            return i
        if ref[0] == "unit":
            entry, ch = (0, len(mask_names), 0), plan.units[ref[1]]
            mask_names.append(ref[1])
        elif ref[0] == "flat":
            base = sid(ref[1])
            entry, ch = (2, base, ref[2]), channels[base] * ref[2]
        else:
            ch = plan.set_channels[ref]
            entry = (1, ch, 0)
        set_id[ref] = len(sets)
        sets.append(entry)
        channels.append(ch)
        refs.append(ref)
        return set_id[ref]

    def need_groups(a: SetRef, b: SetRef) -> None:
        sid(a), sid(b)
        if (a, b) not in groups:
            groups.append((a, b))

    def need_remap(src: SetRef, dst: SetRef) -> None:
        sid(src), sid(dst)
        if (src, dst) not in remaps:
            remaps.append((src, dst))

    for st in plan.steps:  # taken whatever the masks hold (fullness and sharing are decided per run)
        if isinstance(st, ConvStep):
            need_groups(st.in_set, st.out_set)
            if st.residual is not None:
                need_remap(st.residual[1], st.out_set)
            if small_map_eligible(st):
                sid(("flat", st.in_set, st.in_shape[1] * st.in_shape[2]))
                sid(("flat", st.out_set, st.out_shape[1] * st.out_shape[2]))
        elif isinstance(st, RemapStep):
            need_remap(st.src_set, st.dst_set)
            if st.add is not None:
                need_remap(st.add[1], st.dst_set)
    program = [len(sets), len(groups), len(remaps)]
    for e in sets:
        program.extend(e)
    for a, b in groups:
        program.extend((set_id[a], set_id[b]))
    for a, b in remaps:
        program.extend((set_id[a], set_id[b]))
    prog = _HostProgram()
    prog.program, prog.set_refs, prog.set_channels, prog.mask_names = program, refs, channels, mask_names
    prog.group_keys, prog.remap_keys = groups, remaps
    plan.host_program = prog
    return prog


@functools.lru_cache(maxsize=None)
def _plan_indices_op():
    """``torch.ops.gencnp_fast_host.plan_indices`` (csrc/plan_indices.cpp), or None without the extension."""
    try:
        from .. import ops  # noqa: F401  (loads gencnp_fast._C)

        return torch.ops.gencnp_fast_host.plan_indices
    except (ImportError, AttributeError, RuntimeError):
        return None


def _attach_problems(groups: torch.Tensor, problems: torch.Tensor, batch: int, ngroups: int, max_cnt: int) -> None:
    """Attach a planned problem list (``[B + 2G]``: samples, starts, sizes) to the device ``groups`` tensor."""
    table = (problems[:batch], problems[batch : batch + ngroups], problems[batch + ngroups :], ngroups, max_cnt)
    attach_group_table(groups, table, problems)


class _Sets:
    """Resolves the symbolic channel sets of a plan to :class:`ChannelSet` for one call (memoised), with the conv
    groups and re-compaction indices the run needs.

    Direct mode (CPU tensors): everything is computed on the fly, on the masks' device.

    Host planning (the default; see ``HOST_PLANNING``): :meth:`prepare` resolves every set, conv group, Triton
    problem list and re-compaction index of the plan on the host, from one copy of the masks, and sends them to the
    device in one asynchronous transfer per dtype. The forward then only launches kernels: no device-to-host
    synchronisation inside it (on a GPU each one would drain the queue and expose every launch's host overhead).
    """

    def __init__(self, plan: Plan, masks: Dict[str, torch.Tensor], batch: int, device,
                 host_masks: Optional[Dict[str, torch.Tensor]] = None):
        self.plan, self.batch, self.device = plan, batch, torch.device(device)
        self.host_mode = host_masks is not None
        self.masks = host_masks if self.host_mode else masks
        self.cache: Dict[SetRef, ChannelSet] = {}  # host sets in host mode
        self.group_cache: Dict = {}
        self._dev_sets: Dict[SetRef, ChannelSet] = {}
        self._dev_groups: Dict[Tuple[SetRef, SetRef], torch.Tensor] = {}
        self._dev_remaps: Dict[Tuple[SetRef, SetRef], RemapIndex] = {}

    def host(self, ref: SetRef) -> ChannelSet:
        """The set on the masks' device (direct mode) or on the host (host planning)."""
        cs = self.cache.get(ref)
        if cs is None:
            dev = torch.device("cpu") if self.host_mode else self.device
            if ref[0] == "unit":
                cs = ChannelSet.from_mask(self.masks[ref[1]], self.batch)
            elif ref[0] == "flat":
                cs = self.host(ref[1]).flattened(ref[2])
            else:
                cs = ChannelSet.dense(self.batch, self.plan.set_channels[ref], dev)
            self.cache[ref] = cs
        return cs

    def __call__(self, ref: SetRef) -> ChannelSet:
        """The set with its index tensors on the run's device."""
        if not self.host_mode:
            return self.host(ref)
        return self._dev_sets[ref]

    def groups(self, a: SetRef, b: SetRef) -> torch.Tensor:
        """int32 ``[B]`` group ids for a conv from set ``a`` to set ``b`` (see :func:`conv_groups`)."""
        if not self.host_mode:
            return conv_groups(self(a), self(b), self.group_cache)
        return self._dev_groups[(a, b)]

    def remap(self, x: torch.Tensor, src: SetRef, dst: SetRef) -> torch.Tensor:
        """``x`` (stored for ``src``) re-compacted to ``dst``."""
        if not self.host_mode:
            return apply_remap(x, remap_index(self(src), self(dst)))
        return apply_remap(x, self._dev_remaps[(src, dst)])

    # ---- host planning
    def prepare(self) -> None:
        """Resolve everything the plan's run reads, on the host, and send it to the device (host planning): one
        call into the extension (``gencnp_fast_host::plan_indices``) where it is built, else :meth:`prepare_python`
        (the same result, built from the Python channel-set helpers; the tests compare the two)."""
        if _plan_indices_op() is None:
            self.prepare_python()
        else:
            self.prepare_compiled()

    def prepare_compiled(self) -> None:
        """:meth:`prepare` through ``gencnp_fast_host::plan_indices``: the program of the plan (which sets, conv
        groups and re-compactions a run reads; built once per plan) and the masks go in, three buffers (int32,
        int64, uint8) and their layout come out; each buffer is sent with one asynchronous copy (pinned memory on a
        GPU) and the run reads views of them."""
        prog = _host_program(self.plan)
        b = self.batch
        masks = []
        for name in prog.mask_names:
            m = self.masks[name]
            m = (m if m.dtype == torch.bool else m != 0).contiguous()
            masks.append(m.view(torch.uint8).reshape(-1, m.shape[-1]))
        pin = self.device.type == "cuda"
        i32, i64, u8, meta = _plan_indices_op()(masks, prog.program, b, pin)
        if self.device.type != "cpu":
            i32, i64, u8 = (t.to(self.device, non_blocking=True) for t in (i32, i64, u8))
        meta = meta.tolist()
        m = 0
        for ref, channels in zip(prog.set_refs, prog.set_channels):
            full, k, ngroups, off, rows = meta[m : m + 5]
            m += 5
            if full:
                self._dev_sets[ref] = ChannelSet.dense(b, channels, self.device)
            else:
                idx = i32.as_strided((rows, k), (k, 1), off)
                self._dev_sets[ref] = ChannelSet(idx.expand(b, k) if rows == 1 else idx, None, ngroups, channels,
                                                 False, None)
        by_offset: Dict[int, torch.Tensor] = {}
        for key in prog.group_keys:
            goff, poff, ngroups, max_cnt = meta[m : m + 4]
            m += 4
            g = by_offset.get(goff)
            if g is None:  # one tensor (and problem list) per partition of the batch
                g = i32.as_strided((b,), (1,), goff)
                _attach_problems(g, i32.as_strided((b + 2 * ngroups,), (1,), poff), b, ngroups, max_cnt)
                by_offset[goff] = g
            self._dev_groups[key] = g
        kinds = ("same", "zeros", "row", "rows")
        for key in prog.remap_keys:
            kind, width, toff, trows, coff, ncols, koff = meta[m : m + 7]
            m += 7
            take = cols = keep = None
            if kind >= 2:
                take = i64.as_strided((trows, width), (width, 1), toff)
                take = take[0] if kind == 2 else take
                cols = i64.as_strided((ncols,), (1,), coff) if ncols else None
                keep = u8.as_strided((b, width), (width, 1), koff) if koff >= 0 else None
            self._dev_remaps[key] = RemapIndex(kinds[kind], width, take, cols, keep)

    def prepare_python(self) -> None:
        """:meth:`prepare` with the Python channel-set helpers (the reference for :meth:`prepare_compiled`): the
        same needs (the plan's program), each resolved on the host and packed for one copy per dtype."""
        prog = _host_program(self.plan)
        pack = _Pack()
        sets: Dict[SetRef, Tuple[ChannelSet, Optional[int]]] = {}
        for ref in prog.set_refs:  # the kernels read idx only: group ids and counts stay on the host
            cs = self.host(ref)  # one mask for the batch: one row is sent, expanded on the device
            sets[ref] = (cs, None if cs.full else pack.add(cs.idx[:1] if cs.ngroups == 1 else cs.idx))
        groups: Dict[Tuple[SetRef, SetRef], Tuple[int, int, int, int]] = {}
        by_partition: Dict[bytes, Tuple[int, int, int, int]] = {}
        for a, b in prog.group_keys:
            g = conv_groups(self.host(a), self.host(b), self.group_cache)
            key = g.numpy().tobytes()  # one device tensor (and problem list) per partition of the batch
            if key not in by_partition:
                samples, start, counts, ngroups, max_cnt = group_table(g)
                by_partition[key] = (pack.add(g), pack.add(torch.cat([samples, start, counts])), ngroups, max_cnt)
            groups[(a, b)] = by_partition[key]
        remaps: Dict[Tuple[SetRef, SetRef], Tuple[RemapIndex, Tuple[Optional[int], ...]]] = {}
        for src, dst in prog.remap_keys:
            r = remap_index(self.host(src), self.host(dst))
            remaps[(src, dst)] = (r, tuple(None if t is None else pack.add(t) for t in (r.take, r.cols, r.keep)))

        pack.send(self.device)
        for ref, (cs, h) in sets.items():
            if h is None:
                self._dev_sets[ref] = ChannelSet.dense(self.batch, cs.channels, self.device)
            else:  # gid / counts are host-side decisions only: the device twin carries None
                idx = pack[h].expand(self.batch, -1) if cs.ngroups == 1 else pack[h]
                self._dev_sets[ref] = ChannelSet(idx, None, cs.ngroups, cs.channels, False, None)
        dev_groups: Dict[int, torch.Tensor] = {}
        for key, (hg, hp, ngroups, max_cnt) in groups.items():
            if hg not in dev_groups:
                _attach_problems(pack[hg], pack[hp], self.batch, ngroups, max_cnt)
                dev_groups[hg] = pack[hg]
            self._dev_groups[key] = dev_groups[hg]
        for key, (r, hs) in remaps.items():
            take, cols, keep = (None if h is None else pack[h] for h in hs)
            self._dev_remaps[key] = RemapIndex(r.kind, r.width, take, cols, keep)


def small_map_eligible(st: ConvStep) -> bool:
    """Whether ``st`` is cheaper as a dense linear map of its whole input map: a conv whose input map has fewer
    pixels than the kernel has taps (a 3x3 conv on a 2x2 map: 5 of 9 taps read padding), and whose linear map is at
    most 4x the weight's size."""
    if st.linear or len(st.in_shape) != 3 or len(st.out_shape) != 3:
        return False
    khw = st.weight.shape[2] * st.weight.shape[3]
    pi = st.in_shape[1] * st.in_shape[2]
    po = st.out_shape[1] * st.out_shape[2]
    return pi < khw and pi * po <= 4 * khw


def _small_map_weights(st: ConvStep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
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


def _conv_step(st: ConvStep, x: torch.Tensor, env, sets: _Sets, conv: ConvFn) -> torch.Tensor:
    in_cs, out_cs = sets(st.in_set), sets(st.out_set)
    b = x.shape[0]
    if st.linear:
        x = x.reshape(b, -1, 1, 1)
    residual = None
    if st.residual is not None:
        res_slot, res_set = st.residual
        residual = sets.remap(env[res_slot], res_set, st.out_set)
        if st.linear:
            residual = residual.reshape(b, -1, 1, 1)
    if in_cs.full and out_cs.full:
        # Nothing pruned on either side: the dense conv (BN folded) is the fastest kernel there is.
        y = F.conv2d(x, st.weight, st.bias, st.stride, st.padding, st.dilation)
        if residual is not None:
            y = y.add_(residual)
        if st.relu:
            y = y.relu_()
    elif in_cs.ngroups == 1 and out_cs.ngroups == 1 and small_map_eligible(st):
        # One mask for the whole batch on a tiny map: the conv as a dense linear map of the whole map (2.25x fewer
        # FLOPs for 3x3 on 2x2, same sums in the same order). With several groups the larger weight slices would
        # be gathered once per group, which costs more than the saved FLOPs, so those keep the 3x3 path.
        w2, b2 = _small_map_weights(st)
        _, ho, wo = st.out_shape
        pi, po = st.in_shape[1] * st.in_shape[2], ho * wo
        res2 = None if residual is None else residual.reshape(b, -1, 1, 1).contiguous()
        y = conv(x.reshape(b, -1, 1, 1).contiguous(), sets(("flat", st.in_set, pi)).idx, w2, b2,
                 sets(("flat", st.out_set, po)).idx, sets.groups(st.in_set, st.out_set), res2, [1, 1], [0, 0],
                 [1, 1], st.relu)
        y = y.reshape(b, -1, ho, wo)
    else:
        y = conv(x.contiguous(), in_cs.idx, st.weight, st.bias, out_cs.idx, sets.groups(st.in_set, st.out_set),
                 None if residual is None else residual.contiguous(), list(st.stride), list(st.padding),
                 list(st.dilation), st.relu)
    return y.reshape(b, -1) if st.linear else y


def run_plan(plan: Plan, masks: Dict[str, torch.Tensor], x: torch.Tensor, conv: Optional[ConvFn],
             env_out: Optional[Dict[str, torch.Tensor]] = None,
             host_masks: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Run ``plan``; with ``env_out`` (a dict) every value slot is left in it (for unit outputs).

    The index work is planned on the host first where ``HOST_PLANNING`` says so (by default: always on a GPU, and on
    CPU whenever the extension is built; :class:`_Sets`), from ``host_masks`` (the masks on the CPU) or one copy of
    ``masks``.
    """
    b = x.shape[0]
    if _host_planned(x):
        sets = _Sets(plan, masks, b, x.device, masks_to_host(masks) if host_masks is None else host_masks)
        sets.prepare()
    else:
        sets = _Sets(plan, masks, b, x.device)
    env: Dict[str, torch.Tensor] = {plan.input_slot: x}
    for st in plan.steps:
        src = env[st.src]
        if isinstance(st, ConvStep):
            y = _conv_step(st, src, env, sets, conv)
        elif isinstance(st, ChannelwiseStep):
            if src.shape[1] == 0:
                y = src.new_zeros((b, 0) + tuple(st.out_shape[1:]))
            else:
                y = st.fn(src)
        elif isinstance(st, FlattenStep):
            y = src.reshape(b, -1)
        else:  # RemapStep
            y = sets.remap(src, st.src_set, st.dst_set)
            if st.add is not None:
                y = y + sets.remap(env[st.add[0]], st.add[1], st.dst_set)
            if st.relu:
                y = F.relu(y)
        env[st.dst] = y
    if env_out is not None:
        env_out.update(env)
    return env[plan.output_slot]


def fast_pathway_forward(
    model: nn.Module, mask: Optional[MaskLike], x: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Logits of the pathway model ``H(x; m)``, computed with every pruned channel skipped.

    Equal (float32: relative error <= 1e-4) to :func:`reference_pathway_forward`. Inference only: no autograd.

    Args:
        model: target model in eval mode (VGG / ResNet style; see the README for supported layers).
        mask: a :class:`Pathway` or mapping unit name -> bool/0-1 tensor ``[B, C]`` or ``[C]``; units not named
            are kept whole.
        x: input batch ``[B, C, H, W]`` (any memory layout).
        backend: ``"auto"``, ``"cpu"``, ``"torch"``, ``"reference"`` (and ``"cuda"``, ``"triton"`` on a GPU).
    """
    check_model_and_input(model, x)
    backend = _pick_backend(backend, x)
    if backend == "reference":
        with torch.no_grad():
            return reference_pathway_forward(model, mask, x)
    units = cached_units(model, x)
    masks = normalize_masks(units, mask, x)
    plan = get_plan(model, x, frozenset(masks))  # compiled (and cached) first: unsupported layers are named here
    # On a GPU the masks come to the host once (one synchronisation); every decision below reads that copy.
    host_masks = masks_to_host(masks) if _host_planned(x) else None
    with torch.no_grad():
        if all(bool(m.all()) for m in (host_masks if host_masks is not None else masks).values()):
            # A pathway that keeps every channel is the dense model: nothing to skip, so run the model as it is.
            return model(x)
        conv = _CONV_BACKENDS[backend][1]()
        return run_plan(plan, masks, x.contiguous(), conv, host_masks=host_masks)


def dense_capture(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(logits, {unit name: unit output})`` of the dense model, through the compiled plan (BN folded, fast
    pooling; no autograd). The same values as :func:`~gencnp_fast.model.capture_units` without a mask (float32:
    relative error ~1e-6), cheaper than the hooked forward; falls back to it where the plan cannot run (a dtype
    other than float32 on CPU, or an unsupported model)."""
    check_model_and_input(model, x)
    units = cached_units(model, x)
    try:
        if x.dtype != torch.float32:
            raise UnsupportedModelError("dense_capture runs float32")
        plan = get_plan(model, x, frozenset())
    except UnsupportedModelError:
        from ..model.reference import capture_units

        with torch.no_grad():
            return capture_units(model, x)
    env: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = run_plan(plan, {}, x.contiguous(), None, env_out=env)
    return logits, {u.name: env[plan.unit_slots[u.name]] for u in units}


def pathway_flops(model: nn.Module, mask: Optional[MaskLike], x: torch.Tensor) -> Dict[str, object]:
    """Work of the dense model and of the pathway, per conv/linear layer and in total (DESIGN §6).

    Returns a dict with ``layers`` (per layer: ``dense_macs``, ``pathway_macs``, ``dense_weight_bytes``,
    ``pathway_weight_bytes``: bytes of the weight slices each group of samples sharing masks must read) and the totals
    ``dense_macs``, ``pathway_macs``, ``ideal_flop_ratio``, ``dense_bytes``, ``pathway_bytes``, ``ideal_bytes_ratio``
    (bytes = weights read + activations read and written, float32).
    """
    check_model_and_input(model, x)
    units = cached_units(model, x)
    masks = normalize_masks(units, mask, x)
    plan = get_plan(model, x, frozenset(masks))
    b = x.shape[0]
    sets = _Sets(plan, masks, b, x.device)
    layers = []
    tot = dict(dense_macs=0, pathway_macs=0, dense_bytes=0, pathway_bytes=0)
    for st in plan.steps:
        if not isinstance(st, ConvStep):
            continue
        in_cs, out_cs = sets(st.in_set), sets(st.out_set)
        cout, cin, kh, kw = st.weight.shape
        spatial_out = 1
        for d in st.out_shape[1:]:
            spatial_out *= d
        kk = kh * kw
        spatial_in = 1
        for d in st.in_shape[1:]:
            spatial_in *= d
        cnt_in, cnt_out = in_cs.counts.double(), out_cs.counts.double()
        dense_macs = b * cout * cin * kk * spatial_out
        path_macs = float((cnt_in * cnt_out).sum()) * kk * spatial_out
        groups = conv_groups(in_cs, out_cs).long()
        first = torch.zeros(int(groups.max()) + 1, dtype=torch.long, device=groups.device).scatter_reduce_(
            0, groups, torch.arange(b, device=groups.device), reduce="amin", include_self=False
        )  # one representative sample per group
        path_w = float((cnt_in[first] * cnt_out[first]).sum()) * kk * 4
        dense_w = cout * cin * kk * 4
        dense_act = 4 * b * (cin * spatial_in + cout * spatial_out)
        path_act = 4 * float((cnt_in * spatial_in + cnt_out * spatial_out).sum())
        layers.append(dict(name=st.name, dense_macs=dense_macs, pathway_macs=path_macs, dense_weight_bytes=dense_w,
                           pathway_weight_bytes=path_w))
        tot["dense_macs"] += dense_macs
        tot["pathway_macs"] += path_macs
        tot["dense_bytes"] += dense_w + dense_act
        tot["pathway_bytes"] += path_w + path_act
    return dict(
        layers=layers,
        **tot,
        ideal_flop_ratio=tot["dense_macs"] / max(tot["pathway_macs"], 1.0),
        ideal_bytes_ratio=tot["dense_bytes"] / max(tot["pathway_bytes"], 1.0),
    )


from ..kernels import gpu_backends  # noqa: E402,F401  (registers the "triton" and "cuda" backends)
