"""The plan compiler: trace a model once and lower every fx node to steps over compacted activations.

One small function per supported layer type (the lowering table at the bottom, looked up by the module's type or
the function called); anything else raises :class:`~gencnp_fast.model.UnsupportedModelError` naming the node.

Where a unit's mask is applied (docs/design.md §3): nowhere as a multiply. A conv/linear that feeds a masked unit
computes only the mask's output channels (its ``out_set`` is the unit's :class:`UnitChannels`); its epilogue adds
bias, residual and the unit's ReLU for those channels only, and the next step reads only them. Units fed by
something else (a pooling, an add of two non-conv values) re-compact their input to the mask's channels
(:class:`RemapStep`). BatchNorm is folded into the conv before it; the folded weights live in the plan.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..model.units import UnsupportedModelError, is_relu_node, trace_model, unit_nodes
from .sets import AllChannels, ChannelSetRef, FlatFeatures, UnitChannels
from .steps import ChannelwiseStep, ConvStep, FlattenStep, Plan, RemapStep, Step

__all__ = ["compile_plan"]


def compile_plan(model: nn.Module, example: torch.Tensor, masked_units: FrozenSet[str]) -> Plan:
    """Compile ``model`` for inputs shaped like ``example`` and masks naming ``masked_units``."""
    gm = trace_model(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(example[:1].detach())
    low = _Lowering(gm, masked_units, torch.float64 if example.dtype == torch.float64 else torch.float32)
    for node in gm.graph.nodes:
        if node.name not in low.consumed:
            _handler(node, low.modules)(low, node)
    return low.finish()


class _Lowering:
    """The state of one compilation: the steps emitted so far and what each fx node's value became."""

    def __init__(self, gm: fx.GraphModule, masked_units: FrozenSet[str], fold_dtype: torch.dtype):
        self.fold_dtype = fold_dtype  # BN is folded in float32 (float64 for a float64 plan), then cast to x's dtype
        self.modules: Dict[str, nn.Module] = dict(gm.named_modules())
        self.shape: Dict[str, Tuple[int, ...]] = {
            n.name: tuple(n.meta["tensor_meta"].shape[1:]) for n in gm.graph.nodes
            if "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape")}
        self.unit_name: Dict[str, str] = {node.name: name for name, node in unit_nodes(gm)}
        self.masked_units = masked_units
        self.steps: List[Step] = []
        self.sets: Dict[str, ChannelSetRef] = {}  # value slot -> its channel set
        self.set_channels: Dict[ChannelSetRef, int] = {}
        self.alias: Dict[str, str] = {}  # fx node name -> value slot holding its value
        self.pending: Dict[str, ConvStep] = {}  # conv steps deferred to their add (residual fusion)
        self.consumed: set = set()  # nodes folded into an earlier step (BN, fused ReLU)
        self.units_read: Dict[str, int] = {}
        self.input_slot: Optional[str] = None
        self.input_channels = 0
        self.output_slot: Optional[str] = None
        self.output_shape: Tuple[int, ...] = ()

    # -- helpers --------------------------------------------------------------------------------------------------
    def slot(self, n: fx.Node) -> str:
        return self.alias.get(n.name, n.name)

    def emit(self, step: Step, out_set: ChannelSetRef, channels: int, dst: str) -> None:
        step.dst = dst
        self.steps.append(step)
        self.sets[dst] = out_set
        self.set_channels.setdefault(out_set, channels)

    def materialize(self, n: fx.Node) -> str:
        """The slot of ``n``'s value, emitting its conv step if it was deferred for a residual add."""
        s = self.slot(n)
        if s in self.pending:
            st = self.pending.pop(s)
            self.emit(st, st.out_set, st.out_shape[0], s)
        return s

    def unit_set(self, relu_node: fx.Node, fallback: ChannelSetRef) -> ChannelSetRef:
        name = self.unit_name[relu_node.name]
        return UnitChannels(name) if name in self.masked_units else fallback

    def read_unit(self, relu_node: fx.Node) -> None:
        self.units_read[self.unit_name[relu_node.name]] = self.shape[relu_node.name][0]

    def single_user(self, n: fx.Node) -> Optional[fx.Node]:
        return next(iter(n.users)) if len(n.users) == 1 else None

    def relu_after(self, n: fx.Node) -> Optional[fx.Node]:
        u = self.single_user(n)
        return u if u is not None and is_relu_node(u, self.modules) else None

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.modules[node.target]).__name__})"
        if node.op == "call_function":
            return f"function {getattr(node.target, '__name__', node.target)} (node {node.name!r})"
        return f"{node.op} {node.target!r} (node {node.name!r})"

    def finish(self) -> Plan:
        if self.pending:
            raise UnsupportedModelError(f"internal: conv steps {list(self.pending)} were never emitted")
        assert self.input_slot is not None and self.output_slot is not None
        unit_slots = {name: self.alias.get(n, n) for n, name in self.unit_name.items()}
        return Plan(self.steps, self.input_slot, self.input_channels, self.output_slot, self.set_channels,
                    self.units_read, self.output_shape, unit_slots)


