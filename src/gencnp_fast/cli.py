"""The ``gencnp`` command line (also ``python -m gencnp_fast``).

    gencnp demo [--out DIR] [--quick]          embedded MNIST end to end: target, GEN-CNP, explain, evaluate
    gencnp train-target --model SPEC --data D --out target_model.pt
    gencnp train --target target_model.pt --data D --out DIR [--resume]
    gencnp explain --target target_model.pt --generator DIR/generator.pt --data D --out DIR
    gencnp evaluate --target target_model.pt --generator DIR/generator.pt --data D --out DIR
    gencnp evaluate --target target_model.pt --pathways DIR/pathways.pt      (recompute with the reference forward)

Data ``D``: ``mnist`` (embedded 5,000 images), an ImageFolder directory (read lazily, batch by batch, in
``--workers`` processes) or an ``.npz`` (``x``, ``y``; memory-mapped when stored uncompressed). Without
``--test-data`` the data are split deterministically (``--test-fraction``, ``--split-seed``; ``mnist``: the fixed
4,000 / 1,000 split): ``train-target`` and ``train`` use the training part, ``explain`` and ``evaluate`` the test
part. ``--test-data`` alone explains / evaluates every image of it. ``train`` holds out ``--val-fraction`` of its
training part for validation. ``--transform imagenet`` (or ``--image-size`` / ``--mean`` / ``--std``) sets the
preprocessing; ``train`` stores it with the generator and ``explain`` / ``evaluate`` reuse it.

``--device {auto,cpu,cuda,cuda:N}`` and ``--precision {fp32,bf16,fp16}`` (GPU) choose where and how the models run
(:mod:`gencnp_fast.placement`); ``--model module:factory --model-kwargs JSON`` builds a model, e.g. a torchvision
architecture, for a ``state_dict`` weights file.

Target files are the safe format of :mod:`gencnp_fast.target` (a model spec and a state dict, read with
``weights_only=True``); a plain state dict needs ``--model``; a whole-module pickle loads only with
``--trust-pickle`` (only for files you made). Every bad input is a one-line ``gencnp COMMAND: error: ...`` on stderr
with exit status 2; every file is written to a temporary name and renamed into place (:mod:`gencnp_fast.io`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

if TYPE_CHECKING:  # the data module loads lazily (a CLI call that reads no images does not import it)
    from .data import ImageSet

__all__ = ["main", "build_parser", "run_demo", "DEMO_CONFIGS", "CLIError"]


class CLIError(ValueError):
    """A bad command line or input file: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``gencnp train: error: argument --epochs: ...``), exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())} (see: {self.prog} --help)\n")
        raise SystemExit(2)


def _number(kind, low=None, high=None, low_open=False, high_open=False, what="a number"):
    """An argparse ``type=`` that parses ``kind`` and checks its range (NaN and infinity refused)."""
    def parse(text: str):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if (low is not None and (v <= low if low_open else v < low)) or \
                (high is not None and (v >= high if high_open else v > high)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    parse.__name__ = what  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, 1, what="a positive integer")
SEED = _number(int, 0, 2**32, high_open=True, what="an integer in [0, 2**32)")
POSITIVE_FLOAT = _number(float, 0.0, low_open=True, what="a positive number")
NONNEG_FLOAT = _number(float, 0.0, what="a number >= 0")
OPEN_FRACTION = _number(float, 0.0, 1.0, True, True, what="a fraction strictly between 0 and 1")
FRACTION = _number(float, 0.0, 1.0, what="a fraction in [0, 1]")

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
def _transform(args, stored: Optional[dict] = None):
    """The preprocessing of this command: ``--transform`` / ``--image-size`` / ``--mean`` / ``--std``; options not
    given come from ``stored`` (the generator's), else today's default (``none``: [0, 1], no resize)."""
    from .data import Transform

    given = {k: getattr(args, k, None) for k in ("image_size", "mean", "std")}
    if getattr(args, "transform", None) is None and stored is not None:
        base = Transform.from_dict(stored)
        if all(v is None for v in given.values()):
            return base
        opts = {"kind": base.kind, "image_size": base.image_size, "mean": base.mean, "std": base.std}
        if given["image_size"] is None:  # a crop of the stored size keeps the stored resize
            opts["resize"] = base.resize
        opts.update({k: v for k, v in given.items() if v is not None})
        return Transform.from_options(**opts)
    return Transform.from_options(getattr(args, "transform", None) or "none", **given)


