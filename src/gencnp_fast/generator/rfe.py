"""RFE — Recursive Feature Embedders (GEN-CNP, our reconstruction; docs/design.md §4).

Per unit ``l`` a light embedding of the captured feature map ``F_l`` (``[B, C, H, W]`` or ``[B, C]``): global average
and global max pooling over space, concatenated (``[B, 2C]``), a linear map to ``d`` dims and a LayerNorm (the units'
activation scales differ by orders of magnitude). A GRU cell then runs over depth, shallow → deep:
``h_l = GRU(e_l, h_{l−1})``, ``h_0 = 0``, so every deep code carries shallow information.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["UnitEmbedding", "RecursiveFeatureEmbedder", "pool_feature"]


def pool_feature(f: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...]`` → ``[B, 2C]``: global average and global max over the spatial dims (a vector is repeated)."""
    if f.dim() == 2:
        return torch.cat([f, f], 1)
    flat = f.flatten(2)
    return torch.cat([flat.mean(2), flat.amax(2)], 1)


class UnitEmbedding(nn.Module):
    """``e_l = LayerNorm(W · [GAP(F_l), GMP(F_l)])``, ``d`` dims."""

    def __init__(self, channels: int, d: int):
        super().__init__()
        self.proj = nn.Linear(2 * channels, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pool_feature(f)))


class RecursiveFeatureEmbedder(nn.Module):
    """Embeds every unit's feature map and runs a GRU cell over the units shallow → deep.

    Args:
        channels: channel count of each unit, in execution order.
        d: embedding / hidden size.

    ``forward(features)`` takes the feature maps in unit order and returns ``(e, h)``: two lists of ``[B, d]``
    tensors, the per-unit embeddings and the recurrent states.
    """

    def __init__(self, channels: Sequence[int], d: int = 64):
        super().__init__()
        self.embed = nn.ModuleList(UnitEmbedding(c, d) for c in channels)
        self.cell = nn.GRUCell(d, d)
        self.d = d

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if len(features) != len(self.embed):
            raise ValueError(f"expected {len(self.embed)} feature maps, got {len(features)}")
        e = [emb(f) for emb, f in zip(self.embed, features)]
        h_prev = e[0].new_zeros(e[0].shape[0], self.d)
        h = []
        for e_l in e:
            h_prev = self.cell(e_l, h_prev)
            h.append(h_prev)
        return e, h