# ---------------------------------------------------------------------------------------------------------------
# Lowering functions, one per layer type

def _lower_input(low: _Lowering, node: fx.Node) -> None:
    if low.input_slot is not None:
        raise UnsupportedModelError("models with more than one input are not supported")
    low.input_channels = low.shape[node.name][0]
    low.input_slot = node.name
    low.sets[node.name] = AllChannels(node.name)
    low.set_channels[AllChannels(node.name)] = low.input_channels


def _lower_output(low: _Lowering, node: fx.Node) -> None:
    out = node.args[0]
    if not isinstance(out, fx.Node):
        raise UnsupportedModelError("models whose forward returns a tuple or dict are not supported")
    s = low.materialize(out)
    if not isinstance(low.sets[s], AllChannels):  # the output is stored densely
        dense = AllChannels(out.name)
        low.emit(RemapStep(f"output:{out.name}", s, low.sets[s], dense), dense, low.shape[out.name][0], "__output__")
        s = "__output__"
    low.output_slot = s
    low.output_shape = low.shape[out.name]


def _lower_shape_query(low: _Lowering, node: fx.Node) -> None:
    """``x.size(0)`` and the like: allowed only as an argument of a flatten (``x.view(x.size(0), -1)``)."""
    if any(not _is_flatten(u, low.modules) for u in node.users):
        raise UnsupportedModelError(f"{low.describe(node)} is not supported by the pathway engine")


def _fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d],
             dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The conv's weight and bias with the BatchNorm after it folded in, computed in ``dtype``."""
    w = conv.weight.detach().to(dtype)
    b = conv.bias.detach().to(dtype) if conv.bias is not None else None
    if bn is None:
        return w.contiguous(), b
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError(f"BatchNorm2d without running statistics (track_running_stats=False) after {conv}")
    scale = bn.running_var.detach().to(dtype).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -bn.running_mean.detach().to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    if b is not None:
        shift = shift + b * scale
    return (w * scale.reshape(-1, 1, 1, 1)).contiguous(), shift.contiguous()


def _conv_epilogue(low: _Lowering, last: fx.Node) -> Tuple[ChannelSetRef, bool, Optional[fx.Node]]:
    """``(out_set, relu fused, add node)`` of a conv/linear whose (BN-folded) output is ``last``: a ReLU right after
    it is fused; an add right after it is deferred (the conv may take the other operand as its residual)."""
    nxt = low.single_user(last)
    out_set: ChannelSetRef = AllChannels(last.name)
    if nxt is not None and is_relu_node(nxt, low.modules):
        low.consumed.add(nxt.name)
        low.read_unit(nxt)
        return low.unit_set(nxt, out_set), True, None
    if nxt is not None and _is_add(nxt):
        after = low.relu_after(nxt)
        return (low.unit_set(after, AllChannels(nxt.name)) if after is not None else AllChannels(nxt.name)), False, nxt
    return out_set, False, None


def _lower_conv_or_linear(low: _Lowering, node: fx.Node) -> None:
    mod = low.modules[node.target]
    src = low.materialize(node.args[0])
    in_shape = low.shape[node.args[0].name]
    bn = None
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1 or mod.padding_mode != "zeros":
            raise UnsupportedModelError(
                f"module {node.target!r}: Conv2d with groups={mod.groups}, padding_mode={mod.padding_mode!r} "
                "is not supported (groups=1, zero padding only)")
        u = low.single_user(node)
        if u is not None and u.op == "call_module" and isinstance(low.modules[u.target], nn.BatchNorm2d):
            bn = u
    last = bn if bn is not None else node
    out_set, relu, add = _conv_epilogue(low, last)
    if relu:
        low.alias[low.single_user(last).name] = node.name
    if isinstance(mod, nn.Conv2d):
        w, b = _fold_bn(mod, low.modules[bn.target] if bn is not None else None, low.fold_dtype)
        st = ConvStep(node.target, src, low.sets[src], out_set, w, b, _pair(mod.stride), _pair(mod.padding),
                      _pair(mod.dilation), relu, False, low.shape[last.name], in_shape)
    else:
        if len(in_shape) != 1:
            raise UnsupportedModelError(f"module {node.target!r}: Linear on a non-flat input is not supported")
        w = mod.weight.detach().to(low.fold_dtype).reshape(mod.out_features, mod.in_features, 1, 1).contiguous()
        b = mod.bias.detach().to(low.fold_dtype).contiguous() if mod.bias is not None else None
        st = ConvStep(node.target, src, low.sets[src], out_set, w, b, (1, 1), (0, 0), (1, 1), relu, True,
                      low.shape[last.name], in_shape)
    if bn is not None:
        low.alias[bn.name] = node.name
        low.consumed.add(bn.name)
    low.alias[last.name] = node.name
    if add is not None:
        low.pending[node.name] = st
        low.set_channels.setdefault(out_set, low.shape[last.name][0])
    else:
        low.emit(st, out_set, low.shape[last.name][0], node.name)


