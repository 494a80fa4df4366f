"""End-to-end pathway forward on a GPU: the CUDA and Triton backends beside cuDNN dense and the dense masked reference.

The CPU tables' shape (see conftest.py): per case the dense model (cuDNN), the dense masked reference (forward hooks,
cuDNN), and the fast path per GPU backend; speedup over the reference, its fraction of the ideal FLOP ratio and of
the bytes-based bound (``gencnp_fast.pathway_flops``), and the time relative to the dense model.

    32x32 inputs:   VGG-16-BN (models.vgg16_bn_cifar), ResNet-18 (models.resnet18_cifar)
    224x224 inputs: VGG-16 (models.vgg16), ResNet-50 (models.resnet50)
    batch {1, 16, 64, 256}, density {1, 0.5, 0.25, 0.1}, masks {one shared, per class (10 classes), per sample}

    pytest benchmarks/test_bench_gpu.py --benchmark-only [--save-results gpu_h100]

Environment (to cut the matrix): GENCNP_BENCH_MODELS (comma list), GENCNP_BENCH_BATCHES ("1,16"),
GENCNP_BENCH_DENSITIES, GENCNP_BENCH_SHARING, GENCNP_BENCH_DTYPES ("float32,float16"; default float32),
GENCNP_BENCH_BACKENDS ("cuda,triton"). scripts/gpu_check.sh runs the issue's must-reach cases first.

Every fast-path case also times the dense masked reference and the dense model (cuDNN) between its own rounds
(conftest.run_paired): the table's speedup and vs_dense are medians of those per-round ratios.
float32 runs with TF32 off everywhere (cuDNN too): the fast kernels compute in IEEE float32, and the comparison
is like for like. Every timed function ends with torch.cuda.synchronize(). Every fast-path case is checked against
the reference before it is timed. All tests skip where there is no GPU.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan import available_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the GPU benchmarks need CUDA")


def _env_list(name, default, cast=str):
    raw = os.environ.get(name)
    return [cast(v) for v in raw.split(",")] if raw else default


# model name -> input side
SIZES = {"vgg16_bn_cifar": 32, "resnet18_cifar": 32, "vgg16": 224, "resnet50": 224}
MODELS = _env_list("GENCNP_BENCH_MODELS", list(SIZES))
BATCHES = _env_list("GENCNP_BENCH_BATCHES", [1, 16, 64, 256], int)
DENSITIES = _env_list("GENCNP_BENCH_DENSITIES", [1.0, 0.5, 0.25, 0.1], float)
SHARING = _env_list("GENCNP_BENCH_SHARING", ["shared", "per_class", "per_sample"])
DTYPES = _env_list("GENCNP_BENCH_DTYPES", ["float32"])
GPU_BACKENDS = _env_list("GENCNP_BENCH_BACKENDS", ["cuda", "triton"])
ROUNDS = {1: 30, 16: 20, 64: 10, 256: 5}
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def _setup_gpu():
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def sync():
    torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def target(name: str, dtype: str):
    _setup_gpu()
    torch.manual_seed(0)
    model = models.randomize_bn(getattr(models, name)(), torch.Generator().manual_seed(0)).eval()
    return model.to(device="cuda", dtype=getattr(torch, dtype))


@functools.lru_cache(maxsize=None)
def batch_input(name: str, batch: int, dtype: str) -> torch.Tensor:
    s = SIZES[name]
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(batch))
    return x.to(device="cuda", dtype=getattr(torch, dtype))


@functools.lru_cache(maxsize=64)
def pathway(name: str, batch: int, sharing: str, density: float, dtype: str) -> g.Pathway:
    model, x = target(name, dtype), batch_input(name, batch, dtype)
    units = g.pathway_units(model, x)
    gen = torch.Generator().manual_seed(1)
    if sharing == "shared":
        return g.Pathway.random(units, density, None, generator=gen, device="cuda")
    if sharing == "per_class":
        return g.Pathway.random(units, density, batch, groups=torch.arange(batch) % 10, generator=gen, device="cuda")
    return g.Pathway.random(units, density, batch, generator=gen, device="cuda")


def case_model(name: str, dtype: str) -> str:
    """Table key: distinct from the CPU benchmarks' rows of the same model."""
    return f"{name}@cuda" + ("" if dtype == "float32" else f"/{dtype}")


def run(benchmark, fn, batch):
    benchmark.pedantic(fn, rounds=ROUNDS.get(batch, 5), warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_gpu_dense(benchmark, record_result, name, batch, dtype):
    model, x = target(name, dtype), batch_input(name, batch, dtype)
    benchmark.group = f"cuda {name} b{batch} {dtype} dense / reference"

    def fn():
        with torch.no_grad():
            y = model(x)
        sync()
        return y

    run(benchmark, fn, batch)
    record_result((case_model(name, dtype), batch), "dense", benchmark)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_gpu_reference(benchmark, record_result, name, batch, dtype):
    model, x = target(name, dtype), batch_input(name, batch, dtype)
    path = pathway(name, batch, "per_sample", 0.25, dtype)
    benchmark.group = f"cuda {name} b{batch} {dtype} dense / reference"

    def fn():
        with torch.no_grad():
            y = g.reference_pathway_forward(model, path, x)
        sync()
        return y

    run(benchmark, fn, batch)
    record_result((case_model(name, dtype), batch), "reference", benchmark)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_gpu_fast(benchmark, record_result, paired, baselines, name, batch, sharing, density, dtype, backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here (built without CUDA kernels / no triton)")
    model, x = target(name, dtype), batch_input(name, batch, dtype)
    path = pathway(name, batch, sharing, density, dtype)
    with torch.no_grad():
        ref = g.reference_pathway_forward(model, path, x).double()
    out = g.fast_pathway_forward(model, path, x, backend=backend)  # also compiles / autotunes the kernels
    sync()
    err = float((out.double() - ref).norm() / ref.norm().clamp(min=1e-12))
    assert err <= TOL[dtype], f"{backend} differs from the reference: {err:.3g}"
    cost = g.pathway_flops(model, path, x)
    benchmark.group = f"cuda {name} b{batch} {sharing} d{density} {dtype}"

    def fn():
        y = g.fast_pathway_forward(model, path, x, backend=backend)
        sync()
        return y

    extra = paired(benchmark, fn, baselines(model, path, x), rounds=ROUNDS.get(batch, 5), warmup_rounds=2,
                   sync=sync)
    record_result((case_model(name, dtype), batch, sharing, density), f"fast:{backend}", benchmark,
                  ideal_flop_ratio=cost["ideal_flop_ratio"], ideal_bytes_ratio=cost["ideal_bytes_ratio"], **extra)
