"""The plan cache: a model's compiled plans, per input shape, dtype, device and set of masked units.

A plan holds the model's folded weights, so it is valid only while the model is the one it was compiled from:
every lookup compares the model's :class:`~gencnp_fast.model.guards.Fingerprint` (module tree; identity, version
and storage of every parameter and buffer) and recompiles on any change; a model with forward hooks is refused
(the plan cannot run them). What the guards cannot see needs ``gencnp_fast.invalidate(model)``
(:mod:`gencnp_fast.model.guards`).
"""

from __future__ import annotations

import weakref
from typing import Dict, FrozenSet, Optional, Tuple

import torch
import torch.nn as nn

from ..model.guards import Fingerprint, fingerprint, hooked_modules, register_cache
from ..model.units import UnsupportedModelError
from .lowering import compile_plan
from .steps import ConvStep, Plan

__all__ = ["get_plan", "refuse_hooks"]

_PLANS: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Tuple[tuple, Plan]]]" = register_cache(
    weakref.WeakKeyDictionary())


def refuse_hooks(model: nn.Module, fp: Fingerprint) -> None:
    """The error for a model with forward hooks, which a compiled plan would silently skip."""
    if fp.hooked:
        where = ", ".join(f"{kind} on {name!r}" for name, kind in hooked_modules(model))
        raise UnsupportedModelError(
            f"the model has forward hooks ({where}); the fast path runs a compiled plan that cannot call them: "
            "remove them, or use backend='reference' (the model itself, hooks included)")


def get_plan(model: nn.Module, x: torch.Tensor, masked: FrozenSet[str], fp: Optional[Fingerprint] = None) -> Plan:
    """The compiled plan for ``model`` on inputs shaped like ``x`` and masks naming ``masked`` (cached; recompiled
    when the model changes; ``fp``: the model's fingerprint if the caller has it). The folded weights are cast to
    ``x``'s dtype."""
    fp = fingerprint(model) if fp is None else fp
    refuse_hooks(model, fp)
    key = (tuple(x.shape[1:]), x.dtype, x.device, masked)
    per_model = _PLANS.setdefault(model, {})
    fp = (fp.structure, fp.tensors)
    hit = per_model.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1]
    if hit is not None:  # the model changed: every cached plan of it is stale
        per_model.clear()
    plan = compile_plan(model, x, masked)
    if x.dtype != torch.float32:
        for st in plan.steps:
            if isinstance(st, ConvStep):
                st.weight = st.weight.to(x.dtype)
                st.bias = st.bias.to(x.dtype) if st.bias is not None else None
    per_model[key] = (fp, plan)
    return plan
