"""Paired A/B of one engine change inside whole pathway forwards of one compiled plan: the change switched off
("old") and on ("new").

    python benchmarks/engine_ab.py pooling vgg16_bn_cifar 32 1 per_sample 400
    python benchmarks/engine_ab.py pooling resnet50 224 8 shared 24
    python benchmarks/engine_ab.py residual resnet50 224 8 shared 20
    python benchmarks/engine_ab.py packed vgg16_bn_cifar 32 1 per_sample 400

Changes:
  pooling   the compiled ``gencnp_fast::max_pool2d`` and the skipped / mean adaptive average pooling (new) against
            the strided-slice maxima and the ``nn.AdaptiveAvgPool2d`` module (old): the plan's pooling steps'
            functions are swapped.
  residual  a shortcut stored for another channel set re-compacted in the conv's epilogue (``residual_take``, new)
            against a ``gather_channels`` copy before the conv (old).
  packed    a one-mask conv's weight gathered to its active channels once the masks recur (``packed_conv``, new)
            against the kernel reading the rows it needs from the whole weight (old). Both arms run hot here
            (back to back); the benchmarks' paired rounds run it after the dense reference, with cold caches.

The two arms alternate round by round in one process (warm-up call, then one timed ``fast_pathway_forward``), so
that the machine's drifts hit both; the result is the median over rounds of old time / new time, with its
quartiles. The plan object and the guard walk are the same in both arms, so nothing recompiles between rounds; the
two arms' outputs are compared once (bit-equal expected).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn as nn

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan import interpreter
from gencnp_fast.plan.cache import get_plan
from gencnp_fast.plan.lowering import StridedMaxPool
from gencnp_fast.plan.steps import ChannelwiseStep
from gencnp_fast.runtime import maybe_tune_allocator

Arms = Dict[str, Callable[[], None]]  # arm name -> switch the engine to it


def pooling_arms(model: nn.Module, plan) -> Arms:
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

    def use(fns):
        def switch():
            for i, fn in fns.items():
                plan.steps[i].fn = fn
        return switch

    return {"old": use(old), "new": use(new)}


def _swap_arms(name: str, old) -> Arms:
    """Arms that set ``interpreter.<name>`` to ``old`` or back to the engine's own function."""
    new = getattr(interpreter, name)
    return {"old": lambda: setattr(interpreter, name, old), "new": lambda: setattr(interpreter, name, new)}


def residual_arms(model: nn.Module, plan) -> Arms:
    return _swap_arms("fused_residual_take", lambda remap: None)


def packed_arms(model: nn.Module, plan) -> Arms:
    return _swap_arms("packed_conv", lambda st, ix, in_ch, out_ch: None)


CHANGES = {"pooling": pooling_arms, "residual": residual_arms, "packed": packed_arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("change", choices=sorted(CHANGES))
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
    arms = CHANGES[args.change](model, plan)
    times: Dict[str, list] = {"old": [], "new": []}
    with torch.no_grad():
        outs = {}
        for arm, switch in arms.items():
            switch()
            outs[arm] = g.fast_pathway_forward(model, path, x)
        equal = torch.equal(outs["old"], outs["new"])
        for _ in range(args.rounds):
            for arm, switch in arms.items():
                switch()
                g.fast_pathway_forward(model, path, x)
                t0 = time.perf_counter()
                g.fast_pathway_forward(model, path, x)
                times[arm].append(time.perf_counter() - t0)
    arms["new"]()
    ratio = sorted(o / n for o, n in zip(times["old"], times["new"]))
    q = len(ratio) // 4
    print(f"{args.change}: {args.model} {args.size} b{args.batch} {args.sharing}: "
          f"old {1e3 * statistics.median(times['old']):.3f} ms, new {1e3 * statistics.median(times['new']):.3f} ms, "
          f"old/new median {statistics.median(ratio):.3f} (quartiles {ratio[q]:.3f}-{ratio[-q - 1]:.3f}), "
          f"{args.rounds} rounds, outputs {'bit-equal' if equal else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
