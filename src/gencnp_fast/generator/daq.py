"""DAQ — Distance-Aware Quantization (Kim, Lee, Ham, ICCV 2021) in its 1-bit setting: scores in (0, 1) → {0, 1}.

Our reconstruction for pathway masks (the GEN-CNP paper uses DAQ to binarise its scores; its exact form is not
available to us). The quantisation levels are ``q ∈ {0, 1}``.

* **Distance-aware soft rounding (DASR).** A soft argmax over the levels with logits ``−β·d_i`` where
  ``d_i = |s − q_i|`` is the distance of the score to level ``i``; the soft mask is ``Σ_i q_i · w_i``. A Gaussian
  kernel of width ``σ`` centred on the nearest level multiplies the weights (the *kernel* soft argmax of DAQ that
  suppresses far levels; with two levels in [0, 1] and σ = 2 it barely matters, it is kept for fidelity to DAQ).
* **Adaptive temperature.** With a fixed β a score near 0.5 is rounded much more softly than one near 0 or 1, so the
  soft output drifts from the hard one. As in DAQ's temperature controller, β is set per value from its distances,
  ``β = T / |d_0 − d_1|`` (no gradient through β), so every score lands at the same logit gap ``T`` from the decision
  boundary (up to the Gaussian kernel's small term ``g²/(2σ²)`` and the gap's floor of 0.1 near ``s = 0.5``: the
  logit gap is ``T·g/max(g, 0.1) + g²/(2σ²)`` with ``g = |d_0 − d_1|``), so the soft mask is close to
  ``q* ± (1 − sigmoid(T))`` whatever the score, and the gradient w.r.t. the score is largest near the boundary. ``T`` (initial value ``T0 = 2``) is a learned parameter (kept ≥ ``t_min``).
* **Hard rounding** at inference: ``1[s ≥ 0.5]``. ``mode="ste"`` returns the hard mask in the forward pass with
  the soft mask's gradient (straight-through), so training sees exactly the masks inference will use.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DistanceAwareQuantizer", "MODES"]

MODES = ("soft", "hard", "ste")


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard mask exactly; backward: the gradient goes to the soft mask."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


class DistanceAwareQuantizer(nn.Module):
    """1-bit DAQ: ``forward(s, mode)`` maps scores ``s ∈ [0, 1]`` (any shape) to masks of the same shape.

    Args:
        t0: initial temperature ``T`` (logit gap of every soft value to the boundary). DAQ's 1-bit setting: 2.
        sigma: width of the Gaussian kernel of the kernel soft argmax. DAQ's 1-bit setting: 2.
        learn_temperature: make ``T`` a trained parameter (else a fixed buffer).
        t_min: lower bound of ``T`` (keeps the soft masks from collapsing to 0.5).
        min_gap: lower bound of ``|d_0 − d_1|`` in the adaptive β (bounds the gradient of scores at 0.5).
    """

    def __init__(self, t0: float = 2.0, sigma: float = 2.0, learn_temperature: bool = True, t_min: float = 0.5,
                 min_gap: float = 0.1):
        super().__init__()
        if t0 <= 0 or sigma <= 0:
            raise ValueError(f"t0 and sigma must be positive, got t0={t0}, sigma={sigma}")
        self.sigma = float(sigma)
        self.t_min = float(t_min)
        self.min_gap = float(min_gap)
        raw = torch.tensor(math.log(math.expm1(max(t0 - t_min, 1e-3))))  # softplus^-1(t0 - t_min)
        if learn_temperature:
            self.raw_temperature = nn.Parameter(raw)
        else:
            self.register_buffer("raw_temperature", raw)
        self.register_buffer("levels", torch.tensor([0.0, 1.0]))

    @property
    def temperature(self) -> torch.Tensor:
        return self.t_min + F.softplus(self.raw_temperature)

    def soft(self, s: torch.Tensor) -> torch.Tensor:
        """Distance-aware soft rounding of ``s`` to {0, 1} with the adaptive temperature (differentiable)."""
        d = (s.unsqueeze(-1) - self.levels).abs()  # [..., 2] distances to the levels
        gap = (d[..., 0] - d[..., 1]).abs().detach().clamp(min=self.min_gap)
        beta = (self.temperature / gap).unsqueeze(-1)
        d_min = d.min(-1, keepdim=True).values
        kernel = -((d - d_min) ** 2) / (2 * self.sigma**2)  # log of the Gaussian kernel around the nearest level
        w = torch.softmax(-beta * d + kernel, dim=-1)
        return (w * self.levels).sum(-1)

    @staticmethod
    def hard(s: torch.Tensor) -> torch.Tensor:
        """Nearest level: ``1[s ≥ 0.5]`` as float."""
        return (s >= 0.5).to(s.dtype)

    def forward(self, s: torch.Tensor, mode: str = "soft") -> torch.Tensor:
        if mode == "hard":
            return self.hard(s)
        soft = self.soft(s)
        if mode == "soft":
            return soft
        if mode == "ste":
            return _StraightThrough.apply(self.hard(s).detach(), soft)
        raise ValueError(f"DAQ mode must be one of {MODES}, got {mode!r}")

    def extra_repr(self) -> str:
        return f"T={float(self.temperature):.3f}, sigma={self.sigma}, levels=(0, 1)"
