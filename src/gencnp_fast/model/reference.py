"""The oracle: the dense model with every unit's output multiplied by its mask (docs/design.md §2).

It runs the user's own module (not a traced copy): forward hooks on the ``nn.ReLU`` modules, and a
``TorchFunctionMode`` for functional ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` calls made outside an
``nn.ReLU`` module. The k-th functional call of a forward is the k-th functional unit of the traced graph.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .guards import Fingerprint, fingerprint, register_cache
from .pathway import MaskLike, normalize_masks
from .units import Unit, pathway_units

__all__ = [
    "reference_pathway_forward",
    "soft_pathway_forward",
    "cached_units",
    "check_model_and_input",
    "capture_units",
]

_FUNCTIONAL_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}

# model -> {input shape without batch: (module tree, units)}
_UNITS_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Tuple[tuple, List[Unit]]]]" = register_cache(
    weakref.WeakKeyDictionary())


def check_model_and_input(model: nn.Module, x: torch.Tensor, fp: Optional[Fingerprint] = None) -> Fingerprint:
    """Errors for a model in training mode or an input that is not a batch of images; returns the model's
    :class:`~gencnp_fast.model.guards.Fingerprint` (``fp``: one the caller already has), whose walk it checks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    fp = fingerprint(model) if fp is None else fp
    if fp.training is not None:  # named only on error: naming costs a named_modules walk
        name = next((n for n, mod in model.named_modules() if mod is fp.training), "")
        raise ValueError(
            f"the model is in training mode (module {name or type(model).__name__!r}); call model.eval() "
            "first: pathways are defined for eval mode (BatchNorm uses running statistics)"
        )
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [B, C, ...], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch")
    if fp.device is not None and fp.device != x.device:
        raise ValueError(f"x is on {x.device}, the model's parameters are on {fp.device}")
    return fp


def cached_units(model: nn.Module, x: torch.Tensor, fp: Optional[Fingerprint] = None) -> List[Unit]:
    """``pathway_units(model, x)`` cached per model, input shape and module tree (``fp``: the model's fingerprint
    if the caller has it); a clear error if ``x`` does not fit."""
    key = tuple(x.shape[1:])
    structure = (fingerprint(model) if fp is None else fp).structure
    per_model = _UNITS_CACHE.setdefault(model, {})
    hit = per_model.get(key)
    if hit is not None and hit[0] == structure:
        return hit[1]
    try:
        units = pathway_units(model, x)
    except RuntimeError as exc:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit the model: {exc}") from exc
    per_model[key] = (structure, units)
    return units


class _FunctionalUnits(TorchFunctionMode):
    """Routes functional ReLU calls (outside nn.ReLU modules) to a callback, in call order."""

    def __init__(self, on_call: Callable[[torch.Tensor], torch.Tensor], inside_module: List[int]):
        super().__init__()
        self.on_call = on_call
        self.inside_module = inside_module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _FUNCTIONAL_RELU and not self.inside_module[0]:
            out = self.on_call(out)
        return out


