"""Training GEN-CNP (DESIGN §4): KD faithfulness + density penalty + class term; Adam; checkpoints with resume.

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
import time
from typing import Dict, List, Optional

import torch

from .. import distributed as D
from ..data import ImageData, check_labels
from ..evaluation.metrics import confidence_metrics, density_stats
from ..model.reference import soft_pathway_forward
from ..plan.engine import dense_capture
from ..plan import fast_pathway_forward
from .gencnp import GenCNP
from .pdn import distill_kl, supervised_contrastive

__all__ = ["TrainConfig", "train_gencnp", "validate", "gencnp_loss", "seed_everything"]


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

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def gencnp_loss(gen: GenCNP, x: torch.Tensor, cfg: TrainConfig, mode: str, sp_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """The training loss on one batch; returns its terms (``loss``, ``kd``, ``density``, ``cls``)."""
    target = gen.target
    with torch.no_grad():
        z, feats = dense_capture(target, x)
    out = gen.from_features(feats, z, mode)
    z_m = soft_pathway_forward(target, out.masks, x)
    kd = distill_kl(z, z_m, cfg.tau)
    flat = torch.cat([out.masks[n] for n in gen.unit_names], 1)
    density = flat.mean()
    y_hat = z.argmax(1)
    cls = distill_kl(z, out.class_logits, cfg.tau)
    cls = cls + supervised_contrastive(out.code, y_hat, cfg.supcon_temperature)
    cls = cls + supervised_contrastive(flat, y_hat, cfg.supcon_temperature)
    loss = kd + cfg.lambda_sp * sp_scale * density + cfg.lambda_cls * cls
    return {"loss": loss, "kd": kd.detach(), "density": density.detach(), "cls": cls.detach()}


@torch.no_grad()
def validate(gen: GenCNP, data: ImageData, batch_size: int = 256, backend: str = "auto") -> Dict[str, float]:
    """Fidelity, mDC, mIC and density of the hard pathways on ``data`` (pathway forward: ``fast_pathway_forward``)."""
    was = gen.training
    gen.eval()
    full, path, masks = [], [], {n: [] for n in gen.unit_names}
    for i in range(0, len(data), batch_size):
        x = data.x[i:i + batch_size]
        out = gen(x, mode="hard")
        full.append(out.target_logits)
        path.append(fast_pathway_forward(gen.target, out.pathway, x, backend=backend))
        for n in gen.unit_names:
            masks[n].append(out.pathway[n])
    gen.train(was)
    m = confidence_metrics(torch.cat(full), torch.cat(path))
    d = density_stats({n: torch.cat(v) for n, v in masks.items()}, gen.unit_names)
    return {**m, "density_mean": d["density_mean"], "density_std": d["density_std"]}


def _is_better(new: Dict[str, float], best: Optional[Dict[str, float]], floor: float) -> bool:
    if best is None:
        return True
    new_ok, best_ok = new["fidelity"] >= floor, best["fidelity"] >= floor
    if new_ok != best_ok:
        return new_ok
    if new_ok:
        return new["density_mean"] < best["density_mean"]
    return (new["fidelity"], -new["density_mean"]) > (best["fidelity"], -best["density_mean"])


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_gencnp(gen: GenCNP, train: ImageData, val: ImageData, cfg: TrainConfig, out_dir: Optional[str] = None,
                 resume: bool = False, quiet: bool = False, log=None,
                 stop_after: Optional[int] = None, checkpoint_every: Optional[int] = None,
                 stop_after_steps: Optional[int] = None) -> Dict[str, object]:
    """Train ``gen`` on ``train``, validating on ``val`` after every epoch.

    Args:
        gen: a :class:`GenCNP` (its target frozen).
        out_dir: where ``checkpoint.pt`` (latest, for resume) and ``generator.pt`` (best) go; ``None``: keep in
            memory only.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        log: optional ``callable(str)`` for one line per epoch.
        stop_after: stop after this many epochs in total (a time-boxed run; ``resume`` continues it exactly).
        checkpoint_every: also write ``checkpoint.pt`` every this many steps within an epoch (the position in the
            epoch, the running sums and the RNG state; ``resume`` continues mid-epoch exactly).
        stop_after_steps: return right after this many steps in total, writing nothing more (simulates a killed
            run: ``resume`` restarts from the last checkpoint). The result then has ``"stopped_at_step"``.

    Under ``torchrun`` (:mod:`gencnp_fast.distributed`) every rank trains its slice of each global batch of
    ``cfg.batch_size`` with the generator in DistributedDataParallel; only rank 0 writes files and logs.

    Returns:
        ``{"history": [per-epoch dicts], "best": best epoch's validation metrics, "best_epoch": int}``; ``gen``
        holds the best weights when this returns.
    """
    from tqdm.auto import tqdm

    from ..target import progress_enabled

    for d in (train, val):
        gen.check_input(d.x[:1])
        check_labels(d.y, gen.num_classes, d.name)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    history: List[Dict[str, float]] = []
    best, best_epoch, best_state = None, -1, None
    start_epoch = 0
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    best_path = os.path.join(out_dir, "generator.pt") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    dd = D.is_active()
    partial = None
    if resume and ckpt_path and (D.broadcast_object(os.path.isfile(ckpt_path)) if dd else os.path.isfile(ckpt_path)):
        try:
            ck = D.load_on_main(ckpt_path) if dd else torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"could not resume: {ckpt_path} is corrupt ({type(exc).__name__}: {exc})") from None
        if not isinstance(ck, dict) or "generator" not in ck or "optimizer" not in ck:
            raise ValueError(f"could not resume: {ckpt_path} is not a GEN-CNP training checkpoint")
        if [tuple(u) for u in ck["generator"]["units"]] != [tuple(u) for u in gen.signature()]:
            raise ValueError(f"could not resume: {ckpt_path} is a checkpoint for another model")
        gen.load_state_dict(ck["generator"]["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch = int(ck["epoch"]) + 1
        history = list(ck["history"])
        best, best_epoch, best_state = ck["best"], int(ck["best_epoch"]), ck["best_state"]
        partial = ck.get("partial")
        if log:
            log(f"resumed from {ckpt_path} after epoch {start_epoch}")

    model = D.wrap_generator(gen) if dd else None
    soft_epochs = int(round(cfg.soft_fraction * cfg.epochs))
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, end_epoch):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        mode = "soft" if epoch < soft_epochs else "ste"
        gen.train()
        perm = torch.randperm(len(train), generator=g)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "kd": 0.0, "density": 0.0, "cls": 0.0}
        nb = 0
        skip = 0
        if partial is not None and int(partial["epoch"]) == epoch:  # resume mid-epoch
            skip, sums, nb = int(partial["next_batch"]), dict(partial["sums"]), int(partial["nb"])
            t0 -= float(partial["train_seconds"])
            torch.set_rng_state(partial["rng"])
        bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"GEN-CNP epoch {epoch + 1}/{cfg.epochs} ({mode})",
                   disable=not progress_enabled(quiet) or not D.is_main(), leave=False)
        for b, i in enumerate(bar):
            if b < skip:
                continue
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:
                continue
            step = epoch * steps_per_epoch + b
            sp_scale = min(1.0, (step + 1) / max(1.0, cfg.sp_warmup * total_steps))
            if dd:
                terms = D.sharded_gencnp_loss(model, gen, train.x, idx, cfg, mode, sp_scale)
            else:
                terms = gencnp_loss(gen, train.x[idx], cfg, mode, sp_scale)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            terms = terms.get("report", terms)
            for k in sums:
                sums[k] += float(terms[k].detach())
            nb += 1
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}", dens=f"{float(terms['density']):.3f}",
                            kd=f"{float(terms['kd']):.3f}")
            if (checkpoint_every and (b + 1) % checkpoint_every == 0 and i + cfg.batch_size < len(train)
                    and ckpt_path and D.is_main()):
                _atomic_save({"generator": gen.checkpoint_state(), "optimizer": opt.state_dict(), "epoch": epoch - 1,
                              "config": dataclasses.asdict(cfg), "history": history, "best": best,
                              "best_epoch": best_epoch, "best_state": best_state,
                              "partial": {"epoch": epoch, "next_batch": b + 1, "sums": dict(sums), "nb": nb,
                                          "train_seconds": time.perf_counter() - t0,
                                          "rng": torch.get_rng_state()}}, ckpt_path)
            if stop_after_steps is not None and step + 1 >= stop_after_steps:
                D.barrier()
                return {"history": history, "best": best, "best_epoch": best_epoch, "stopped_at_step": step + 1}
        train_s = time.perf_counter() - t0
        val_m = D.validate_sharded(gen, val, backend=cfg.backend) if dd else validate(gen, val, backend=cfg.backend)
        rec = {"epoch": epoch, "mode": mode, **{f"train_{k}": v / max(nb, 1) for k, v in sums.items()},
               **{f"val_{k}": v for k, v in val_m.items()}, "temperature": float(gen.daq.temperature.detach()),
               "train_seconds": train_s}
        history.append(rec)
        if _is_better(val_m, best, cfg.fidelity_floor):
            best, best_epoch = val_m, epoch
            best_state = {k: v.detach().clone() for k, v in gen.state_dict().items()}
            if best_path and D.is_main():
                gen.save(best_path)
        if log:
            log(f"epoch {epoch + 1}/{cfg.epochs} [{mode}] loss {rec['train_loss']:.4f} kd {rec['train_kd']:.4f} "
                f"density {rec['train_density']:.3f} | val fidelity {val_m['fidelity']:.4f} "
                f"density {val_m['density_mean']:.3f}±{val_m['density_std']:.3f} mDC {val_m['mDC']:.2f} "
                f"({train_s:.0f}s){' *' if best_epoch == epoch else ''}")
        if ckpt_path and D.is_main():
            _atomic_save({"generator": gen.checkpoint_state(), "optimizer": opt.state_dict(), "epoch": epoch,
                          "config": dataclasses.asdict(cfg), "history": history, "best": best,
                          "best_epoch": best_epoch, "best_state": best_state}, ckpt_path)
    if best_state is not None:
        gen.load_state_dict(best_state)
    D.barrier()
    gen.eval()
    return {"history": history, "best": best, "best_epoch": best_epoch}
