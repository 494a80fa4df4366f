"""``GenCNP``: the pathway generator (docs/design.md §3–4) around a frozen target CNN.

``GenCNP(target, example_input)`` builds RFE → PDN → RPD → DAQ for the target's units. Calling it on a batch ``x``
runs the target once, densely, capturing every unit's feature map (:func:`~gencnp_fast.plan.dense_capture`: the compiled plan's dense
forward, BN folded), and returns a
:class:`GenCNPOutput` with the hard pathway (a :class:`Pathway` of bool ``[B, C]`` masks), the DAQ masks of the
chosen mode (soft masks in training), the raw scores, the class code and the class head's logits. The target's
parameters are frozen and are not part of the generator's parameters or state dict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..model.pathway import Pathway
from ..model.reference import cached_units
from ..plan import dense_capture
from ..model.units import Unit
from .daq import DistanceAwareQuantizer
from .pdn import PathwayDistillationNetwork
from .rfe import RecursiveFeatureEmbedder
from .rpd import RecursivePathwayDecoder

__all__ = ["GenCNP", "GenCNPOutput", "CHECKPOINT_FORMAT", "read_checkpoint", "check_generator_state"]

CHECKPOINT_FORMAT = "gencnp_fast.generator/1"


@dataclasses.dataclass
class GenCNPOutput:
    """What one generator call returns.

    Attributes:
        pathway: hard masks (``s ≥ 0.5``) as a :class:`Pathway`, bool ``[B, C]`` per unit.
        masks: DAQ output of the requested mode per unit (float ``[B, C]``; soft/straight-through in training).
        scores: raw decoder scores ``s_l ∈ (0, 1)`` per unit.
        code: the PDN class code ``c`` ``[B, code_dim]``.
        class_logits: the PDN head's logits ``[B, classes]``.
        target_logits: the target's dense logits ``z`` ``[B, classes]`` (captured in the same forward).
    """

    pathway: Pathway
    masks: Dict[str, torch.Tensor]
    scores: Dict[str, torch.Tensor]
    code: torch.Tensor
    class_logits: torch.Tensor
    target_logits: torch.Tensor


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class GenCNP(nn.Module):
    """GEN-CNP pathway generator for a frozen target model.

    Args:
        target_model: the CNN to explain (put in eval mode and frozen here).
        example_input: one batch (or one image ``[C, H, W]``) of the inputs the target takes; fixes the units.
        d: RFE/RPD hidden size.
        code_dim: size of the PDN class code.
        t0, sigma: DAQ's initial temperature and kernel width (1-bit setting: 2, 2).
        init_bias: initial bias of the decoder heads (positive: start from the dense pathway).
    """

    def __init__(self, target_model: nn.Module, example_input: torch.Tensor, d: int = 64, code_dim: int = 64,
                 t0: float = 2.0, sigma: float = 2.0, init_bias: float = 0.5):
        super().__init__()
        if not isinstance(target_model, nn.Module):
            raise TypeError(f"target_model must be a torch.nn.Module, got {type(target_model).__name__}")
        if example_input.dim() == 3:
            example_input = example_input.unsqueeze(0)
        _freeze(target_model)
        object.__setattr__(self, "target", target_model)  # not a submodule: not trained, not saved
        self.input_shape = tuple(int(s) for s in example_input.shape[1:])
        with torch.no_grad():
            try:
                logits = target_model(example_input[:1])
            except RuntimeError as exc:
                raise ValueError(
                    f"inputs of shape {self.input_shape} do not fit the target model: {exc}") from exc
        if logits.dim() != 2:
            raise ValueError(f"the target must output logits [B, classes], got shape {tuple(logits.shape)}")
        self.num_classes = int(logits.shape[1])
        self.units: List[Unit] = list(cached_units(target_model, example_input[:1]))
        if not self.units:
            raise ValueError("the target model has no units (no ReLU calls): nothing to explain")
        self.config = dict(d=d, code_dim=code_dim, t0=t0, sigma=sigma, init_bias=init_bias)
        channels = [u.channels for u in self.units]
        self.rfe = RecursiveFeatureEmbedder(channels, d)
        self.pdn = PathwayDistillationNetwork(d, code_dim, self.num_classes)
        self.rpd = RecursivePathwayDecoder(channels, d, code_dim, init_bias)
        self.daq = DistanceAwareQuantizer(t0=t0, sigma=sigma)
        # The preprocessing of the images it was trained on (gencnp_fast.data.Transform.to_dict(); None: unknown),
        # saved with it so that explain / evaluate read images the same way.
        self.transform: Optional[dict] = None

    # ------------------------------------------------------------------------------------------------------------
    @property
    def unit_names(self) -> List[str]:
        return [u.name for u in self.units]

    def signature(self) -> List[tuple]:
        """``[(unit name, channels)]``: what a checkpoint must match."""
        return [(u.name, u.channels) for u in self.units]

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"images of shape {tuple(x.shape[1:])} (batch {tuple(x.shape)}) do not fit the target model, "
                f"which takes {self.input_shape}")

    def forward(self, x: torch.Tensor, mode: Optional[str] = None) -> GenCNPOutput:
        """Dense target forward (features captured once, no gradient into the target) → generator → masks.

        ``mode``: DAQ mode of ``masks`` — ``"soft"``, ``"ste"`` or ``"hard"``; default ``"soft"`` in training mode
        and ``"hard"`` in eval mode. ``pathway`` is always the hard one.
        """
        self.check_input(x)
        with torch.no_grad():
            logits, feats = dense_capture(self.target, x)
        return self.from_features(feats, logits, mode)

    def from_features(self, features: Dict[str, torch.Tensor], target_logits: torch.Tensor,
                      mode: Optional[str] = None) -> GenCNPOutput:
        """The generator on already captured unit outputs (``{unit name: [B, C, ...]}``)."""
        if mode is None:
            mode = "soft" if self.training else "hard"
        names = self.unit_names
        missing = [n for n in names if n not in features]
        if missing:
            raise ValueError(f"features are missing units {missing[:4]}")
        feats = [features[n].detach() for n in names]
        if feats[0].dtype in (torch.float16, torch.bfloat16):  # a target at reduced --precision: float32 weights
            feats = [f.float() for f in feats]
            target_logits = target_logits.float()
        e, h = self.rfe(feats)
        code, class_logits = self.pdn(h)
        scores = self.rpd(code, e)
        bools = [s >= 0.5 for s in scores]  # the hard pathway (DAQ's nearest level)
        if mode == "hard":
            masks = {n: b.to(s.dtype) for n, b, s in zip(names, bools, scores)}
        else:
            masks = {n: self.daq(s, mode) for n, s in zip(names, scores)}
        hard = Pathway(dict(zip(names, bools)), {u.name: u.channels for u in self.units})
        return GenCNPOutput(hard, masks, dict(zip(names, scores)), code, class_logits, target_logits.detach())

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> Pathway:
        """The hard pathway of every sample of ``x`` (no gradient; the generator's mode is left unchanged)."""
        return self.forward(x, mode="hard").pathway

    # Persistence ------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dict(self.config),
            "units": [list(t) for t in self.signature()],
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "target_class": f"{type(self.target).__module__}.{type(self.target).__qualname__}",
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "transform": self.transform,
        }

    def save(self, path) -> None:
        """Save the generator (weights, config, and the target's unit signature; not the target), atomically: an
        existing file is replaced only by a complete new one."""
        from ..io import atomic_save

        atomic_save(self.checkpoint_state(), path)

    @classmethod
    def load(cls, path, target_model: nn.Module) -> "GenCNP":
        """Load a generator saved by :meth:`save` (or a training checkpoint) for ``target_model``.

        Raises ``ValueError`` for an unreadable/corrupt file, a file that is no GEN-CNP checkpoint, or a checkpoint
        made for another model (different units or channel counts).
        """
        state = read_checkpoint(path)
        shape = tuple(state["input_shape"])
        example = torch.zeros((1,) + shape)
        saved = [tuple(u) for u in state["units"]]
        try:
            units = cached_units(_freeze(target_model), example)
        except ValueError as exc:
            raise ValueError(f"{path} was trained for inputs of shape {shape}, which do not fit this model: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        ours = [(u.name, u.channels) for u in units]
        if ours != saved:
            diff = next(((a, b) for a, b in zip(saved, ours) if a != b), None)
            detail = (f"first difference: checkpoint {diff[0]} vs model {diff[1]}" if diff else
                      f"checkpoint has {len(saved)} units, the model {len(ours)}")
            raise ValueError(
                f"{path} is a generator for another model ({state.get('target_class', '?')}, {len(saved)} units); "
                f"{detail}")
        if not all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()):
            raise ValueError(f"{path}: the generator weights hold NaN or infinity")
        gen = cls(target_model, example, **state["config"])
        if gen.num_classes != state["num_classes"]:
            raise ValueError(f"{path} is for a model with {state['num_classes']} classes, this one has "
                             f"{gen.num_classes}")
        try:
            gen.load_state_dict(state["state_dict"])
        except RuntimeError as exc:
            raise ValueError(f"{path}: generator weights do not fit: {' '.join(str(exc).split())[:400]}") from None
        gen.transform = state.get("transform")
        gen.eval()
        return gen


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # also refuses NaN and infinity (abs(v) <= max is False)
_CONFIG_KEYS = {"d": int, "code_dim": int, "t0": (int, float), "sigma": (int, float), "init_bias": (int, float)}


