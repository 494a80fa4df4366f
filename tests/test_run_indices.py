"""The run index planner (csrc/run_indices.cpp through gencnp_fast.plan.indices.plan_run) against the plain-torch
oracle (tests/planner_oracle.py): every channel set, conv group, problem list and re-compaction index, bit for bit,
on models with every kind of step (residual adds fused and not, re-compacted units, flatten, small maps) and masks
with every kind of row (shared, per class, per sample, duplicates, empty, full); and the forward run with either
answer gives the same logits as the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.model.pathway import normalize_masks
from gencnp_fast.model.reference import cached_units

from conftest import GPU_DEVICE, HAS_GPU, rel_err, skip_reason

pytestmark = pytest.mark.skipif(skip_reason("cpu") is not None, reason=f"cpu: {skip_reason('cpu')}")

if skip_reason("cpu") is None:
    from gencnp_fast import _C
    from gencnp_fast.plan import get_plan
    from gencnp_fast.plan.backends import conv_backend
    from gencnp_fast.plan.indices import masks_to_host, plan_run
    from gencnp_fast.plan.interpreter import run_plan
    from planner_oracle import oracle_plan_run


class SmallMaps(nn.Module):
    """Down to 2x2 and 1x1 maps (the small-map path), a residual add between two non-conv values, and a head."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.b0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 12, 3, padding=1)
        self.b2 = nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.b3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b1(self.c1(x)))  # 2x2
        x = torch.relu(self.b2(self.c2(x)) + x)
        x = torch.relu(self.b3(self.c3(x)))  # 1x1
        return self.fc(torch.flatten(x, 1))