def _split(args, transform=None) -> Tuple[Optional["ImageSet"], "ImageSet"]:
    """``(train, test)``: ``--data`` split (or ``--test-data`` as the test part; ``--test-data`` alone: no training
    part), each an :class:`~gencnp_fast.data.ImageSet` read with ``transform``."""
    from .data import load_data, mnist_split, split_data

    data = getattr(args, "data", None)
    if args.test_data is not None:
        train = load_data(data, transform) if data is not None else None
        test = load_data(args.test_data, transform)
    elif data in (None, "mnist", "mnist5k"):
        train, test = mnist_split(args.split_seed)
        if transform is not None and not transform.is_identity:
            train, test = (d.with_transform(transform) for d in (train, test))
    else:
        train, test = split_data(load_data(data, transform), args.test_fraction, args.split_seed)
    if args.limit and train is not None:
        train = train.limit(args.limit)
    if args.test_limit:
        test = test.limit(args.test_limit)
    return train, test


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, default="mnist" if required else None,
                   help="'mnist' (embedded), an ImageFolder directory (read lazily) or an .npz with x and y "
                        "(memory-mapped when stored uncompressed)" + ("" if required else
                        "; default 'mnist', or none when --test-data is given"))
    p.add_argument("--test-data", default=None,
                   help="separate test data (default: split --data); alone, explain / evaluate every image of it")
    p.add_argument("--test-fraction", type=OPEN_FRACTION, default=0.2)
    p.add_argument("--split-seed", type=SEED, default=0)
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)
    p.add_argument("--test-limit", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)
    p.add_argument("--transform", choices=["none", "imagenet"], default=None,
                   help="preprocessing: 'imagenet' (resize 256, centre crop 224, ImageNet mean/std: for pretrained "
                        "torchvision / timm models) or 'none' (scale to [0, 1], the default). explain / evaluate "
                        "reuse the generator's unless given")
    p.add_argument("--image-size", type=POSITIVE_INT, default=None, metavar="PIXELS",
                   help="crop ('imagenet') or resize ('none') images to PIXELS x PIXELS")
    p.add_argument("--mean", default=None, metavar="M[,M,M]",  # checked by gencnp_fast.data.Transform
                   help="per-channel mean subtracted after scaling to [0, 1]")
    p.add_argument("--std", default=None, metavar="S[,S,S]",
                   help="per-channel standard deviation divided by after --mean")
    p.add_argument("--workers", type=_number(int, 0, what="an integer >= 0"), default=None, metavar="N",
                   help="processes decoding images (default: 0 for in-memory data, else up to 4)")


def _model_kwargs(text: str) -> dict:
    """``--model-kwargs``: a JSON object."""
    try:
        v = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"num_classes\": 4}}': {exc}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"num_classes\": 4}}', got {text!r}")
    return v


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where to run (default auto: the GPU when CUDA is available, else the CPU); under torchrun "
                        "each process uses its local GPU")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="GPU only: the target and the pathway forward in bf16 / fp16, the generator under autocast")


def _placement(args, data=None):
    """The :class:`~gencnp_fast.placement.Placement` of ``--device`` / ``--precision`` / ``--workers``; the
    default worker count is 0 for in-memory data and up to 4 for data read from files."""
    from . import distributed
    from .data import ImageData
    from .placement import resolve_placement

    workers = getattr(args, "workers", None)
    if workers is None:
        workers = 0 if data is None or isinstance(data, ImageData) else max(1, min(4, (os.cpu_count() or 2) - 1))
    return resolve_placement(getattr(args, "device", "cpu"), getattr(args, "precision", "fp32"), workers,
                             distributed.device() if distributed.is_active() else None)


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True,
                   help="target model file (gencnp train-target / save_target; or, with --model, a state_dict)")
    p.add_argument("--model", default=None,
                   help="'module:factory' (or a built-in name) building the model the --target file fits")
    p.add_argument("--model-kwargs", type=_model_kwargs, default=None, metavar="JSON",
                   help="keyword arguments for --model's factory, e.g. '{\"num_classes\": 4}'")
    p.add_argument("--trust-pickle", action="store_true",
                   help="also load a whole-module pickle (torch.save(model)); unpickling runs code from the file: "
                        "only for files you made")


