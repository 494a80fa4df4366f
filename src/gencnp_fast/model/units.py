"""Units of a target model: every call of an activation function, in execution order.

A *unit* (docs/design.md §2) is every call of ``nn.ReLU`` (module call), ``F.relu``, ``torch.relu`` or
``Tensor.relu`` in the model's forward. A module called twice gives two units, named ``name`` and ``name#1``; a functional call is named by its
torch.fx node name. A unit's channels are dim 1 of its output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .guards import register_cache

__all__ = ["Unit", "pathway_units", "trace_model", "is_relu_node", "unit_nodes", "eval_mode", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model contains a layer or construct the pathway engine does not support."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One activation call of the target model.

    Attributes:
        name: unit name (docs/design.md §2), e.g. ``"features.2"`` or ``"layer1.0.relu#1"``.
        channels: number of channels (dim 1 of the activation's output).
        index: position in execution order.
        node: name of the torch.fx node that computes it.
        shape: output shape per sample (``(C, H, W)`` or ``(C,)``) for the traced input size.
    """

    name: str
    channels: int
    index: int
    node: str
    shape: Tuple[int, ...]


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_)


def is_relu_node(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether an fx node is an activation call that counts as a unit."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


# Trace cache: model -> (structure key, GraphModule). Tracing is symbolic, so it does not depend on weights.
_TRACE_CACHE: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, fx.GraphModule]]" = register_cache(
    weakref.WeakKeyDictionary())


def _structure_key(model: nn.Module) -> tuple:
    return tuple((name, type(m).__name__, id(m)) for name, m in model.named_modules())


def trace_model(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with torch.fx once (cached while its module structure is unchanged)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    key = _structure_key(model)
    hit = _TRACE_CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise UnsupportedModelError(
            f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); the pathway "
            "engine needs a forward without data-dependent control flow"
        ) from exc
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Traced")
    _TRACE_CACHE[model] = (key, gm)
    return gm


def unit_nodes(gm: fx.GraphModule) -> List[Tuple[str, fx.Node]]:
    """(unit name, node) for every activation call in graph order (graph order is execution order)."""
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    out = []
    for node in gm.graph.nodes:
        if not is_relu_node(node, modules):
            continue
        if node.op == "call_module":
            k = calls.get(node.target, 0)
            calls[node.target] = k + 1
            name = node.target if k == 0 else f"{node.target}#{k}"
        else:
            name = node.name
        out.append((name, node))
    return out


def _shape_prop(gm: fx.GraphModule, example_input: torch.Tensor) -> Dict[str, torch.Size]:
    """Output shape (batch included) of every tensor-valued node on ``example_input``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    return {n.name: n.meta["tensor_meta"].shape for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode for the block, then every module's own ``training`` flag restored (a model in
    training mode may hold frozen eval-mode modules: ``model.train(True)`` would switch them back)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def pathway_units(model: nn.Module, example_input: torch.Tensor) -> List[Unit]:
    """The units of ``model`` in execution order, with their channel counts.

    Args:
        model: the target CNN (any mode; shapes do not depend on it).
        example_input: one input batch (``[B, C, H, W]``); only its shape matters.

    Returns:
        A list of :class:`Unit`, named as docs/design.md §2 fixes.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    gm = trace_model(model)
    with eval_mode(model):  # BN in training mode would update its running statistics
        shapes = _shape_prop(gm, example_input[:1])
    units = []
    for i, (name, node) in enumerate(unit_nodes(gm)):
        shape = tuple(shapes[node.name][1:])
        if len(shape) < 1:
            raise UnsupportedModelError(f"unit {name!r} has a scalar output; units need a channel dimension")
        units.append(Unit(name=name, channels=int(shape[0]), index=i, node=node.name, shape=shape))
    return units
