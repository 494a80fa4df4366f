"""End-to-end pathway forward on CIFAR-sized VGG-16-BN and ResNet-18 (docs/design.md §6).

Side by side in one run: the dense model, the dense masked reference (forward hooks), and the fast path per
backend, for densities {1, 0.5, 0.25, 0.1}, batches {1, 16, 64} and mask sharing {one shared mask, per class
(10 classes), per sample}. The ratio table is printed at the end (see conftest.py). Each benchmark checks the fast
path against the reference once before timing, and times the reference (and at density 1 the dense model) again
between its own rounds: the table's speedups use those paired medians.

    pytest benchmarks/test_bench_models.py --benchmark-only [--save-results NAME]
"""

from __future__ import annotations

import functools

import pytest
import torch

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan import available_backends

MODELS = ["vgg16_bn_cifar", "resnet18_cifar"]
BATCHES = [1, 16, 64]
DENSITIES = [1.0, 0.5, 0.25, 0.1]
SHARING = ["shared", "per_class", "per_sample"]
BACKENDS = [b for b in available_backends("cpu") if b == "cpu"]
ROUNDS = {1: 25, 16: 11, 64: 9}


@functools.lru_cache(maxsize=None)
def target(name: str):
    torch.manual_seed(0)
    model = getattr(models, name)()
    return models.randomize_bn(model, torch.Generator().manual_seed(0)).eval()


@functools.lru_cache(maxsize=None)
def batch_input(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def pathway(name: str, batch: int, sharing: str, density: float) -> g.Pathway:
    model, x = target(name), batch_input(batch)
    units = g.pathway_units(model, x)
    gen = torch.Generator().manual_seed(1)
    if sharing == "shared":
        return g.Pathway.random(units, density, None, generator=gen)
    if sharing == "per_class":
        return g.Pathway.random(units, density, batch, groups=torch.arange(batch) % 10, generator=gen)
    return g.Pathway.random(units, density, batch, generator=gen)


def run(benchmark, fn, batch):
    benchmark.pedantic(fn, rounds=ROUNDS[batch], warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_dense(benchmark, record_result, name, batch):
    model, x = target(name), batch_input(batch)
    benchmark.group = f"{name} b{batch} dense / reference"

    def fn():
        with torch.no_grad():
            return model(x)

    run(benchmark, fn, batch)
    record_result((name, batch), "dense", benchmark)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_reference(benchmark, record_result, name, batch):
    model, x = target(name), batch_input(batch)
    path = pathway(name, batch, "per_sample", 0.25)
    benchmark.group = f"{name} b{batch} dense / reference"

    def fn():
        with torch.no_grad():
            return g.reference_pathway_forward(model, path, x)

    run(benchmark, fn, batch)
    record_result((name, batch), "reference", benchmark)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_fast(benchmark, record_result, paired, baselines, name, batch, sharing, density, backend):
    model, x = target(name), batch_input(batch)
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
                   baselines(model, path, x, dense=density == 1.0), rounds=ROUNDS[batch])
    record_result((name, batch, sharing, density), f"fast:{backend}", benchmark,
                  ideal_flop_ratio=cost["ideal_flop_ratio"], ideal_bytes_ratio=cost["ideal_bytes_ratio"], **extra)