def _load_target(args):
    from .target import load_target

    return load_target(args.target, args.model, trust_pickle=args.trust_pickle, model_kwargs=args.model_kwargs)


def _check_out_dir(path: Optional[str], option: str = "--out") -> None:
    """``path`` can be (or become) an output directory: a one-line error if it is an existing file."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{option} {path} is an existing file; give a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise CLIError(f"{option} {path}: {parent} is a file, not a directory")


def _check_out_file(path: str, option: str = "--out") -> None:
    """``path`` can be written as a file: a one-line error if it is a directory or lies under a file."""
    if os.path.isdir(path):
        raise CLIError(f"{option} {path} is a directory; give a file name (e.g. {os.path.join(path, 'target.pt')})")
    _check_out_dir(os.path.dirname(os.path.abspath(path)), option)


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
    p.add_argument("--epochs", type=POSITIVE_INT, default=None)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None)
    p.add_argument("--tau", type=POSITIVE_FLOAT, default=None, help="KD temperature")
    p.add_argument("--lambda-sp", type=NONNEG_FLOAT, default=None, help="density penalty weight")
    p.add_argument("--lambda-cls", type=NONNEG_FLOAT, default=None, help="class term weight")
    p.add_argument("--soft-fraction", type=FRACTION, default=None, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=POSITIVE_INT, default=None, help="generator hidden size d (default 64)")
    p.add_argument("--code-dim", type=POSITIVE_INT, default=None, help="class code size (default 64)")


def _resume_defaults(args, cfg, out_dir: str):
    """On ``--resume``: the settings not given on the command line come from ``OUT/checkpoint.pt`` (so a plain
    ``--resume`` continues the run as it was); given ones that differ are checked by ``train_gencnp`` (refused
    unless ``--override``). Returns ``(cfg, hidden, code_dim)``."""
    from .generator.train import CONFIG_OPTIONS, read_training_checkpoint

    hidden, code_dim = getattr(args, "hidden", None), getattr(args, "code_dim", None)
    ck = read_training_checkpoint(os.path.join(out_dir, "checkpoint.pt")) if args.resume else None
    if ck is not None:
        saved = ck["config"]
        for field in CONFIG_OPTIONS:
            if getattr(args, field, None) is None and field in saved:
                setattr(cfg, field, saved[field])
        for field in set(saved) - set(CONFIG_OPTIONS) - {"backend"}:  # settings the CLI has no option for
            if hasattr(cfg, field):
                setattr(cfg, field, saved[field])
        hidden = ck["generator"]["config"]["d"] if hidden is None else hidden
        code_dim = ck["generator"]["config"]["code_dim"] if code_dim is None else code_dim
    return cfg, 64 if hidden is None else hidden, 64 if code_dim is None else code_dim


def _train_generator(args, target, train, out_dir: str, resume: bool, cfg, place=None):
    from .data import split_data
    from .generator import GenCNP, seed_everything, train_gencnp
    from .generator.train import check_config

    cfg, hidden, code_dim = _resume_defaults(args, cfg, out_dir) if resume else \
        (cfg, args.hidden or 64, args.code_dim or 64)
    check_config(cfg)
    if len(train) < 2:
        raise CLIError(f"{train.name}: {len(train)} training image(s); GEN-CNP needs at least 2")
    tr, val = split_data(train, args.val_fraction, cfg.seed)
    tr.name, val.name = f"{train.name} (training part)", f"{train.name} (validation part, --val-fraction)"
    if len(val) == 0 or len(tr) < 2:
        raise CLIError(f"--val-fraction {args.val_fraction} of {len(train)} training images leaves {len(tr)} to train "
                       f"and {len(val)} to validate (each class gives round(fraction x its images)); use more "
                       f"images or another --val-fraction")
    seed_everything(cfg.seed)
    gen = GenCNP(target, tr.batch(torch.arange(2)), d=hidden, code_dim=code_dim)
    gen.transform = train.transform.to_dict()
    _log(args, f"GEN-CNP: {sum(p.numel() for p in gen.parameters())} parameters, {len(gen.units)} units "
               f"({sum(u.channels for u in gen.units)} channels); {len(tr)} train / {len(val)} validation images")
    res = train_gencnp(gen, tr, val, cfg, out_dir=out_dir, resume=resume, quiet=args.quiet,
                       log=lambda s: _log(args, "  " + s), checkpoint_every=getattr(args, "checkpoint_every", None),
                       stop_after_steps=getattr(args, "stop_after_steps", None),
                       override=getattr(args, "override", False), place=place)
    return gen, res


# Commands --------------------------------------------------------------------------------------------------------
def cmd_train_target(args) -> None:
    from .data import check_labels
    from .target import accuracy, build_model, check_model_input, save_target, train_target

    _check_out_file(args.out)
    train, test = _split(args, _transform(args))
    place = _placement(args, train)
    torch.manual_seed(args.seed)
    kwargs = dict(args.model_kwargs or {})
    if ":" in args.model:
        model = build_model(args.model, **kwargs)
    else:
        model = build_model(args.model, num_classes=args.num_classes, in_channels=int(train.sample_shape[0]), **kwargs)
    n_cls = check_model_input(model, train.batch(torch.arange(1)), train.name)
    check_labels(train.y, n_cls, train.name)
    check_labels(test.y, n_cls, test.name)
    t0 = time.perf_counter()
    train_target(model, train, args.epochs, args.lr, args.batch_size, args.seed, quiet=args.quiet, place=place)
    acc = accuracy(model, test, place=place)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_target(model.cpu(), args.out)
    _log(args, f"target {args.model}: test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f}s) -> {args.out}")


def cmd_train(args) -> None:
    _check_out_dir(args.out)
    target = _load_target(args)
    train, _ = _split(args, _transform(args))
    _log(args, f"data: {len(train)} training images of {train.name} ({train.transform.describe()})")
    cfg = _gen_config(args)
    gen, res = _train_generator(args, target, train, args.out, args.resume, cfg, _placement(args, train))
    if "stopped_at_step" in res:
        _log(args, f"stopped after step {res['stopped_at_step']} (resume with --resume)")
        return
    b = res["best"]
    if b is None:  # resumed a finished run: nothing was trained
        _log(args, f"nothing left to train in {args.out} (all {cfg.epochs} epochs done)")
        return
    _log(args, f"best epoch {res['best_epoch'] + 1}: val fidelity {b['fidelity']:.4f}, density "
               f"{b['density_mean']:.3f} -> {os.path.join(args.out, 'generator.pt')}")


def _load_generator(args, target):
    from .generator import GenCNP

    return GenCNP.load(args.generator, target)


def _test_set(args, gen):
    """The test set of explain / evaluate, read with the generator's transform unless the options override it."""
    train, test = _split(args, _transform(args, gen.transform))
    _log(args, f"data: {len(test)} test images of {test.name} ({test.transform.describe()})")
    return train, test


