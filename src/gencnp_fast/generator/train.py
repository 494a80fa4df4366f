"""Training GEN-CNP (docs/design.md §4): KD faithfulness + density penalty + class term; Adam; checkpoints with resume.

Per batch (the target is frozen, in eval mode):

1. dense forward of the target, capturing every unit's feature map and the logits ``z`` (no gradient);
2. the generator gives DAQ masks ``m`` (soft in the first ``soft_fraction`` of the epochs, then straight-through:
   hard masks forward, DAQ's soft gradient backward, so the last epochs train on exactly the masks inference uses);
3. the pathway logits ``z_m = soft_pathway_forward(target, m, x)`` (differentiable in ``m``);
4. ``loss = KL(softmax(z/τ) ‖ softmax(z_m/τ))·τ² + λ_sp · density(m) + λ_cls · class_term``, where ``density`` is the
   mean mask value over all channels of all units (channel-weighted, as the density metric) and
   ``class_term = KL(softmax(z/τ) ‖ softmax(head(c)/τ))·τ² + SupCon(c; ŷ) + SupCon(m; ŷ)`` with ŷ the target's
   prediction. No sparsity budget: λ_sp trades density against faithfulness per instance. λ_sp ramps up linearly
   over the first ``sp_warmup`` fraction of the steps.

One process and many (``torchrun``, :mod:`gencnp_fast.distributed`) run the same step: :func:`gencnp_loss` gets
this process's slice of the global batch (all of it for one process) and gives the loss of the global batch.

Validation after every epoch runs the hard pathways through :func:`fast_pathway_forward` and records fidelity, mean
density and mDC. The *best* checkpoint is the one with the lowest validation density among the epochs whose
fidelity reaches ``fidelity_floor`` (the highest fidelity if none does); it is written to ``generator.pt``, and the
latest state (generator, optimiser, history) to ``checkpoint.pt`` for ``resume``. Shuffling uses a generator seeded
by ``(seed, epoch)``, so a run is reproducible and a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import distributed as D
from ..data import ImageSet
from ..io import atomic_save
from ..model.reference import soft_pathway_forward
from ..placement import Placement
from ..plan import dense_capture
from .gencnp import GenCNP, GenCNPOutput, check_generator_state
from .pdn import distill_kl, supervised_contrastive

__all__ = ["TrainConfig", "train_gencnp", "validate", "gencnp_loss", "seed_everything", "read_training_checkpoint",
           "check_config", "CONFIG_OPTIONS"]

TERMS = ("loss", "kd", "density", "cls")  # the reported terms of the loss (per-epoch means in the history)


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of GEN-CNP training (the defaults are the ones the embedded demo uses)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    tau: float = 2.0                 # KD temperature (faithfulness term and PDN head)
    lambda_sp: float = 3.0           # density penalty
    lambda_cls: float = 0.1          # class term
    supcon_temperature: float = 0.2
    sp_warmup: float = 0.1           # fraction of the steps over which λ_sp ramps up from 0
    soft_fraction: float = 0.25      # fraction of the epochs trained with soft DAQ masks (then straight-through)
    fidelity_floor: float = 0.97     # best-checkpoint rule (see module doc)
    seed: int = 0
    backend: str = "auto"            # fast_pathway_forward backend for validation


# The CLI option of each TrainConfig field (for messages); fields without one are Python-API settings.
CONFIG_OPTIONS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "tau": "--tau",
                  "lambda_sp": "--lambda-sp", "lambda_cls": "--lambda-cls", "seed": "--seed",
                  "soft_fraction": "--soft-fraction"}
# What a resumed run may not change without ``override`` (everything that shapes the training trajectory).
RESUME_FIXED = ("epochs", "batch_size", "lr", "weight_decay", "tau", "lambda_sp", "lambda_cls", "supcon_temperature",
                "sp_warmup", "soft_fraction", "fidelity_floor", "seed")


def _opt(name: str) -> str:
    return CONFIG_OPTIONS.get(name, f"TrainConfig.{name}")


def check_config(cfg: "TrainConfig") -> None:
    """A one-line ``ValueError`` naming the first setting of ``cfg`` that is out of its range."""
    def bad(name, why):
        return ValueError(f"{_opt(name)} {why}, got {getattr(cfg, name)!r}")

    for name in ("epochs", "batch_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(name, "must be a positive integer")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise bad("seed", "must be an integer in [0, 2**32)")
    for name in ("lr", "tau", "supcon_temperature"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise bad(name, "must be a positive finite number")
    for name in ("weight_decay", "lambda_sp", "lambda_cls"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad(name, "must be a finite number >= 0")
    for name in ("sp_warmup", "soft_fraction", "fidelity_floor"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise bad(name, "must lie in [0, 1]")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def gencnp_loss(forward: Callable[..., GenCNPOutput], gen: GenCNP, x: torch.Tensor, cfg: TrainConfig, mode: str,
                sp_scale: float = 1.0, shard: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """The training loss of a global batch, of which this process holds the rows ``x``.

    Args:
        forward: ``(features, logits, mode) -> GenCNPOutput``: ``gen.from_features`` in one process, the generator
            in DistributedDataParallel under ``torchrun`` (:func:`gencnp_fast.distributed.wrap_generator` gives
            the right one).
        x: this process's rows of the global batch (:meth:`_Trainer._steps`).
        shard: how many rows every process holds, in rank order (``None``: one process holding ``x``, the whole
            batch). A process without rows passes one placeholder row; its count 0 gives it weight 0.
        sp_scale: the warm-up factor of λ_sp.

    The per-sample terms (KD faithfulness, density, PDN head distillation) are means over ``x`` weighted by
    ``w = n_local · world / n_global``, so that DDP's average of the gradients over processes is the gradient of the
    global-batch mean also for uneven slices; the batch-coupled class terms (supervised-contrastive on the codes
    and on the masks) are computed on the whole global batch, gathered from every process with autograd (the
    backward sums every process's gradient into the rows of their owner). For one process ``w = 1`` and the gather
    is the identity. The result: ``{"loss": the tensor to backpropagate, "report": {"loss", "kd", "density",
    "cls"}}``, the report holding the terms of the global batch as floats (the same on every process).
    """
    sizes = [x.shape[0]] if shard is None else list(shard)
    world, n_global = len(sizes), sum(sizes)
    w = sizes[D.rank()] * world / n_global
    target = gen.target
    with torch.no_grad():
        z, feats = dense_capture(target, x)
    out = forward(feats, z, mode)
    z_m = soft_pathway_forward(target, out.masks, x)
    kd = distill_kl(z, z_m, cfg.tau)
    flat = torch.cat([out.masks[n] for n in gen.unit_names], 1)
    density = flat.mean()
    y_hat = D.gather_batch(z.argmax(1), sizes)
    cls = w * distill_kl(z, out.class_logits, cfg.tau)
    cls = cls + supervised_contrastive(D.gather_batch(out.code, sizes, autograd=True), y_hat, cfg.supcon_temperature)
    cls = cls + supervised_contrastive(D.gather_batch(flat, sizes, autograd=True), y_hat, cfg.supcon_temperature)
    loss = w * (kd + cfg.lambda_sp * sp_scale * density) + cfg.lambda_cls * cls
    with torch.no_grad():  # the mean over processes of (loss, w·kd, w·density, cls) is the global batch's
        local = [float(loss), w * float(kd), w * float(density), float(cls)]
        report = dict(zip(TERMS, (v / world for v in D.all_reduce_sum(local))))
    return {"loss": loss, "report": report}


@torch.no_grad()
def validate(gen: GenCNP, data: ImageSet, batch_size: int = 256, backend: str = "auto",
             place: Optional[Placement] = None) -> Dict[str, float]:
    """Fidelity, mDC, mIC and density of the hard pathways on ``data`` (pathway forward: ``fast_pathway_forward``;
    streamed, and dealt out over the processes under ``torchrun``: :func:`gencnp_fast.stream.explain_set`)."""
    from ..stream import explain_set

    was = gen.training
    res = explain_set(gen, data, batch_size, place, backend)
    gen.train(was)
    d = res.packed.density_stats()
    return {**res.confidence(), "density_mean": d["density_mean"], "density_std": d["density_std"]}


def _is_better(new: Dict[str, float], best: Optional[Dict[str, float]], floor: float) -> bool:
    if best is None:
        return True
    new_ok, best_ok = new["fidelity"] >= floor, best["fidelity"] >= floor
    if new_ok != best_ok:
        return new_ok
    if new_ok:
        return new["density_mean"] < best["density_mean"]
    return (new["fidelity"], -new["density_mean"]) > (best["fidelity"], -best["density_mean"])


CHECKPOINT_KEYS = ("generator", "optimizer", "epoch", "config", "history", "best", "best_epoch", "best_state")


def read_training_checkpoint(path: Optional[str]) -> Optional[dict]:
    """The training checkpoint at ``path`` (read on rank 0 with ``weights_only=True``, sent to every rank), with
    its keys and their types checked; ``None`` when there is no such file. A one-line ``ValueError`` names the
    file and the first problem."""
    if not path or not D.broadcast_object(os.path.isfile(path)):
        return None
    try:
        ck = D.load_on_main(path, "training checkpoint")
    except ValueError as exc:
        raise ValueError(f"could not resume: {exc}") from None
    if not isinstance(ck, dict) or "generator" not in ck:
        raise ValueError(f"could not resume: {path} is not a GEN-CNP training checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise ValueError(f"could not resume: {path} is an incomplete training checkpoint: {missing[0]!r} is missing")
    check_generator_state(ck["generator"], path)
    kinds = {"optimizer": dict, "config": dict, "history": list, "best": (dict, type(None)),
             "best_state": (dict, type(None)), "epoch": int, "best_epoch": int, "partial": (dict, type(None))}
    for key, kind in kinds.items():
        if not isinstance(ck.get(key), kind) or isinstance(ck.get(key), bool):
            raise ValueError(f"could not resume: {path}: {key!r} has the wrong type ({type(ck.get(key)).__name__})")
    partial = ck.get("partial")
    if partial is not None and not (
            {"epoch", "next_batch", "sums", "nb", "train_seconds", "rng"} <= set(partial)
            and isinstance(partial["rng"], torch.Tensor) and partial["rng"].dtype == torch.uint8
            and isinstance(partial["sums"], dict) and set(TERMS) <= set(partial["sums"])):
        raise ValueError(f"could not resume: {path}: its mid-epoch position ('partial') is incomplete")
    return ck


@dataclasses.dataclass
class _EpochSums:
    """Running sums of the reported terms over an epoch's steps (what a mid-epoch checkpoint saves)."""

    sums: Dict[str, float]
    nb: int = 0
    seconds: float = 0.0
    stopped_at_step: Optional[int] = None


class _Trainer:
    """The state of one :func:`train_gencnp` call: optimiser, history, best epoch, files (only rank 0 writes)."""

    def __init__(self, gen: GenCNP, train: ImageSet, val: ImageSet, cfg: TrainConfig, out_dir: Optional[str],
                 quiet: bool, log, checkpoint_every: Optional[int], stop_after_steps: Optional[int],
                 place: Placement):
        self.gen, self.train, self.val, self.cfg, self.place = gen, train, val, cfg, place
        self.quiet, self.log = quiet, log
        self.checkpoint_every, self.stop_after_steps = checkpoint_every, stop_after_steps
        self.opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.total_steps = max(cfg.epochs * self.steps_per_epoch, 1)
        self.history: List[Dict[str, float]] = []
        self.best, self.best_epoch, self.best_state = None, -1, None
        self.start_epoch = 0
        self.partial = None  # a mid-epoch position to continue from (resume)
        self.overrides: List[dict] = []  # settings changed on resume (--override), with the epoch they apply from
        self.ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
        self.best_path = os.path.join(out_dir, "generator.pt") if out_dir else None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)

    # resume and checkpoints -----------------------------------------------------------------------------------
    def resume(self, override: bool = False) -> None:
        """Continue from ``checkpoint.pt`` if there is one (read on rank 0, sent to every rank).

        The checkpoint must be for the same target (units) and generator size; a change of any setting in
        :data:`RESUME_FIXED` (batch size, learning rate, epochs, ...) is refused unless ``override``, which logs it.
        """
        path = self.ckpt_path
        ck = read_training_checkpoint(path)
        if ck is None:
            return
        gen = self.gen
        if [tuple(u) for u in ck["generator"]["units"]] != [tuple(u) for u in gen.signature()]:
            raise ValueError(f"could not resume: {path} is a checkpoint for another model")
        saved_gen = ck["generator"]["config"]
        if saved_gen != gen.config:
            names = {"d": "hidden size d (--hidden)", "code_dim": "code size (--code-dim)"}
            diff = ", ".join(f"{names.get(k, k)} {saved_gen.get(k)}, now {v}" for k, v in gen.config.items()
                             if saved_gen.get(k) != v)
            raise ValueError(f"could not resume: {path} holds a generator of another size: {diff}; give the "
                             f"checkpoint's --hidden {saved_gen.get('d')} --code-dim {saved_gen.get('code_dim')}, "
                             f"or train into a new --out")
        changes = self._config_changes(ck["config"], path, override)
        try:
            gen.load_state_dict(ck["generator"]["state_dict"])
            self.opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"could not resume: {path} does not fit this generator "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
        for group in self.opt.param_groups:  # this run's settings (equal to the checkpoint's unless overridden)
            group["lr"], group["weight_decay"] = self.cfg.lr, self.cfg.weight_decay
        self.start_epoch = ck["epoch"] + 1
        self.history = list(ck["history"])
        self.best, self.best_epoch, self.best_state = ck["best"], ck["best_epoch"], ck["best_state"]
        self.overrides = list(ck.get("overrides") or [])
        self.partial = ck.get("partial")
        if changes:
            self.overrides.append({"epoch": self.start_epoch, "changes": changes})
            old_bs = changes.get("batch_size", (None,))[0]
            if self.partial is not None and old_bs is not None:  # the same samples done, in batches of the new size
                done = int(self.partial["next_batch"]) * int(old_bs)
                self.partial = dict(self.partial, next_batch=done // self.cfg.batch_size)
        if self.log:
            self.log(f"resumed from {path} after epoch {self.start_epoch}")

    def _config_changes(self, saved: dict, path: str, override: bool) -> Dict[str, Tuple]:
        """``{field: (checkpoint value, this run's value)}`` for the settings that differ; an error unless
        ``override`` (then every change is printed on rank 0)."""
        changes = {k: (saved[k], getattr(self.cfg, k)) for k in RESUME_FIXED
                   if k in saved and saved[k] != getattr(self.cfg, k)}
        if not changes:
            return changes
        text = ", ".join(f"{k} {a} -> {b} ({_opt(k)})" for k, (a, b) in changes.items())
        if not override:
            raise ValueError(f"could not resume: this run changes settings of {path}: {text}. Resume with the "
                             f"checkpoint's values, or pass --override to change them (the change is logged)")
        if D.is_main():
            print(f"gencnp: resuming {path} with changed settings (--override): {text}", file=sys.stderr,
                  flush=True)
        return changes

    def save_checkpoint(self, epoch: int, partial: Optional[dict] = None) -> None:
        """``checkpoint.pt`` after ``epoch`` (``partial``: the position within the next epoch); rank 0 only."""
        if not self.ckpt_path or not D.is_main():
            return
        ck = {"generator": self.gen.checkpoint_state(), "optimizer": self.opt.state_dict(), "epoch": epoch,
              "config": dataclasses.asdict(self.cfg), "history": self.history, "best": self.best,
              "best_epoch": self.best_epoch, "best_state": self.best_state, "overrides": self.overrides}
        if partial is not None:
            ck["partial"] = partial
        atomic_save(ck, self.ckpt_path)

    # one epoch --------------------------------------------------------------------------------------------------
    def _steps(self, perm: torch.Tensor, skip: int) -> List[Tuple[int, torch.Tensor, torch.Tensor, List[int]]]:
        """The epoch's steps from batch ``skip``: ``(b, global batch idx, this process's rows, rows per process)``.
        A global batch of fewer than 2 samples is skipped; a process whose slice is empty gets a placeholder row
        (its count 0 gives it weight 0 in :func:`gencnp_loss`)."""
        bs, world, r = self.cfg.batch_size, D.world_size(), D.rank()
        steps = []
        for b, i in enumerate(range(0, len(perm), bs)):
            idx = perm[i:i + bs]
            if b < skip or len(idx) < 2:
                continue
            sizes = D.shard_sizes(len(idx), world)
            local = idx[D.shard_slice(len(idx), world, r)] if sizes[r] > 0 else idx[:1]
            steps.append((b, idx, local, sizes))
        return steps

    def train_epoch(self, epoch: int, mode: str, forward) -> _EpochSums:
        """The steps of ``epoch`` (from the resumed position, if any); stops early at ``stop_after_steps``. Images
        are read batch by batch (in ``place.workers`` processes)."""
        from tqdm.auto import tqdm

        from ..target import progress_enabled

        cfg, train, place = self.cfg, self.train, self.place
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        self.gen.train()
        perm = torch.randperm(len(train), generator=g)
        t0 = time.perf_counter()
        acc = _EpochSums({k: 0.0 for k in TERMS})
        skip = 0
        if self.partial is not None and int(self.partial["epoch"]) == epoch:  # resume mid-epoch
            p = self.partial
            skip, acc.sums, acc.nb = int(p["next_batch"]), dict(p["sums"]), int(p["nb"])
            t0 -= float(p["train_seconds"])
            torch.set_rng_state(p["rng"])
        steps = self._steps(perm, skip)
        bar = tqdm(total=sum(len(s[1]) for s in steps), desc=f"GEN-CNP epoch {epoch + 1}/{cfg.epochs} ({mode})",
                   unit="img", unit_scale=True, disable=not progress_enabled(self.quiet) or not D.is_main(),
                   leave=False)
        loader = train.batches_of([s[2] for s in steps], workers=place.workers, pin_memory=place.pin_memory)
        for (b, idx, _, sizes), (_, x, _) in zip(steps, loader):
            step = epoch * self.steps_per_epoch + b
            sp_scale = min(1.0, (step + 1) / max(1.0, cfg.sp_warmup * self.total_steps))  # λ_sp's warm-up
            rep = self.step(forward, place.inputs(x), sizes, mode, sp_scale)
            if not all(math.isfinite(v) for v in rep.values()):
                raise ValueError(f"GEN-CNP training stopped: the loss is {rep['loss']} (kd {rep['kd']}, density "
                                 f"{rep['density']}) at epoch {epoch + 1}, batch {b + 1}: {self._diagnose(idx)}; "
                                 f"nothing more is written")
            for k in TERMS:
                acc.sums[k] += rep[k]
            acc.nb += 1
            bar.update(len(idx))
            bar.set_postfix(loss=f"{rep['loss']:.3f}", dens=f"{rep['density']:.3f}", kd=f"{rep['kd']:.3f}")
            if self.checkpoint_every and (b + 1) % self.checkpoint_every == 0 and \
                    (b + 1) * cfg.batch_size < len(train):
                self.save_checkpoint(epoch - 1, {"epoch": epoch, "next_batch": b + 1, "sums": dict(acc.sums),
                                                 "nb": acc.nb, "train_seconds": time.perf_counter() - t0,
                                                 "rng": torch.get_rng_state()})
            if self.stop_after_steps is not None and step + 1 >= self.stop_after_steps:
                acc.stopped_at_step = step + 1
                break
        bar.close()
        acc.seconds = time.perf_counter() - t0
        return acc

    @torch.no_grad()
    def _diagnose(self, idx: torch.Tensor) -> str:
        """Why a loss is not finite: the images, the target's own logits on the batch, or the training diverged."""
        x = self.train.batch(idx[:256])
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return f"images of {self.train.name} hold NaN or infinite values"
        target = self.gen.target
        logits = target(self.place.inputs(x))
        if not bool(torch.isfinite(logits).all()):
            return ("the target model's logits are NaN or infinite for these images (it overflows; it cannot be "
                    "explained)")
        return f"the training diverged (lr {self.cfg.lr:g}; try a smaller --lr)"

    def step(self, forward, x: torch.Tensor, sizes: List[int], mode: str, sp_scale: float) -> Dict[str, float]:
        """One optimiser step on a global batch, of which this process holds the rows ``x`` (``sizes``: rows per
        process); returns its reported terms. A non-finite loss (the same on every rank) returns before the step,
        leaving the weights as they were."""
        with self.place.autocast():
            terms = gencnp_loss(forward, self.gen, x, self.cfg, mode, sp_scale, shard=sizes)
        if not all(math.isfinite(v) for v in terms["report"].values()):
            return terms["report"]
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.opt.step()
        return terms["report"]

    def end_epoch(self, epoch: int, mode: str, acc: _EpochSums) -> None:
        """Validate, record the epoch, keep (and write) the best weights, log, write ``checkpoint.pt``."""
        gen, cfg = self.gen, self.cfg
        bad = next((n for n, p in gen.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise ValueError(f"GEN-CNP training diverged: the generator's {bad} became NaN or infinite in epoch "
                             f"{epoch + 1}; nothing more is written (lr {cfg.lr:g})")
        val_m = validate(gen, self.val, backend=cfg.backend, place=self.place)
        rec = {"epoch": epoch, "mode": mode, **{f"train_{k}": v / max(acc.nb, 1) for k, v in acc.sums.items()},
               **{f"val_{k}": v for k, v in val_m.items()}, "temperature": float(gen.daq.temperature.detach()),
               "train_seconds": acc.seconds}
        self.history.append(rec)
        if _is_better(val_m, self.best, cfg.fidelity_floor):
            self.best, self.best_epoch = val_m, epoch
            self.best_state = {k: v.detach().clone() for k, v in gen.state_dict().items()}
            if self.best_path and D.is_main():
                gen.save(self.best_path)
        if self.log:
            self.log(f"epoch {epoch + 1}/{cfg.epochs} [{mode}] loss {rec['train_loss']:.4f} kd {rec['train_kd']:.4f} "
                     f"density {rec['train_density']:.3f} | val fidelity {val_m['fidelity']:.4f} "
                     f"density {val_m['density_mean']:.3f}±{val_m['density_std']:.3f} mDC {val_m['mDC']:.2f} "
                     f"({acc.seconds:.0f}s){' *' if self.best_epoch == epoch else ''}")
        self.save_checkpoint(epoch)

    def result(self, **extra) -> Dict[str, object]:
        return {"history": self.history, "best": self.best, "best_epoch": self.best_epoch, **extra}


def train_gencnp(gen: GenCNP, train: ImageSet, val: ImageSet, cfg: TrainConfig, out_dir: Optional[str] = None,
                 resume: bool = False, quiet: bool = False, log=None,
                 stop_after: Optional[int] = None, checkpoint_every: Optional[int] = None,
                 stop_after_steps: Optional[int] = None, override: bool = False,
                 place: Optional[Placement] = None) -> Dict[str, object]:
    """Train ``gen`` on ``train``, validating on ``val`` after every epoch.

    Args:
        gen: a :class:`GenCNP` (its target frozen).
        train, val: :class:`~gencnp_fast.data.ImageSet` s (an in-memory :class:`~gencnp_fast.data.ImageData`, or a
            folder / memory-mapped array read batch by batch).
        place: device, precision and data workers (:class:`~gencnp_fast.placement.Placement`; default: CPU,
            float32). The generator and its target are moved there.
        out_dir: where ``checkpoint.pt`` (latest, for resume) and ``generator.pt`` (best) go; ``None``: keep in
            memory only.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        log: optional ``callable(str)`` for one line per epoch.
        stop_after: stop after this many epochs in total (a time-boxed run; ``resume`` continues it exactly).
        checkpoint_every: also write ``checkpoint.pt`` every this many steps within an epoch (the position in the
            epoch, the running sums and the RNG state; ``resume`` continues mid-epoch exactly).
        stop_after_steps: return right after this many steps in total, writing nothing more (simulates a killed
            run: ``resume`` restarts from the last checkpoint). The result then has ``"stopped_at_step"``.
        override: on ``resume``, accept settings of ``cfg`` that differ from the checkpoint's (batch size,
            learning rate, epochs, ...; printed, and recorded under ``"overrides"`` in the checkpoint); without it
            such a change is a ``ValueError``.

    Non-finite images, a non-finite loss or generator weights that become non-finite stop training with a
    ``ValueError`` before anything non-finite is written.

    Under ``torchrun`` (:mod:`gencnp_fast.distributed`) every rank trains its slice of each global batch of
    ``cfg.batch_size`` with the generator in DistributedDataParallel; only rank 0 writes files and logs.

    Returns:
        ``{"history": [per-epoch dicts], "best": best epoch's validation metrics, "best_epoch": int}``; ``gen``
        holds the best weights when this returns.
    """
    from ..stream import check_set

    check_config(cfg)
    place = place or Placement()
    for d in (train, val):
        check_set(gen, d)
    gen.to(place.device)
    place.target(gen.target)
    run = _Trainer(gen, train, val, cfg, out_dir, quiet, log, checkpoint_every, stop_after_steps, place)
    if resume:
        run.resume(override)
    forward = D.wrap_generator(gen)
    soft_epochs = int(round(cfg.soft_fraction * cfg.epochs))
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(run.start_epoch, end_epoch):
        mode = "soft" if epoch < soft_epochs else "ste"
        acc = run.train_epoch(epoch, mode, forward)
        if acc.stopped_at_step is not None:
            D.barrier()
            return run.result(stopped_at_step=acc.stopped_at_step)
        run.end_epoch(epoch, mode, acc)
    if run.best_state is not None:
        gen.load_state_dict(run.best_state)
    D.barrier()
    gen.eval()
    return run.result()
