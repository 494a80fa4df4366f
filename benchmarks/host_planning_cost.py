"""Host cost of planning one run on a GPU (gencnp_fast.plan.engine._Sets.prepare), measured on the CPU.

On CUDA tensors every channel set, conv group, kernel problem list and re-compaction index of a forward is
computed on the host before the first launch, then sent to the device in one copy per dtype. That host work is
the same whatever the GPU, so it is timed here on CPU tensors (where runs are host-planned too, without the
device copy). Median of 30 calls after 3 warm-ups, per model, mask sharing and batch, random masks at
density 0.25 (32x32 inputs: the index work does not depend on the map size).

    python benchmarks/host_planning_cost.py [--models vgg16,resnet50] [--batches 1,64,256] [--python]

``--python`` times the Python planner (``_Sets.prepare_python``) instead of the compiled one. ``--forward`` times
whole CPU forwards instead (VGG-16-BN / ResNet-18 for CIFAR by default, backend "cpu"), host-planned (the default)
against resolved step by step (``engine.HOST_PLANNING = False``), interleaved round by round in this one process:
median times and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.model.pathway import normalize_masks
from gencnp_fast.model.reference import cached_units
from gencnp_fast.plan import engine as E


def prepare_ms(model, batch: int, sharing: str, reps: int = 30) -> float:
    x = torch.randn(batch, 3, 32, 32)
    units = cached_units(model, x)
    per = None if sharing == "shared" else batch
    path = g.Pathway.random(units, 0.25, per, generator=torch.Generator().manual_seed(1))
    masks = normalize_masks(units, path, x)
    plan = E.get_plan(model, x, frozenset(masks))
    times = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        sets = E._Sets(plan, masks, batch, x.device, E.masks_to_host(masks))
        sets.prepare()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def forward_ab(name: str, batch: int, sharing: str, rounds: int = 12) -> str:
    model = models.randomize_bn(getattr(models, name)(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    units = g.pathway_units(model, x)
    path = g.Pathway.random(units, 0.25, None if sharing == "shared" else batch,
                            generator=torch.Generator().manual_seed(1))
    times = {None: [], False: []}
    with torch.no_grad():
        for r in range(rounds + 2):
            for mode in (None, False):
                E.HOST_PLANNING = mode
                t0 = time.perf_counter()
                g.fast_pathway_forward(model, path, x, backend="cpu")
                if r >= 2:
                    times[mode].append(time.perf_counter() - t0)
    E.HOST_PLANNING = None
    planned, direct = statistics.median(times[None]), statistics.median(times[False])
    ratio = statistics.median(d / p for d, p in zip(times[False], times[None]))
    return (f"{name:16s} batch {batch:3d} {sharing:10s}: host-planned {1e3 * planned:7.2f} ms, step by step "
            f"{1e3 * direct:7.2f} ms, step-by-step / planned {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet50,resnet18_cifar")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--python", action="store_true", help="time the Python planner instead of the compiled one")
    ap.add_argument("--forward", action="store_true", help="time whole CPU forwards, planned vs step by step")
    args = ap.parse_args()
    if args.forward:
        from gencnp_fast.runtime import maybe_tune_allocator

        maybe_tune_allocator()
        names = args.models if args.models != ap.get_default("models") else "vgg16_bn_cifar,resnet18_cifar"
        batches = args.batches if args.batches != ap.get_default("batches") else "1,64"
        for name in names.split(","):
            for batch in [int(b) for b in batches.split(",")]:
                for sharing in ("shared", "per_sample"):
                    print(forward_ab(name, batch, sharing), flush=True)
        return
    if args.python:
        E._plan_indices_op = lambda: None
    for name in args.models.split(","):
        model = getattr(models, name)().eval()
        for batch in [int(b) for b in args.batches.split(",")]:
            cells = [f"{s} {prepare_ms(model, batch, s):6.2f} ms" for s in ("shared", "per_sample")]
            print(f"{name:16s} batch {batch:4d}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
