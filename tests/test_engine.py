"""fast_pathway_forward against the reference (the dense masked model), on every CPU backend."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan.engine import available_backends, get_plan

BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]
if os.environ.get("CI") == "true":
    # CI builds the extension: its absence is a failure, not a skip.
    assert "cpu" in BACKENDS, "the compiled extension did not load in CI"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def small_resnet_basic():
    return models.ResNet(models.BasicBlock, [1, 2], num_classes=7, width=8, cifar_stem=True)


def small_resnet_bottleneck():
    return models.ResNet(models.Bottleneck, [1, 1, 1], num_classes=7, width=4, cifar_stem=True)


def small_resnet_imagenet_stem():
    return models.ResNet(models.BasicBlock, [1, 1], num_classes=5, width=8)


def small_vgg(bn=True):
    return models.VGG(models.make_vgg_features([8, "M", 16, 16, "M", 24], bn), num_classes=6, pool_size=2,
                      hidden=20, feature_channels=24)


class HandWritten(nn.Module):
    """A hand-written net: functional ReLUs, a module ReLU reused, avg-pool, a residual add, nn.Flatten."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 12, 3, padding=2, dilation=2, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.c3 = nn.Conv2d(12, 10, 5, stride=2, padding=1)
        self.flat = nn.Flatten()
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(10 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(x))
        x = self.act(y + x)
        x = self.pool(x)
        x = torch.relu(self.c3(x))
        x = self.act(self.fc1(self.drop(self.flat(x))))
        return self.fc2(x)


MODELS = {
    "vgg_bn": (small_vgg, (3, 16, 16)),
    "vgg_nobn": (lambda: small_vgg(False), (3, 16, 16)),
    "vgg_odd": (small_vgg, (3, 13, 11)),  # odd sizes through the 2×2 max-pools
    "resnet_basic": (small_resnet_basic, (3, 12, 12)),
    "resnet_bottleneck": (small_resnet_bottleneck, (3, 12, 12)),
    "resnet_stem": (small_resnet_imagenet_stem, (3, 23, 23)),
    "handwritten": (HandWritten, (3, 13, 13)),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    factory, shape = MODELS[name]
    model = models.randomize_bn(factory(), torch.Generator().manual_seed(seed)).eval()
    return model, shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1, 0.0])
@pytest.mark.parametrize("sharing", ["shared", "per_class", "per_sample"])
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_reference(backend, name, density, sharing, batch):
    model, shape = make(name)
    gen = torch.Generator().manual_seed(hash((name, density, sharing, batch)) % 2**31)
    x = torch.randn((batch,) + shape, generator=gen)
    units = g.pathway_units(model, x)
    if sharing == "shared":
        path = g.Pathway.random(units, density, None, generator=gen)
    elif sharing == "per_class":
        path = g.Pathway.random(units, density, batch, groups=torch.arange(batch) % 2, generator=gen)
    else:
        path = g.Pathway.random(units, density, batch, generator=gen)
    ref = g.reference_pathway_forward(model, path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_empty_full_and_missing_units(backend):
    """Some samples with an empty unit, some with a full one, some units not in the mapping."""
    model, shape = make("resnet_basic", 3)
    x = torch.randn((4,) + shape)
    units = g.pathway_units(model, x)
    path = dict(g.Pathway.random(units, 0.4, 4, generator=torch.Generator().manual_seed(1)))
    path[units[1].name][0] = False  # sample 0: an empty unit
    path[units[2].name][1] = True  # sample 1: a full unit
    del path[units[3].name]  # a unit kept whole
    path[units[4].name] = path[units[4].name].float()  # float masks are accepted
    ref = g.reference_pathway_forward(model, path, x)
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), ref) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mask_equals_dense_model(backend):
    model, shape = make("vgg_bn")
    x = torch.randn((3,) + shape)
    with torch.no_grad():
        dense = model(x)
    assert rel_err(g.fast_pathway_forward(model, None, x, backend=backend), dense) <= 1e-4
    assert rel_err(g.fast_pathway_forward(model, {}, x, backend=backend), dense) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_noncontiguous_inputs(backend):
    model, shape = make("resnet_basic")
    base = torch.randn((6,) + shape)
    units = g.pathway_units(model, base)
    path = g.Pathway.random(units, 0.5, 3, generator=torch.Generator().manual_seed(0))
    for x in (base[::2], base[:3].to(memory_format=torch.channels_last), base[:3].transpose(2, 3)):
        ref = g.reference_pathway_forward(model, path, x)
        assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), ref) <= 1e-4


