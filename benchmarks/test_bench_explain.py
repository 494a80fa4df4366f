"""What an explanation costs: GEN-CNP against the baselines, per image, side by side in one run (issue: evaluation).

For the demo's targets (``mnist_vgg``, ``mnist_resnet``; 1×28×28 inputs, batch 128 as in ``gencnp demo``):

- ``dense``: the target's forward, the unit of cost;
- ``dense_fwd_bwd``: forward + backward to the input with the weights frozen, the work of one CDRP step;
- ``gencnp``: ``GenCNP.explain`` (dense feature capture through the compiled plan, then the generator);
- ``neuron_mct``: NeuronMCT's binary pathways (one forward + backward, scores, thresholding);
- ``cdrp``: CDRP's binary pathways (30 SGD steps on the gates, the issue's default).

Weights are random (timing does not depend on them; the generator is untrained but has the trained one's shape).
The table at the end gives GEN-CNP's speedup over each baseline and every cost in dense forwards.

    pytest benchmarks/test_bench_explain.py --benchmark-only [--save-results NAME]
"""

from __future__ import annotations

import functools

import pytest
import torch

from gencnp_fast import models
from gencnp_fast.evaluation.baselines import cdrp_pathways, neuron_mct_pathways
from gencnp_fast.generator import GenCNP

MODELS = ["mnist_vgg", "mnist_resnet"]
BATCH = 128
DENSITY = 0.2  # matched density of the baselines (the demo's GEN-CNP pathways are about this dense)
ROUNDS = {"dense": 15, "dense_fwd_bwd": 11, "gencnp": 15, "neuron_mct": 11, "cdrp": 3}


@functools.lru_cache(maxsize=None)
def target(name: str):
    torch.manual_seed(0)
    model = models.randomize_bn(getattr(models, name)(), torch.Generator().manual_seed(0)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def batch_input() -> torch.Tensor:
    return torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _fwd_bwd(model, x):
    xi = x.detach().requires_grad_(True)
    with torch.enable_grad():
        model(xi).sum().backward()
    return xi.grad


@pytest.mark.parametrize("method", list(ROUNDS))
@pytest.mark.parametrize("name", MODELS)
def test_explain_cost(benchmark, record_explainer, name, method):
    model, x = target(name), batch_input()
    if method == "dense":
        def fn():
            with torch.no_grad():
                return model(x)
    elif method == "dense_fwd_bwd":
        def fn():
            return _fwd_bwd(model, x)
    elif method == "gencnp":
        gen = GenCNP(model, x[:1]).eval()
        pathway = gen.explain(x)
        assert list(pathway) == gen.unit_names and pathway.batch_size == BATCH

        def fn():
            return gen.explain(x)
    elif method == "neuron_mct":
        def fn():
            return neuron_mct_pathways(model, x, DENSITY, batch_size=BATCH)
    else:
        def fn():
            return cdrp_pathways(model, x, DENSITY, steps=30, batch_size=BATCH)
    benchmark.pedantic(fn, rounds=ROUNDS[method], warmup_rounds=1, iterations=1)
    record_explainer(name, BATCH, method, benchmark)
