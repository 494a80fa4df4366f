"""The ``gencnp`` command line (also ``python -m gencnp_fast``).

    gencnp demo [--out DIR] [--quick]          embedded MNIST end to end: target, GEN-CNP, explain, evaluate
    gencnp train-target --model SPEC --data D --out target_model.pt
    gencnp train --target target_model.pt --data D --out DIR [--resume]
    gencnp explain --target target_model.pt --generator DIR/generator.pt --data D --out DIR
    gencnp evaluate --target target_model.pt --generator DIR/generator.pt --data D --out DIR
    gencnp evaluate --target target_model.pt --pathways DIR/pathways.pt      (recompute with the reference forward)

Data ``D``: ``mnist`` (embedded 5,000 images), an ImageFolder directory or an ``.npz`` (``x``, ``y``). Without
``--test-data`` the data are split deterministically (``--test-fraction``, ``--split-seed``; ``mnist``: the fixed
4,000 / 1,000 split): ``train-target`` and ``train`` use the training part, ``explain`` and ``evaluate`` the test
part. ``train`` holds out ``--val-fraction`` of its training part for validation. A model given as
``module:factory`` needs ``--weights`` (a state_dict); a whole-module file (``torch.save(model)``) needs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Tuple

import torch

__all__ = ["main", "build_parser", "run_demo", "DEMO_CONFIGS"]

# The embedded demo's settings. "quick" must finish in under 5 minutes on 2 CPU cores, "full" in under 30.
DEMO_CONFIGS = {
    "quick": dict(model="mnist_vgg", width=16, target_epochs=4, target_lr=3e-3, epochs=4),
    "full": dict(model="mnist_vgg", width=32, target_epochs=6, target_lr=3e-3, epochs=12),
}


def _log(args, msg: str) -> None:
    from .distributed import is_main

    if not getattr(args, "quiet", False) and is_main():
        print(msg, flush=True)


# Data ------------------------------------------------------------------------------------------------------------
def _split(args) -> Tuple["ImageData", "ImageData"]:
    from .data import load_data, mnist_split, split_data

    if args.data in ("mnist", "mnist5k") and args.test_data is None:
        train, test = mnist_split(args.split_seed)
    elif args.test_data is not None:
        train, test = load_data(args.data), load_data(args.test_data)
    else:
        train, test = split_data(load_data(args.data), args.test_fraction, args.split_seed)
    if args.limit:
        train = train.limit(args.limit)
    if args.test_limit:
        test = test.limit(args.test_limit)
    return train, test


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, default="mnist",
                   help="'mnist' (embedded), an ImageFolder directory or an .npz with x and y")
    p.add_argument("--test-data", default=None, help="separate test data (default: split --data)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--test-limit", type=int, default=None, help=argparse.SUPPRESS)


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True,
                   help="target model: a whole-module .pt (torch.save(model)) or, with --model, a state_dict file")
    p.add_argument("--model", default=None,
                   help="'module:factory' (or a built-in name) building the model the --target state_dict fits")


def _load_target(args):
    from .target import load_target

    return load_target(args.target, args.model)


def _gen_config(args, **over):
    from .generator import TrainConfig

    cfg = TrainConfig()
    for k in ("epochs", "batch_size", "lr", "tau", "lambda_sp", "lambda_cls", "seed", "soft_fraction"):
        v = getattr(args, k, None)
        if v is not None:
            setattr(cfg, k, v)
    for k, v in over.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--tau", type=float, default=None, help="KD temperature")
    p.add_argument("--lambda-sp", type=float, default=None, help="density penalty weight")
    p.add_argument("--lambda-cls", type=float, default=None, help="class term weight")
    p.add_argument("--soft-fraction", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=64, help="generator hidden size d")
    p.add_argument("--code-dim", type=int, default=64)


def _train_generator(args, target, train, out_dir: str, resume: bool, cfg):
    from .data import split_data
    from .generator import GenCNP, seed_everything, train_gencnp

    tr, val = split_data(train, args.val_fraction, cfg.seed)
    seed_everything(cfg.seed)
    gen = GenCNP(target, tr.x[:2], d=args.hidden, code_dim=args.code_dim)
    _log(args, f"GEN-CNP: {sum(p.numel() for p in gen.parameters())} parameters, {len(gen.units)} units "
               f"({sum(u.channels for u in gen.units)} channels); {len(tr)} train / {len(val)} validation images")
    res = train_gencnp(gen, tr, val, cfg, out_dir=out_dir, resume=resume, quiet=args.quiet,
                       log=lambda s: _log(args, "  " + s), checkpoint_every=getattr(args, "checkpoint_every", None),
                       stop_after_steps=getattr(args, "stop_after_steps", None))
    return gen, res


# Commands --------------------------------------------------------------------------------------------------------
def cmd_train_target(args) -> None:
    from .target import accuracy, build_model, check_model_input, save_target, train_target
    from .data import check_labels

    train, test = _split(args)
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=args.num_classes, in_channels=int(train.x.shape[1])) \
        if ":" not in args.model else build_model(args.model)
    n_cls = check_model_input(model, train.x, train.name)
    check_labels(train.y, n_cls, train.name)
    check_labels(test.y, n_cls, test.name)
    t0 = time.perf_counter()
    train_target(model, train, args.epochs, args.lr, args.batch_size, args.seed, quiet=args.quiet)
    acc = accuracy(model, test)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_target(model, args.out)
    _log(args, f"target {args.model}: test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f}s) -> {args.out}")


def cmd_train(args) -> None:
    target = _load_target(args)
    train, _ = _split(args)
    cfg = _gen_config(args)
    gen, res = _train_generator(args, target, train, args.out, args.resume, cfg)
    if "stopped_at_step" in res:
        _log(args, f"stopped after step {res['stopped_at_step']} (resume with --resume)")
        return
    b = res["best"]
    _log(args, f"best epoch {res['best_epoch'] + 1}: val fidelity {b['fidelity']:.4f}, density "
               f"{b['density_mean']:.3f} -> {os.path.join(args.out, 'generator.pt')}")


def _load_generator(args, target):
    from .generator import GenCNP

    return GenCNP.load(args.generator, target)


def cmd_explain(args) -> None:
    from .explain import explain_batched, save_pathways

    target = _load_target(args)
    gen = _load_generator(args, target)
    _, test = _split(args)
    from .data import check_labels

    check_labels(test.y, gen.num_classes, test.name)
    from . import distributed

    explain = distributed.explain_sharded if distributed.is_active() else explain_batched
    pathway, _, _ = explain(gen, test.x, args.batch_size_eval)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "pathways.pt")
    if distributed.is_main():
        save_pathways(out, test.x, test.y, pathway, gen.unit_names)
    _log(args, f"{len(test)} pathways (density {pathway.density():.3f}) -> {out}")


def cmd_evaluate(args) -> None:
    from .explain import EVALUATION_HOOKS, evaluate_gencnp, recompute_metrics, run_evaluation_hooks, write_outputs

    target = _load_target(args)
    if args.pathways:
        m = recompute_metrics(args.pathways, target)
        print(json.dumps(m, indent=2))
        return
    if not args.generator or not args.out:
        raise ValueError("evaluate needs --generator and --out (or --pathways to recompute a pathways file)")
    gen = _load_generator(args, target)
    train, test = _split(args)
    from . import distributed

    evaluate = distributed.evaluate_sharded if distributed.is_active() else evaluate_gencnp
    res = evaluate(target, gen, test, args.batch_size_eval, timing=not args.no_timing)
    if not distributed.is_main():
        return
    hooks = [] if args.no_suite else [suite_hook(args.out, train, quick=False, quiet=args.quiet)]
    run_evaluation_hooks(res, hooks=hooks + list(EVALUATION_HOOKS))
    write_outputs(args.out, res)
    _log(args, _summary(res.metrics))
    _log(args, f"-> {os.path.join(args.out, 'metrics.json')}, {os.path.join(args.out, 'pathways.pt')}")


def suite_hook(out_dir: str, train, quick: bool, quiet: bool, max_train: int = 2000):
    """The evaluation suite (baselines, transfer, figures, report.html) as an evaluation hook for ``res``.

    Class pathways are built from GEN-CNP's pathways of (at most ``max_train``) training images; GEN-CNP's explainer
    is timed beside the baselines, in the same run and batch size.
    """
    from .evaluation.suite import SuiteConfig, run_suite

    def hook(res) -> None:
        gen = res.generator
        tr = train.limit(max_train) if train is not None and len(train) > max_train else train
        gen.eval()
        with torch.no_grad():  # soft scores give GEN-CNP's curve in the mDC-vs-density figure
            parts = [gen(xb, mode="hard").scores for xb in res.data.x.split(256)]
        scores = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        suite = run_suite(
            res.target, res.data.x, res.data.y, res.pathway, out_dir,
            train_x=None if tr is None else tr.x, train_y=None if tr is None else tr.y,
            gencnp_explain_ms=res.metrics["gencnp"].get("explain_ms_per_image"), config=SuiteConfig(quick=quick),
            gencnp_scores=scores, pathway_fn=lambda _m, x: gen.explain(x), log=None if quiet else print,
        )
        res.metrics["baselines"] = suite["baselines"]
        res.metrics["transfer"] = suite["transfer"]
        res.metrics["suite"] = suite["suite"]

    return hook


def _summary(m: dict) -> str:
    g = m["gencnp"]
    s = (f"target accuracy {m['target']['accuracy']:.4f} | GEN-CNP fidelity {g['fidelity']:.4f}, mDC {g['mDC']:.2f}, "
         f"mIC {g['mIC']:.2f}, density {g['density_mean']:.3f}±{g['density_std']:.3f}, acIOU {g['acIOU']:.3f} "
         f"(inter-class {g['inter_class_iou']:.3f})")
    if "explain_ms_per_image" in g:
        s += (f", explain {g['explain_ms_per_image']:.3f} ms/image = {g['explain_cost_ratio']:.2f}x a dense "
              f"forward")
    return s


def run_demo(out_dir: str, quick: bool = False, quiet: bool = False, seed: int = 0, **over):
    """The embedded default end to end; returns the :class:`~gencnp_fast.explain.ExplainResult`.

    ``over`` overrides :data:`DEMO_CONFIGS` entries and ``limit`` / ``test_limit`` (tests use a tiny run).
    """
    from .data import mnist_split
    from .explain import EVALUATION_HOOKS, evaluate_gencnp, run_evaluation_hooks, write_outputs
    from .models import mnist_resnet, mnist_vgg
    from .target import accuracy, save_target, train_target

    conf = dict(DEMO_CONFIGS["quick" if quick else "full"])
    conf.update({k: v for k, v in over.items() if v is not None})
    args = argparse.Namespace(quiet=quiet, hidden=conf.get("hidden", 64), code_dim=conf.get("code_dim", 64),
                              val_fraction=conf.get("val_fraction", 0.1))
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    train, test = mnist_split(0)
    if conf.get("limit"):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:conf["limit"]])
    if conf.get("test_limit"):
        test = test.limit(conf["test_limit"])
    _log(args, f"[1/3] target {conf['model']} (width {conf['width']}) on {len(train)} MNIST images, "
               f"{conf['target_epochs']} epochs")
    torch.manual_seed(seed)
    factory = {"mnist_vgg": mnist_vgg, "mnist_resnet": mnist_resnet}[conf["model"]]
    target = factory(width=conf["width"])
    for mod in target.modules():  # PyTorch's default init for the small classifier head (trains faster)
        if isinstance(mod, torch.nn.Linear):
            mod.reset_parameters()
    train_target(target, train, conf["target_epochs"], conf["target_lr"], seed=seed, quiet=quiet)
    save_target(target, os.path.join(out_dir, "target_model.pt"))
    _log(args, f"      test accuracy {accuracy(target, test):.4f} ({time.perf_counter() - t_start:.0f}s)")
    _log(args, f"[2/3] GEN-CNP, {conf['epochs']} epochs")
    ns = argparse.Namespace(**{k: conf.get(k) for k in ("epochs", "lambda_sp", "lambda_cls", "tau", "lr",
                                                         "batch_size", "soft_fraction")}, seed=seed)
    cfg = _gen_config(ns)
    gen, _ = _train_generator(args, target, train, out_dir, False, cfg)
    _log(args, f"[3/3] explain and evaluate {len(test)} test images ({time.perf_counter() - t_start:.0f}s)")
    res = evaluate_gencnp(target, gen, test, timing=conf.get("timing", True))
    res.metrics["demo"] = {"config": "quick" if quick else "full", **{k: v for k, v in conf.items()},
                           "seed": seed}
    if conf.get("suite", True):
        _log(args, f"[4/4] baselines, transfer, report ({time.perf_counter() - t_start:.0f}s)")
        run_evaluation_hooks(res, hooks=[suite_hook(out_dir, train, quick, quiet)] + list(EVALUATION_HOOKS))
    else:
        run_evaluation_hooks(res)
    res.metrics["demo"]["wall_seconds"] = time.perf_counter() - t_start
    write_outputs(out_dir, res)
    _log(args, _summary(res.metrics))
    _log(args, f"wrote {out_dir}/metrics.json, target_model.pt, generator.pt, pathways.pt "
               f"in {time.perf_counter() - t_start:.0f}s")
    return res


def cmd_demo(args) -> None:
    run_demo(args.out, quick=args.quick, quiet=args.quiet, seed=args.seed, epochs=args.epochs,
             target_epochs=args.target_epochs, limit=args.limit, test_limit=args.test_limit, width=args.width,
             model=args.model, timing=False if args.no_timing else None, suite=False if args.no_suite else None)


# Parser ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gencnp", description="GEN-CNP neural-pathway explanations of CNN classifiers")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp):
        sp.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
        sp.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("demo", help="embedded MNIST end to end (target, GEN-CNP, explain, evaluate)")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="smaller run, under 5 minutes on 2 CPU cores")
    d.add_argument("--model", choices=["mnist_vgg", "mnist_resnet"], default=None)
    for hidden in ("--epochs", "--target-epochs", "--limit", "--test-limit", "--width"):
        d.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--no-timing", action="store_true", help=argparse.SUPPRESS)
    d.add_argument("--no-suite", action="store_true", help="skip baselines, transfer and the report")
    common(d)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train-target", help="train a target CNN on your data")
    t.add_argument("--model", required=True, help="built-in name (mnist_vgg, mnist_resnet, ...) or module:factory")
    t.add_argument("--out", required=True, help="file for the whole trained model (torch.save)")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--num-classes", type=int, default=None, help="for built-in models (default: 10)")
    _add_data_args(t)
    common(t)
    t.set_defaults(func=cmd_train_target)

    g = sub.add_parser("train", help="train GEN-CNP for a target model")
    _add_target_args(g)
    _add_data_args(g)
    _add_train_args(g)
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--out", required=True, help="directory for generator.pt (best) and checkpoint.pt (latest)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also write OUT/checkpoint.pt every STEPS steps within an epoch (resumable mid-epoch)")
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    common(g)
    g.set_defaults(func=cmd_train)

    for name, fn, hlp in (("explain", cmd_explain, "write pathways.pt for the test data"),
                          ("evaluate", cmd_evaluate, "metrics.json (and pathways.pt) for the test data")):
        e = sub.add_parser(name, help=hlp)
        _add_target_args(e)
        _add_data_args(e, required=False)
        e.add_argument("--generator", required=(name == "explain"), default=None, help="generator.pt")
        e.add_argument("--out", required=(name == "explain"), default=None, help="output directory")
        e.add_argument("--batch-size-eval", type=int, default=256)
        if name == "evaluate":
            e.add_argument("--pathways", default=None, help="recompute the metrics of this pathways.pt instead")
            e.add_argument("--no-timing", action="store_true", help="skip the explain-cost timing")
            e.add_argument("--no-suite", action="store_true", help="skip baselines, transfer and the report")
        common(e)
        e.set_defaults(func=fn)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .model.units import UnsupportedModelError

    from . import distributed
    from .runtime import maybe_tune_allocator

    maybe_tune_allocator()
    if distributed.env_from_torchrun().distributed and args.command not in ("train", "evaluate", "explain"):
        print(f"gencnp {args.command}: error: only train, evaluate and explain run under torchrun "
              f"(WORLD_SIZE > 1); run {args.command} as one process", file=sys.stderr)
        raise SystemExit(2)
    try:
        with distributed.maybe_distributed():
            args.func(args)
    except (ValueError, FileNotFoundError, TypeError, UnsupportedModelError) as exc:
        print(f"gencnp {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