class PoolAdd(nn.Module):
    """A masked unit fed by a pooling (re-compacted), an add of two non-conv values, a dense flatten to a head."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.c1 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        a = self.pool(torch.relu(self.c0(x)))
        b = self.act(a)
        c = self.act(self.pool(self.c1(b)) + self.pool(b))
        return self.fc(torch.flatten(c, 1))


MODELS = {
    "resnet_basic": (lambda: models.ResNet(models.BasicBlock, [1, 1], num_classes=10, width=4, cifar_stem=True), 8),
    "resnet_bottleneck": (lambda: models.ResNet(models.Bottleneck, [1, 1], num_classes=6, width=4,
                                                cifar_stem=True), 8),
    "vgg": (lambda: models.VGG(models.make_vgg_features([4, "M", 8, 8, "M", 8], True), num_classes=5, pool_size=1,
                               hidden=12, feature_channels=8), 8),
    "small_maps": (SmallMaps, 4),
    "pool_add": (PoolAdd, 8),
}


def _masks(units, batch, sharing, gen):
    """Masks with every kind of row: per unit one of shared / per class / per sample, with duplicate, empty and
    full rows mixed in; one unit left out (kept whole)."""
    out = {}
    for i, u in enumerate(units[:-1]):
        kind = sharing if sharing != "mixed" else ("shared", "per_class", "per_sample")[i % 3]
        if kind == "shared":
            out[u.name] = torch.rand(u.channels, generator=gen) < 0.5
            continue
        rows = 3 if kind == "per_class" else batch
        m = torch.rand(rows, u.channels, generator=gen) < 0.5
        m = m[torch.arange(batch) % rows]
        if batch > 2 and kind == "per_sample":
            m[0] = False  # an empty row
            m[1] = True  # a full row
        out[u.name] = m
    return out


def _setup(name, batch, sharing, seed=0):
    build, side = MODELS[name]
    torch.manual_seed(seed)
    model = models.randomize_bn(build(), torch.Generator().manual_seed(seed)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, side, side, generator=gen)
    units = g.pathway_units(model, x)
    masks = normalize_masks(cached_units(model, x), _masks(units, batch, sharing, gen), x)
    return model, x, masks, get_plan(model, x, frozenset(masks))


def _same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
    else:
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), what


def assert_same_indices(got, want):
    assert set(got.sets) == set(want.sets)
    for ref, w in want.sets.items():
        s = got.sets[ref]
        assert (s.full, s.channels, s.ngroups) == (w.full, w.channels, w.ngroups), ref
        _same(s.idx, w.idx, ref)
    assert set(got.conv_groups) == set(want.conv_groups)
    for key, w in want.conv_groups.items():
        c = got.conv_groups[key]
        assert (c.ngroups, c.max_group) == (w.ngroups, w.max_group), key
        _same(c.sample_group, w.sample_group, key)
        _same(c.problems, w.problems, key)
    assert set(got.remaps) == set(want.remaps)
    for key, w in want.remaps.items():
        r = got.remaps[key]
        assert (r.kind, r.width) == (w.kind, w.width), key
        for f in ("take", "keep"):
            _same(getattr(r, f), getattr(w, f), (key, f))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sharing", ["shared", "per_class", "per_sample", "mixed"])
@pytest.mark.parametrize("batch", [1, 6])
def test_compiled_planner_matches_oracle(name, sharing, batch):
    model, x, masks, plan = _setup(name, batch, sharing)
    got = plan_run(plan, masks, batch, x.device)
    assert_same_indices(got, oracle_plan_run(plan, masks, batch))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sharing", ["per_class", "mixed"])
def test_forward_with_either_planner(name, sharing):
    """The same kernels reading either planner's indices give the same logits, bit for bit, equal to the
    reference."""
    model, x, masks, plan = _setup(name, 6, sharing, seed=2)
    conv = conv_backend("cpu")
    with torch.no_grad():
        compiled = run_plan(plan, plan_run(plan, masks, 6, x.device), x, conv)
        oracle = run_plan(plan, oracle_plan_run(plan, masks, 6), x, conv)
        ref = g.reference_pathway_forward(model, masks, x)
    assert torch.equal(compiled, oracle)
    assert rel_err(compiled, ref) <= 1e-4


@pytest.mark.parametrize("name,sharing,batch,packs", [("vgg16_bn_cifar", "per_sample", 1, True),
                                                      ("resnet18_cifar", "shared", 3, True),
                                                      ("resnet18_cifar", "per_sample", 3, False)])
def test_recurring_one_mask_runs_use_packed_weights(name, sharing, batch, packs):
    """A run whose masks were seen before gathers each one-mask conv's weight to its active channels once
    (plan.indices.packed_conv) and gives bit-for-bit the first run's logits; fresh masks and per-sample masks of
    several samples keep the whole weight."""
    from gencnp_fast.plan.cache import get_plan

    model = models.randomize_bn(getattr(models, name)(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    units = g.pathway_units(model, x)
    path = g.Pathway.random(units, 0.25, None if sharing == "shared" else batch,
                            generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = g.fast_pathway_forward(model, path, x, backend="cpu")
        plan = get_plan(model, x, frozenset(u.name for u in units))
        assert not plan.last_run[4].packed and not plan.last_run[4].reused
        again = g.fast_pathway_forward(model, path, x, backend="cpu")
        assert plan.last_run[4].reused and bool(plan.last_run[4].packed) == packs
        assert torch.equal(again, first)
        assert torch.equal(g.fast_pathway_forward(model, path, x, backend="cpu"), first)
        other = g.Pathway.random(units, 0.25, None if sharing == "shared" else batch,
                                 generator=torch.Generator().manual_seed(3))
        fresh = g.fast_pathway_forward(model, other, x, backend="cpu")
        assert not plan.last_run[4].packed  # new masks: new indices, nothing packed yet
        assert rel_err(fresh, g.reference_pathway_forward(model, other, x)) <= 1e-4


def test_step_seconds_times_every_step_without_changing_the_result():
    """``run_plan(step_seconds=...)`` (the layer profiler) records one time per step per run and returns the same
    logits as an untimed run."""
    model, x, masks, plan = _setup("resnet_basic", 3, "per_sample", seed=4)
    conv = conv_backend("cpu")
    times = {}
    with torch.no_grad():
        plain = run_plan(plan, plan_run(plan, masks, 3, x.device), x, conv)
        for _ in range(2):
            timed = run_plan(plan, plan_run(plan, masks, 3, x.device), x, conv, step_seconds=times)
    assert torch.equal(plain, timed)
    assert sorted(times) == list(range(len(plan.steps)))
    assert all(len(v) == 2 and min(v) >= 0.0 for v in times.values())


@pytest.mark.parametrize("name", ["resnet_basic", "vgg"])
def test_values_are_dropped_after_their_last_read(name, monkeypatch):
    """A run holds only live values: when a conv step starts, the output of every earlier conv step whose slot no
    step from here on reads (and that no pooling / dropout / flatten step passed on) is gone (weak references),
    while a residual stays alive until the conv that adds it. With ``env_out`` every value is kept for the caller;
    both runs give the same logits."""
    import weakref

    from gencnp_fast.plan import interpreter
    from gencnp_fast.plan.steps import ConvStep, reads

    model, x, masks, plan = _setup(name, 3, "per_sample", seed=5)
    last_read, passed_on = {}, set()
    for i, st in enumerate(plan.steps):
        for slot in reads(st):
            last_read[slot] = i
        if not isinstance(st, ConvStep):
            passed_on.add(st.src)  # its output may be the same tensor or a view of it
    outputs, stale, checked = [], [], []
    real = interpreter._conv_step

    def spy(st, src, env, ix, conv):
        here = plan.steps.index(st)
        for dst, ref in outputs:
            dead = last_read.get(dst, len(plan.steps)) < here and dst not in passed_on
            if dead:
                checked.append(dst)
                if ref() is not None:
                    stale.append((dst, st.name))
        y = real(st, src, env, ix, conv)
        outputs.append((st.dst, weakref.ref(y)))
        return y

    monkeypatch.setattr(interpreter, "_conv_step", spy)
    with torch.no_grad():
        plain = run_plan(plan, plan_run(plan, masks, 3, x.device), x, conv_backend("cpu"))
        assert checked and not stale, stale
        env = {}
        kept = run_plan(plan, plan_run(plan, masks, 3, x.device), x, conv_backend("cpu"), env_out=env)
    assert torch.equal(plain, kept)
    assert {st.dst for st in plan.steps} <= set(env)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("sharing", ["per_sample", "mixed"])
def test_indices_sent_to_the_gpu(sharing):
    """On a GPU the planned indices arrive on the device (one pinned copy per buffer), equal to the host's."""
    model, x, masks, plan = _setup("resnet_basic", 6, sharing, seed=3)
    dev = torch.device(GPU_DEVICE)
    got = plan_run(plan, masks_to_host({k: v.to(dev) for k, v in masks.items()}), 6, dev)
    assert all(s.idx.device.type == "cuda" for s in got.sets.values())
    assert_same_indices(got, oracle_plan_run(plan, masks, 6))