def _eval_batch(args, data, place) -> int:
    """``--batch-size-eval``, by default 256, or 64 on the CPU for images larger than 64 x 64 (at 224 x 224 a batch
    of 256 takes about 4 GB on the CPU, and 64 runs as fast)."""
    if args.batch_size_eval is not None:
        return args.batch_size_eval
    _, h, w = data.sample_shape
    return 64 if place.device.type == "cpu" and h * w > 64 * 64 else 256


def _throughput(args, what: str, ex) -> None:
    _log(args, f"{what} {len(ex)} images in {ex.seconds:.1f} s: {ex.images_per_second:.1f} images/s")


def cmd_explain(args) -> None:
    from . import distributed
    from .explain import explain_to_file

    _check_out_dir(args.out)
    target = _load_target(args)
    gen = _load_generator(args, target)
    _, test = _test_set(args, gen)
    place = _placement(args, test)
    out = os.path.join(args.out, "pathways.pt")
    if distributed.is_main():
        os.makedirs(args.out, exist_ok=True)
    ex = explain_to_file(gen, test, out, _eval_batch(args, test, place), place,
                         progress=None if args.quiet else "explain",
                         save_inputs=args.save_inputs)
    _throughput(args, "explained", ex)
    _log(args, f"{len(ex)} pathways (density {ex.packed.density_stats()['density_mean']:.3f}) -> {out}")


