"""Target CNNs: build (a built-in name or a user's ``module:factory``), train, evaluate, load.

A trained target is saved whole (``torch.save(model)``; load with ``weights_only=False``); a user's model can also
come as a ``module:factory`` spec plus a ``state_dict`` file.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageData, check_labels
from .models import MODEL_FACTORIES

__all__ = ["build_model", "load_target", "save_target", "train_target", "accuracy", "predict", "check_model_input",
           "progress_enabled"]


def progress_enabled(quiet: bool = False) -> bool:
    """tqdm bars only on an interactive terminal and when not ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def build_model(spec: str, num_classes: Optional[int] = None, in_channels: Optional[int] = None) -> nn.Module:
    """A fresh model: a name of :data:`gencnp_fast.models.MODEL_FACTORIES` or ``"package.module:factory"``.

    ``num_classes`` / ``in_channels`` are passed to the built-in ``mnist_*`` factories (and ``num_classes`` to the
    others); a user factory is called without arguments.
    """
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ValueError(f"could not import module {mod_name!r} of model {spec!r}: {exc}") from None
        factory = getattr(mod, fn_name, None)
        if not callable(factory):
            raise ValueError(f"{mod_name!r} has no callable {fn_name!r} (model spec {spec!r})")
        model = factory()
    else:
        factory = MODEL_FACTORIES.get(spec)
        if factory is None:
            raise ValueError(f"unknown model {spec!r}; use one of {sorted(MODEL_FACTORIES)} or 'module:factory'")
        kwargs = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None and spec.startswith("mnist_"):
            kwargs["in_channels"] = in_channels
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def save_target(model: nn.Module, path: str) -> None:
    """``torch.save`` of the whole module (eval mode)."""
    torch.save(model.eval(), path)


def load_target(path: str, factory: Optional[str] = None) -> nn.Module:
    """Load a target model, in eval mode.

    Args:
        path: a whole-module file (``torch.save(model)``) or, with ``factory``, a ``state_dict`` file.
        factory: ``"module:factory"`` (or a built-in name) that builds the model the state dict belongs to.
    """
    if not os.path.isfile(path):
        raise ValueError(f"target model file {path} does not exist")
    if factory is not None:
        model = build_model(factory)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"could not read the state_dict {path}: corrupt or not a torch file ({exc})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"the state_dict {path} does not fit the model {factory!r}: {str(exc)[:500]}") from None
        return model.eval()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"could not read the target model {path}: corrupt or not a torch file "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(obj, dict):
        raise ValueError(f"{path} holds a state_dict, not a whole model: also give the model's 'module:factory'")
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj.eval()


def check_model_input(model: nn.Module, x: torch.Tensor, source: str = "data") -> int:
    """Run one image through ``model``; a clear error if the image shape does not fit. Returns the class count."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1])
    except Exception as exc:
        raise ValueError(f"{source}: images of shape {tuple(x.shape[1:])} do not fit the model "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model must return logits [B, classes], got {getattr(out, 'shape', type(out))}")
    return int(out.shape[1])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``x``, batched."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, data: ImageData, batch_size: int = 512) -> float:
    return float((predict(model, data.x, batch_size).argmax(1) == data.y).double().mean())


def train_target(model: nn.Module, train: ImageData, epochs: int = 3, lr: float = 2e-3, batch_size: int = 64,
                 seed: int = 0, weight_decay: float = 1e-4, quiet: bool = False) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy (one-cycle cosine schedule); returns it in eval mode.

    Deterministic for a given seed (the shuffle uses its own generator).
    """
    from tqdm.auto import tqdm

    num_classes = check_model_input(model, train.x, train.name)
    check_labels(train.y, num_classes, train.name)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        bar = tqdm(range(0, len(train), batch_size), desc=f"target epoch {epoch + 1}/{epochs}",
                   disable=not progress_enabled(quiet), leave=False)
        for i in bar:
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