def test_program_and_results_are_named():
    """The planner's request builder and answer are named (no integer codes on the Python side)."""
    prog = _C.RunProgram()
    a = prog.add_unit_set(0)
    b = prog.add_all_set(5)
    f = prog.add_flat_set(a, 4)
    assert (a, b, f, prog.num_sets) == (0, 1, 2, 3)
    assert prog.add_conv_groups(a, b) == 0 and prog.add_remap(b, a) == 0
    m = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.uint8)
    out = _C.plan_run_indices(prog, [m], 3, False)
    s = out.sets[0]
    assert (s.full, s.channels, s.k, s.ngroups, s.rows) == (False, 5, 3, 2, 3)
    assert out.sets[1].full and out.sets[2].k == 12
    assert (out.conv_groups[0].ngroups, out.conv_groups[0].max_group) == (2, 2)
    assert out.remaps[0].kind == _C.RemapKind.ROWS and out.remaps[0].width == 3
    assert list(_C.SetKind.__members__) == ["UNIT", "ALL", "FLAT"]


@pytest.mark.parametrize("bad,match", [
    (lambda p, m: (p.add_unit_set(3), [m]), "reads mask 3"),
    (lambda p, m: (p.add_flat_set(5, 2), [m]), "flatten an earlier set"),
    (lambda p, m: (p.add_all_set(-1), [m]), "channels"),
    (lambda p, m: (p.add_conv_groups(0, 9), [m]), "names set"),
    (lambda p, m: (p.add_unit_set(0), [m.float()]), "uint8"),
    (lambda p, m: (p.add_unit_set(0), [m[:2]]), "rows, batch is 3"),
    # sizes whose products would overflow int32 indices are refused before anything is allocated
    (lambda p, m: (p.add_all_set(2**31), [m]), "2147483648 channels"),
    (lambda p, m: (p.add_flat_set(0, 2**31), [m]), "spatial < 2\\^31"),
    (lambda p, m: (p.add_flat_set(0, 2**30), [m]), "more than int32 indices hold"),
])
def test_bad_programs_are_refused(bad, match):
    prog = _C.RunProgram()
    m = torch.ones(3, 4, dtype=torch.uint8)
    prog.add_unit_set(0)
    _, masks = bad(prog, m)
    with pytest.raises(RuntimeError, match=match):
        _C.plan_run_indices(prog, masks, 3, False)


def test_batch_beyond_int32_is_refused():
    prog = _C.RunProgram()
    prog.add_unit_set(0)
    with pytest.raises(RuntimeError, match="batch must be in"):
        _C.plan_run_indices(prog, [torch.ones(3, 4, dtype=torch.uint8)], 2**31, False)
