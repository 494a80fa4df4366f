"""End-to-end pathway forward (docs/design.md §6): CIFAR-sized VGG-16-BN and ResNet-18 at 32x32, and the
torchvision-layout VGG-16, ResNet-18 and ResNet-50 at 224x224 (``gencnp_fast.models``, random weights).

Side by side in one run: the dense model, the dense masked reference (forward hooks), and the fast path per
backend. 32x32: densities {1, 0.5, 0.25, 0.1}, batches {1, 16, 64}; 224x224: densities {0.5, 0.25}, batches
{1, 8} (batch 64 at 224x224 takes minutes per case on a 2-core CPU: select it with GENCNP_BENCH_224_BATCHES=1,8,64);
mask sharing {one shared mask, per class (10 classes), per sample}. The ratio table is printed at the end (see
conftest.py). Each benchmark checks the fast path against the reference once before timing, and times the
reference (and at density 1 the dense model) again between its own rounds: the table's speedups use those paired
medians.

    pytest benchmarks/test_bench_models.py --benchmark-only [--save-results NAME]
    pytest benchmarks/test_bench_models.py --benchmark-only -k 224      # the 224x224 cases only
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan import available_backends

SIZE = {"vgg16_bn_cifar": 32, "resnet18_cifar": 32, "vgg16": 224, "resnet18": 224, "resnet50": 224}
SHARING = ["shared", "per_class", "per_sample"]
BACKENDS = [b for b in available_backends("cpu") if b == "cpu"]
ROUNDS = {1: 25, 8: 7, 16: 11, 64: 9}
ROUNDS_224 = {1: 11, 8: 5, 64: 3}
_B224 = [int(b) for b in os.environ.get("GENCNP_BENCH_224_BATCHES", "1,8").split(",")]
CASES = ([(m, b, d) for m in ("vgg16_bn_cifar", "resnet18_cifar") for b in (1, 16, 64) for d in (1.0, 0.5, 0.25, 0.1)]
         + [(m, b, d) for m in ("vgg16", "resnet18", "resnet50") for b in _B224 for d in (0.5, 0.25)])
BASE_CASES = sorted({(m, b) for m, b, _ in CASES}, key=lambda c: (SIZE[c[0]], c[0], c[1]))


def rounds(name: str, batch: int) -> int:
    return (ROUNDS_224 if SIZE[name] == 224 else ROUNDS)[batch]


@functools.lru_cache(maxsize=None)
def target(name: str):
    torch.manual_seed(0)
    model = getattr(models, name)()
    return models.randomize_bn(model, torch.Generator().manual_seed(0)).eval()


@functools.lru_cache(maxsize=2)
def batch_input(batch: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def pathway(name: str, batch: int, sharing: str, density: float) -> g.Pathway:
    model, x = target(name), batch_input(batch, SIZE[name])
    units = g.pathway_units(model, x)
    gen = torch.Generator().manual_seed(1)
    if sharing == "shared":
        return g.Pathway.random(units, density, None, generator=gen)
    if sharing == "per_class":
        return g.Pathway.random(units, density, batch, groups=torch.arange(batch) % 10, generator=gen)
    return g.Pathway.random(units, density, batch, generator=gen)


def run(benchmark, fn, name, batch):
    benchmark.pedantic(fn, rounds=rounds(name, batch), warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("name,batch", BASE_CASES, ids=[f"{m}-{SIZE[m]}-{b}" for m, b in BASE_CASES])
def test_dense(benchmark, record_result, name, batch):
    model, x = target(name), batch_input(batch, SIZE[name])
    benchmark.group = f"{name} b{batch} dense / reference"

    def fn():
        with torch.no_grad():
            return model(x)

    run(benchmark, fn, name, batch)
    record_result((name, batch), "dense", benchmark)


@pytest.mark.parametrize("name,batch", BASE_CASES, ids=[f"{m}-{SIZE[m]}-{b}" for m, b in BASE_CASES])
def test_reference(benchmark, record_result, name, batch):
    model, x = target(name), batch_input(batch, SIZE[name])
    path = pathway(name, batch, "per_sample", 0.25)
    benchmark.group = f"{name} b{batch} dense / reference"

    def fn():
        with torch.no_grad():
            return g.reference_pathway_forward(model, path, x)

    run(benchmark, fn, name, batch)
    record_result((name, batch), "reference", benchmark)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("name,batch,density", CASES, ids=[f"{m}-{SIZE[m]}-{b}-{d}" for m, b, d in CASES])
def test_fast(benchmark, record_result, paired, baselines, name, batch, sharing, density, backend):
    model, x = target(name), batch_input(batch, SIZE[name])
    path = pathway(name, batch, sharing, density)
    with torch.no_grad():
        ref = g.reference_pathway_forward(model, path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4
    cost = g.pathway_flops(model, path, x)
    benchmark.group = f"{name} b{batch} {sharing} d{density}"
    # Paired baselines: before every timed round of the fast path, pedantic's (untimed) setup runs the dense masked
    # reference, and at density 1 the dense model (conftest.run_paired). The ratios then compare rounds taken
    # seconds apart, which this shared machine's minute-scale drifts (±30 %) cannot tilt.
    extra = paired(benchmark, lambda: g.fast_pathway_forward(model, path, x, backend=backend),
                   baselines(model, path, x, dense=density == 1.0), rounds=rounds(name, batch))
    record_result((name, batch, sharing, density), f"fast:{backend}", benchmark,
                  ideal_flop_ratio=cost["ideal_flop_ratio"], ideal_bytes_ratio=cost["ideal_bytes_ratio"], **extra)
