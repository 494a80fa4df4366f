"""Baselines at matched density (CDRP/DGR, NeuronMCT, Random) and the metrics they are scored with."""

from __future__ import annotations

import pytest
import torch

from gencnp_fast import Pathway, models, pathway_units, reference_pathway_forward
from gencnp_fast.evaluation import baselines as B
from gencnp_fast.evaluation.metrics import flatten_pathway

GENCNP_KEYS = {"fidelity", "mDC", "mIC", "density_mean", "density_std", "density_per_unit", "acIOU",
               "inter_class_iou", "explain_ms_per_image"}


_MODELS = {}


def tiny_model(kind="vgg", seed=0):
    """A small random-weight target (cached: tracing a model once keeps the tests fast)."""
    if (kind, seed) not in _MODELS:
        _MODELS[(kind, seed)] = _build(kind, seed)
    return _MODELS[(kind, seed)]


def _build(kind, seed):
    torch.manual_seed(seed)
    m = models.mnist_vgg(num_classes=4, width=4) if kind == "vgg" else models.mnist_resnet(num_classes=4, width=4)
    models.randomize_bn(m, torch.Generator().manual_seed(seed))
    return m.eval()


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % 4


def reference_pathway(model, x, seed=1):
    units = pathway_units(model, x[:1])
    g = torch.Generator().manual_seed(seed)
    # different density per sample and per unit
    dens = {u.name: 0.2 + 0.5 * i / max(1, len(units) - 1) for i, u in enumerate(units)}
    pw = Pathway.random(units, dens, x.shape[0], generator=g)
    extra = Pathway.random(units, 0.2, x.shape[0], generator=g)
    return {u.name: pw[u.name] | extra[u.name] for u in units}


def test_topk_per_sample_exact_counts_and_order():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    keep = B.topk_per_sample(s, torch.tensor([2, 1]))
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    # ties: exact count still holds
    keep = B.topk_per_sample(torch.ones(3, 10), torch.tensor([0, 4, 10]))
    assert keep.sum(1).tolist() == [0, 4, 10]


def test_split_flat_inverts_flatten():
    pw = {"a": torch.rand(5, 3) > 0.5, "b": torch.rand(5, 7) > 0.5}
    back = B.split_flat(flatten_pathway(pw, ["a", "b"]), {"a": 3, "b": 7})
    assert all(torch.equal(back[k], pw[k]) for k in pw)


def test_random_matches_per_sample_per_unit_counts():
    like = {"a": torch.rand(6, 9) > 0.3, "b": torch.rand(6, 4) > 0.7, "s": torch.rand(11) > 0.5}
    r = B.random_pathways(like, generator=torch.Generator().manual_seed(0))
    for k in like:
        assert r[k].shape == like[k].shape and r[k].dtype == torch.bool
        assert torch.equal(r[k].sum(-1), like[k].sum(-1))
    assert not all(torch.equal(r[k], like[k]) for k in like)


def test_cdrp_gates_start_at_one_and_l1_shrinks():
    m = tiny_model()
    x, _ = data(6)
    g0 = B.cdrp_gates(m, x, steps=0)
    assert all(bool((v == 1).all()) for v in g0.values())
    g = B.cdrp_gates(m, x, steps=5, l1=0.05, batch_size=4)
    units = [u.name for u in pathway_units(m, x[:1])]
    assert list(g) == units
    assert all(v.shape == (6, c) for v, c in zip(g.values(), [u.channels for u in pathway_units(m, x[:1])]))
    assert all(bool((v >= 0).all()) for v in g.values())
    assert float(torch.cat(list(g.values()), 1).mean()) < 1.0
    assert all(p.requires_grad for p in m.parameters())  # flags handed back as they were
    for p in m.parameters():
        p.requires_grad_(False)  # a frozen target (as GEN-CNP freezes it) stays frozen
    B.cdrp_gates(m, x[:2], steps=1)
    assert not any(p.requires_grad for p in m.parameters())
    for p in m.parameters():
        p.requires_grad_(True)


def test_cdrp_and_mct_match_density_per_sample():
    m = tiny_model()
    x, _ = data(10)
    ref = reference_pathway(m, x)
    names = list(ref)
    k = B.per_sample_keep_counts(ref, names)
    d = sum(v.shape[1] for v in ref.values())
    for fn in (lambda: B.cdrp_pathways(m, x, k.double() / d, steps=3),
               lambda: B.neuron_mct_pathways(m, x, k.double() / d)):
        pw = fn()
        assert list(pw) == names
        assert torch.equal(B.per_sample_keep_counts(pw, names), k)


