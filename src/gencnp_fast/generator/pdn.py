"""PDN — Pathway Distillation Network (GEN-CNP, our reconstruction; docs/design.md §4).

Maps the recurrent states ``{h_l}`` of the RFE to a class-relevant code ``c`` (``[B, code_dim]``): an MLP on the
deepest state concatenated with the mean state over units. Two losses make ``c`` carry the target's class knowledge:

* **distillation**: a linear head on ``c`` is trained to match the target's logits, ``KL(softmax(z/τ) ‖
  softmax(head(c)/τ)) · τ²`` (:func:`distill_kl`);
* **class term**: a supervised-contrastive loss (Khosla et al. 2020) on the normalised codes with the target's own
  predictions ``ŷ`` as labels, pulling same-class codes together and pushing other classes apart
  (:func:`supervised_contrastive`). The trainer applies the same loss to the soft masks too.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PathwayDistillationNetwork", "distill_kl", "supervised_contrastive"]


class PathwayDistillationNetwork(nn.Module):
    """``c = MLP([h_L, mean_l h_l])`` and a class head ``head(c)`` (logits over the target's classes)."""

    def __init__(self, d: int, code_dim: int, num_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * d, code_dim), nn.ReLU(), nn.Linear(code_dim, code_dim))
        self.head = nn.Linear(code_dim, num_classes)

    def forward(self, h: Sequence[torch.Tensor]):
        """Returns ``(c, head_logits)``."""
        hs = torch.stack(list(h), 0)
        c = self.mlp(torch.cat([hs[-1], hs.mean(0)], 1))
        return c, self.head(c)


def distill_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``KL(softmax(teacher/τ) ‖ softmax(student/τ)) · τ²``, mean over the batch."""
    t = F.log_softmax(teacher_logits.detach() / tau, 1)
    s = F.log_softmax(student_logits / tau, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * tau * tau


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised-contrastive loss of the rows of ``z`` (L2-normalised here) with ``labels``; 0 without positives."""
    z = F.normalize(z.flatten(1), dim=1)
    n = z.shape[0]
    sim = z @ z.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, 1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    npos = pos.sum(1)
    has = npos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[has] / npos[has]
    return -mean_log_prob_pos.mean()
