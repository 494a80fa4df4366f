"""The plan compiler: trace a model once into a list of steps over compacted activations.

Where a unit's mask is applied: a unit's mask never multiplies anything. It decides which output channels the
conv/linear step that feeds the unit computes (``out_set``); the step's epilogue applies bias, residual and the
unit's ReLU to those channels only, and the next step reads only them (``in_set``). Units fed by something else
(a pooling, an add of two non-conv values) re-compact their input to the mask's channels (``UnitSelect``).

A plan depends on the model's structure, the input shape and which units the mask names; it is cached per model
(see :mod:`gencnp_fast.plan.engine`). BatchNorm is folded into the preceding conv; the folded weights live in the
plan and are rebuilt when any parameter or buffer of the model changes.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..model.units import UnsupportedModelError, is_relu_node, trace_model

__all__ = ["Plan", "compile_plan", "ConvStep", "SetRef"]

# A symbolic channel set: ("input",) the model input, ("full", node) all channels of a node's output,
# ("unit", name) the channels a unit's mask keeps, ("flat", ref, spatial) the flattened features of ref.
SetRef = Tuple


@dataclasses.dataclass
class ConvStep:
    """``out = act(conv(x[in_set], W[out_set, in_set]) + bias + residual)`` on compacted tensors."""

    name: str
    src: str  # value slot of the input
    in_set: SetRef
    out_set: SetRef
    weight: torch.Tensor  # folded, [C_out, C_in, kh, kw]
    bias: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    relu: bool
    linear: bool
    out_shape: Tuple[int, ...]  # per sample, dense: (C_out, Ho, Wo) or (C_out,)
    in_shape: Tuple[int, ...] = ()  # per sample, dense
    residual: Optional[Tuple[str, SetRef]] = None  # (slot, its set) added before the ReLU
    dst: str = ""
    # the conv as one dense linear map of its whole input map, built on first use (engine._small_map_weights)
    small_map: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None


@dataclasses.dataclass
class ChannelwiseStep:
    """A channel-wise op (pooling, dropout, identity, ReLU of a kept unit) on a compacted tensor."""

    name: str
    src: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    out_shape: Tuple[int, ...]  # per sample, dense
    dst: str = ""


@dataclasses.dataclass
class FlattenStep:
    name: str
    src: str
    dst: str = ""


@dataclasses.dataclass
class RemapStep:
    """Re-compact ``src`` from ``src_set`` to ``dst_set`` (zeros where absent), optionally adding another value
    and applying ReLU: units fed by non-conv ops, adds of two non-conv values, the model's output."""

    name: str
    src: str
    src_set: SetRef
    dst_set: SetRef
    relu: bool = False
    add: Optional[Tuple[str, SetRef]] = None
    dst: str = ""


Step = Union[ConvStep, ChannelwiseStep, FlattenStep, RemapStep]


@dataclasses.dataclass
class Plan:
    steps: List[Step]
    input_slot: str
    input_channels: int
    output_slot: str
    set_channels: Dict[SetRef, int]  # channel count of every symbolic set
    units: Dict[str, int]  # unit name -> channels, for the units whose masks this plan reads
    output_dense_shape: Tuple[int, ...]
    unit_slots: Dict[str, str] = dataclasses.field(default_factory=dict)  # unit name -> value slot of its output
    host_program: object = None  # engine._host_program: what a host-planned run reads (built on first use)


def _fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else None
    if bn is None:
        return w.contiguous(), b
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError(f"BatchNorm2d without running statistics (track_running_stats=False) after {conv}")
    scale = bn.running_var.detach().float().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().float()
    shift = -bn.running_mean.detach().float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().float()
    if b is not None:
        shift = shift + b * scale
    return (w * scale.reshape(-1, 1, 1, 1)).contiguous(), shift.contiguous()


_ADD = {operator.add, operator.iadd, torch.add}
_FLATTEN_FUNCS = {torch.flatten}
_PASSTHROUGH = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)


def _maxpool_2x2(t: torch.Tensor) -> torch.Tensor:
    """2×2 stride-2 max-pool as three strided maxima (several times faster than ``F.max_pool2d`` on CPU)."""
    h, w = t.shape[-2] // 2 * 2, t.shape[-1] // 2 * 2
    t = t[..., :h, :w]
    return torch.maximum(
        torch.maximum(t[..., 0::2, 0::2], t[..., 0::2, 1::2]), torch.maximum(t[..., 1::2, 0::2], t[..., 1::2, 1::2])
    )


def _channelwise_fn(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(mod, (nn.Dropout, nn.Identity)):  # eval mode: identity
        return lambda t: t
    if (isinstance(mod, nn.MaxPool2d) and _pair(mod.kernel_size) == (2, 2) and _pair(mod.stride or 2) == (2, 2)
            and _pair(mod.padding) == (0, 0) and _pair(mod.dilation) == (1, 1) and not mod.ceil_mode
            and not mod.return_indices):
        return _maxpool_2x2
    if isinstance(mod, nn.MaxPool2d) and mod.return_indices:
        raise UnsupportedModelError("MaxPool2d(return_indices=True) is not supported")
    return mod


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD:
        return len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_flatten(node: fx.Node, modules) -> bool:
    if node.op == "call_module" and isinstance(modules.get(node.target), nn.Flatten):
        return True
    if node.op == "call_function" and node.target in _FLATTEN_FUNCS:
        return True
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def _describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} (node {node.name!r})"
    return f"{node.op} {node.target!r} (node {node.name!r})"


