"""RPD — Recursive Pathway Decoders (GEN-CNP, our reconstruction; docs/design.md §4).

A GRU cell runs over the units deep → shallow: ``g_{L+1} = tanh(W c)``, ``g_l = GRU([c, e_l], g_{l+1})``, so each
unit's decision sees the class code, its own feature embedding (instance-specific sparsity) and the decisions made
for the deeper units. A per-unit linear head gives channel scores ``s_l = sigmoid(head_l(g_l)) ∈ (0, 1)^{C_l}``.
The heads' biases start at ``init_bias`` (GenCNP's default +0.5: every channel kept, s ≈ 0.62, close enough to the
threshold that a few hundred Adam steps can prune), so training starts from the faithful dense pathway and the
density penalty prunes from there.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from .rfe import run_gru_cell, stacked_linears

__all__ = ["RecursivePathwayDecoder"]


class RecursivePathwayDecoder(nn.Module):
    """``forward(c, e)`` → list of scores ``[B, C_l]`` in unit order (shallow → deep)."""

    def __init__(self, channels: Sequence[int], d: int, code_dim: int, init_bias: float = 0.5):
        super().__init__()
        self.init = nn.Linear(code_dim, d)
        self.cell = nn.GRUCell(code_dim + d, d)
        self.heads = nn.ModuleList(nn.Linear(d, c) for c in channels)
        for head in self.heads:
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.constant_(head.bias, init_bias)

    def forward(self, c: torch.Tensor, e: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(e) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} unit embeddings, got {len(e)}")
        g0 = torch.tanh(self.init(c))
        # deep -> shallow: the recurrence runs over the units in reverse order, in one call
        inputs = torch.stack([torch.cat([c, e[l]], 1) for l in range(len(e) - 1, -1, -1)], 0)
        g = run_gru_cell(self.cell, inputs, g0).flip(0)  # back to unit order
        if torch.is_grad_enabled():
            return [torch.sigmoid(head(g[l])) for l, head in enumerate(self.heads)]
        w, b = stacked_linears(self, lambda: list(self.heads))  # inference: every head in one batched product
        s = torch.sigmoid(torch.baddbmm(b, g, w))
        return [s[l, :, : head.out_features] for l, head in enumerate(self.heads)]
