"""Cache guards: what the engine's caches of a model (its traced units, its compiled plans with folded weights) are
valid for, checked on every call, and :func:`invalidate` for what cannot be checked cheaply (docs/design.md §3).

Checked on every call, in one walk over the module tree (:func:`fingerprint`):
  * the module tree: the identity and type of every module, in order (a replaced or added submodule);
  * every parameter and buffer: its identity, its in-place version counter and its storage pointer (an optimizer
    step, ``load_state_dict``, ``weight.data = new``, a replaced buffer);
  * forward hooks and pre-hooks on any module, and global ones: the compiled plan cannot run them, so the fast path
    refuses a hooked model (naming the module) instead of silently skipping the hook.

Not detectable without reading every weight: an in-place change through ``.data`` (``weight.data.mul_(2)``), which
bypasses the version counter, or a change made through another view of the same storage. After such a change call
``gencnp_fast.invalidate(model)``.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import List, Tuple

import torch.nn as nn

__all__ = ["Fingerprint", "fingerprint", "tensors_key", "invalidate", "register_cache", "hooked_modules"]

_CACHES: List["weakref.WeakKeyDictionary"] = []


def register_cache(cache: "weakref.WeakKeyDictionary") -> "weakref.WeakKeyDictionary":
    """Register a per-model cache (keyed by the model) so that :func:`invalidate` clears it."""
    _CACHES.append(cache)
    return cache


def invalidate(model: nn.Module) -> None:
    """Forget everything the engine cached for ``model`` (traced units, compiled plans, folded weights): the next
    call recompiles. Needed only after changes the guards cannot see: in-place edits through ``.data``
    (``model.conv.weight.data.mul_(2)``) or through another view of a parameter's storage."""
    for cache in _CACHES:
        cache.pop(model, None)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    structure: object  # (id, type) of every module, in walk order (bytes from the compiled walk, else a tuple)
    tensors: object  # (id, version, data_ptr) of every parameter and buffer (likewise)
    hooked: bool  # a forward hook or pre-hook on some module, or a global one
    training: object  # the first module found in training mode, or None
    device: object  # the device of the first parameter, or None


def _compiled_walk():
    try:
        from .. import _C

        return _C.model_fingerprint
    except (ImportError, AttributeError):  # no compiled extension: the Python walk (same guards, slower)
        return None


_WALK = _compiled_walk()


def fingerprint(model: nn.Module) -> Fingerprint:
    """The model's :class:`Fingerprint`, in one walk over the module tree: the compiled walk
    (csrc/fingerprint.cpp, ~10x faster: this runs on every call), or the same walk in Python without the extension.
    Two fingerprints of a model compare equal exactly when nothing the guards watch has changed."""
    hooked = bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    if _WALK is not None:
        structure, tensors, any_hook, training, first = _WALK(model)
        return Fingerprint(structure, tensors, hooked or any_hook, training, None if first is None else first.device)
    return _python_fingerprint(model, hooked)


def tensors_key(module: nn.Module):
    """The identity, in-place version and storage of every parameter and buffer of ``module``, as one comparable
    value (the ``tensors`` of its :class:`Fingerprint`): what a cache of tensors derived from its weights is keyed
    on (the generator's stacked weights, ``generator/rfe.py``)."""
    if _WALK is not None:
        return _WALK(module)[1]
    return _python_fingerprint(module, False).tensors


def _python_fingerprint(model: nn.Module, hooked: bool) -> Fingerprint:
    structure, tensors = [], []
    training = device = None
    stack = [model]
    while stack:
        mod = stack.pop()
        structure.append((id(mod), type(mod)))
        if mod._forward_hooks or mod._forward_pre_hooks:
            hooked = True
        if mod.training and training is None:
            training = mod
        for t in mod._parameters.values():
            if t is not None:
                tensors.append((id(t), t._version, t.data_ptr()))
                device = t.device if device is None else device
        for t in mod._buffers.values():
            if t is not None:
                tensors.append((id(t), t._version, t.data_ptr()))
        stack.extend(m for m in mod._modules.values() if m is not None)
    return Fingerprint(tuple(structure), tuple(tensors), hooked, training, device)


def hooked_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """``(module name, hook kind)`` of every forward hook on ``model`` (``"<global>"`` for global ones)."""
    out = []
    if nn.modules.module._global_forward_hooks:
        out.append(("<global>", "forward hook"))
    if nn.modules.module._global_forward_pre_hooks:
        out.append(("<global>", "forward pre-hook"))
    for name, mod in model.named_modules():
        if mod._forward_hooks:
            out.append((name or "<model>", "forward hook"))
        if mod._forward_pre_hooks:
            out.append((name or "<model>", "forward pre-hook"))
    return out