def _reject_batchnorm(low: _Lowering, node: fx.Node) -> None:
    raise UnsupportedModelError(
        f"module {node.target!r}: BatchNorm2d is supported only directly after a Conv2d whose output nothing else "
        "reads (it is folded into the conv)")


def _lower_add(low: _Lowering, node: fx.Node) -> None:
    """A residual add: fused into a deferred conv's epilogue when one operand is such a conv writing the same set,
    else a re-compaction of both operands to the add's set."""
    a, b = node.args
    after = low.relu_after(node)
    dense = AllChannels(node.name)
    out_set = low.unit_set(after, dense) if after is not None else dense
    sa, sb = low.slot(a), low.slot(b)
    main = res = None
    for cand, other in ((sa, sb), (sb, sa)):
        if cand in low.pending and low.pending[cand].out_set == out_set and low.pending[cand].residual is None:
            main, res = cand, other
            break
    if main is not None:
        st = low.pending.pop(main)
        res_slot = low.materialize(a if res == sa else b)
        st.residual = (res_slot, low.sets[res_slot])
        st.relu = after is not None
        low.emit(st, out_set, low.shape[node.name][0], main)
        low.alias[node.name] = main
    else:
        sa, sb = low.materialize(a), low.materialize(b)
        low.emit(RemapStep(f"add:{node.name}", sa, low.sets[sa], out_set, relu=after is not None,
                           add=(sb, low.sets[sb])), out_set, low.shape[node.name][0], node.name)
    if after is not None:
        low.consumed.add(after.name)
        low.alias[after.name] = low.alias.get(node.name, node.name)
        low.read_unit(after)


def _lower_relu(low: _Lowering, node: fx.Node) -> None:
    """A unit not fused into the step before it: a masked one re-compacts to its mask, an unmasked one is a ReLU."""
    src = low.materialize(node.args[0])
    name = low.unit_name[node.name]
    low.read_unit(node)
    channels = low.shape[node.name][0]
    if name in low.masked_units:
        low.emit(RemapStep(f"unit:{name}", src, low.sets[src], UnitChannels(name), relu=True), UnitChannels(name),
                 channels, node.name)
    else:
        low.emit(ChannelwiseStep(f"relu:{name}", src, F.relu, low.shape[node.name]), low.sets[src], channels,
                 node.name)


def _lower_channelwise(low: _Lowering, node: fx.Node) -> None:
    """Pooling, dropout (eval: identity), identity: the same op on the compacted tensor."""
    src = low.materialize(node.args[0])
    fn = _channelwise_fn(low.modules[node.target], tuple(low.shape[node.args[0].name]))
    low.emit(ChannelwiseStep(node.target, src, fn, low.shape[node.name]), low.sets[src], low.shape[node.name][0],
             node.name)


def _lower_flatten(low: _Lowering, node: fx.Node) -> None:
    src_node = node.args[0]
    in_shape, out_shape = low.shape[src_node.name], low.shape[node.name]
    ok = len(out_shape) == 1 and len(in_shape) >= 1
    if node.op == "call_function" and ((len(node.args) > 1 and node.args[1] != 1)
                                       or node.kwargs.get("start_dim", 1) != 1):
        ok = False
    if not ok:
        raise UnsupportedModelError(f"{low.describe(node)}: only flattening [B, C, H, W] to [B, C*H*W] is supported")
    src = low.materialize(src_node)
    spatial = 1
    for d in in_shape[1:]:
        spatial *= d
    ref = low.sets[src]
    low.emit(FlattenStep(node.name, src), ref if spatial == 1 else FlatFeatures(ref, spatial), out_shape[0],
             node.name)


# ---------------------------------------------------------------------------------------------------------------
# The lowering table

_Lower = Callable[[_Lowering, fx.Node], None]

_MODULE_LOWERING: Dict[type, _Lower] = {
    nn.Conv2d: _lower_conv_or_linear,
    nn.Linear: _lower_conv_or_linear,
    nn.BatchNorm2d: _reject_batchnorm,
    nn.ReLU: _lower_relu,
    nn.MaxPool2d: _lower_channelwise,
    nn.AvgPool2d: _lower_channelwise,
    nn.AdaptiveAvgPool2d: _lower_channelwise,
    nn.Dropout: _lower_channelwise,
    nn.Identity: _lower_channelwise,
    nn.Flatten: _lower_flatten,
}