def check_generator_state(state, path) -> dict:
    """The checks of a generator entry (:meth:`GenCNP.checkpoint_state`): every key present, with the right type;
    a ``ValueError`` naming ``path`` and the first problem otherwise."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a GEN-CNP generator checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    for key in ("config", "units", "input_shape", "num_classes", "state_dict"):
        if key not in state:
            raise ValueError(f"{path} is an incomplete generator checkpoint: {key!r} is missing")
    cfg = state["config"]
    if not isinstance(cfg, dict) or set(cfg) != set(_CONFIG_KEYS) or not all(
            isinstance(cfg[k], t) and not isinstance(cfg[k], bool) for k, t in _CONFIG_KEYS.items()) \
            or not 1 <= cfg["d"] <= 1 << 16 or not 1 <= cfg["code_dim"] <= 1 << 16 \
            or not all(abs(cfg[k]) <= _FLOAT32_MAX for k in ("t0", "sigma", "init_bias")):
        raise ValueError(f"{path}: the generator config must hold {sorted(_CONFIG_KEYS)} (sizes 1..65536, finite "
                         f"float32 values), got {cfg!r:.200}")
    units = state["units"]
    if not isinstance(units, (list, tuple)) or not units or not all(
            isinstance(u, (list, tuple)) and len(u) == 2 and isinstance(u[0], str) and isinstance(u[1], int)
            for u in units):
        raise ValueError(f"{path}: 'units' must be a non-empty list of [unit name, channels]")
    shape = state["input_shape"]
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4 or not all(
            isinstance(v, int) and 0 < v <= 1 << 16 for v in shape) or math.prod(shape) > 1 << 26:
        raise ValueError(f"{path}: 'input_shape' must be a list of positive sizes of one image, got {shape!r:.100}")
    if not isinstance(state["num_classes"], int) or state["num_classes"] < 1:
        raise ValueError(f"{path}: 'num_classes' must be a positive integer, got {state['num_classes']!r:.50}")
    if state.get("transform") is not None:
        from ..data import Transform

        Transform.from_dict(state["transform"], source=f"{path}: 'transform'")
    sd = state["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: 'state_dict' must map parameter names to tensors")
    return state


def read_checkpoint(path) -> dict:
    """Read a generator file (or the ``"generator"`` entry of a training checkpoint) with clear errors; loaded with
    ``weights_only=True`` (nothing in the file can run code)."""
    from ..io import safe_load

    state = safe_load(path, "generator checkpoint")
    if isinstance(state, dict) and "generator" in state and isinstance(state["generator"], dict):
        state = state["generator"]
    return check_generator_state(state, path)
