"""PathwayGrad for Quantus and Captum.

- :func:`explain_func` has Quantus's signature ``explain_func(model, inputs, targets, **kwargs) -> np.ndarray``
  (inputs ``[N, C, H, W]``, numpy or torch; the result has the inputs' shape), so it can be passed as
  ``explain_func=`` to any Quantus metric (``quantus.FaithfulnessCorrelation``, ``quantus.MaxSensitivity``, ...).
- :class:`PathwayAttribution` is Captum-style: ``PathwayAttribution(model).attribute(inputs, target=...)`` returns a
  tensor shaped like ``inputs``; ``attribute`` can be passed to ``captum.metrics.sensitivity_max`` and its output to
  ``captum.metrics.infidelity``. Its inputs must have the model's dtype (a one-line ``ValueError`` names the
  expected one); :func:`explain_func` converts Quantus's arrays to it.

Which pathway explains a batch (the same keyword arguments for both):

- ``pathway``: a fixed mapping ``unit -> bool [N, C]`` / ``[C]`` (only for exactly those ``N`` inputs, or shared);
- ``pathway_fn``: a callable ``(model, x) -> {unit: [N, C]}`` called on every batch — e.g. a GEN-CNP explainer.
  Metrics that perturb the inputs (sensitivity, robustness) call the explanation on new inputs, so this is the
  right choice for them;
- neither: the NeuronMCT pathway at ``density`` (default 0.3), computed on the batch.

``absolute=True`` returns ``|gradient|``; ``reduce_channels=True`` sums over the channel axis and keeps it as size 1
(Quantus accepts ``[N, 1, H, W]`` attributions).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from .baselines import neuron_mct_pathways
from ..model.units import eval_mode
from .saliency import pathway_grad

__all__ = ["explain_func", "PathwayAttribution", "resolve_pathway"]

PathwayFn = Callable[[nn.Module, torch.Tensor], Mapping[str, torch.Tensor]]


def resolve_pathway(
    model: nn.Module, x: torch.Tensor, pathway: Optional[Mapping[str, torch.Tensor]] = None,
    pathway_fn: Optional[PathwayFn] = None, density: float = 0.3,
) -> Mapping[str, torch.Tensor]:
    """The pathway that explains ``x`` (see the module docstring for the order of precedence)."""
    if pathway is not None and pathway_fn is not None:
        raise ValueError("pass either pathway or pathway_fn, not both")
    if pathway_fn is not None:
        with torch.no_grad():
            pw = pathway_fn(model, x)
    elif pathway is not None:
        pw = pathway
    else:
        pw = neuron_mct_pathways(model, x, density)
    for n, m in pw.items():
        if m.dim() == 2 and m.shape[0] != x.shape[0]:
            raise ValueError(
                f"the pathway's mask of unit {n!r} has {m.shape[0]} rows for a batch of {x.shape[0]} inputs; pass a "
                "shared [C] mask, or pathway_fn to compute the pathway of each batch"
            )
    return pw


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _attribute(model, x, target, pathway, pathway_fn, density, absolute, reduce_channels) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor or an array, got {type(x).__name__}")
    expected = _model_dtype(model)
    if x.dtype != expected:
        raise ValueError(f"inputs are {x.dtype}, but the model is {expected}: expected {expected} inputs "
                         f"(convert them, e.g. inputs.to({expected}))")
    with eval_mode(model):  # every module's own training flag is restored after
        pw = resolve_pathway(model, x, pathway, pathway_fn, density)
        pw = {n: m.to(x.device) for n, m in pw.items()}
        g = pathway_grad(model, x, pw, target)
    if absolute:
        g = g.abs()
    if reduce_channels:
        g = g.sum(1, keepdim=True)
    return g


def explain_func(
    model: nn.Module,
    inputs: Any,
    targets: Any = None,
    pathway: Optional[Mapping[str, torch.Tensor]] = None,
    pathway_fn: Optional[PathwayFn] = None,
    density: float = 0.3,
    absolute: bool = False,
    reduce_channels: bool = False,
    device: Any = None,
    **_: Any,
) -> np.ndarray:
    """PathwayGrad saliency as Quantus wants it: float32 ``np.ndarray`` shaped like ``inputs``.

    ``targets``: class per input (array, tensor, int, or ``None`` for the model's prediction). Extra keyword
    arguments that Quantus forwards (``channel_first``, ``softmax``, ...) are ignored.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    x = x.to(device=dev, dtype=_model_dtype(model))  # Quantus hands over numpy arrays of any float dtype
    t = None
    if targets is not None:
        t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets).long()
        t = t.reshape(-1).to(dev)
    g = _attribute(model, x, t, pathway, pathway_fn, density, absolute, reduce_channels)
    return g.detach().cpu().numpy().astype(np.float32)


class PathwayAttribution:
    """Captum-style attribution: the input gradient through the pathway model ``H(x; m)``.

    Args:
        model: the target model (put in eval mode for the call).
        pathway_fn, pathway, density: which pathway explains each batch (module docstring).
        absolute: return ``|gradient|``.

    ``attribute(inputs, target=None, additional_forward_args=None, pathway=None)`` → tensor shaped like ``inputs``;
    ``target`` is an int, a list or a ``[N]`` tensor (Captum's convention), ``None`` means the predicted class.
    """

    def __init__(
        self, model: nn.Module, pathway_fn: Optional[PathwayFn] = None,
        pathway: Optional[Mapping[str, torch.Tensor]] = None, density: float = 0.3, absolute: bool = False,
    ):
        self.forward_func = model
        self.model = model
        self.pathway_fn = pathway_fn
        self.pathway = pathway
        self.density = density
        self.absolute = absolute

    def attribute(self, inputs: torch.Tensor, target=None, additional_forward_args=None, pathway=None,
                  **kwargs: Any) -> torch.Tensor:
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError("PathwayAttribution explains a single input tensor")
            return (self.attribute(inputs[0], target, additional_forward_args, pathway, **kwargs),)
        if additional_forward_args is not None:
            raise ValueError("the target model takes no additional forward arguments")
        t = None
        if target is not None:
            t = torch.as_tensor(target).long().reshape(-1).to(inputs.device)
            if t.numel() == 1 and inputs.shape[0] > 1:
                t = t.expand(inputs.shape[0])
        pw = pathway if pathway is not None else self.pathway
        fn = None if pathway is not None else self.pathway_fn
        g = _attribute(self.model, inputs.detach(), t, pw, fn, self.density, self.absolute, False)
        return g.to(inputs.dtype)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False
