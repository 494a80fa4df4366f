"""The engine's caches never answer for a model that changed (src/gencnp_fast/model/guards.py): every change the
guards can see recompiles, a forward hook is refused by name, and gencnp_fast.invalidate covers the rest. Each case
is checked against the reference forward of the changed model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gencnp_fast as g
from gencnp_fast import models

from conftest import rel_err, skip_reason

pytestmark = pytest.mark.skipif(skip_reason("cpu") is not None, reason=f"cpu: {skip_reason('cpu')}")


@pytest.fixture(autouse=True, params=["compiled walk", "python walk"])
def walk(request, monkeypatch):
    """Every case with the compiled guard walk (csrc/fingerprint.cpp) and with the Python one (no extension)."""
    from gencnp_fast.model import guards

    if request.param == "python walk":
        monkeypatch.setattr(guards, "_WALK", None)
    else:
        assert guards._WALK is not None
    return request.param


def test_both_walks_see_the_same_model(walk):
    """The compiled walk reads what the Python walk reads: one (id, type) per module, one (id, version, pointer)
    per tensor, the same hook, training and device answers."""
    from gencnp_fast.model import guards

    model, _, _ = _setup()
    structure, tensors, hooked, training, first = guards._compiled_walk()(model)
    py = guards._python_fingerprint(model, False)
    assert len(structure) == 16 * len(py.structure) and len(tensors) == 24 * len(py.tensors)
    assert (hooked, training, first.device) == (py.hooked, py.training, py.device) == (False, None, torch.device("cpu"))
    model.features[3].train()
    assert guards.fingerprint(model).training is model.features[3]
    handle = model.features[2].register_forward_pre_hook(lambda m, i: None)
    assert guards.fingerprint(model).hooked
    handle.remove()
    assert not guards.fingerprint(model).hooked

def _setup(seed=0):
    torch.manual_seed(seed)
    model = models.randomize_bn(models.VGG(models.make_vgg_features([8, "M", 16, "M", 16], True), num_classes=6,
                                           pool_size=1, hidden=12, feature_channels=16),
                                torch.Generator().manual_seed(seed)).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 1))
    path = g.Pathway.random(g.pathway_units(model, x), 0.5, 3, generator=torch.Generator().manual_seed(seed + 2))
    return model, x, path


def _check(model, path, x):
    fast = g.fast_pathway_forward(model, path, x, backend="cpu")
    assert rel_err(fast, g.reference_pathway_forward(model, path, x)) <= 1e-4
    return fast


def _conv0(model):
    return model.features[0]


def _bn0(model):
    return model.features[1]


CHANGES = [
    lambda m: setattr(_conv0(m).weight, "data", _conv0(m).weight.data * 2),  # .data replaced
    lambda m: _conv0(m).weight.mul_(2),  # in place (under no_grad, as an optimizer step): version counted
    lambda m: setattr(_bn0(m).running_var, "data", _bn0(m).running_var.data * 3),  # a BN buffer's .data replaced
    lambda m: _bn0(m).running_mean.add_(1.0),  # a buffer in place
    lambda m: m.load_state_dict(_setup(seed=5)[0].state_dict()),
    lambda m: setattr(_bn0(m), "bias", nn.Parameter(torch.randn(8))),  # a parameter replaced
]


@pytest.mark.parametrize("change", CHANGES)
def test_visible_changes_recompile(change):
    model, x, path = _setup()
    before = _check(model, path, x)
    with torch.no_grad():
        change(model)
    after = _check(model, path, x)
    assert rel_err(after, before) > 1e-3  # the change mattered, and the fast path follows it


@pytest.mark.parametrize("change", CHANGES)
def test_visible_changes_reach_packed_weights(change):
    """A one-mask run whose masks recur uses weights gathered to its channels (plan.indices.packed_conv), kept with
    the run's indices: a change of the model must reach them too."""
    model, x, _ = _setup()
    path = g.Pathway.random(g.pathway_units(model, x), 0.5, None, generator=torch.Generator().manual_seed(4))
    _check(model, path, x)
    before = _check(model, path, x)  # the masks recur: packed weights
    with torch.no_grad():
        change(model)
    after = _check(model, path, x)
    assert rel_err(after, before) > 1e-3
    _check(model, path, x)


