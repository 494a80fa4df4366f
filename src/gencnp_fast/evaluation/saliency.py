"""Input-space views of a pathway: Grad-CAM of the full and of the pathway model, and PathwayGrad.

- **Grad-CAM** (Selvaraju et al. 2017) at a unit (default: the last unit with a spatial map): weights = spatial mean
  of the gradient of the target logit w.r.t. the unit's output, map = ReLU(sum_c w_c · A_c), bilinearly upsampled to
  the input size and scaled to [0, 1] per image. With a ``mask``, the model is the pathway model ``H(x; m)``
  (the dense masked reference, which has autograd), so the map shows where the *pathway* looks.
- **PathwayGrad**: the gradient of the target logit of ``H(x; m)`` w.r.t. the input — the saliency of the masked
  model (vanilla gradient when no mask is given). Shape of the input.

The target class defaults to the *full* model's prediction ŷ in both cases, so the full and the pathway maps explain
the same decision.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import capture_units, pathway_units, soft_pathway_forward

__all__ = ["default_cam_unit", "grad_cam", "pathway_grad"]


def default_cam_unit(model: nn.Module, x: torch.Tensor) -> str:
    """The last unit whose output has a spatial map (``[C, H, W]``)."""
    spatial = [u.name for u in pathway_units(model, x[:1]) if len(u.shape) == 3]
    if not spatial:
        raise ValueError("the model has no unit with a spatial feature map; Grad-CAM needs one")
    return spatial[-1]


def _targets(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    t = torch.as_tensor(target).long().reshape(-1)
    return t.expand(x.shape[0]) if t.numel() == 1 else t


def _float_mask(mask: Optional[Mapping[str, torch.Tensor]], x: torch.Tensor):
    if mask is None:
        return {}
    return {n: m.to(device=x.device, dtype=x.dtype) for n, m in mask.items()}


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    target=None,
    mask: Optional[Mapping[str, torch.Tensor]] = None,
    unit: Optional[str] = None,
) -> torch.Tensor:
    """Grad-CAM ``[N, H, W]`` in [0, 1] of the full model, or of the pathway model when ``mask`` is given."""
    model.eval()
    unit = default_cam_unit(model, x) if unit is None else unit
    t = _targets(model, x, target)
    with torch.enable_grad():
        # the input requires grad so the unit outputs are in the graph even when the target is frozen
        logits, feats = capture_units(model, x.detach().requires_grad_(True), mask)
        if unit not in feats:
            raise ValueError(f"{unit!r} is not a unit of this model")
        a = feats[unit]
        (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    w = g.mean((2, 3), keepdim=True)
    cam = F.relu((w * a.detach()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    mx = cam.flatten(1).amax(1).clamp(min=1e-12)
    return (cam / mx[:, None, None]).detach()


def pathway_grad(
    model: nn.Module,
    x: torch.Tensor,
    mask: Optional[Mapping[str, torch.Tensor]] = None,
    target=None,
) -> torch.Tensor:
    """PathwayGrad: ``d H(x; m)_t / d x`` (shape of ``x``); ``t`` defaults to the full model's prediction."""
    model.eval()
    t = _targets(model, x, target)
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = soft_pathway_forward(model, _float_mask(mask, x), xg)
        (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xg)
    return g.detach()
