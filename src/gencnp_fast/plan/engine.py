"""The engine's entry points: :func:`fast_pathway_forward` and :func:`dense_capture` (docs/design.md §3).

model -> plan (:mod:`.lowering`, cached by :mod:`.cache`) -> the run's index planning (:mod:`.indices`) -> the
interpreter (:mod:`.interpreter`) with a kernel backend (:mod:`.backends`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..model.pathway import MaskLike, normalize_masks
from ..model.reference import cached_units, capture_units, check_model_and_input, reference_pathway_forward
from ..model.units import UnsupportedModelError
from .backends import conv_backend, extension_error, pick_backend
from .cache import get_plan
from .indices import masks_to_host, plan_run
from .interpreter import run_plan

__all__ = ["fast_pathway_forward", "dense_capture"]


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
        backend: ``"auto"``, ``"cpu"``, ``"torch"``, ``"reference"`` (and ``"cuda"``, ``"triton"`` on a GPU); see
            :mod:`gencnp_fast.plan.backends`.
    """
    fp = check_model_and_input(model, x)  # one walk: mode, device, the guards of the caches, forward hooks
    backend = pick_backend(backend, x)
    if backend == "reference":
        with torch.no_grad():
            return reference_pathway_forward(model, mask, x)
    masks = normalize_masks(cached_units(model, x, fp), mask, x)
    plan = get_plan(model, x, frozenset(masks), fp)  # compiled (and cached) first: unsupported layers named here
    host_masks = masks_to_host(masks)  # on a GPU: one copy, one synchronisation; every decision reads this copy
    with torch.no_grad():
        if all(bool(m.all()) for m in host_masks.values()):
            # A pathway that keeps every channel is the dense model: nothing to skip, so run the model as it is.
            return model(x)
        indices = plan_run(plan, host_masks, x.shape[0], x.device)
        return run_plan(plan, indices, x.contiguous(), conv_backend(backend))


def dense_capture(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(logits, {unit name: unit output})`` of the dense model, through the compiled plan (BN folded, fast
    pooling; no autograd). The same values as :func:`~gencnp_fast.model.capture_units` without a mask (float32:
    relative error ~1e-6), cheaper than the hooked forward; the hooked forward runs where the plan cannot (a dtype
    other than float32, an unsupported model, forward hooks on the model, no compiled extension)."""
    fp = check_model_and_input(model, x)
    units = cached_units(model, x, fp)
    try:
        if x.dtype != torch.float32 or extension_error():
            raise UnsupportedModelError("dense_capture runs float32 plans with the compiled planner")
        plan = get_plan(model, x, frozenset(), fp)
    except UnsupportedModelError:
        with torch.no_grad():
            return capture_units(model, x)
    env: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        indices = plan_run(plan, {}, x.shape[0], x.device)
        # on the CPU the compiled op runs the layers whose work is tiny (interpreter.DENSE_OP_MAX_MACS), torch the rest
        conv = conv_backend("cpu") if x.device.type == "cpu" else None
        logits = run_plan(plan, indices, x.contiguous(), conv, env_out=env)
    return logits, {u.name: env[plan.unit_slots[u.name]] for u in units}