def test_replaced_submodule_recompiles_and_rechecks_masks():
    model, x, path = _setup()
    _check(model, path, x)
    model.features[0] = nn.Conv2d(3, 8, 3, padding=1).eval()  # same shape, new module
    _check(model, path, x)
    model.features[0] = nn.Conv2d(3, 10, 3, padding=1).eval()  # now 10 channels: BN after it must follow
    model.features[1] = models.randomize_bn(nn.BatchNorm2d(10), torch.Generator().manual_seed(3)).eval()
    model.features[4] = nn.Conv2d(10, 16, 3, padding=1).eval()
    with pytest.raises(ValueError, match="shape"):  # the old 8-channel mask no longer fits the unit
        g.fast_pathway_forward(model, path, x, backend="cpu")
    units = g.pathway_units(model, x)
    assert units[0].channels == 10
    _check(model, g.Pathway.random(units, 0.5, 3, generator=torch.Generator().manual_seed(1)), x)


def test_in_place_edits_through_data_need_invalidate():
    """``.data`` bypasses the version counter: the guards cannot see it (documented); invalidate() makes the fast
    path follow."""
    model, x, path = _setup()
    _check(model, path, x)
    with torch.no_grad():
        _conv0(model).weight.data.mul_(2.0)
        _bn0(model).running_var.data.mul_(3.0)
    stale = g.fast_pathway_forward(model, path, x, backend="cpu")
    ref = g.reference_pathway_forward(model, path, x)
    assert rel_err(stale, ref) > 1e-3  # what invalidate() is for
    g.invalidate(model)
    _check(model, path, x)


def test_forward_hooks_are_refused_by_name():
    model, x, path = _setup()
    _check(model, path, x)
    seen = []
    handle = model.features[4].register_forward_hook(lambda m, i, o: seen.append(1))
    with pytest.raises(g.UnsupportedModelError, match=r"forward hook on 'features\.4'"):
        g.fast_pathway_forward(model, path, x, backend="cpu")
    ref = g.fast_pathway_forward(model, path, x, backend="reference")  # the model itself: the hook runs
    assert seen and rel_err(ref, g.reference_pathway_forward(model, path, x)) == 0
    logits, feats = g.plan.dense_capture(model, x)  # falls back to the hooked forward: the hook runs
    assert len(seen) >= 3
    handle.remove()
    _check(model, path, x)
    pre = model.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(g.UnsupportedModelError, match="forward pre-hook on '<model>'"):
        g.fast_pathway_forward(model, path, x, backend="cpu")
    pre.remove()
    glob = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(g.UnsupportedModelError, match="<global>"):
            g.fast_pathway_forward(model, path, x, backend="cpu")
    finally:
        glob.remove()
    _check(model, path, x)


def test_capturing_units_keeps_every_modules_mode():
    """pathway_units runs the model in eval mode and restores each module's own flag: a frozen eval-mode BN inside
    a model in training mode stays in eval mode."""
    model, x, _ = _setup()
    model.train()
    _bn0(model).eval()
    g.pathway_units(model, x[:1] + 0.5)  # a new input shape: traced and shape-propagated again
    assert model.training and not _bn0(model).training and model.features[4].training
    stats = _bn0(model).running_mean.clone()
    g.pathway_units(model, torch.randn(1, 3, 10, 10))
    assert torch.equal(stats, _bn0(model).running_mean)
    from gencnp_fast.target import check_model_input

    check_model_input(model, x)  # the CLI's input check: the same rule
    assert model.training and not _bn0(model).training and model.features[4].training
