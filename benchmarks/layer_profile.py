"""Per-step profile of one pathway forward against the dense layer and against the ideal (docs/design.md §6).

For every step of the compiled plan: the fast path's time (median of rounds), and for conv / linear steps the time of
the same layer run densely (``F.conv2d`` with the folded weight on a dense input of the layer's shape, + bias + ReLU),
the layer's ideal FLOP ratio (dense MACs / pathway MACs) and the fraction of it reached (dense time / fast time /
ideal ratio). Non-conv steps (re-compaction, pooling, flatten) are listed with their time alone; index planning and
the Python step loop appear as their own rows.

    python benchmarks/layer_profile.py --model resnet50 --size 224 --batch 8 --density 0.25 --sharing per_sample
    python benchmarks/layer_profile.py --model vgg16 --batch 64 --device cuda --backend triton   # on a GPU

On a GPU every timed region ends with ``torch.cuda.synchronize()`` (steps included) and float32 runs without TF32,
as in ``benchmarks/test_bench_gpu.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.model.pathway import normalize_masks
from gencnp_fast.model.reference import cached_units
from gencnp_fast.plan import get_plan
from gencnp_fast.plan.backends import conv_backend
from gencnp_fast.plan.cost import pathway_flops
from gencnp_fast.plan.indices import masks_to_host, plan_run
from gencnp_fast.plan.interpreter import run_plan
from gencnp_fast.plan.steps import ConvStep


def _nothing() -> None:
    pass


def _dense_layer_ms(st: ConvStep, batch: int, rounds: int, sync=_nothing) -> float:
    x = torch.randn((batch,) + tuple(st.in_shape), device=st.weight.device)
    if st.linear:
        x = x.reshape(batch, -1, 1, 1)
    ts = []
    for r in range(rounds + 1):
        sync()
        t0 = time.perf_counter()
        y = F.conv2d(x, st.weight, st.bias, st.stride, st.padding, st.dilation)
        if st.relu:
            y.relu_()
        sync()
        if r:
            ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--sharing", choices=["shared", "per_class", "per_sample"], default="per_sample")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top", type=int, default=0, help="only the N slowest steps (0: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--backend", default=None, help="conv backend (default: cpu on the CPU, cuda on a GPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    backend = args.backend or ("cpu" if device.type == "cpu" else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else _nothing
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from gencnp_fast.runtime import maybe_tune_allocator

    maybe_tune_allocator()
    model = models.randomize_bn(getattr(models, args.model)(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    model, x = model.to(device), x.to(device)
    units = g.pathway_units(model, x)
    gen = torch.Generator().manual_seed(2)
    groups = torch.arange(args.batch) % 10 if args.sharing == "per_class" else None
    path = g.Pathway.random(units, args.density, None if args.sharing == "shared" else args.batch, groups=groups,
                            generator=gen).to(device)
    masks = normalize_masks(cached_units(model, x), path, x)
    plan = get_plan(model, x, frozenset(masks))
    conv = conv_backend(backend)
    cost = {c["name"]: c for c in pathway_flops(model, path, x)["layers"]}
    times: Dict[int, List[float]] = {}
    plan_ms, total_ms, dense_ms = [], [], []
    with torch.no_grad():
        for r in range(args.rounds + 1):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            t1 = time.perf_counter()
            indices = plan_run(plan, masks_to_host(masks), args.batch, x.device)
            t2 = time.perf_counter()
            run_plan(plan, indices, x, conv, step_seconds=times, sync=None if device.type == "cpu" else sync)
            sync()
            t3 = time.perf_counter()
            if r:
                dense_ms.append(1e3 * (t1 - t0))
                plan_ms.append(1e3 * (t2 - t1))
                total_ms.append(1e3 * (t3 - t1))
            else:
                times.clear()
    rows = []
    for i, st in enumerate(plan.steps):
        ms = 1e3 * statistics.median(times[i])
        if isinstance(st, ConvStep):
            c = cost[st.name]
            ideal = c["dense_macs"] / max(c["pathway_macs"], 1.0)
            dense = _dense_layer_ms(st, args.batch, args.rounds, sync)
            rows.append((ms, f"{st.name:28s} conv {tuple(st.in_shape)}->{st.out_shape[0]:4d} {ms:8.2f} ms  dense "
                             f"{dense:8.2f} ms  ideal x{ideal:5.1f}  frac {dense / ms / ideal:5.2f}"))
        else:
            rows.append((ms, f"{st.name:28s} {type(st).__name__:14s} {ms:8.2f} ms"))
    shown = sorted(rows, reverse=True)[: args.top] if args.top else rows
    for _, line in shown:
        print(line)
    steps_ms = sum(1e3 * statistics.median(v) for v in times.values())
    print(f"index planning {statistics.median(plan_ms):.2f} ms | steps {steps_ms:.1f} ms | whole run "
          f"{statistics.median(total_ms):.1f} ms | dense model {statistics.median(dense_ms):.1f} ms | "
          f"ideal x{pathway_flops(model, path, x)['ideal_flop_ratio']:.2f}")


if __name__ == "__main__":
    main()