def test_neuron_mct_scores_are_activation_times_gradient():
    m = tiny_model()
    x, _ = data(3)
    scores = B.neuron_mct_scores(m, x)
    unit = list(scores)[1]
    # independent computation with a plain forward hook on that ReLU module
    mod = dict(m.named_modules())[unit]
    store = {}
    h = mod.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    xg = x.clone()
    logits = m(xg)
    h.remove()
    a = store["a"]
    g, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), a)
    expected = (a * g).abs().sum((2, 3))
    torch.testing.assert_close(scores[unit], expected.detach(), rtol=1e-5, atol=1e-6)


def test_neuron_mct_one_global_threshold_across_units():
    scores = {"a": torch.tensor([[5.0, 1.0, 0.2]]), "b": torch.tensor([[3.0, 0.1, 4.0, 0.05]])}
    pw = B._binarise(scores, {"a": 3, "b": 4}, torch.tensor([3]), 0)
    assert pw["a"].tolist() == [[True, False, False]] and pw["b"].tolist() == [[True, False, True, False]]


def test_neuron_mct_on_resnet_with_inplace_residual():
    m = tiny_model("resnet")
    x, _ = data(4)
    s = B.neuron_mct_scores(m, x)
    assert len(s) == len(pathway_units(m, x[:1]))
    assert all(bool(torch.isfinite(v).all()) for v in s.values())


def test_pathway_logits_match_reference():
    m = tiny_model()
    x, _ = data(12)
    ref = reference_pathway(m, x)
    fast = B.pathway_logits(m, ref, x, batch_size=5)
    torch.testing.assert_close(fast, reference_pathway_forward(m, ref, x), rtol=1e-4, atol=1e-4)


def test_evaluate_full_pathway_is_perfect():
    m = tiny_model()
    x, y = data(12)
    units = pathway_units(m, x[:1])
    full = {u.name: torch.ones(12, u.channels, dtype=torch.bool) for u in units}
    r = B.evaluate_pathway(m, x, full, y)
    assert set(r) == GENCNP_KEYS
    assert r["fidelity"] == 1.0 and r["mDC"] == pytest.approx(0.0, abs=1e-4) and r["density_mean"] == 1.0
    assert r["acIOU"] == 1.0


def test_run_baselines_keys_and_matched_density():
    m = tiny_model()
    x, y = data(24)
    ref = reference_pathway(m, x)
    res, art = B.run_baselines(m, x, ref, y, cdrp_max_samples=12, cdrp_steps=3, batch_size=8)
    assert set(res) == {"cdrp", "neuron_mct", "random"}
    ref_d = float(flatten_pathway(ref).double().mean(1).mean())
    for name, r in res.items():
        assert GENCNP_KEYS <= set(r), name
        assert r["explain_ms_per_image"] > 0
        assert 0 <= r["fidelity"] <= 1
    assert res["neuron_mct"]["density_mean"] == pytest.approx(ref_d)
    assert res["random"]["density_mean"] == pytest.approx(ref_d)
    assert res["random"]["density_per_unit"] == pytest.approx({k: float(v.double().mean()) for k, v in ref.items()})
    idx = art["cdrp_index"]
    assert res["cdrp"]["n_samples"] == 12 and idx.numel() == 12 and len(set(y[idx].tolist())) > 1
    sub_d = float(flatten_pathway(ref).double().mean(1)[idx].mean())
    assert res["cdrp"]["density_mean"] == pytest.approx(sub_d)
    assert "reference_mDC" in res["cdrp"]


def test_density_sweep_hits_target_densities():
    m = tiny_model()
    x, _ = data(8)
    names = [u.name for u in pathway_units(m, x[:1])]
    scores = {"neuron_mct": B.neuron_mct_scores(m, x)}
    soft = {u: torch.rand(8, c) for u, c in B.unit_channels(m, x).items()}
    sw = B.density_sweep(m, x, [0.1, 0.5], scores, names, thresholds={"gencnp": soft}, threshold_grid=(0.5,))
    assert set(sw) == {"neuron_mct", "random", "gencnp"}
    assert [round(r["density"], 2) for r in sw["neuron_mct"]] == [0.1, 0.5]
    assert all({"density", "mDC", "mIC", "fidelity"} <= set(r) for rows in sw.values() for r in rows)
