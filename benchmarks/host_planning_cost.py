"""Host cost of a run's index planning (gencnp_fast.plan.indices.plan_run), measured on the CPU.

Every forward plans its channel sets, conv groups, kernel problem lists and re-compaction indices on the host, in
one call into the compiled planner (csrc/run_indices.cpp), before the first kernel launch; on a GPU the result then
goes to the device in one copy per buffer. That host work is the same whatever the device, so it is timed here on
CPU tensors. Median of 30 calls after 3 warm-ups, per model, mask sharing and batch, random masks at density 0.25
(32x32 inputs: the index work does not depend on the map size). ``--share`` also reports the planner's share of a
whole CPU forward (VGG-16-BN / ResNet-18 for CIFAR by default, backend "cpu").

    python benchmarks/host_planning_cost.py [--models vgg16,resnet50] [--batches 1,64,256] [--share]
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
from gencnp_fast.plan import get_plan
from gencnp_fast.plan.indices import masks_to_host, plan_run


def _setup(model, batch: int, sharing: str):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    units = cached_units(model, x)
    path = g.Pathway.random(units, 0.25, None if sharing == "shared" else batch,
                            generator=torch.Generator().manual_seed(1))
    masks = normalize_masks(units, path, x)
    return x, path, masks, get_plan(model, x, frozenset(masks))


def _median_ms(fn, reps: int = 30) -> float:
    times = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        fn()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def planning_ms(model, batch: int, sharing: str) -> float:
    x, _, masks, plan = _setup(model, batch, sharing)
    return _median_ms(lambda: plan_run(plan, masks_to_host(masks), batch, x.device))


def share_of_forward(name: str, batch: int, sharing: str) -> str:
    model = models.randomize_bn(getattr(models, name)(), torch.Generator().manual_seed(0)).eval()
    x, path, masks, plan = _setup(model, batch, sharing)
    with torch.no_grad():
        fwd = _median_ms(lambda: g.fast_pathway_forward(model, path, x, backend="cpu"), reps=12)
    planning = _median_ms(lambda: plan_run(plan, masks_to_host(masks), batch, x.device))
    return (f"{name:16s} batch {batch:3d} {sharing:10s}: forward {fwd:7.2f} ms, index planning {planning:6.3f} ms "
            f"({100 * planning / fwd:.1f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet50,resnet18_cifar")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--share", action="store_true", help="the planner's share of whole CPU forwards")
    args = ap.parse_args()
    if args.share:
        from gencnp_fast.runtime import maybe_tune_allocator

        maybe_tune_allocator()
        names = args.models if args.models != ap.get_default("models") else "vgg16_bn_cifar,resnet18_cifar"
        batches = args.batches if args.batches != ap.get_default("batches") else "1,64"
        for name in names.split(","):
            for batch in [int(b) for b in batches.split(",")]:
                for sharing in ("shared", "per_sample"):
                    print(share_of_forward(name, batch, sharing), flush=True)
        return
    for name in args.models.split(","):
        model = getattr(models, name)().eval()
        for batch in [int(b) for b in args.batches.split(",")]:
            cells = [f"{s} {planning_ms(model, batch, s):6.2f} ms" for s in ("shared", "per_sample")]
            print(f"{name:16s} batch {batch:4d}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
