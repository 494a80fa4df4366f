"""Target CNNs: build (a built-in name or a user's ``module:factory``), train, evaluate, save and load.

**The target file format** (``gencnp_fast.target/1``, what :func:`save_target` writes and ``gencnp train-target`` /
``gencnp demo`` produce) is a plain dict saved with ``torch.save`` and read back with ``torch.load(...,
weights_only=True)``, which cannot run code from the file::

    {"format": "gencnp_fast.target/1",
     "spec": {"factory": "mnist_vgg" | "package.module:callable", "kwargs": {...}},
     "state_dict": {...}}

:func:`load_target` rebuilds the model by calling the factory with its keyword arguments, then loads the state dict.
A built-in factory (a name of :data:`gencnp_fast.models.MODEL_FACTORIES`) needs nothing else. A ``module:callable``
named *by the file* is called only when the caller names the same factory too (``--model module:callable``, or
``load_target(path, "module:callable")``), or trusts the file (``trust_pickle``): a file must not pick which
function this process calls (``os:system`` is a callable too). Importing ``module`` runs that module's code, as any
Python import does; that is the user's own code, not the file's.

A plain ``state_dict`` file also loads, with ``factory`` (``--model``) building the model. A whole-module pickle
(``torch.save(model)``, the format of earlier versions) is refused with a one-line error: unpickling it would run
whatever code the file names. ``trust_pickle=True`` (``--trust-pickle``) loads it anyway with
``weights_only=False``; use it only for files you made.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import pickletools
import sys
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageData, ImageSet, check_labels
from .io import one_line, safe_load
from .model.units import eval_mode
from .models import MODEL_FACTORIES, model_spec

__all__ = ["TARGET_FORMAT", "build_model", "build_from_spec", "load_target", "save_target", "train_target",
           "accuracy", "predict", "check_model_input", "check_input_dtype", "check_finite_model",
           "progress_enabled"]

TARGET_FORMAT = "gencnp_fast.target/1"
_SPEC_ATTR = "_gencnp_spec"  # where build_model (and the built-in factories) record a model's spec

Spec = Dict[str, Any]


def progress_enabled(quiet: bool = False) -> bool:
    """tqdm bars only on an interactive terminal and when not ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def _import_factory(name: str):
    """The callable ``module:qualname`` names (a clear ``ValueError`` if it cannot be imported or is missing)."""
    mod_name, _, fn_name = name.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"model factory {name!r} must be 'package.module:callable' or a built-in name "
                         f"({', '.join(sorted(MODEL_FACTORIES))})")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as exc:
        raise ValueError(f"could not import module {mod_name!r} of model {name!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    for part in fn_name.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ValueError(f"{mod_name!r} has no callable {fn_name!r} (model factory {name!r})")
    return obj


def _check_spec(spec: Any, source: str) -> Spec:
    """``{"factory": str, "kwargs": {str: plain value}}``, checked; ``source`` names where it came from."""
    if isinstance(spec, str):
        spec = {"factory": spec, "kwargs": {}}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("factory"), str) or not spec["factory"]:
        raise ValueError(f"{source}: the model spec must be {{'factory': 'name or module:callable', 'kwargs': "
                         f"{{...}}}}, got {spec!r:.200}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{source}: the model spec's kwargs must be a dict with string keys, got {kwargs!r:.200}")

    def plain(v) -> bool:
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, Mapping):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, (bool, int, float, str))

    if not plain(dict(kwargs)):
        raise ValueError(f"{source}: the model spec's kwargs may hold only None, bool, int, float, str, lists and "
                         f"dicts of them, got {dict(kwargs)!r:.200}")
    return {"factory": spec["factory"], "kwargs": dict(kwargs)}


