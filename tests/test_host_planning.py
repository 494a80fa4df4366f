"""Host planning of a run (engine._Sets.prepare): every channel set, conv group, kernel problem list and
re-compaction index is computed on the host before the first launch (on a GPU from one copy of the masks, then sent
in one transfer per dtype, so that the forward never synchronises). It is the default on CPU too, through the
compiled planner (``gencnp_fast_host::plan_indices``); ``engine.HOST_PLANNING = False`` gives the lazy step-by-step
path. Both planners (compiled and Python) are checked here against that path, bit for bit (the same kernels read
the same indices), and against the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.model.pathway import normalize_masks
from gencnp_fast.model.reference import cached_units
from gencnp_fast.plan import channel_sets as CS
from gencnp_fast.plan import engine as E
from gencnp_fast.plan.engine import available_backends

BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


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


MODELS = {
    "resnet_basic": (lambda: models.ResNet(models.BasicBlock, [1, 1], num_classes=10, width=4, cifar_stem=True), 8),
    "resnet_bottleneck": (lambda: models.ResNet(models.Bottleneck, [1, 1], num_classes=6, width=4,
                                                cifar_stem=True), 8),
    "vgg": (lambda: models.VGG(models.make_vgg_features([4, "M", 8, 8, "M", 8], True), num_classes=5, pool_size=1,
                               hidden=12, feature_channels=8), 8),
    "small_maps": (SmallMaps, 4),
    "resnet18_cifar": (models.resnet18_cifar, 32),
}


def _setup(name, batch, sharing, density, seed=0):
    build, side = MODELS[name]
    torch.manual_seed(seed)
    model = models.randomize_bn(build(), torch.Generator().manual_seed(seed)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, side, side, generator=gen)
    units = g.pathway_units(model, x)
    groups = torch.arange(batch) % 3 if sharing == "per_class" else None  # 3 classes
    path = g.Pathway.random(units, density, None if sharing == "shared" else batch, groups=groups, generator=gen)
    return model, x, units, path


@pytest.fixture(params=["compiled", "python"])
def host_planning(request, monkeypatch):
    """Host planning on, through the compiled planner or the Python one."""
    monkeypatch.setattr(E, "HOST_PLANNING", True)
    if request.param == "python":
        monkeypatch.setattr(E, "_plan_indices_op", lambda: None)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sharing,density", [("shared", 0.5), ("per_class", 0.3), ("per_sample", 0.5),
                                             ("per_sample", 0.0), ("per_sample", 0.9)])
def test_host_planned_run_equals_direct_run_and_reference(backend, name, sharing, density, monkeypatch):
    model, x, _, path = _setup(name, 5, sharing, density)
    with torch.no_grad():
        ref = g.reference_pathway_forward(model, path, x)
    monkeypatch.setattr(E, "HOST_PLANNING", False)
    direct = g.fast_pathway_forward(model, path, x, backend=backend)
    monkeypatch.setattr(E, "HOST_PLANNING", True)
    compiled = g.fast_pathway_forward(model, path, x, backend=backend)
    monkeypatch.setattr(E, "_plan_indices_op", lambda: None)
    python = g.fast_pathway_forward(model, path, x, backend=backend)
    assert torch.equal(compiled, direct), "the compiled planner must feed the kernels the same indices"
    assert torch.equal(python, direct), "the Python planner must feed the kernels the same indices"
    assert rel_err(compiled, ref) <= 1e-4


def test_default_is_compiled_host_planning_on_cpu():
    assert E.HOST_PLANNING is None
    assert E._host_planned(torch.zeros(1)) == (E._plan_indices_op() is not None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_planning_mixed_empty_full_missing_units_and_batch_one(backend, host_planning):
    model, x, units, path = _setup("resnet_basic", 4, "per_sample", 0.4, seed=3)
    path = dict(path)
    path[units[1].name][0] = False  # sample 0: an empty unit
    path[units[2].name][1] = True  # sample 1: a full unit
    del path[units[3].name]  # a unit kept whole
    ref = g.reference_pathway_forward(model, path, x)
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), ref) <= 1e-4
    one = {k: v[:1] for k, v in path.items()}
    assert rel_err(g.fast_pathway_forward(model, one, x[:1], backend=backend),
                   g.reference_pathway_forward(model, one, x[:1])) <= 1e-4


def test_full_pathway_is_the_dense_model_under_host_planning(host_planning):
    model, x, units, _ = _setup("vgg", 3, "shared", 1.0)
    path = {u.name: torch.ones(3, u.channels, dtype=torch.bool) for u in units}
    with torch.no_grad():
        assert torch.equal(g.fast_pathway_forward(model, path, x), model(x))


def test_dense_capture_under_host_planning(host_planning):
    model, x, units, _ = _setup("resnet_basic", 3, "shared", 1.0)
    logits, outs = E.dense_capture(model, x)
    ref_logits, ref_outs = g.capture_units(model, x)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert all(rel_err(outs[u.name], ref_outs[u.name]) <= 1e-5 for u in units)


def test_prepare_resolves_every_conv_group_with_its_problem_list(host_planning):
    """Every groups tensor of the run carries the (host-computed) Triton problem list, equal to computing it."""
    model, x, _, path = _setup("resnet18_cifar", 6, "per_class", 0.4)
    masks = normalize_masks(cached_units(model, x), path, x)
    plan = E.get_plan(model, x, frozenset(masks))
    sets = E._Sets(plan, masks, 6, x.device, E.masks_to_host(masks))
    sets.prepare()  # compiled or Python planner (the fixture's parameter)
    assert sets._dev_groups, "a pruned run has conv groups"
    for (a, b), grp in sets._dev_groups.items():
        assert torch.equal(grp, CS.conv_groups(sets.host(a), sets.host(b)))
        attached = CS.cached_group_table(grp)
        fresh = CS.group_table(grp)
        assert attached[3:] == fresh[3:]
        assert all(torch.equal(p, q) for p, q in zip(attached[:3], fresh[:3]))
        assert attached is grp._gencnp_group_table[1]  # read from the tensor, not recomputed
        problems, max_group = CS.planned_problems(grp)
        assert torch.equal(problems, torch.cat(fresh[:3])) and max_group == fresh[4]
    for ref, cs in sets._dev_sets.items():  # device twins: the host sets' values in separate tensors
        h = sets.host(ref)
        assert cs.full == h.full and cs.ngroups == h.ngroups and torch.equal(cs.idx, h.idx)
        assert cs.full or (cs.gid is None and cs.counts is None)
    grp = next(iter(sets._dev_groups.values()))
    old = grp._gencnp_group_table
    grp.add_(0)  # modified in place: the attached table is stale, so it is recomputed (and attached again)
    fresh = CS.cached_group_table(grp)
    assert grp._gencnp_group_table is not old and grp._gencnp_group_table[:2] == (grp._version, fresh)
    assert CS.planned_problems(grp) is None  # the op is then called without a (stale) problem list


def test_masks_to_host_one_copy_round_trip():
    masks = {"a": torch.rand(4, 7) < 0.5, "b": torch.rand(9) < 0.5, "c": torch.zeros(4, 0, dtype=torch.bool)}
    host = E.masks_to_host(masks)
    assert list(host) == list(masks)
    assert all(torch.equal(host[k], masks[k]) and host[k].shape == masks[k].shape for k in masks)
    assert E.masks_to_host({}) == {}


def test_pack_views_match_their_tensors():
    pack = E._Pack()
    ts = [torch.arange(12, dtype=torch.int32).view(3, 4), torch.tensor([5, -1], dtype=torch.int64),
          torch.zeros(2, 0, dtype=torch.int32), torch.tensor([[7]], dtype=torch.int32),
          torch.arange(6, dtype=torch.int64).view(2, 3).t()]  # non-contiguous
    hs = [pack.add(t) for t in ts]
    pack.send(torch.device("cpu"))
    for h, t in zip(hs, ts):
        assert pack[h].dtype == t.dtype and pack[h].shape == t.shape and torch.equal(pack[h], t)


@pytest.mark.parametrize("src_kind", ["full", "empty", "shared", "per_sample"])
@pytest.mark.parametrize("dst_kind", ["full", "empty", "shared", "per_sample"])
def test_remap_index_is_the_remap(src_kind, dst_kind):
    """remap_index + apply_remap (the host-planned pieces) give remap_channels' result, also when the indices were
    copied elsewhere (as the pack does)."""
    from test_channel_sets import _set

    b, c = 6, 10
    src, dst = _set(src_kind, b, c, 1), _set(dst_kind, b, c, 2)
    x = torch.randn(b, src.width, 3, 2)
    r = CS.remap_index(src, dst)
    moved = CS.RemapIndex(r.kind, r.width, *(None if t is None else t.clone() for t in (r.take, r.cols, r.keep)))
    want = CS.remap_channels(x, src, dst)
    assert torch.equal(CS.apply_remap(x, r), want)
    assert torch.equal(CS.apply_remap(x, moved), want)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
def test_planned_problem_list_reaches_the_compiled_op(monkeypatch):
    """The "cuda" backend's wrapper passes each conv's host-planned problem list to the op (the CUDA kernel then
    needs no synchronisation); run here around the CPU kernel, which checks it, on a host-planned run."""
    from gencnp_fast.kernels.gpu_backends import with_planned_problems

    op = torch.ops.gencnp_fast.gathered_conv2d
    seen = []

    def spy(*args):
        seen.append(len(args))
        if len(args) == 13:  # problems, max_group: the table of this call's groups
            groups, problems, max_group = args[5], args[11], args[12]
            samples, start, counts, ng, mx = CS.group_table(groups)
            assert torch.equal(problems, torch.cat([samples, start, counts])) and max_group == mx
        return op(*args)

    model, x, _, path = _setup("resnet18_cifar", 6, "per_class", 0.4)
    masks = normalize_masks(cached_units(model, x), path, x)
    plan = E.get_plan(model, x, frozenset(masks))
    monkeypatch.setattr(E, "HOST_PLANNING", False)
    with torch.no_grad():
        direct = E.run_plan(plan, masks, x, with_planned_problems(spy))
        assert seen and set(seen) == {11}, "a direct run plans nothing: the plain call"
        seen.clear()
        monkeypatch.setattr(E, "HOST_PLANNING", True)
        planned = E.run_plan(plan, masks, x, with_planned_problems(spy))
    assert seen and set(seen) == {13}
    assert torch.equal(planned, direct)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
def test_op_checks_a_given_problem_list():
    from gencnp_fast.ops import gathered_conv2d

    b = 4
    x = torch.randn(b, 3, 5, 5)
    in_idx = torch.tensor([[0, 1, 2]] * b, dtype=torch.int32)
    out_idx = torch.tensor([[1, 3]] * b, dtype=torch.int32)
    w = torch.randn(4, 3, 3, 3)
    groups = torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    samples, start, counts, _, mx = CS.group_table(groups)
    problems = torch.cat([samples, start, counts])
    want = gathered_conv2d(x, in_idx, w, None, out_idx, groups, padding=1)
    assert torch.equal(gathered_conv2d(x, in_idx, w, None, out_idx, groups, padding=1, problems=problems,
                                       max_group=mx), want)
    with pytest.raises(RuntimeError, match="problems must be int32"):
        gathered_conv2d(x, in_idx, w, None, out_idx, groups, padding=1, problems=problems.long(), max_group=mx)
    with pytest.raises(RuntimeError, match=r"problems must be \[B \+ 2G\]"):
        gathered_conv2d(x, in_idx, w, None, out_idx, groups, padding=1, problems=problems[:-1], max_group=mx)
    with pytest.raises(RuntimeError, match="max_group must be"):
        gathered_conv2d(x, in_idx, w, None, out_idx, groups, padding=1, problems=problems, max_group=0)
    with pytest.raises(RuntimeError, match="max_group is given without problems"):
        gathered_conv2d(x, in_idx, w, None, out_idx, groups, padding=1, max_group=2)