def _run_with_unit_hook(
    model: nn.Module, units: Sequence[Unit], x: torch.Tensor, on_unit: Callable[[Unit, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Run ``model(x)``, replacing each unit's output ``y`` by ``on_unit(unit, y)``."""
    by_module: Dict[str, List[Unit]] = {}
    functional: List[Unit] = []
    modules = dict(model.named_modules())
    for u in units:
        base = u.name.split("#", 1)[0]
        if isinstance(modules.get(base), nn.ReLU):
            by_module.setdefault(base, []).append(u)
        else:
            functional.append(u)
    calls: Dict[str, int] = {}
    inside = [0]
    fcount = [0]
    handles = []

    def make_hooks(mod_name: str):
        def pre(_m, _inp):
            inside[0] += 1

        def post(_m, _inp, out):
            inside[0] -= 1
            k = calls.get(mod_name, 0)
            calls[mod_name] = k + 1
            lst = by_module[mod_name]
            if k >= len(lst):
                raise RuntimeError(f"module {mod_name!r} was called more often than when the model was traced")
            return on_unit(lst[k], out)

        return pre, post

    def on_functional(out: torch.Tensor) -> torch.Tensor:
        k = fcount[0]
        fcount[0] += 1
        if k >= len(functional):
            raise RuntimeError("more functional ReLU calls than when the model was traced")
        return on_unit(functional[k], out)

    try:
        for mod_name in by_module:
            pre, post = make_hooks(mod_name)
            handles.append(modules[mod_name].register_forward_pre_hook(pre))
            handles.append(modules[mod_name].register_forward_hook(post))
        if functional:
            with _FunctionalUnits(on_functional, inside):
                return model(x)
        return model(x)
    finally:
        for h in handles:
            h.remove()


def _channelwise(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``m`` (``[B, C]`` or ``[C]``) shaped to broadcast over ``y``'s channels (dim 1)."""
    if m.dim() == 1:
        m = m.unsqueeze(0)
    return m.reshape(m.shape + (1,) * (y.dim() - 2))


def _apply_mask(y: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
    """``y`` with the channels a bool mask prunes set to exactly 0 (``m`` ``[B, C]``, ``[C]`` or ``None``: kept
    whole). A select, not a multiply: a NaN or inf in a pruned channel does not leak (NaN * 0 is NaN), as in the
    fast path, which never computes pruned channels (docs/design.md §2)."""
    if m is None:
        return y
    return torch.where(_channelwise(m.bool(), y), y, torch.zeros((), dtype=y.dtype, device=y.device))


def _apply_scores(y: torch.Tensor, s: Optional[torch.Tensor]) -> torch.Tensor:
    """``y * s`` channel-wise (the differentiable relaxation)."""
    return y if s is None else y * _channelwise(s.to(y.dtype), y)


def reference_pathway_forward(model: nn.Module, mask: Optional[MaskLike], x: torch.Tensor) -> torch.Tensor:
    """Logits of the pathway model ``H(x; m)``: the dense model with each unit's pruned channels set to 0.

    Args:
        model: the target model, in eval mode.
        mask: a :class:`Pathway` or mapping unit name -> ``[B, C]`` / ``[C]`` bool or 0/1 tensor. Units not in
            the mapping are kept whole.
        x: input batch.

    Returns:
        The model's output on ``x`` with the pathway applied.
    """
    fp = check_model_and_input(model, x)
    units = cached_units(model, x, fp)
    masks = normalize_masks(units, mask, x)

    return _run_with_unit_hook(model, units, x, lambda unit, y: _apply_mask(y, masks.get(unit.name)))


def capture_units(model: nn.Module, x: torch.Tensor, mask: Optional[MaskLike] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Run the (optionally masked) model and return ``(logits, {unit name: unit output})``.

    The captured feature maps are the masked unit outputs (the dense ones when ``mask`` is ``None``); autograd
    flows through them, so they can feed a generator or a gradient-based explanation.
    """
    fp = check_model_and_input(model, x)
    units = cached_units(model, x, fp)
    masks = normalize_masks(units, mask, x)
    feats: Dict[str, torch.Tensor] = {}

    def apply(unit: Unit, y: torch.Tensor) -> torch.Tensor:
        y = _apply_mask(y, masks.get(unit.name))
        feats[unit.name] = y
        return y

    logits = _run_with_unit_hook(model, units, x, apply)
    return logits, feats


def soft_pathway_forward(model: nn.Module, scores: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The dense model with each unit's output multiplied by real-valued ``scores`` (``[B, C]`` or ``[C]``).

    The differentiable relaxation used to train pathway generators and gates: gradients flow to ``scores``
    (and to ``x``). Values are not checked to be binary; names and shapes are.
    """
    fp = check_model_and_input(model, x)
    units = cached_units(model, x, fp)
    by_name = {u.name: u for u in units}
    for name, s in scores.items():
        u = by_name.get(name)
        if u is None:
            raise ValueError(f"{name!r} is not a unit of this model")
        if s.shape[-1] != u.channels or s.dim() not in (1, 2) or (s.dim() == 2 and s.shape[0] != x.shape[0]):
            raise ValueError(
                f"scores of unit {name!r} have shape {tuple(s.shape)}; expected [{x.shape[0]}, {u.channels}] or "
                f"[{u.channels}]"
            )
    return _run_with_unit_hook(model, units, x, lambda unit, y: _apply_scores(y, scores.get(unit.name)))