def cmd_evaluate(args) -> None:
    from .explain import EVALUATION_HOOKS, evaluate_gencnp, recompute_metrics, run_evaluation_hooks, write_outputs
    from .io import json_ready

    if args.pathways:
        if args.generator:
            raise CLIError("--pathways recomputes the metrics of a pathways file: give it without --generator")
        target = _load_target(args)
        m, undefined = json_ready(recompute_metrics(args.pathways, target, args.batch_size_eval or 256))
        if undefined:
            m["undefined"] = undefined
        print(json.dumps(m, indent=2, allow_nan=False))
        return
    if not args.generator or not args.out:
        raise CLIError("evaluate needs --generator and --out (or --pathways to recompute a pathways file)")
    _check_out_dir(args.out)
    target = _load_target(args)
    gen = _load_generator(args, target)
    train, test = _test_set(args, gen)
    from . import distributed

    place = _placement(args, test)
    res = evaluate_gencnp(target, gen, test, _eval_batch(args, test, place), timing=not args.no_timing, place=place,
                          progress=None if args.quiet else "evaluate", keep_all=args.save_inputs)
    _throughput(args, "explained", res.explained)
    if not distributed.is_main():
        return
    classes = test.classes if test.classes is not None else (train.classes if train is not None else None)
    hooks = [] if args.no_suite else [suite_hook(args.out, train, quick=False, quiet=args.quiet,
                                                 class_names=classes)]
    run_evaluation_hooks(res, hooks=hooks + list(EVALUATION_HOOKS))
    write_outputs(args.out, res)
    _log(args, _summary(res.metrics))
    _log(args, f"-> {os.path.join(args.out, 'metrics.json')}, {os.path.join(args.out, 'pathways.pt')}")


