"""Convolutions on tiny maps as one dense linear map (plan.indices.small_map_eligible / plan.interpreter.small_map_weights).

With one mask for the whole batch, a conv whose input map has fewer pixels than the kernel has taps (3x3 on 2x2,
on 1x1, ...) runs as a 1x1 gathered conv over the flattened map. Checked here against the reference on tiny models
covering stride, dilation, padding, residual adds, empty and full masks, and that per-sample masks (which keep the
3x3 path) agree too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gencnp_fast as g
from gencnp_fast import models
from gencnp_fast.plan import get_plan
from gencnp_fast.plan.indices import small_map_eligible
from gencnp_fast.plan import interpreter
from gencnp_fast.plan.interpreter import small_map_weights
from gencnp_fast.plan.sets import AllChannels
from gencnp_fast.plan.steps import ConvStep


class TinyMap(nn.Module):
    def __init__(self, k=3, stride=1, pad=1, dil=1, residual=False):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.b0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 12, k, stride=stride, padding=pad, dilation=dil)
        self.b1 = nn.BatchNorm2d(12)
        self.residual = residual
        if residual:
            self.c2 = nn.Conv2d(12, 12, 3, padding=1)
            self.b2 = nn.BatchNorm2d(12)
        self.fc = nn.LazyLinear(5)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b1(self.c1(x)))
        if self.residual:
            x = torch.relu(self.b2(self.c2(x)) + x)
        return self.fc(torch.flatten(x, 1))


CASES = {  # name: (input H, W, model kwargs)
    "3x3_on_2x2": (2, 2, {}),
    "3x3_on_1x1": (1, 1, {}),
    "3x3_on_1x2": (1, 2, {}),
    "3x3_on_2x1": (2, 1, {}),
    "3x3_s2_on_2x2": (2, 2, {"stride": 2}),
    "3x3_d2_on_2x2": (2, 2, {"pad": 2, "dil": 2}),  # an output pixel reads 1 of 4 pixels: not eligible
    "3x3_pad0_on_3x3": (3, 3, {"pad": 0}),  # 9 pixels = 9 taps: not eligible, stays 3x3
    "residual_on_2x2": (2, 2, {"residual": True}),
}


@pytest.fixture(autouse=True)
def small_map_from_batch_one(monkeypatch):
    """The path runs from batch 16 by default (below, the 3x3 taps read fewer weight bytes): these tiny-batch tests
    take it from batch 1."""
    monkeypatch.setattr(interpreter, "SMALL_MAP_MIN_BATCH", 1)


def _model(kwargs, h, w):
    torch.manual_seed(0)
    m = TinyMap(**kwargs).eval()
    m(torch.zeros(1, 3, h, w))  # materialise the lazy Linear
    return models.randomize_bn(m, torch.Generator().manual_seed(1)).eval()


def _plan_steps(model, x, masks):
    return [st for st in get_plan(model, x, frozenset(masks)).steps if isinstance(st, ConvStep)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sharing", ["shared", "per_sample"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_tiny_map_convs_match_reference(case, sharing, density, batch):
    h, w, kwargs = CASES[case]
    model = _model(kwargs, h, w)
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(2))
    units = g.pathway_units(model, x)
    gen = torch.Generator().manual_seed(3)
    pw = g.Pathway.random(units, density, None if sharing == "shared" else batch, generator=gen)
    if density == 0.5:  # keep the first unit whole: one side full, one side pruned
        pw = g.Pathway({**dict(pw), units[0].name: torch.ones(units[0].channels, dtype=torch.bool)})
    ref = g.reference_pathway_forward(model, pw, x)
    out = g.fast_pathway_forward(model, pw, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_shared_masks_take_the_linear_map_where_eligible(case):
    h, w, kwargs = CASES[case]
    model = _model(kwargs, h, w)
    x = torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(2))
    units = g.pathway_units(model, x)
    pw = g.Pathway.random(units, 0.5, None, generator=torch.Generator().manual_seed(4))
    g.fast_pathway_forward(model, pw, x)
    steps = {st.name: st for st in _plan_steps(model, x, pw)}
    c1 = next(st for name, st in steps.items() if "c1" in name)
    eligible = case not in ("3x3_pad0_on_3x3", "3x3_d2_on_2x2")
    assert small_map_eligible(c1) is eligible
    assert (c1.small_map is not None) is eligible  # built on first use, only when used
    if eligible:
        w2, b2 = c1.small_map
        cout, cin = c1.weight.shape[:2]
        assert w2.shape == (cout * c1.out_shape[1] * c1.out_shape[2], cin * h * w, 1, 1)
        assert b2.shape == (w2.shape[0],)


def test_per_sample_masks_keep_the_tap_path():
    h, w, kwargs = CASES["3x3_on_2x2"]
    model = _model(kwargs, h, w)
    x = torch.randn(6, 3, h, w, generator=torch.Generator().manual_seed(2))
    units = g.pathway_units(model, x)
    pw = g.Pathway.random(units, 0.5, 6, generator=torch.Generator().manual_seed(5))
    g.fast_pathway_forward(model, pw, x)
    assert all(st.small_map is None for st in _plan_steps(model, x, pw))


@pytest.mark.parametrize("h,w,stride,pad,dil", [(2, 2, 1, 1, 1), (1, 1, 1, 1, 1), (2, 2, 2, 1, 1), (2, 1, 1, 2, 2)])
def test_linear_map_equals_conv2d(h, w, stride, pad, dil):
    g_ = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(7, 5, 3, 3, generator=g_), torch.randn(7, generator=g_)
    x = torch.randn(3, 5, h, w, generator=g_)
    want = torch.nn.functional.conv2d(x, weight, bias, stride, pad, dil)
    st = ConvStep(name="c", src="x", in_set=AllChannels("x"), out_set=AllChannels("c"), weight=weight, bias=bias,
                  stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil), relu=False, linear=False,
                  out_shape=tuple(want.shape[1:]), in_shape=(5, h, w))
    w2, b2 = small_map_weights(st)
    got = (x.reshape(3, -1) @ w2.reshape(w2.shape[0], -1).T + b2).reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_small_batches_keep_the_taps(monkeypatch):
    """By default a batch below SMALL_MAP_MIN_BATCH keeps the 3x3 path (weight bytes, not FLOPs, bound it)."""
    monkeypatch.setattr(interpreter, "SMALL_MAP_MIN_BATCH", 16)
    h, w, kwargs = CASES["3x3_on_2x2"]
    model = _model(kwargs, h, w)
    for batch, used in [(4, False), (16, True)]:
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(2))
        units = g.pathway_units(model, x)
        pw = g.Pathway.random(units, 0.5, None, generator=torch.Generator().manual_seed(4))
        out = g.fast_pathway_forward(model, pw, x)
        torch.testing.assert_close(out, g.reference_pathway_forward(model, pw, x), rtol=1e-4, atol=1e-5)
        c1 = next(st for st in _plan_steps(model, x, pw) if "c1" in st.name)
        assert (c1.small_map is not None) is used