def compile_plan(model: nn.Module, example: torch.Tensor, masked_units: FrozenSet[str]) -> Plan:
    """Compile ``model`` for inputs shaped like ``example`` and masks naming ``masked_units``."""
    gm = trace_model(model)
    modules = dict(gm.named_modules())
    with torch.no_grad():
        ShapeProp(gm).propagate(example[:1].detach())
    shape = {n.name: tuple(n.meta["tensor_meta"].shape[1:]) for n in gm.graph.nodes if "tensor_meta" in n.meta
             and hasattr(n.meta["tensor_meta"], "shape")}

    unit_name: Dict[str, str] = {}
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if is_relu_node(node, modules):
            if node.op == "call_module":
                k = calls.get(node.target, 0)
                calls[node.target] = k + 1
                unit_name[node.name] = node.target if k == 0 else f"{node.target}#{k}"
            else:
                unit_name[node.name] = node.name

    def single_user(n: fx.Node) -> Optional[fx.Node]:
        return next(iter(n.users)) if len(n.users) == 1 else None

    def bn_after(n: fx.Node) -> Optional[fx.Node]:
        u = single_user(n)
        if u is not None and u.op == "call_module" and isinstance(modules[u.target], nn.BatchNorm2d):
            return u
        return None

    def unit_set(relu_node: fx.Node, fallback: SetRef) -> SetRef:
        name = unit_name[relu_node.name]
        return ("unit", name) if name in masked_units else fallback

    steps: List[Step] = []
    sets: Dict[str, SetRef] = {}  # value slot -> its channel set
    set_channels: Dict[SetRef, int] = {}
    alias: Dict[str, str] = {}  # fx node name -> value slot holding its value
    pending: Dict[str, ConvStep] = {}  # conv steps deferred to their add (residual fusion)
    consumed: set = set()  # nodes folded into an earlier step (BN, fused ReLU)
    units_read: Dict[str, int] = {}

    def slot(n: fx.Node) -> str:
        return alias.get(n.name, n.name)

    def emit(step: Step, out_set: SetRef, channels: int, dst: str) -> None:
        step.dst = dst
        steps.append(step)
        sets[dst] = out_set
        set_channels.setdefault(out_set, channels)

    def materialize(n: fx.Node) -> str:
        s = slot(n)
        if s in pending:
            st = pending.pop(s)
            emit(st, st.out_set, st.out_shape[0], s)
        return s

    input_channels = None
    input_slot = ""
    output_slot = None
    output_shape: Tuple[int, ...] = ()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if input_channels is not None:
                raise UnsupportedModelError("models with more than one input are not supported")
            input_channels = shape[node.name][0]
            input_slot = node.name
            sets[node.name] = ("full", node.name)
            set_channels[("full", node.name)] = input_channels
            continue
        if node.name in consumed:
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise UnsupportedModelError("models whose forward returns a tuple or dict are not supported")
            s = materialize(out)
            if sets[s][0] != "full":  # the output is stored densely
                dense = ("full", out.name)
                emit(RemapStep(f"output:{out.name}", s, sets[s], dense), dense, shape[out.name][0], "__output__")
                s = "__output__"
            output_slot = s
            output_shape = shape[out.name]
            continue
        if node.op in ("get_attr",) or (node.op == "call_method" and node.target == "size") or (
            node.op == "call_function" and node.target is getattr
        ):
            if any(not (_is_flatten(u, modules)) for u in node.users):
                raise UnsupportedModelError(f"{_describe(node, modules)} is not supported by the pathway engine")
            continue

        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
                raise UnsupportedModelError(
                    f"module {node.target!r}: Conv2d with groups={mod.groups}, padding_mode={mod.padding_mode!r} "
                    "is not supported (groups=1, zero padding only)"
                )
            src = materialize(node.args[0])
            bn = bn_after(node) if isinstance(mod, nn.Conv2d) else None
            last = bn if bn is not None else node
            nxt = single_user(last)
            relu = False
            residual_via_add = None
            out_full: SetRef = ("full", last.name)
            out_set: SetRef = out_full
            if nxt is not None and is_relu_node(nxt, modules):
                out_set = unit_set(nxt, out_full)
                relu = True
                consumed.add(nxt.name)
                alias[nxt.name] = node.name
                units_read[unit_name[nxt.name]] = shape[nxt.name][0]
            elif nxt is not None and _is_add(nxt):
                after = single_user(nxt)
                if after is not None and is_relu_node(after, modules):
                    out_set = unit_set(after, ("full", nxt.name))
                else:
                    out_set = ("full", nxt.name)
                residual_via_add = nxt
            if isinstance(mod, nn.Conv2d):
                w, b = _fold_bn(mod, modules[bn.target] if bn is not None else None)
                st = ConvStep(
                    node.target, src, sets[src], out_set, w, b, _pair(mod.stride), _pair(mod.padding),
                    _pair(mod.dilation), relu, False, shape[last.name], shape[node.args[0].name],
                )
            else:
                if len(shape[node.args[0].name]) != 1:
                    raise UnsupportedModelError(f"module {node.target!r}: Linear on a non-flat input is not supported")
                w = mod.weight.detach().float().reshape(mod.out_features, mod.in_features, 1, 1).contiguous()
                b = mod.bias.detach().float().contiguous() if mod.bias is not None else None
                st = ConvStep(node.target, src, sets[src], out_set, w, b, (1, 1), (0, 0), (1, 1), relu, True,
                              shape[last.name], shape[node.args[0].name])
            if bn is not None:
                alias[bn.name] = node.name
                consumed.add(bn.name)
            dst = node.name
            alias[last.name] = dst
            if residual_via_add is not None:
                pending[dst] = st
                set_channels.setdefault(out_set, shape[last.name][0])
            else:
                emit(st, out_set, shape[last.name][0], dst)
            continue

        if isinstance(mod, nn.BatchNorm2d):
            raise UnsupportedModelError(
                f"module {node.target!r}: BatchNorm2d is supported only directly after a Conv2d whose output "
                "nothing else reads (it is folded into the conv)"
            )

        if _is_add(node):
            a, b = node.args
            after = single_user(node)
            relu_after = after is not None and is_relu_node(after, modules)
            dense = ("full", node.name)
            out_set = unit_set(after, dense) if relu_after else dense
            sa, sb = slot(a), slot(b)
            main = None
            for cand, other in ((sa, sb), (sb, sa)):
                if cand in pending and pending[cand].out_set == out_set and pending[cand].residual is None:
                    main, res = cand, other
                    break
            if main is not None:
                st = pending.pop(main)
                res_slot = materialize(a if res == sa else b)
                st.residual = (res_slot, sets[res_slot])
                st.relu = relu_after
                emit(st, out_set, shape[node.name][0], main)
                alias[node.name] = main
            else:
                sa, sb = materialize(a), materialize(b)
                emit(RemapStep(f"add:{node.name}", sa, sets[sa], out_set, relu=relu_after, add=(sb, sets[sb])),
                     out_set, shape[node.name][0], node.name)
            if relu_after:
                consumed.add(after.name)
                alias[after.name] = alias.get(node.name, node.name)
                units_read[unit_name[after.name]] = shape[after.name][0]
            continue

        if is_relu_node(node, modules):
            src = materialize(node.args[0])
            name = unit_name[node.name]
            units_read[name] = shape[node.name][0]
            if name in masked_units:
                emit(RemapStep(f"unit:{name}", src, sets[src], ("unit", name), relu=True), ("unit", name),
                     shape[node.name][0], node.name)
            else:
                emit(ChannelwiseStep(f"relu:{name}", src, F.relu, shape[node.name]), sets[src], shape[node.name][0],
                     node.name)
            continue

        if isinstance(mod, _PASSTHROUGH):
            src = materialize(node.args[0])
            fn = _channelwise_fn(mod)
            emit(ChannelwiseStep(node.target, src, fn, shape[node.name]), sets[src], shape[node.name][0], node.name)
            continue

        if _is_flatten(node, modules):
            src_node = node.args[0]
            in_shape = shape[src_node.name]
            out_shape = shape[node.name]
            ok = len(out_shape) == 1 and len(in_shape) >= 1
            if node.op == "call_function" and (len(node.args) > 1 and node.args[1] != 1 or node.kwargs.get("start_dim", 1) != 1):
                ok = False
            if not ok:
                raise UnsupportedModelError(
                    f"{_describe(node, modules)}: only flattening [B, C, H, W] to [B, C*H*W] is supported"
                )
            src = materialize(src_node)
            spatial = 1
            for d in in_shape[1:]:
                spatial *= d
            ref = sets[src]
            new = ref if spatial == 1 else ("flat", ref, spatial)
            emit(FlattenStep(node.name, src), new, out_shape[0], node.name)
            continue

        raise UnsupportedModelError(f"{_describe(node, modules)} is not supported by the pathway engine")

    if pending:
        raise UnsupportedModelError(f"internal: conv steps {list(pending)} were never emitted")
    assert input_channels is not None and output_slot is not None
    unit_slots = {unit_name[n]: alias.get(n, n) for n in unit_name}
    return Plan(steps, input_slot, input_channels, output_slot, set_channels, units_read, output_shape, unit_slots)


def plan_weights(plan: Plan) -> List[torch.Tensor]:
    return [t for st in plan.steps if isinstance(st, ConvStep) for t in (st.weight, st.bias) if t is not None]
