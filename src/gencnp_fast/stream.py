"""One streamed pass of explanation over an image set, on one process or dealt out over ``torchrun`` ranks
(docs/design.md §5).

:func:`explain_set` reads the set batch by batch (:meth:`gencnp_fast.data.ImageSet.batches`, decoding in
``--workers`` processes), runs the target's dense forward with feature capture, the generator and the pathway
forward (:func:`gencnp_fast.plan.fast_pathway_forward`) on the device, and keeps only what does not grow with the
images: every sample's pathway as packed bits (:class:`~gencnp_fast.evaluation.packed.PackedPathways`), its label,
the target's and the pathway's predicted class, and the float64 sums behind fidelity / mDC / mIC. Inputs and logits
are kept only for the rows asked for (``keep``: the sample a report shows). Peak memory therefore stays flat in the
number of images.

Under ``torchrun`` the set is cut into the batches of one process and whole batches are dealt to ranks in
contiguous blocks (:func:`gencnp_fast.distributed.batch_shard`): every sample is computed in the batch it would be
in one process, and the per-sample rows are all-gathered in that order, so the result equals one process's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional

import torch

from . import distributed as D
from .data import ImageData, check_finite, check_labels, evenly_spread
from .evaluation.metrics import confidence_sums, finish_confidence
from .evaluation.packed import FORMAT, PackedPathways
from .placement import Placement
from .plan import fast_pathway_forward

__all__ = ["SetExplanation", "explain_set", "report_rows", "check_set"]

_SUM_KEYS = ("n", "dc_sum", "ic_sum", "agree_sum")


@dataclasses.dataclass
class SetExplanation:
    """What :func:`explain_set` keeps, rows in the order of ``index`` (the data set's positions).

    ``kept`` are the rows (positions into ``index``) whose inputs ``x`` and logits ``full_logits`` /
    ``path_logits`` are kept; ``seconds`` is the wall time of the pass (this process)."""

    index: torch.Tensor
    y: torch.Tensor
    pred: torch.Tensor
    path_pred: torch.Tensor
    packed: PackedPathways
    sums: Dict[str, float]
    kept: torch.Tensor
    x: torch.Tensor
    full_logits: torch.Tensor
    path_logits: torch.Tensor
    seconds: float

    def __len__(self) -> int:
        return int(self.index.numel())

    @property
    def images_per_second(self) -> float:
        return len(self) / self.seconds if self.seconds > 0 else float("nan")

    def confidence(self) -> Dict[str, float]:
        """``{"fidelity", "mDC", "mIC"}`` over every sample."""
        return finish_confidence(self.sums)

    def accuracy(self) -> float:
        return float((self.pred == self.y).double().mean()) if len(self) else float("nan")


def report_rows(n: int, bytes_per_image: int, budget_bytes: int = 256 << 20) -> torch.Tensor:
    """The rows a report shows and whose inputs are kept: all ``n`` when they fit in ``budget_bytes``, else as many
    as fit, spread evenly over the set (as :meth:`~gencnp_fast.data.ImageSet.limit`)."""
    k = max(1, min(n, budget_bytes // max(int(bytes_per_image), 1)))
    if k >= n:
        return torch.arange(n)
    return evenly_spread(n, k).unique()  # rounding can meet a position twice


def check_set(gen, data) -> None:
    """The checks before a pass over ``data``: the shape and dtype of its first image, finite values (every image
    of an in-memory set; a streamed set's batches are checked as they are read), labels within the model's
    classes. One-line ``ValueError`` s naming the set."""
    from .target import check_input_dtype

    shape = tuple(data.sample_shape)
    if shape != tuple(gen.input_shape):
        raise ValueError(f"{data.name}: images of shape {shape} do not fit the target model, which takes "
                         f"{tuple(gen.input_shape)}")
    if len(data) == 0:
        raise ValueError(f"{data.name} holds no images")
    first = data.batch(torch.arange(1))
    if next(gen.target.parameters()).dtype not in (torch.float16, torch.bfloat16):  # --precision: converted later
        check_input_dtype(gen.target, first, data.name)
    gen.check_input(first)
    check_finite(data.x if isinstance(data, ImageData) else first, data.name)
    check_labels(data.y, gen.num_classes, data.name)


class _Local:
    """The per-batch accumulators of one process."""

    def __init__(self, gen):
        self.packed = PackedPathways(gen.unit_names, [u.channels for u in gen.units])
        self.index: List[torch.Tensor] = []
        self.y: List[torch.Tensor] = []
        self.pred: List[torch.Tensor] = []
        self.path_pred: List[torch.Tensor] = []
        self.sums = {k: 0.0 for k in _SUM_KEYS}
        self.kept: List[torch.Tensor] = []
        self.x: List[torch.Tensor] = []
        self.full: List[torch.Tensor] = []
        self.path: List[torch.Tensor] = []

    def add(self, pos: torch.Tensor, idx, x, y, pathway, full, path, keep_mask: Optional[torch.Tensor]) -> None:
        self.packed.append(pathway)
        self.index.append(idx)
        self.y.append(y)
        self.pred.append(full.argmax(1).cpu())
        self.path_pred.append(path.argmax(1).cpu())
        for k, v in confidence_sums(full, path).items():
            self.sums[k] += v
        if keep_mask is not None:
            sel = keep_mask[pos]
            if bool(sel.any()):
                self.kept.append(pos[sel])
                self.x.append(x[sel.to(x.device)].cpu())
                self.full.append(full[sel.to(full.device)].cpu())
                self.path.append(path[sel.to(path.device)].cpu())


def _cat(parts: List[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else empty


@torch.no_grad()
def explain_set(gen, data, batch_size: int = 256, place: Optional[Placement] = None, backend: str = "auto",
                keep: Optional[torch.Tensor] = None, progress: Optional[str] = None) -> SetExplanation:
    """Explain every image of ``data`` (an :class:`~gencnp_fast.data.ImageSet`) in batches of ``batch_size``; see
    the module docstring. ``keep``: the rows whose inputs and logits are kept. ``progress``: a progress bar's title
    (images/s shown), or ``None``."""
    place = place or Placement()
    n = len(data)
    keep_mask = None
    if keep is not None:
        keep_mask = torch.zeros(n, dtype=torch.bool)
        keep_mask[torch.as_tensor(keep).long()] = True
    gen.eval()
    gen.to(place.device)
    place.target(gen.target)
    ranges = D.batch_shard(n, batch_size, D.world_size(), D.rank())
    mine = torch.cat([torch.arange(i, j) for i, j in ranges]) if ranges else torch.zeros(0, dtype=torch.long)
    acc = _Local(gen)
    t0 = time.perf_counter()
    done = 0
    for idx, x, y in data.batches(batch_size, indices=mine, workers=place.workers,
                                  pin_memory=place.pin_memory, progress=progress if D.is_main() else None):
        pos = mine[done:done + len(idx)]
        done += len(idx)
        xb = place.inputs(x)
        with place.autocast():
            out = gen(xb, mode="hard")
        path = fast_pathway_forward(gen.target, out.pathway, xb, backend=backend).float()
        acc.add(pos, idx, x, y, out.pathway, out.target_logits.float(), path, keep_mask)  # x: as read, float32
    seconds = time.perf_counter() - t0
    return _finish(gen, acc, n, batch_size, seconds)


def _finish(gen, acc: _Local, n: int, batch_size: int, seconds: float) -> SetExplanation:
    """Concatenate this process's rows; under ``torchrun`` all-gather every rank's, in one process's order."""
    long0 = torch.zeros(0, dtype=torch.long)
    ncls = gen.num_classes
    shape = tuple(gen.input_shape)
    rows = {"index": _cat(acc.index, long0), "y": _cat(acc.y, long0), "pred": _cat(acc.pred, long0),
            "path_pred": _cat(acc.path_pred, long0), "bits": acc.packed.bits}
    kept = {"kept": _cat(acc.kept, long0), "x": _cat(acc.x, torch.zeros((0,) + shape)),
            "full": _cat(acc.full, torch.zeros(0, ncls)), "path": _cat(acc.path, torch.zeros(0, ncls))}
    sums, packed = dict(acc.sums), acc.packed
    if D.is_active():
        world = D.world_size()
        sizes = [sum(j - i for i, j in D.batch_shard(n, batch_size, world, r)) for r in range(world)]
        rows = {k: D.gather_rows(v, sizes) for k, v in rows.items()}
        kept_sizes = [int(v) for v in D.per_rank(len(kept["kept"]))]
        kept = {k: D.gather_rows(v, kept_sizes) for k, v in kept.items()}
        sums = dict(zip(_SUM_KEYS, D.all_reduce_sum([sums[k] for k in _SUM_KEYS])))
        seconds = max(D.per_rank(seconds))
        packed = PackedPathways.from_state({"format": FORMAT, "units": packed.units, "channels": packed.channels,
                                            "bits": rows["bits"]}, "the gathered pathways")
    return SetExplanation(rows["index"], rows["y"], rows["pred"], rows["path_pred"], packed, sums, kept["kept"],
                          kept["x"], kept["full"], kept["path"], seconds)