def suite_hook(out_dir: str, train, quick: bool, quiet: bool, max_train: int = 2000, class_names=None):
    """The evaluation suite (baselines, transfer, figures, report.html) as an evaluation hook for ``res``.

    It runs on the report sample (``res.data``) on the generator's device, in float32. Class pathways are built
    from GEN-CNP's pathways of at most ``max_train`` training images (fewer when their inputs would take more than
    :data:`gencnp_fast.explain.REPORT_BYTES`, spread over the set); GEN-CNP's explainer is timed beside the
    baselines, in the same run and batch size.
    """
    from .evaluation.suite import SuiteConfig, run_suite
    from .explain import REPORT_BYTES

    def hook(res) -> None:
        gen = res.generator
        c, h, w = gen.input_shape
        cap = max(1, min(max_train, REPORT_BYTES // (4 * c * h * w)))
        tr = None if train is None else (train.limit(cap) if len(train) > cap else train).materialize()
        dev = next(gen.parameters()).device
        res.target.float()  # a reduced --precision ran the explanation; the suite's baselines run in float32
        x = res.data.x.to(dev)
        gen.eval()
        with torch.no_grad():  # soft scores give GEN-CNP's curve in the mDC-vs-density figure
            parts = [gen(xb, mode="hard").scores for xb in x.split(256)]
        scores = {n: torch.cat([p[n] for p in parts]).cpu() for n in parts[0]}
        suite = run_suite(
            res.target, x, res.data.y, res.pathway, out_dir,
            train_x=None if tr is None else tr.x.to(dev), train_y=None if tr is None else tr.y,
            gencnp_explain_ms=res.metrics["gencnp"].get("explain_ms_per_image"), config=SuiteConfig(quick=quick),
            gencnp_scores=scores, pathway_fn=lambda _m, xb: gen.explain(xb), log=None if quiet else print,
            class_names=class_names, gencnp_timing={k: v for k, v in res.metrics["gencnp"].items()
                                                    if k.startswith(("explain_", "dense_ms"))},
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


def run_demo(out_dir: str, quick: bool = False, quiet: bool = False, seed: int = 0, place=None, **over):
    """The embedded default end to end; returns the :class:`~gencnp_fast.explain.ExplainResult`.

    ``over`` overrides :data:`DEMO_CONFIGS` entries and ``limit`` / ``test_limit`` (tests use a tiny run); ``place``:
    the device and precision (:class:`~gencnp_fast.placement.Placement`; default the CPU).
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
    train_target(target, train, conf["target_epochs"], conf["target_lr"], seed=seed, quiet=quiet, place=place)
    save_target(target, os.path.join(out_dir, "target_model.pt"))
    _log(args, f"      test accuracy {accuracy(target, test, place=place):.4f} "
               f"({time.perf_counter() - t_start:.0f}s)")
    _log(args, f"[2/3] GEN-CNP, {conf['epochs']} epochs")
    ns = argparse.Namespace(**{k: conf.get(k) for k in ("epochs", "lambda_sp", "lambda_cls", "tau", "lr",
                                                         "batch_size", "soft_fraction")}, seed=seed)
    cfg = _gen_config(ns)
    gen, _ = _train_generator(args, target, train, out_dir, False, cfg, place)
    _log(args, f"[3/3] explain and evaluate {len(test)} test images ({time.perf_counter() - t_start:.0f}s)")
    res = evaluate_gencnp(target, gen, test, timing=conf.get("timing", True), place=place)
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
    _check_out_dir(args.out)
    run_demo(args.out, quick=args.quick, quiet=args.quiet, seed=args.seed, place=_placement(args),
             epochs=args.epochs, target_epochs=args.target_epochs, limit=args.limit, test_limit=args.test_limit,
             width=args.width, model=args.model, timing=False if args.no_timing else None,
             suite=False if args.no_suite else None)


# Parser ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gencnp", description="GEN-CNP neural-pathway explanations of CNN classifiers")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp, seed_default=0):
        sp.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
        sp.add_argument("--seed", type=SEED, default=seed_default,
                        help="random seed (default 0" + ("; on --resume the checkpoint's)" if seed_default is None
                                                         else ")"))

    d = sub.add_parser("demo", help="embedded MNIST end to end (target, GEN-CNP, explain, evaluate)")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="smaller run, under 5 minutes on 2 CPU cores")
    d.add_argument("--model", choices=["mnist_vgg", "mnist_resnet"], default=None)
    for hidden in ("--epochs", "--target-epochs", "--limit", "--test-limit", "--width"):
        d.add_argument(hidden, type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)
    d.add_argument("--no-timing", action="store_true", help=argparse.SUPPRESS)
    d.add_argument("--no-suite", action="store_true", help="skip baselines, transfer and the report")
    _add_run_args(d)
    common(d)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train-target", help="train a target CNN on your data")
    t.add_argument("--model", required=True, help="built-in name (mnist_vgg, mnist_resnet, ...) or module:factory")
    t.add_argument("--out", required=True,
                   help="file for the trained model (safe format: model spec + state_dict, written atomically)")
    t.add_argument("--epochs", type=POSITIVE_INT, default=4)
    t.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-3)
    t.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    t.add_argument("--num-classes", type=POSITIVE_INT, default=None, help="for built-in models (default: 10)")
    t.add_argument("--model-kwargs", type=_model_kwargs, default=None, metavar="JSON",
                   help="keyword arguments for the factory, e.g. '{\"num_classes\": 4}'")
    _add_data_args(t)
    _add_run_args(t)
    common(t)
    t.set_defaults(func=cmd_train_target)

    g = sub.add_parser("train", help="train GEN-CNP for a target model")
    _add_target_args(g)
    _add_data_args(g)
    _add_run_args(g)
    _add_train_args(g)
    g.add_argument("--val-fraction", type=OPEN_FRACTION, default=0.1)
    g.add_argument("--out", required=True, help="directory for generator.pt (best) and checkpoint.pt (latest)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (options not given take the checkpoint's values)")
    g.add_argument("--override", action="store_true",
                   help="with --resume: accept options that differ from the checkpoint's (e.g. --batch-size, "
                        "--lr); each change is logged")
    g.add_argument("--checkpoint-every", type=POSITIVE_INT, default=None, metavar="STEPS",
                   help="also write OUT/checkpoint.pt every STEPS steps within an epoch (resumable mid-epoch)")
    g.add_argument("--stop-after-steps", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)
    common(g, seed_default=None)
    g.set_defaults(func=cmd_train)

    for name, fn, hlp in (("explain", cmd_explain, "write pathways.pt for the test data"),
                          ("evaluate", cmd_evaluate, "metrics.json (and pathways.pt) for the test data")):
        e = sub.add_parser(name, help=hlp)
        _add_target_args(e)
        _add_data_args(e, required=False)
        e.add_argument("--generator", required=(name == "explain"), default=None, help="generator.pt")
        e.add_argument("--out", required=(name == "explain"), default=None, help="output directory")
        e.add_argument("--batch-size-eval", type=POSITIVE_INT, default=None,
                       help="images per batch (default 256; 64 on the CPU for images larger than 64 x 64)")
        e.add_argument("--save-inputs", action="store_true",
                       help="write every input to pathways.pt (default: a sample's, at most 64 MB for explain, "
                            "256 MB for evaluate)")
        _add_run_args(e)
        if name == "evaluate":
            e.add_argument("--pathways", default=None, help="recompute the metrics of this pathways.pt instead")
            e.add_argument("--no-timing", action="store_true", help="skip the explain-cost timing")
            e.add_argument("--no-suite", action="store_true", help="skip baselines, transfer and the report")
        common(e)
        e.set_defaults(func=fn)
    return p


# The errors a bad input raises (UnsupportedModelError and CLIError are ValueErrors, FileNotFoundError an OSError):
# one line on stderr, exit status 2. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, TypeError, OSError)


def _error_line(args, exc: BaseException, rank: Optional[int] = None) -> str:
    from .io import one_line

    where = "" if rank is None else f" (rank {rank})"
    return f"gencnp {args.command}: error{where}: {one_line(exc, 2000)}"


def _new_dirs(args) -> List[str]:
    """The output directories this command would create (none exists yet), deepest first."""
    out = getattr(args, "out", None)
    if not out:
        return []
    path = os.path.abspath(os.path.dirname(out) if args.command == "train-target" else out)
    new = []
    while path and not os.path.exists(path) and path != os.path.dirname(path):
        new.append(path)
        path = os.path.dirname(path)
    return new


def _remove_empty(dirs: List[str]) -> None:
    """After a failure: remove the directories of :func:`_new_dirs` that were created and are still empty."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


def _run_ranked(args) -> None:
    """``args.func(args)``; under ``torchrun`` a failure ends this process at once, after one line on stderr (a
    traceback for a bug), and makes every other rank stop too (:func:`gencnp_fast.distributed.abort`), so that no
    rank waits in a collective for one that is gone."""
    from . import distributed

    try:
        args.func(args)
    except BaseException as exc:
        if not distributed.is_active():
            raise
        from .io import one_line

        r = distributed.rank()
        if not isinstance(exc, EXPECTED_ERRORS) or distributed.lost_peer(exc):
            why = distributed.peer_failure()  # another rank failed first and said why
            if why is not None:
                print(f"gencnp {args.command}: error (rank {r}): stopping because another process failed: {why}",
                      file=sys.stderr, flush=True)
                distributed.abort(f"stopped after another process failed: {why}", 1)
            if distributed.lost_peer(exc):
                print(f"gencnp {args.command}: error (rank {r}): lost contact with another process, which failed or "
                      f"was killed (see its error): {one_line(exc)}", file=sys.stderr, flush=True)
                distributed.abort(f"lost contact with another process: {one_line(exc)}", 1)
        if isinstance(exc, EXPECTED_ERRORS):
            print(_error_line(args, exc, r), file=sys.stderr, flush=True)
            distributed.abort(one_line(exc, 1000), 2)
        import traceback

        traceback.print_exc()
        distributed.abort(f"{type(exc).__name__}: {one_line(exc)}", 1)


def main(argv: Optional[List[str]] = None) -> int:
    """The ``gencnp`` command. Returns 0; a bad input exits with status 2 after one line on stderr."""
    args = build_parser().parse_args(argv)
    from . import distributed
    from .runtime import maybe_tune_allocator

    created = _new_dirs(args)
    try:
        if distributed.env_from_torchrun().distributed and args.command not in ("train", "evaluate", "explain"):
            raise CLIError(f"only train, evaluate and explain run under torchrun (WORLD_SIZE > 1); run "
                           f"{args.command} as one process")
        maybe_tune_allocator()
        backend = "gloo" if getattr(args, "device", "auto") == "cpu" else None  # --device cpu under torchrun
        with distributed.maybe_distributed(backend):
            _run_ranked(args)
    except EXPECTED_ERRORS as exc:
        _remove_empty(created)
        print(_error_line(args, exc), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