def test_plan_is_rebuilt_when_weights_change():
    model, shape = make("vgg_bn")
    x = torch.randn((2,) + shape)
    units = g.pathway_units(model, x)
    path = g.Pathway.random(units, 0.5, 2, generator=torch.Generator().manual_seed(0))
    before = g.fast_pathway_forward(model, path, x)
    plan = get_plan(model, x, frozenset(path))
    assert get_plan(model, x, frozenset(path)) is plan  # cached
    with torch.no_grad():
        model.features[0].weight.mul_(2.0)
        model.features[1].running_var.mul_(3.0)
    after = g.fast_pathway_forward(model, path, x)
    assert get_plan(model, x, frozenset(path)) is not plan
    assert rel_err(after, g.reference_pathway_forward(model, path, x)) <= 1e-4
    assert rel_err(after, before) > 1e-3
    model.load_state_dict(make("vgg_bn", seed=5)[0].state_dict())
    assert rel_err(g.fast_pathway_forward(model, path, x), g.reference_pathway_forward(model, path, x)) <= 1e-4


def test_unit_names_follow_design():
    model = models.resnet18_cifar()
    names = [u.name for u in g.pathway_units(model, torch.randn(1, 3, 32, 32))]
    assert names[:4] == ["relu", "layer1.0.relu", "layer1.0.relu#1", "layer1.1.relu"]
    assert len(names) == 17
    hand = [u.name for u in g.pathway_units(HandWritten().eval(), torch.randn(1, 3, 13, 13))]
    assert hand == ["relu", "act", "relu_1", "act#1"]
    chans = [u.channels for u in g.pathway_units(HandWritten().eval(), torch.randn(1, 3, 13, 13))]
    assert chans == [12, 12, 10, 16]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors


@pytest.fixture
def vgg():
    model, shape = make("vgg_bn")
    x = torch.randn((2,) + shape)
    return model, x, g.pathway_units(model, x)


def test_error_training_mode(vgg):
    model, x, units = vgg
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        g.fast_pathway_forward(model, None, x)
    with pytest.raises(ValueError, match="training mode"):
        g.reference_pathway_forward(model, None, x)


def test_error_unknown_unit(vgg):
    model, x, units = vgg
    with pytest.raises(ValueError, match="not a unit"):
        g.fast_pathway_forward(model, {"features.99": torch.ones(8, dtype=torch.bool)}, x)


@pytest.mark.parametrize("bad", [lambda c: torch.ones(3, c, dtype=torch.bool), lambda c: torch.ones(c + 1, dtype=torch.bool),
                                 lambda c: torch.ones(2, c, 1, dtype=torch.bool)])
def test_error_mask_shape(vgg, bad):
    model, x, units = vgg
    with pytest.raises(ValueError, match="shape"):
        g.fast_pathway_forward(model, {units[0].name: bad(units[0].channels)}, x)


def test_error_mask_values_and_dtype(vgg):
    model, x, units = vgg
    u = units[0]
    with pytest.raises(ValueError, match="only 0 and 1"):
        g.fast_pathway_forward(model, {u.name: torch.full((u.channels,), 0.5)}, x)
    with pytest.raises(TypeError, match="dtype"):
        g.fast_pathway_forward(model, {u.name: torch.ones(u.channels, dtype=torch.complex64)}, x)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        g.fast_pathway_forward(model, {u.name: [1] * u.channels}, x)


