"""Paired A/B of a plan's pooling steps: the compiled ``gencnp_fast::max_pool2d`` and the skipped / mean adaptive
average pooling (new) against the strided-slice maxima and the ``nn.AdaptiveAvgPool2d`` module (old), inside whole
pathway forwards of one compiled plan.

The two arms alternate round by round in one process (warm-up call, then one timed ``fast_pathway_forward``), so
that the machine's drifts hit both; the result is the median over rounds of old time / new time, with its
quartiles. The plan object and the guard walk are the same in both arms (only the pooling steps' functions are
swapped), so nothing recompiles between rounds.

    python benchmarks/pooling_ab.py vgg16_bn_cifar 32 1 per_sample 400
    python benchmarks/pooling_ab.py resnet50 224 8 shared 24
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan.cache import get_plan
from gencnp_fast.plan.lowering import StridedMaxPool
from gencnp_fast.plan.steps import ChannelwiseStep
from gencnp_fast.runtime import maybe_tune_allocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("size", type=int)
    ap.add_argument("batch", type=int)
    ap.add_argument("sharing", choices=["shared", "per_sample"])
    ap.add_argument("rounds", type=int)
    args = ap.parse_args()
    maybe_tune_allocator()
    model = models.randomize_bn(getattr(models, args.model)(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    units = g.pathway_units(model, x)
    path = g.Pathway.random(units, 0.25, None if args.sharing == "shared" else args.batch,
                            generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        g.fast_pathway_forward(model, path, x)
    plan = get_plan(model, x, frozenset(u.name for u in units))
    modules = dict(model.named_modules())
    new, old = {}, {}
    for i, st in enumerate(plan.steps):
        if not isinstance(st, ChannelwiseStep):
            continue
        new[i] = st.fn
        if isinstance(st.fn, StridedMaxPool):
            old[i] = st.fn.strided
        elif isinstance(modules.get(st.name), nn.AdaptiveAvgPool2d):
            old[i] = modules[st.name]
        else:
            old[i] = st.fn
    times = {"old": [], "new": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            for arm, fns in (("old", old), ("new", new)):
                for i, fn in fns.items():
                    plan.steps[i].fn = fn
                g.fast_pathway_forward(model, path, x)
                t0 = time.perf_counter()
                g.fast_pathway_forward(model, path, x)
                times[arm].append(time.perf_counter() - t0)
    for i, fn in new.items():
        plan.steps[i].fn = fn
    ratio = sorted(o / n for o, n in zip(times["old"], times["new"]))
    q = len(ratio) // 4
    print(f"{args.model} {args.size} b{args.batch} {args.sharing}: old {1e3 * statistics.median(times['old']):.3f} ms, "
          f"new {1e3 * statistics.median(times['new']):.3f} ms, old/new median {statistics.median(ratio):.3f} "
          f"(quartiles {ratio[q]:.3f}-{ratio[-q - 1]:.3f}), {args.rounds} rounds")


if __name__ == "__main__":
    main()
