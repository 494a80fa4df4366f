"""Pathways: per-unit binary channel masks (docs/design.md §2), and the checks every backend applies to them."""

from __future__ import annotations

import math
from typing import Dict, Iterator, Mapping, Optional, Sequence, Union

import torch

from .units import Unit

__all__ = ["Pathway", "MaskLike", "normalize_masks"]


def _as_bool_mask(name: str, m: torch.Tensor) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"mask of unit {name!r} must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype == torch.bool:
        return m
    if not (m.is_floating_point() or m.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"mask of unit {name!r} has dtype {m.dtype}; use bool or a float tensor of 0s and 1s")
    bad = (m != 0) & (m != 1)
    if bool(bad.any()):
        v = m[bad].flatten()[0].item()
        raise ValueError(f"mask of unit {name!r} has a value {v!r}; masks hold only 0 and 1")
    return m != 0


class Pathway(Mapping[str, torch.Tensor]):
    """A typed container of per-unit boolean masks.

    Each mask is ``[B, C]`` (one row per sample) or ``[C]`` (shared by every sample of a batch, e.g. a transferred
    class pathway). A unit that is not in the pathway is kept whole. A ``Pathway`` is a read-only mapping
    ``unit name -> bool tensor`` and can be passed wherever a mask mapping is accepted.

    Args:
        masks: mapping of unit name to a bool or 0/1 float tensor.
        channels: optional mapping of unit name to channel count (kept for density over units the
            pathway omits; filled from ``masks`` otherwise).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], channels: Optional[Mapping[str, int]] = None):
        self._masks: Dict[str, torch.Tensor] = {}
        batch = None
        for name, m in masks.items():
            b = _as_bool_mask(name, m)
            if b.dim() not in (1, 2):
                raise ValueError(f"mask of unit {name!r} has shape {tuple(b.shape)}; expected [B, C] or [C]")
            if b.dim() == 2:
                if batch is not None and b.shape[0] != batch:
                    raise ValueError(
                        f"mask of unit {name!r} has batch size {b.shape[0]}, another unit has {batch}"
                    )
                batch = b.shape[0]
            self._masks[name] = b
        self._channels = {n: int(m.shape[-1]) for n, m in self._masks.items()}
        if channels:
            for n, c in channels.items():
                if n in self._channels and self._channels[n] != c:
                    raise ValueError(f"mask of unit {n!r} has {self._channels[n]} channels, the unit has {c}")
                self._channels.setdefault(n, int(c))

    # Mapping interface -----------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        kind = "shared" if self.batch_size is None else f"batch {self.batch_size}"
        return f"Pathway({len(self)} units, {kind}, density {self.density():.3f})"

    # Properties ------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> Optional[int]:
        """Number of samples, or ``None`` when every mask is shared (``[C]``)."""
        for m in self._masks.values():
            if m.dim() == 2:
                return int(m.shape[0])
        return None

    @property
    def device(self) -> torch.device:
        for m in self._masks.values():
            return m.device
        return torch.device("cpu")

    def to(self, device) -> "Pathway":
        return Pathway({n: m.to(device) for n, m in self._masks.items()}, self._channels)

    def expand(self, batch_size: int) -> "Pathway":
        """Every mask as ``[batch_size, C]`` (shared masks repeated)."""
        out = {}
        for n, m in self._masks.items():
            if m.dim() == 1:
                out[n] = m.unsqueeze(0).expand(batch_size, -1).contiguous()
            elif m.shape[0] != batch_size:
                raise ValueError(f"mask of unit {n!r} has batch size {m.shape[0]}, not {batch_size}")
            else:
                out[n] = m
        return Pathway(out, self._channels)

    def sample(self, i: Union[int, slice, torch.Tensor]) -> "Pathway":
        """The pathway of sample ``i`` (shared masks ``[C]``), or of a slice / index tensor of samples."""
        out = {}
        for n, m in self._masks.items():
            out[n] = m if m.dim() == 1 else m[i]
        return Pathway(out, self._channels)

    # Density ---------------------------------------------------------------------------------------------------
    def density_per_unit(self) -> Dict[str, float]:
        """Kept fraction of channels per unit (mean over samples)."""
        return {n: float(m.float().mean()) for n, m in self._masks.items()}

    def density_per_sample(self) -> torch.Tensor:
        """Kept fraction of all channels of all units in the pathway, per sample (``[B]``, or ``[1]`` if shared)."""
        if not self._masks:
            return torch.ones(1)
        total = sum(self._channels[n] for n in self._masks)
        b = self.batch_size or 1
        kept = torch.zeros(b)
        for m in self._masks.values():
            s = m.sum(-1).float().cpu()
            kept = kept + (s if m.dim() == 2 else s.expand(b))
        return kept / total

    def density(self) -> float:
        """Kept fraction of all channels of all units, averaged over samples."""
        return float(self.density_per_sample().mean())

    # Persistence -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": {n: m.cpu() for n, m in self._masks.items()}, "channels": dict(self._channels)}

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "Pathway":
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise ValueError(f"could not read a pathway from {path}: {exc}") from exc
        if not isinstance(state, dict) or "masks" not in state:
            raise ValueError(f"{path} does not hold a saved Pathway")
        return cls(state["masks"], state.get("channels"))

    # Construction ----------------------------------------------------------------------------------------------
    @classmethod
    def full(cls, units: Sequence[Unit], batch_size: Optional[int] = None, device=None) -> "Pathway":
        """Every channel of every unit kept."""
        shape = (lambda c: (c,)) if batch_size is None else (lambda c: (batch_size, c))
        return cls({u.name: torch.ones(shape(u.channels), dtype=torch.bool, device=device) for u in units})

    @classmethod
    def random(
        cls,
        units: Sequence[Unit],
        density: Union[float, Mapping[str, float]],
        batch_size: Optional[int] = None,
        *,
        groups: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        device=None,
    ) -> "Pathway":
        """A random pathway keeping ``round(density * C)`` channels of every unit, chosen uniformly.

        Args:
            units: the units (from :func:`pathway_units`).
            density: kept fraction, one for all units or a mapping unit name -> fraction.
            batch_size: ``None`` for one shared mask ``[C]``; else one mask per sample ``[B, C]``.
            groups: optional ``[B]`` integer labels: samples with the same label share one random mask
                (per-class pathways). Needs ``batch_size``.
            generator: torch random generator for reproducibility.
        """
        if groups is not None:
            if batch_size is None:
                raise ValueError("groups needs batch_size")
            groups = torch.as_tensor(groups)
            if groups.shape != (batch_size,):
                raise ValueError(f"groups has shape {tuple(groups.shape)}, expected ({batch_size},)")
            uniq, inv = torch.unique(groups, return_inverse=True)
            per_group = cls.random(units, density, len(uniq), generator=generator, device=device)
            return Pathway({n: m[inv.to(m.device)] for n, m in per_group.items()})
        masks = {}
        for u in units:
            d = density[u.name] if isinstance(density, Mapping) else density
            if not 0.0 <= float(d) <= 1.0:
                raise ValueError(f"density must lie in [0, 1], got {d} for unit {u.name!r}")
            k = int(math.floor(float(d) * u.channels + 0.5))
            rows = 1 if batch_size is None else batch_size
            scores = torch.rand(rows, u.channels, generator=generator)
            keep = torch.zeros(rows, u.channels, dtype=torch.bool)
            if k > 0:
                keep.scatter_(1, scores.topk(k, dim=1).indices, True)
            masks[u.name] = (keep[0] if batch_size is None else keep).to(device)
        return cls(masks)


MaskLike = Union[Pathway, Mapping[str, torch.Tensor]]


def normalize_masks(
    units: Sequence[Unit], mask: Optional[MaskLike], x: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Check ``mask`` against the model's units and the input batch; return unit name -> bool mask.

    Raises a ``ValueError``/``TypeError`` that names the problem: a name that is no unit, a wrong shape, dtype,
    device or value.
    """
    if mask is None:
        return {}
    if not isinstance(mask, Mapping):
        raise TypeError(f"mask must be a Pathway or a mapping of unit name -> tensor, got {type(mask).__name__}")
    by_name = {u.name: u for u in units}
    batch = x.shape[0]
    out: Dict[str, torch.Tensor] = {}
    for name, m in mask.items():
        unit = by_name.get(name)
        if unit is None:
            hint = ", ".join(list(by_name)[:6]) + (", ..." if len(by_name) > 6 else "")
            raise ValueError(f"{name!r} is not a unit of this model; its units are: {hint}")
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask of unit {name!r} must be a torch.Tensor, got {type(m).__name__}")
        if m.device != x.device:
            raise ValueError(f"mask of unit {name!r} is on {m.device}, the input is on {x.device}")
        ok_shape = (m.dim() == 1 and m.shape[0] == unit.channels) or (
            m.dim() == 2 and m.shape[0] == batch and m.shape[1] == unit.channels
        )
        if not ok_shape:
            raise ValueError(
                f"mask of unit {name!r} has shape {tuple(m.shape)}; expected [{batch}, {unit.channels}] "
                f"(per sample) or [{unit.channels}] (shared)"
            )
        out[name] = _as_bool_mask(name, m)
    return out
