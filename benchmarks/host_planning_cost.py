"""Host cost of planning one run on a GPU (gencnp_fast.plan.engine._Sets.prepare), measured on the CPU.

On CUDA tensors every channel set, conv group, kernel problem list and re-compaction index of a forward is
computed on the host before the first launch, then sent to the device in one copy per dtype. That host work is
the same whatever the GPU, so it is timed here on CPU tensors (where runs are host-planned too, without the
device copy). Median of 30 calls after 3 warm-ups, per model, mask sharing and batch, random masks at
density 0.25 (32x32 inputs: the index work does not depend on the map size).

    python benchmarks/host_planning_cost.py [--models vgg16,resnet50] [--batches 1,64,256] [--python]

``--python`` times the Python planner (``_Sets.prepare_python``) instead of the compiled one.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet50,resnet18_cifar")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--python", action="store_true", help="time the Python planner instead of the compiled one")
    args = ap.parse_args()
    if args.python:
        E._plan_indices_op = lambda: None
    for name in args.models.split(","):
        model = getattr(models, name)().eval()
        for batch in [int(b) for b in args.batches.split(",")]:
            cells = [f"{s} {prepare_ms(model, batch, s):6.2f} ms" for s in ("shared", "per_sample")]
            print(f"{name:16s} batch {batch:4d}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
