"""fast_pathway_forward against the reference (the dense masked model), one test body over every backend
(tests/conftest.py: cpu, torch, triton, cuda; skipped with the reason where a backend cannot run here)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan import backends as B
from gencnp_fast.plan import dense_capture, get_plan

from conftest import INTERPRET, HAS_GPU, assert_close_to_fp64, backend_device, rel_err, skip_reason


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


TINY = {  # small enough for the Triton interpreter
    "resnet_basic": lambda: models.ResNet(models.BasicBlock, [1, 1], num_classes=10, width=4, cifar_stem=True),
    "resnet_bottleneck": lambda: models.ResNet(models.Bottleneck, [1, 1], num_classes=6, width=4, cifar_stem=True),
    "vgg": lambda: models.VGG(models.make_vgg_features([4, "M", 8, 8, "M", 8], True), num_classes=5, pool_size=1,
                              hidden=12, feature_channels=8),
}

interpreter_too_slow = "too slow for the Triton interpreter (test_tiny_models_match_reference runs there)"


def make(name, seed=0, device="cpu"):
    torch.manual_seed(seed)
    factory, shape = MODELS[name]
    model = models.randomize_bn(factory(), torch.Generator().manual_seed(seed)).eval()
    return model.to(device), shape


def random_pathway(units, density, batch, sharing, gen, device="cpu"):
    if sharing == "shared":
        return g.Pathway.random(units, density, None, generator=gen, device=device)
    groups = torch.arange(batch) % 2 if sharing == "per_class" else None
    return g.Pathway.random(units, density, batch, groups=groups, generator=gen, device=device)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1, 0.0])
@pytest.mark.parametrize("sharing", ["shared", "per_class", "per_sample"])
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_reference(backend, name, density, sharing, batch):
    if INTERPRET:
        pytest.skip(interpreter_too_slow)
    dev = backend_device(backend)
    model, shape = make(name, device=dev)
    gen = torch.Generator().manual_seed(hash((name, density, sharing, batch)) % 2**31)
    x = torch.randn((batch,) + shape, generator=gen).to(dev)
    path = random_pathway(g.pathway_units(model, x), density, batch, sharing, gen, dev)
    ref = g.reference_pathway_forward(model, path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert out.shape == ref.shape and out.device == x.device
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("sharing,density", [("shared", 0.5), ("per_class", 0.25), ("per_sample", 0.5),
                                             ("per_sample", 1.0), ("per_sample", 0.0)])
def test_tiny_models_match_reference(backend, name, sharing, density):
    dev = backend_device(backend)
    model = models.randomize_bn(TINY[name](), torch.Generator().manual_seed(0)).eval().to(dev)
    gen = torch.Generator().manual_seed(hash((name, sharing, density)) % 2**31)
    x = torch.randn(3, 3, 8, 8, generator=gen).to(dev)
    path = random_pathway(g.pathway_units(model, x), density, 3, sharing, gen, dev)
    ref = g.reference_pathway_forward(model, path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4, rel_err(out, ref)


def test_mixed_empty_full_and_missing_units(backend):
    """Some samples with an empty unit, some with a full one, some units not in the mapping."""
    dev = backend_device(backend)
    model = models.randomize_bn(TINY["resnet_basic"](), torch.Generator().manual_seed(1)).eval().to(dev)
    x = torch.randn(4, 3, 8, 8).to(dev)
    units = g.pathway_units(model, x)
    path = dict(g.Pathway.random(units, 0.4, 4, generator=torch.Generator().manual_seed(1), device=dev))
    path[units[1].name][0] = False  # sample 0: an empty unit
    path[units[2].name][1] = True  # sample 1: a full unit
    del path[units[3].name]  # a unit kept whole
    path[units[4].name] = path[units[4].name].float()  # float masks are accepted
    ref = g.reference_pathway_forward(model, path, x)
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), ref) <= 1e-4


def test_no_mask_equals_dense_model(backend):
    dev = backend_device(backend)
    model = models.randomize_bn(TINY["vgg"](), torch.Generator().manual_seed(2)).eval().to(dev)
    x = torch.randn(3, 3, 8, 8).to(dev)
    with torch.no_grad():
        dense = model(x)
    assert rel_err(g.fast_pathway_forward(model, None, x, backend=backend), dense) <= 1e-4
    assert rel_err(g.fast_pathway_forward(model, {}, x, backend=backend), dense) <= 1e-4


def test_channels_last_and_noncontiguous_inputs(backend):
    dev = backend_device(backend)
    model = models.randomize_bn(TINY["resnet_basic"](), torch.Generator().manual_seed(3)).eval().to(dev)
    base = torch.randn(6, 3, 8, 8).to(dev)
    units = g.pathway_units(model, base)
    path = g.Pathway.random(units, 0.5, 3, generator=torch.Generator().manual_seed(0), device=dev)
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
    with pytest.raises(ValueError, match="float32"):
        g.fast_pathway_forward(model.double(), None, x.double(), backend="cpu")
    with pytest.raises(ValueError, match="runs on cuda"):
        g.fast_pathway_forward(model, None, x, backend="cuda")


def test_auto_without_the_extension_warns_once(vgg, monkeypatch):
    """Without the compiled extension "auto" runs the reference and says so once; a named backend is refused
    with the reason; the reference itself needs nothing compiled."""
    model, x, units = vgg
    monkeypatch.setattr(B, "extension_error", lambda: "gencnp_fast._C could not be imported: (simulated)")
    B._warn_once.cache_clear()
    path = g.Pathway.random(units, 0.5, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="slow dense reference"):
        out = g.fast_pathway_forward(model, path, x)
    assert torch.equal(out, g.reference_pathway_forward(model, path, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.fast_pathway_forward(model, path, x)  # once
    assert g.available_backends("cpu") == ["reference"]
    with pytest.raises(RuntimeError, match="needs the compiled extension .*simulated"):
        g.fast_pathway_forward(model, path, x, backend="cpu")
    B._warn_once.cache_clear()


def test_auto_on_a_dtype_no_kernel_takes_says_so(vgg):
    if skip_reason("torch"):
        pytest.skip(skip_reason("torch"))
    model, x, units = vgg
    B._warn_once.cache_clear()
    path = g.Pathway.random(units, 0.5, 2, generator=torch.Generator().manual_seed(0))
    model64 = make("vgg_bn")[0].double()
    with pytest.warns(RuntimeWarning, match="plain-torch convolutions"):
        out = g.fast_pathway_forward(model64, path, x.double())
    assert rel_err(out, g.reference_pathway_forward(model64, path, x.double())) <= 1e-10
    B._warn_once.cache_clear()


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


def test_view_flatten_and_method_relu(backend):
    torch.manual_seed(0)
    dev = backend_device(backend)
    model = ViewFlatten().eval().to(dev)
    x = torch.randn(3, 2, 4, 4).to(dev)
    units = g.pathway_units(model, x)
    assert [u.name for u in units] == ["relu", "relu_1"]
    path = g.Pathway.random(units, 0.5, 3, generator=torch.Generator().manual_seed(0), device=dev)
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), g.reference_pathway_forward(model, path, x)) <= 1e-4


@pytest.fixture(params=["torch_conv", "compiled_op"])
def full_layer_kernel(request, monkeypatch):
    """Which kernel runs the layers with nothing pruned: torch's dense conv, or (on the CPU, for tiny work) the
    compiled op with every channel listed (interpreter.DENSE_OP_MAX_MACS). Yields a list that counts the layers the
    compiled op ran."""
    from gencnp_fast.plan import interpreter

    monkeypatch.setattr(interpreter, "DENSE_OP_MAX_MACS", 0 if request.param == "torch_conv" else 10 ** 12)
    ran = []
    real = interpreter._dense_on_op

    def spy(st, x, conv):
        taken = real(st, x, conv)
        if taken:
            ran.append(st.name)
        return taken

    monkeypatch.setattr(interpreter, "_dense_on_op", spy)
    yield request.param, ran
    if request.param == "torch_conv":
        assert not ran


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["vgg_bn", "resnet_basic", "resnet_bottleneck", "handwritten"])
def test_full_layers_beside_pruned_ones(backend, name, batch, full_layer_kernel):
    """Every unit kept whole but one: the plan's dense-conv branch (BN folded; torch's conv or the compiled CPU op)
    next to gathered convs."""
    if INTERPRET:
        pytest.skip(interpreter_too_slow)
    dev = backend_device(backend)
    model, shape = make(name, 7, device=dev)
    x = torch.randn((batch,) + shape).to(dev)
    units = g.pathway_units(model, x)
    path = dict(g.Pathway.full(units, batch).to(dev))
    mid = units[len(units) // 2].name
    path[mid] = g.Pathway.random(units, 0.5, batch, device=dev)[mid]
    ref = g.reference_pathway_forward(model, path, x)
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), ref) <= 1e-4
    kernel, ran = full_layer_kernel
    if kernel == "compiled_op" and backend == "cpu":
        assert ran, "no full layer ran on the compiled op"


@pytest.mark.parametrize("density", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("sharing", ["shared", "per_class", "per_sample"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["vgg_bn", "resnet_bottleneck", "resnet_stem", "handwritten"])
def test_logits_from_inputs_kept_per_sample(backend, name, batch, sharing, density, monkeypatch):
    """A linear layer that computes every output from inputs kept per sample or per class runs, on the CPU op, as one
    call with every input listed on the inputs scattered into zero-filled rows (per group, the op would read the
    weight once per group); the logits match the reference and are bit-equal to the per-group calls (a sample's
    logits do not depend on its batch), and the path is taken exactly where its rule says (several input groups
    whose kept columns add up to the weight's width), never on another backend."""
    from gencnp_fast.plan import interpreter

    if INTERPRET:
        pytest.skip(interpreter_too_slow)
    dev = backend_device(backend)
    model, shape = make(name, 3, device=dev)
    x = torch.randn((batch,) + shape, generator=torch.Generator().manual_seed(4)).to(dev)
    units = g.pathway_units(model, x)
    path = random_pathway(units, density, batch, sharing, torch.Generator().manual_seed(5), device=dev)
    taken = []
    real = interpreter._linear_on_union

    def spy(st, xx, in_ch, out_ch, conv):
        y = real(st, xx, in_ch, out_ch, conv)
        if y is not None:
            taken.append((st.name, in_ch.ngroups, xx.shape[1], st.weight.shape[1]))
        return y

    monkeypatch.setattr(interpreter, "_linear_on_union", spy)
    ref = g.reference_pathway_forward(model, path, x)
    got = g.fast_pathway_forward(model, path, x, backend=backend)
    assert rel_err(got, ref) <= 1e-4
    monkeypatch.setattr(interpreter, "_linear_on_union", lambda *args: None)
    assert torch.equal(got, g.fast_pathway_forward(model, path, x, backend=backend)), "not the per-group op's bits"
    expect = backend == "cpu" and batch > 1 and sharing != "shared" and density == 0.5
    assert bool(taken) == expect, taken
    assert all(groups > 1 and groups * k >= c_in for _, groups, k, c_in in taken), taken


@pytest.mark.parametrize("name", list(MODELS))
def test_dense_capture_matches_hooked_capture(name, full_layer_kernel):
    """The plan's dense forward gives every unit's output as the hooked forward does, whichever kernel runs its
    layers."""
    model, shape = make(name, 11)
    x = torch.randn((3,) + shape)
    ref_logits, ref_feats = g.capture_units(model, x)
    logits, feats = dense_capture(model, x)
    kernel, ran = full_layer_kernel
    if kernel == "compiled_op":
        assert ran, "no layer ran on the compiled op"
    assert rel_err(logits, ref_logits) <= 1e-4
    assert list(feats) == list(ref_feats)
    for n in feats:
        assert feats[n].shape == ref_feats[n].shape
        assert rel_err(feats[n], ref_feats[n]) <= 1e-4, n


# ----------------------------------------------------------------------------------------------------------------
# GPU backends on full-size models and in half precision (too large for the interpreter)

gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (too large for the interpreter)")


@gpu_only
@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg16_bn_cifar"])
@pytest.mark.parametrize("sharing,density", [("shared", 0.25), ("per_class", 0.5), ("per_sample", 0.25),
                                             ("per_sample", 0.1), ("per_sample", 1.0)])
def test_full_size_models(backend, name, sharing, density):
    """The benchmark models (64-512 channels, 32x32 down to 2x2 maps: several M and N tiles, every tile family)
    against a float64 reference."""
    dev = backend_device(backend)
    model = models.randomize_bn(getattr(models, name)(), torch.Generator().manual_seed(2)).eval().to(dev)
    batch = 12
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(dev)
    units = g.pathway_units(model, x)
    groups = {"shared": None, "per_class": torch.arange(batch) % 4, "per_sample": None}[sharing]
    path = g.Pathway.random(units, density, None if sharing == "shared" else batch, groups=groups, generator=gen,
                            device=dev)
    with torch.no_grad():
        ref = g.reference_pathway_forward(model.double(), path, x.double())
        model.float()
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert rel_err(out, ref) <= 1e-4, rel_err(out, ref)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sharing", ["shared", "per_sample"])
def test_half_precision_models(backend, dtype, sharing):
    """docs/design.md §6 on a whole model: the fast path's error against a float64 reference is within 2x torch's
    own (the dense masked reference run in the same dtype), plus a few units of rounding."""
    if backend not in ("cuda", "triton"):
        pytest.skip(f"{backend} computes float32 only here")
    dev = backend_device(backend)
    model = models.randomize_bn(models.resnet18_cifar(), torch.Generator().manual_seed(4)).eval().to(dev)
    batch = 8
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(dev).to(dtype)
    units = g.pathway_units(model, x.float())
    path = g.Pathway.random(units, 0.5, None if sharing == "shared" else batch, generator=gen, device=dev)
    with torch.no_grad():
        ref64 = g.reference_pathway_forward(model.double(), path, x.double())
        torch_out = g.reference_pathway_forward(model.to(dtype), path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert out.dtype == dtype
    assert_close_to_fp64(out, torch_out, ref64, f"{backend} {sharing}")


@gpu_only
def test_auto_backend_on_cuda_tensors():
    """backend="auto" on CUDA tensors picks a GPU backend (cuda, else triton) and matches the reference."""
    avail = g.available_backends("cuda")
    assert any(b in avail for b in ("cuda", "triton")), avail
    model = models.randomize_bn(TINY["resnet_basic"](), torch.Generator().manual_seed(6)).eval().cuda()
    x = torch.randn(5, 3, 8, 8).cuda()
    path = g.Pathway.random(g.pathway_units(model, x), 0.5, 5, generator=torch.Generator().manual_seed(6),
                            device="cuda")
    assert B.pick_backend("auto", x) in ("cuda", "triton")
    out = g.fast_pathway_forward(model, path, x)
    assert out.device.type == "cuda"
    assert rel_err(out, g.reference_pathway_forward(model, path, x)) <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# NaN and inf propagate as in the reference (docs/design.md §2): through kept channels, never from pruned ones

def _poison(model, x, where):
    """Put a NaN or inf in the input, or in a weight / BN bias of a kept (channel 0) or pruned (channel 3) output
    channel of the first conv."""
    conv, bn = model.features[0], model.features[1]
    with torch.no_grad():
        if where == "input_nan":
            x[0, 1, 3, 3] = float("nan")
        elif where == "input_inf":
            x[1, 0, 2, 5] = float("inf")
        elif where.startswith("weight"):
            conv.weight[0 if where.endswith("kept") else 3, 1, 1, 1] = float("nan")
        else:
            bn.bias[0 if where.endswith("kept") else 3] = float("inf")
    return x


@pytest.mark.parametrize("where", ["input_nan", "input_inf", "weight_kept", "weight_pruned", "bias_kept",
                                   "bias_pruned"])
@pytest.mark.parametrize("sharing", ["shared", "per_sample"])
def test_nan_and_inf_propagate_as_the_reference(backend, where, sharing):
    dev = backend_device(backend)
    model = models.randomize_bn(TINY["vgg"](), torch.Generator().manual_seed(8)).eval()
    x = _poison(model, torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(9)), where)
    model, x = model.to(dev), x.to(dev)
    units = g.pathway_units(model, x)
    path = dict(g.Pathway.random(units, 0.6, None if sharing == "shared" else 3,
                                 generator=torch.Generator().manual_seed(10), device=dev))
    first = path[units[0].name]
    first[..., 0], first[..., 3] = True, False  # channel 0 kept, channel 3 pruned in every sample
    ref = g.reference_pathway_forward(model, path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    if where.endswith("pruned"):
        assert bool(torch.isfinite(ref).all())  # a pruned channel's NaN / inf does not leak
    else:
        assert not bool(torch.isfinite(ref).all())
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) <= 1e-4
