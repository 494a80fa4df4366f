"""Files the package writes: atomic replacement and strict JSON.

Every file the CLI writes (target model, generator, checkpoint, pathways, ``metrics.json``, the report's HTML and
PNGs) goes through :func:`atomic_write`: the content is written to a hidden temporary file in the destination's
directory, flushed to disk, and renamed over the destination with :func:`os.replace` (atomic on POSIX and Windows
within one file system). A reader, or a run killed half-way, therefore sees either the old complete file or the new
complete file, never a truncated one; on an error the temporary file is removed. A process killed by ``SIGKILL``
in the middle of a write may leave a hidden ``.<name>.*.tmp`` file beside the destination, never a partial
destination.

``metrics.json`` is strict JSON (RFC 8259 has no NaN or infinity): :func:`json_ready` turns every non-finite float
into ``null`` and records why under a top-level ``"undefined"`` entry (:func:`write_json`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from typing import Any, Dict, IO, Iterator, Tuple

__all__ = ["atomic_write", "atomic_save", "write_bytes", "write_text", "write_json", "json_ready", "safe_load",
           "one_line", "MissingFileError", "UNDEFINED_REASONS"]

_UMASK = None


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (``0o666`` minus the umask)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", encoding: str = None) -> Iterator[IO]:
    """``with atomic_write(path) as fh: ...``: ``fh`` is a temporary file beside ``path``; when the block ends
    without an exception it is flushed, synced and renamed to ``path`` (replacing an existing file); on an exception
    it is removed and ``path`` is left as it was.

    Raises ``IsADirectoryError`` when ``path`` is an existing directory and ``FileNotFoundError`` when its directory
    does not exist (the caller creates it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a file that can be written")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: the directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


class MissingFileError(FileNotFoundError, ValueError):
    """An input file that does not exist: a ``FileNotFoundError`` that is also a ``ValueError`` (what the package's
    loaders raised for it before)."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), cut at ``limit``."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _load_detail(exc: BaseException) -> str:
    msg = str(exc)
    if msg.startswith("Weights only load failed"):  # torch's advice to unpickle: not the problem here
        msg = ""
    return type(exc).__name__ + (": " + one_line(msg, 160) if msg else "")


def safe_load(path: str, what: str = "file", weights_only: bool = True):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors naming ``what`` and the
    file: :class:`MissingFileError` (a ``FileNotFoundError`` and a ``ValueError``) when it does not exist,
    ``ValueError`` for a directory or a file that is corrupt,
    not a torch file, or (``weights_only``) a pickle of Python objects. torch's warnings about the file are
    silenced (the error says what is wrong)."""
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise ValueError(f"could not read {what} {path}: corrupt or not a torch file ({_load_detail(exc)})") \
            from None


# Why a metric can be undefined, by its key (the last part of its path in metrics.json).
UNDEFINED_REASONS = {
    "acIOU": "no class has two or more samples: acIOU averages the IoU over pairs of pathways of the same class",
    "reference_acIOU": "no class has two or more samples among CDRP's samples: acIOU needs pairs of the same class",
    "inter_class_iou": "all samples belong to one class: there is no pair of pathways of different classes",
}
_GENERIC_REASON = "not a finite number: the computation gave NaN or infinity"


def json_ready(obj: Any, prefix: str = "") -> Tuple[Any, Dict[str, str]]:
    """``(clean, undefined)``: ``obj`` with every non-finite float replaced by ``None`` (tuples become lists, numpy
    and 0-d torch numbers become Python numbers), and ``{"dotted.path": reason}`` for each replaced value."""
    undefined: Dict[str, str] = {}

    def walk(v, path: str, key: str):
        if isinstance(v, dict):
            return {str(k): walk(x, f"{path}.{k}" if path else str(k), str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]", key) for i, x in enumerate(v)]
        if hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy scalars, 0-d arrays and tensors
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            undefined[path] = UNDEFINED_REASONS.get(key, _GENERIC_REASON)
            return None
        return v

    return walk(obj, prefix, ""), undefined


def write_json(path: str, obj: Dict[str, Any], indent: int = 2) -> Dict[str, Any]:
    """Write ``obj`` as strict JSON, atomically; returns what was written.

    Non-finite floats become ``null``; a top-level ``"undefined"`` entry maps each one's dotted path (e.g.
    ``"gencnp.acIOU"``) to the reason it is undefined (merged with an ``"undefined"`` entry ``obj`` already has).
    """
    body = {k: v for k, v in obj.items() if k != "undefined"}
    clean, undefined = json_ready(body)
    previous = obj.get("undefined") if isinstance(obj.get("undefined"), dict) else {}
    merged = {k: v for k, v in previous.items() if _is_null(clean, k)}
    merged.update(undefined)
    if merged:
        clean["undefined"] = merged
    write_text(path, json.dumps(clean, indent=indent, allow_nan=False) + "\n")
    return clean


def _is_null(obj: Any, dotted: str) -> bool:
    """Whether the value at a :func:`json_ready` path (dict keys only) exists and is ``None``."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False
        obj = obj[part]
    return obj is None