def test_error_input_shape(vgg):
    model, x, units = vgg
    with pytest.raises(ValueError, match="does not fit"):
        g.fast_pathway_forward(model, None, torch.randn(2, 5, 16, 16))


def test_error_unsupported_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(g.UnsupportedModelError, match="GELU"):
        g.fast_pathway_forward(model, None, torch.randn(1, 3, 8, 8), backend="torch")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU()).eval()
    with pytest.raises(g.UnsupportedModelError, match="groups=2"):
        g.fast_pathway_forward(grouped, None, torch.randn(1, 4, 8, 8), backend="torch")


def test_error_backend(vgg):
    model, x, units = vgg
    with pytest.raises(ValueError, match="unknown backend"):
        g.fast_pathway_forward(model, None, x, backend="tpu")
    if "cpu" in BACKENDS:
        with pytest.raises(ValueError, match="float32"):
            g.fast_pathway_forward(model.double(), None, x.double(), backend="cpu")


def test_pathway_container_roundtrip(tmp_path, vgg):
    model, x, units = vgg
    p = g.Pathway.random(units, 0.25, 4, generator=torch.Generator().manual_seed(0))
    assert abs(p.density() - sum(round(0.25 * u.channels) for u in units) / sum(u.channels for u in units)) < 1e-6
    p.save(tmp_path / "p.pt")
    q = g.Pathway.load(tmp_path / "p.pt")
    assert all(torch.equal(p[n], q[n]) for n in p)
    one = p.sample(1)
    assert one.batch_size is None and one[units[0].name].shape == (units[0].channels,)
    assert p.expand(4)[units[0].name].shape == (4, units[0].channels)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        g.Pathway.load(tmp_path / "bad.pt")


def test_pathway_flops_ideal_ratio(vgg):
    model, x, units = vgg
    full = g.pathway_flops(model, None, x)
    assert full["ideal_flop_ratio"] == pytest.approx(1.0)
    quarter = g.pathway_flops(model, g.Pathway.random(units, 0.25, 2), x)
    assert 4.0 < quarter["ideal_flop_ratio"] < 16.0
    assert quarter["ideal_bytes_ratio"] > 1.0


class ViewFlatten(nn.Module):
    """``x.view(x.size(0), -1)``, ``Tensor.relu`` and ``torch.add`` spellings."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = self.c1(x).relu()
        x = torch.add(self.c2(x), x).relu()
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_flatten_and_method_relu(backend):
    torch.manual_seed(0)
    model = ViewFlatten().eval()
    x = torch.randn(3, 2, 4, 4)
    units = g.pathway_units(model, x)
    assert [u.name for u in units] == ["relu", "relu_1"]
    path = g.Pathway.random(units, 0.5, 3, generator=torch.Generator().manual_seed(0))
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), g.reference_pathway_forward(model, path, x)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["vgg_bn", "resnet_basic", "resnet_bottleneck", "handwritten"])
def test_full_layers_beside_pruned_ones(backend, name):
    """Every unit kept whole but one: the plan's dense-conv branch (BN folded) next to gathered convs."""
    model, shape = make(name, 7)
    x = torch.randn((3,) + shape)
    units = g.pathway_units(model, x)
    path = dict(g.Pathway.full(units, 3))
    path[units[len(units) // 2].name] = g.Pathway.random(units, 0.5, 3)[units[len(units) // 2].name]
    ref = g.reference_pathway_forward(model, path, x)
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), ref) <= 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_dense_capture_matches_hooked_capture(name):
    """The plan's dense forward gives every unit's output as the hooked forward does."""
    from gencnp_fast.plan.engine import dense_capture

    model, shape = make(name, 11)
    x = torch.randn((3,) + shape)
    ref_logits, ref_feats = g.capture_units(model, x)
    logits, feats = dense_capture(model, x)
    assert rel_err(logits, ref_logits) <= 1e-4
    assert list(feats) == list(ref_feats)
    for n in feats:
        assert feats[n].shape == ref_feats[n].shape
        assert rel_err(feats[n], ref_feats[n]) <= 1e-4, n
