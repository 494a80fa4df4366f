"""What an explanation costs: GEN-CNP against the baselines, per image, side by side in one run (issue: evaluation).

For the demo's targets (``mnist_vgg``, ``mnist_resnet``; 1×28×28 inputs, batch 128 as in ``gencnp demo``):

- ``dense``: the target's forward, the unit of cost;
- ``dense_fwd_bwd``: forward + backward to the input with the weights frozen, the work of one CDRP step;
- ``gencnp``: ``GenCNP.explain`` (dense feature capture through the compiled plan, then the generator);
- ``neuron_mct``: NeuronMCT's binary pathways (one forward + backward, scores, thresholding);
- ``cdrp``: CDRP's binary pathways (30 SGD steps on the gates, the issue's default).

Weights are random (timing does not depend on them; the generator is untrained but has the trained one's shape).
All methods are timed in interleaved rounds of one benchmark per model (see ``test_explain_cost``).
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
ROUNDS = 7
CDRP_STEPS = 30


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


@pytest.mark.parametrize("name", MODELS)
def test_explain_cost(benchmark, record_explainer, paired, name):
    """GEN-CNP's explain is the benchmarked function; before each of its rounds, pedantic's untimed setup runs and
    times every other method once, so all medians come from interleaved rounds (robust to this machine's drifts)."""
    model, x = target(name), batch_input()
    gen = GenCNP(model, x[:1]).eval()
    pathway = gen.explain(x)
    assert list(pathway) == gen.unit_names and pathway.batch_size == BATCH

    def dense():
        with torch.no_grad():
            return model(x)

    others = {
        "dense": dense,
        "dense_fwd_bwd": lambda: _fwd_bwd(model, x),
        "neuron_mct": lambda: neuron_mct_pathways(model, x, DENSITY, batch_size=BATCH),
        "cdrp": lambda: cdrp_pathways(model, x, DENSITY, steps=CDRP_STEPS, batch_size=BATCH),
    }
    extra = paired(benchmark, lambda: gen.explain(x), others, rounds=ROUNDS)
    record_explainer(name, BATCH, "gencnp", benchmark)
    for k in others:
        record_explainer(name, BATCH, k, extra[f"paired_{k}"])


def _sparse_generator(model, x, density: float = 0.2) -> GenCNP:
    """A GenCNP whose decoder heads keep about ``density`` of each unit's channels (random weights otherwise): the
    pathway forward then skips what a trained generator's would."""
    gen = GenCNP(model, x[:1]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in gen.rpd.heads:
            head.bias.copy_(torch.where(torch.rand(head.out_features, generator=g) < density, 4.0, -4.0))
    return gen


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("name", MODELS)
def test_explain_with_pathway_forward(benchmark, record_explainer, paired, name, batch):
    """One explanation as a user gets it: dense capture + generator + the pathway's fast forward (the explained
    logits), at batch 1 (an image at a time) and batch 256; paired with the target's dense forward each round."""
    from gencnp_fast import fast_pathway_forward

    model = target(name)
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    gen = _sparse_generator(model, x)
    assert 0.1 < gen.explain(x).density() < 0.35

    def explain():
        with torch.no_grad():
            return fast_pathway_forward(model, gen(x, mode="hard").pathway, x)

    def dense():
        with torch.no_grad():
            return model(x)

    extra = paired(benchmark, explain, {"dense": dense}, rounds=101 if batch == 1 else 9)
    record_explainer(name, batch, "gencnp_full", benchmark)
    record_explainer(name, batch, "dense", extra["paired_dense"])