_ADD = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD:
        return len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_flatten(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module" and isinstance(modules.get(node.target), nn.Flatten):
        return True
    if node.op == "call_function" and node.target is torch.flatten:
        return True
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def _unsupported(low: _Lowering, node: fx.Node) -> None:
    raise UnsupportedModelError(f"{low.describe(node)} is not supported by the pathway engine")


def _handler(node: fx.Node, modules: Dict[str, nn.Module]) -> _Lower:
    """The lowering function of ``node``: by module type (most derived first), else by the function called."""
    if node.op == "placeholder":
        return _lower_input
    if node.op == "output":
        return _lower_output
    if node.op == "get_attr" or (node.op == "call_method" and node.target == "size") or (
            node.op == "call_function" and node.target is getattr):
        return _lower_shape_query
    if node.op == "call_module":
        for cls in type(modules[node.target]).__mro__:
            if cls in _MODULE_LOWERING:
                return _MODULE_LOWERING[cls]
        return _unsupported
    if _is_add(node):
        return _lower_add
    if is_relu_node(node, modules):
        return _lower_relu
    if _is_flatten(node, modules):
        return _lower_flatten
    return _unsupported


class StridedMaxPool:
    """``F.max_pool2d`` (no dilation, no ceil mode) on a compacted tensor. CPU float32: the compiled op
    ``gencnp_fast::max_pool2d`` (one pass over the input: ResNet-50's 3x3 stride-2 stem pool on [8, 16, 112, 112]
    in 0.23 ms alone and 0.4-0.7 ms inside a plan, torch's NCHW CPU kernel 6.8-8.7 ms). Other devices / dtypes: strided maxima (pad with -inf, the
    max of ``k`` strided column slices, then of ``k`` strided row slices: 1.3-2 ms there). Both give F.max_pool2d's
    values exactly (a max is exact; NaN propagates)."""

    def __init__(self, kernel: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int]):
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self._args = (list(kernel), list(stride), list(padding))
        self._op = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and t.dtype == torch.float32:
            if self._op is None:
                from .. import ops  # noqa: F401  (loads the extension: the op's schema and CPU kernel)

                self._op = torch.ops.gencnp_fast.max_pool2d.default
            return self._op(t, *self._args)
        return self.strided(t)

    def strided(self, t: torch.Tensor) -> torch.Tensor:
        """The strided-slice maxima (any device and dtype)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        ho = (t.shape[-2] + 2 * ph - kh) // sh + 1
        wo = (t.shape[-1] + 2 * pw - kw) // sw + 1
        if ph or pw:
            t = F.pad(t, (pw, pw, ph, ph), value=float("-inf"))
        cols = t[..., :, 0: sw * (wo - 1) + 1: sw]
        for dx in range(1, kw):
            cols = torch.maximum(cols, t[..., :, dx: dx + sw * (wo - 1) + 1: sw])
        out = cols[..., 0: sh * (ho - 1) + 1: sh, :]
        for dy in range(1, kh):
            out = torch.maximum(out, cols[..., dy: dy + sh * (ho - 1) + 1: sh, :])
        return out


def _global_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean((2, 3), keepdim=True)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _channelwise_fn(mod: nn.Module, in_shape: Tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The op of a channel-wise module on compacted tensors of per-sample shape ``in_shape`` ``(C, H, W)``."""
    if isinstance(mod, (nn.Dropout, nn.Identity)):  # eval mode: identity
        return _identity
    if isinstance(mod, nn.AdaptiveAvgPool2d) and len(in_shape) == 3:
        out = mod.output_size if isinstance(mod.output_size, (tuple, list)) else (mod.output_size, mod.output_size)
        out = tuple(in_shape[1 + i] if o is None else int(o) for i, o in enumerate(out))
        if out == tuple(in_shape[1:]):  # already the output size: nothing to average (exact)
            return _identity
        if out == (1, 1):
            # the global average: the same sums (equal to the module's result, tested), without the module's
            # per-plane parallel loop, whose thread wake-up cost ~50 us at batch 1 (VGG-16-BN for CIFAR)
            return _global_mean
    if isinstance(mod, nn.MaxPool2d) and mod.return_indices:
        raise UnsupportedModelError("MaxPool2d(return_indices=True) is not supported")
    if isinstance(mod, nn.MaxPool2d) and _pair(mod.dilation) == (1, 1) and not mod.ceil_mode:
        return StridedMaxPool(_pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding))
    return mod


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))