def build_from_spec(spec: Union[str, Spec], allow_import: bool = True) -> nn.Module:
    """A fresh model from ``{"factory": ..., "kwargs": {...}}`` (or just a factory name).

    ``allow_import=False`` refuses a ``module:callable`` factory (only built-in names are then called).
    """
    spec = _check_spec(spec, "model spec")
    name, kwargs = spec["factory"], spec["kwargs"]
    if ":" in name:
        if not allow_import:
            raise ValueError(f"the model factory {name!r} is not a built-in model")
        factory = _import_factory(name)
    else:
        factory = MODEL_FACTORIES.get(name)
        if factory is None:
            raise ValueError(f"unknown model {name!r}; use one of {sorted(MODEL_FACTORIES)} or 'module:factory'")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the factory is the user's code: kwargs it does not take, sizes too big, its own bugs
        raise ValueError(f"model factory {name!r} failed with kwargs {kwargs}: {type(exc).__name__}: "
                         f"{one_line(exc, 300)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    try:  # record how to rebuild it (save_target writes this)
        object.__setattr__(model, _SPEC_ATTR, {"factory": name, "kwargs": dict(kwargs)})
    except AttributeError:
        pass
    return model


def build_model(spec: str, num_classes: Optional[int] = None, in_channels: Optional[int] = None,
                **kwargs) -> nn.Module:
    """A fresh model: a name of :data:`gencnp_fast.models.MODEL_FACTORIES` or ``"package.module:factory"``.

    ``num_classes`` / ``in_channels`` are passed to the built-in ``mnist_*`` factories (and ``num_classes`` to the
    others); a user factory gets only ``kwargs``. The model remembers its spec (factory and keyword arguments), so
    :func:`save_target` can write it.
    """
    if ":" not in spec:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None and spec.startswith("mnist_"):
            kwargs["in_channels"] = in_channels
    return build_from_spec({"factory": spec, "kwargs": kwargs})


def save_target(model: nn.Module, path: str, spec: Union[str, Spec, None] = None) -> None:
    """Write ``model`` (put in eval mode) to ``path`` in the safe target format (module docstring), atomically.

    ``spec``: how to rebuild the model, ``{"factory": name or "module:callable", "kwargs": {...}}`` (a string: no
    kwargs). Default: the spec :func:`build_model` or a :mod:`gencnp_fast.models` factory recorded on the model.
    """
    from .io import atomic_save

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_target needs a torch.nn.Module, got {type(model).__name__}")
    spec = spec if spec is not None else model_spec(model)
    if spec is None:
        raise ValueError(f"save_target: a {type(model).__name__} built outside gencnp_fast has no model spec; pass "
                         f"spec={{'factory': 'package.module:callable', 'kwargs': {{...}}}} (what rebuilds it)")
    spec = _check_spec(spec, "save_target")
    state = {k: v.detach().cpu() for k, v in model.eval().state_dict().items()}
    _check_spec_rebuilds(spec, state)
    atomic_save({"format": TARGET_FORMAT, "spec": spec, "state_dict": state}, path)


def _check_spec_rebuilds(spec: Spec, state: Mapping[str, torch.Tensor]) -> None:
    """A clear error when ``spec`` builds a model whose state dict has other names or shapes than ``state`` (the
    file would not load). The model is built on the meta device (no memory, the RNG untouched); a factory that
    cannot build there is not checked."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            ref = build_from_spec(spec).state_dict()
    except Exception:
        return
    ours = {k: tuple(v.shape) for k, v in state.items()}
    theirs = {k: tuple(v.shape) for k, v in ref.items()}
    if ours != theirs:
        diff = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k] != theirs[k]]
        raise ValueError(f"save_target: the spec {spec} does not rebuild this model (first difference: "
                         f"{diff[0]!r}); pass the spec that builds it")


def _pickle_globals(path: str) -> Optional[List[str]]:
    """The globals (``module.name``) the pickles of a torch file refer to, read without unpickling anything;
    ``None`` when the file is not a readable pickle (corrupt)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                streams = [io.BytesIO(z.read(names[0]))] if names else []
        else:
            with open(path, "rb") as fh:
                streams = [io.BytesIO(fh.read())]
        found: List[str] = []
        for stream in streams:
            end = len(stream.getbuffer())
            for _ in range(8):  # a legacy torch file is several pickles in a row
                if stream.tell() >= end:
                    break
                strings: List[str] = []
                for op, arg, _pos in pickletools.genops(stream):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(".".join(strings[-2:]))
                    if isinstance(arg, str):
                        strings.append(arg)
        return found if streams else None
    except Exception:
        return None


_PLAIN_GLOBALS = {"collections.OrderedDict", "torch.serialization._get_layout", "torch.Size", "torch.device",
                  "_codecs.encode", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
                  "builtins.bytearray", "__builtin__.set", "__builtin__.frozenset"}


def _is_plain_global(name: str) -> bool:
    """Whether a pickle global is part of plain tensor data (what ``weights_only=True`` accepts)."""
    if name in _PLAIN_GLOBALS or name.startswith(("torch._utils.", "torch.storage.")):
        return True
    mod, _, attr = name.rpartition(".")
    return mod == "torch" and (attr.endswith("Storage") or isinstance(getattr(torch, attr, None), torch.dtype))


def _object_global(path: str) -> Optional[str]:
    """The global of the file's pickles that shows it holds Python objects (a class such as
    ``gencnp_fast.models.VGG``, a function such as ``posix.system``); ``None`` if there is none or the file is not
    a readable pickle."""
    found = [g for g in (_pickle_globals(path) or []) if not _is_plain_global(g)]
    return next((g for g in found if not g.startswith("torch.nn.")), found[0] if found else None)


def _read_target_file(path: str, trust_pickle: bool):
    """What ``path`` holds, loaded with ``weights_only=True``. A pickle of Python objects (which that refuses) is
    an error unless ``trust_pickle``, which loads it with ``weights_only=False``; anything else unreadable is a
    corrupt file."""
    try:
        return safe_load(path, "target model")
    except ValueError:
        culprit = _object_global(path) if os.path.isfile(path) else None
        if culprit is None:
            raise
    if not trust_pickle:
        raise ValueError(
            f"{path} is a pickle of Python objects (it names {culprit}), e.g. a whole model saved with "
            f"torch.save(model): loading it would run code from the file. Re-save it in the safe format "
            f"(gencnp_fast.target.save_target(model, path)) or, only for a file you made, pass --trust-pickle")
    return safe_load(path, "target model (--trust-pickle)", weights_only=False)


def _load_state(model: nn.Module, state: Any, path: str, what: str) -> nn.Module:
    """``model.load_state_dict(state)`` (strict) with a one-line error naming ``path`` and the model."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of parameter name -> tensor)")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"the state_dict {path} does not fit the model {what}: "
                         f"{one_line(exc, 500)}") from None
    return model


def check_finite_model(model: nn.Module, source: str = "the target model") -> None:
    """A clear error when a parameter or floating buffer holds NaN or infinity (naming the first one)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: {name} holds NaN or infinity")


def load_target(path: str, factory: Optional[str] = None, trust_pickle: bool = False,
                model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Load a target model, in eval mode: the one loader of the CLI, the evaluation suite and the Python API.

    Args:
        path: a target file (:func:`save_target`), or with ``factory`` a plain ``state_dict`` file.
        factory: ``"module:callable"`` or a built-in name that builds the model (``--model``). With a target file
            that names the same factory, its saved kwargs are used; naming it is also the consent that lets a
            file's ``module:callable`` factory be imported and called.
        trust_pickle: also load whole-module pickles (``torch.save(model)``) and call a file's own factory
            (``--trust-pickle``). Unpickling runs code named by the file: only for files you made.
        model_kwargs: keyword arguments for ``factory`` (``--model-kwargs``, e.g. ``{"num_classes": 4}``); they
            replace a target file's saved kwargs. Only with ``factory``.

    Raises ``FileNotFoundError`` / ``ValueError`` with one-line messages naming the file and the problem.
    """
    if model_kwargs is not None and factory is None:
        raise ValueError("--model-kwargs needs --model (the factory the keyword arguments are for)")
    obj = _read_target_file(path, trust_pickle)
    if isinstance(obj, nn.Module):  # only reachable with trust_pickle
        if factory is not None:
            raise ValueError(f"{path} holds a whole model; --model is only for state_dict files")
        check_finite_model(obj, f"target model {path}")
        return obj.eval()
    if isinstance(obj, Mapping) and obj.get("format") == TARGET_FORMAT:
        for key in ("spec", "state_dict"):
            if key not in obj:
                raise ValueError(f"{path} is an incomplete target file: {key!r} is missing")
        spec = _check_spec(obj["spec"], path)
        if factory is not None:
            spec = spec if factory == spec["factory"] else {"factory": factory, "kwargs": {}}
            if model_kwargs is not None:
                spec = {"factory": factory, "kwargs": dict(model_kwargs)}
            model = build_from_spec(spec)
        elif ":" in spec["factory"] and not trust_pickle:
            raise ValueError(f"{path} names the model factory {spec['factory']!r}, which is not built in: pass "
                             f"--model {spec['factory']} to import and call it (a file does not choose the code "
                             f"this process runs)")
        else:
            model = build_from_spec(spec)
        what = repr(spec["factory"])
        state = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj.get("format") is not None:
        raise ValueError(f"{path} is not a target model file (format {obj.get('format')!r}; "
                         f"{TARGET_FORMAT!r} expected)")
    elif isinstance(obj, Mapping):
        if factory is None:
            raise ValueError(f"{path} holds a state_dict, not a target model file: also give the model's factory "
                             f"(--model module:factory or a built-in name)")
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
        model = build_from_spec({"factory": factory, "kwargs": dict(model_kwargs or {})})
        what = repr(factory)
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a target model")
    _load_state(model, state, path, what)
    check_finite_model(model, f"target model {path}")
    return model.eval()


def check_input_dtype(model: nn.Module, x: torch.Tensor, source: str = "data") -> None:
    """A clear error when ``x``'s dtype is not the dtype of ``model``'s floating-point parameters."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{source}: inputs must be a torch.Tensor, got {type(x).__name__}")
    expected = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if expected is not None and x.dtype != expected:
        raise ValueError(f"{source}: inputs are {x.dtype}, but the model is {expected}: expected {expected} inputs "
                         f"(convert them, e.g. x.to({expected}); images in [0, 1])")


def check_model_input(model: nn.Module, x: torch.Tensor, source: str = "data") -> int:
    """Run one image through ``model``; a clear error if the images' dtype or shape does not fit, or if the model
    gives no ``[B, classes]`` logits. Returns the class count."""
    check_input_dtype(model, x, source)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{source} holds no images (shape {tuple(x.shape)})")
    try:
        with eval_mode(model), torch.no_grad():  # every module's own training flag is restored after
            out = model(x[:1])
    except Exception as exc:
        raise ValueError(f"{source}: images of shape {tuple(x.shape[1:])} do not fit the model "
                         f"({type(exc).__name__}: {one_line(exc)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model must return logits [B, classes], got {getattr(out, 'shape', type(out))}")
    return int(out.shape[1])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``x``, batched."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 512, place=None) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``data`` (any :class:`~gencnp_fast.data.ImageSet`, streamed)."""
    from .placement import Placement

    place = place or Placement()
    model.eval()
    correct = 0
    for _, x, y in data.batches(batch_size, workers=place.workers, pin_memory=place.pin_memory):
        with place.autocast():
            correct += int((model(place.inputs(x)).argmax(1).cpu() == y).sum())
    return correct / max(len(data), 1)


def train_target(model: nn.Module, train: ImageSet, epochs: int = 3, lr: float = 2e-3, batch_size: int = 64,
                 seed: int = 0, weight_decay: float = 1e-4, quiet: bool = False, place=None) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy (one-cycle cosine schedule); returns it in eval mode.

    ``train``: any :class:`~gencnp_fast.data.ImageSet` (a folder is decoded batch by batch, in ``place.workers``
    processes); ``place``: the device and precision (:class:`~gencnp_fast.placement.Placement`; default CPU).
    Deterministic for a given seed (the shuffle uses its own generator). Non-finite images, a loss that becomes NaN
    or infinite, or weights that do, stop it with a ``ValueError`` (the model is then not usable).
    """
    from .data import check_finite

    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"train_target: {name} must be a positive integer, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"train_target: lr must be a positive finite number, got {lr!r}")
    from .placement import Placement

    place = place or Placement()
    first = train.batch(torch.arange(min(len(train), 2)))
    check_finite(train.x if isinstance(train, ImageData) else first, train.name)  # streamed: per batch (the loss)
    num_classes = check_model_input(model, first, train.name)
    check_labels(train.y, num_classes, train.name)
    model.to(place.device)  # trained in float32 (autocast at a reduced --precision)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        batches = [perm[i:i + batch_size] for i in range(0, len(train), batch_size)]
        batches = [b for b in batches if len(b) >= 2]  # BatchNorm needs two samples
        bar = train.batches_of(batches, workers=place.workers, pin_memory=place.pin_memory,
                               progress=None if not progress_enabled(quiet) else f"target epoch {epoch + 1}/{epochs}")
        for b, (_, x, y) in enumerate(bar):
            with place.autocast():
                loss = F.cross_entropy(model(place.inputs(x)), y.to(place.device))
            value = loss.item()
            if not math.isfinite(value):
                raise ValueError(f"target training diverged: the loss is {value} at epoch {epoch + 1}, batch "
                                 f"{b + 1} (lr {lr:g}); try a smaller learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    check_finite_model(model, f"target training diverged (lr {lr:g}): the trained model")
    return model.eval()
