"""RFE — Recursive Feature Embedders (GEN-CNP, our reconstruction; docs/design.md §4).

Per unit ``l`` a light embedding of the captured feature map ``F_l`` (``[B, C, H, W]`` or ``[B, C]``): global average
and global max pooling over space, concatenated (``[B, 2C]``), a linear map to ``d`` dims and a LayerNorm (the units'
activation scales differ by orders of magnitude). A GRU cell then runs over depth, shallow → deep:
``h_l = GRU(e_l, h_{l−1})``, ``h_0 = 0``, so every deep code carries shallow information.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch.nn.functional as F

import torch
import torch.nn as nn

from ..model.guards import tensors_key

__all__ = ["UnitEmbedding", "RecursiveFeatureEmbedder", "pool_feature", "run_gru_cell", "stacked_linears"]


def _compiled():
    try:
        from .. import _C

        return _C
    except ImportError:  # no compiled extension: the ATen paths below
        return None


_C = _compiled()
SMALL_BATCH = 16  # up to this batch the inference recurrences and poolings run in the compiled helpers


def stacked_linears(owner: nn.Module, linears: Callable[[], Sequence[nn.Linear]],
                    key=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W [L, in_max, out_max], b [L, 1, out_max])``: the ``L`` linear maps of different sizes as one zero-padded
    stack, for ``torch.baddbmm`` over units at inference (one call instead of L). Cached on ``owner`` and rebuilt
    when any parameter of ``owner`` changes (``key``: its :func:`~gencnp_fast.model.guards.tensors_key`, if the
    caller has it): ``linears`` is a callable that lists them, called only then."""
    key = tensors_key(owner) if key is None else key
    hit = getattr(owner, "_stacked_linears", None)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    linears = list(linears())
    n_in = max(lin.in_features for lin in linears)
    n_out = max(lin.out_features for lin in linears)
    ref = linears[0].weight
    w = ref.new_zeros(len(linears), n_in, n_out)
    b = ref.new_zeros(len(linears), 1, n_out)
    with torch.no_grad():
        for l, lin in enumerate(linears):
            w[l, : lin.in_features, : lin.out_features] = lin.weight.t()
            if lin.bias is not None:
                b[l, 0, : lin.out_features] = lin.bias
    object.__setattr__(owner, "_stacked_linears", (key, w, b))
    return w, b


def run_gru_cell(cell: nn.GRUCell, inputs: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The states ``h_t = cell(inputs[t], h_{t-1})`` for every t of ``inputs`` ``[T, B, in]``, stacked ``[T, B, d]``:
    the GRU cell's recurrence in one call of torch's sequence GRU (the kernel behind ``nn.GRU``) with the cell's
    own parameters, instead of T calls of a dozen small ops each (the cost of a batch-1 explanation)."""
    params = [cell.weight_ih, cell.weight_hh] + ([cell.bias_ih, cell.bias_hh] if cell.bias else [])
    if (_C is not None and not torch.is_grad_enabled() and inputs.shape[1] <= SMALL_BATCH
            and inputs.device.type == "cpu" and inputs.dtype == torch.float32 and h0.dtype == torch.float32):
        # inference at small batch: the whole recurrence in one compiled call (torch's GRU issues ~15 ATen calls
        # per step, the batch-1 cost of an explanation)
        return _C.gru_sequence(inputs, h0, *params)
    out, _ = torch._VF.gru(inputs, h0.unsqueeze(0), params, cell.bias, 1, 0.0, cell.training, False, False)
    return out


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
        if torch.is_grad_enabled():
            e = torch.stack([emb(f) for emb, f in zip(self.embed, features)], 0)
        else:  # inference: every unit's projection in one batched product, one LayerNorm
            e = self._embed_stacked(features)
        h = run_gru_cell(self.cell, e, e.new_zeros(e.shape[1], self.d))
        return list(e.unbind(0)), list(h.unbind(0))

    def _embed_stacked(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[L, B, d]``: the embeddings of :meth:`forward` without autograd, the L linear maps as one baddbmm.
        Each unit's pooling writes straight into its rows of one zero-padded buffer (the batch-1 cost is the count
        of small ops)."""
        key = tensors_key(self)  # one walk for both cached stacks
        w, b = stacked_linears(self, lambda: [emb.proj for emb in self.embed], key)
        gamma, beta = self._norm_affine(key)
        pooled = features[0].new_zeros(len(features), features[0].shape[0], w.shape[1])
        if (_C is not None and pooled.shape[1] <= SMALL_BATCH
                and all(f.device.type == "cpu" and f.dtype == torch.float32 for f in features)):
            _C.pool_units(list(features), pooled)  # one call instead of two per unit
        else:
            for l, f in enumerate(features):
                c = f.shape[1]
                if f.dim() == 2:
                    pooled[l, :, :c] = f
                    pooled[l, :, c:2 * c] = f
                else:
                    flat = f.flatten(2)
                    torch.mean(flat, 2, out=pooled[l, :, :c])
                    torch.amax(flat, 2, out=pooled[l, :, c:2 * c])
        e = F.layer_norm(torch.baddbmm(b, pooled, w), (self.d,), eps=self.embed[0].norm.eps)
        return torch.addcmul(beta, e, gamma)

    def _norm_affine(self, key) -> Tuple[torch.Tensor, torch.Tensor]:
        """The LayerNorms' weights and biases stacked ``[L, 1, d]``, cached like :func:`stacked_linears` (``key``:
        this module's :func:`~gencnp_fast.model.guards.tensors_key`)."""
        hit = getattr(self, "_stacked_norm", None)
        if hit is None or hit[0] != key:
            gamma = torch.stack([emb.norm.weight.detach() for emb in self.embed]).unsqueeze(1)
            beta = torch.stack([emb.norm.bias.detach() for emb in self.embed]).unsqueeze(1)
            hit = (key, gamma, beta)
            object.__setattr__(self, "_stacked_norm", hit)
        return hit[1], hit[2]
