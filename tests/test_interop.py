"""PathwayGrad through Quantus (explain_func) and Captum (PathwayAttribution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gencnp_fast import models, pathway_units
from gencnp_fast.evaluation.interop import PathwayAttribution, explain_func
from gencnp_fast.evaluation.saliency import grad_cam, pathway_grad


def tiny_model():
    torch.manual_seed(0)
    m = models.mnist_vgg(num_classes=4, width=4)
    models.randomize_bn(m, torch.Generator().manual_seed(0))
    return m.eval()


MODEL = tiny_model()
X = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
Y = torch.arange(6) % 4
UNITS = pathway_units(MODEL, X[:1])


def half_pathway(model, x):
    """A deterministic per-batch pathway: the first half of every unit's channels."""
    return {u.name: (torch.arange(u.channels) < (u.channels + 1) // 2).expand(x.shape[0], -1) for u in UNITS}


def test_pathway_grad_is_the_gradient_of_the_masked_model():
    pw = half_pathway(MODEL, X)
    g = pathway_grad(MODEL, X, pw, Y)
    assert g.shape == X.shape
    from gencnp_fast import reference_pathway_forward

    xg = X.clone().requires_grad_(True)
    out = reference_pathway_forward(MODEL, pw, xg)
    expected, = torch.autograd.grad(out.gather(1, Y[:, None]).sum(), xg)
    torch.testing.assert_close(g, expected)
    # no mask: the plain input gradient
    assert not torch.allclose(pathway_grad(MODEL, X, None, Y), g)


def test_grad_cam_shape_and_range():
    cam = grad_cam(MODEL, X)
    assert cam.shape == (6, 28, 28) and float(cam.min()) >= 0 and float(cam.max()) <= 1 + 1e-6
    cam_p = grad_cam(MODEL, X, mask=half_pathway(MODEL, X))
    assert cam_p.shape == cam.shape


def test_saliency_works_on_a_frozen_target():
    m = tiny_model()
    for p in m.parameters():
        p.requires_grad_(False)
    from gencnp_fast.evaluation.baselines import neuron_mct_scores

    assert grad_cam(m, X).shape == (6, 28, 28)
    assert pathway_grad(m, X, half_pathway(m, X)).shape == X.shape
    assert all(bool(torch.isfinite(v).all()) for v in neuron_mct_scores(m, X).values())


def test_explain_func_numpy_in_numpy_out():
    a = explain_func(MODEL, X.numpy(), Y.numpy(), pathway_fn=half_pathway)
    assert isinstance(a, np.ndarray) and a.shape == tuple(X.shape) and a.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(a), pathway_grad(MODEL, X, half_pathway(MODEL, X), Y))
    # a fixed pathway, reduced channels, absolute values, NeuronMCT default
    fixed = half_pathway(MODEL, X)
    b = explain_func(MODEL, X, Y, pathway=fixed, absolute=True, reduce_channels=True)
    assert b.shape == (6, 1, 28, 28) and (b >= 0).all()
    c = explain_func(model=MODEL, inputs=X.numpy(), targets=Y.numpy(), density=0.5)
    assert c.shape == tuple(X.shape)
    with pytest.raises(ValueError, match="rows"):
        explain_func(MODEL, X[:3], Y[:3], pathway=fixed)


def test_pathway_attribution_captum_style():
    attr = PathwayAttribution(MODEL, pathway_fn=half_pathway)
    a = attr.attribute(X, target=Y)
    assert isinstance(a, torch.Tensor) and a.shape == X.shape
    assert attr.attribute(X, target=1).shape == X.shape
    assert attr.attribute((X,), target=Y)[0].shape == X.shape
    assert not attr.has_convergence_delta()


def test_quantus_metrics_accept_explain_func():
    quantus = pytest.importorskip("quantus")
    kw = {"pathway_fn": half_pathway}
    x, y = X.numpy(), Y.numpy()
    sparse = quantus.Sparseness(disable_warnings=True, display_progressbar=False)(
        model=MODEL, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func, explain_func_kwargs=kw,
        device="cpu")
    assert len(sparse) == 6 and np.all(np.isfinite(sparse))
    faith = quantus.FaithfulnessCorrelation(nr_runs=5, subset_size=56, perturb_baseline="black", return_aggregate=False,
                                            disable_warnings=True, display_progressbar=False)(
        model=MODEL, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func, explain_func_kwargs=kw,
        device="cpu")
    assert len(faith) == 6
    sens = quantus.MaxSensitivity(nr_samples=2, disable_warnings=True, display_progressbar=False)(
        model=MODEL, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func, explain_func_kwargs=kw,
        device="cpu")
    assert len(sens) == 6 and np.all(np.isfinite(sens))


def test_captum_metrics_accept_pathway_attribution():
    pytest.importorskip("captum")
    from captum.metrics import infidelity, sensitivity_max

    attr = PathwayAttribution(MODEL, pathway_fn=half_pathway)
    sens = sensitivity_max(attr.attribute, X, target=Y, n_perturb_samples=2)
    assert sens.shape == (6,) and bool(torch.isfinite(sens).all())

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.05
        return noise, inputs - noise

    a = attr.attribute(X, target=Y)
    inf = infidelity(MODEL, perturb, X, a, target=Y, n_perturb_samples=3)
    assert inf.shape == (6,) and bool(torch.isfinite(inf).all())
