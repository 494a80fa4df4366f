"""Class pathways (majority / union / intersection over j pathways) and their transfer to other samples."""

from __future__ import annotations

import pytest
import torch

from gencnp_fast import Pathway, models, pathway_units
from gencnp_fast.evaluation import transfer as T
from gencnp_fast.evaluation.baselines import evaluate_pathway


def tiny_model():
    torch.manual_seed(0)
    m = models.mnist_vgg(num_classes=3, width=4)
    models.randomize_bn(m, torch.Generator().manual_seed(0))
    return m.eval()


MODEL = tiny_model()


def test_rules_on_a_hand_made_example():
    pw = {"u": torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)}
    y = torch.tensor([0, 0, 0, 1])
    maj = T.class_pathways(pw, y, rule="majority")["u"]
    uni = T.class_pathways(pw, y, rule="union")["u"]
    inter = T.class_pathways(pw, y, rule="intersection")["u"]
    assert maj.tolist() == [[True, True, True, False], [False, False, False, True]]
    assert uni.tolist() == [[True, True, True, False], [False, False, False, True]]
    assert inter.tolist() == [[True, False, False, False], [False, False, False, True]]
    # j = 2: first two pathways of class 0; majority with a tie (1 of 2) keeps the channel (mean >= 0.5)
    assert T.class_pathways(pw, y, j=2, rule="majority")["u"][0].tolist() == [True, True, True, False]
    assert T.class_pathways(pw, y, j=1, rule="intersection")["u"][0].tolist() == [True, True, False, False]


def test_class_without_samples_is_kept_whole_and_bad_input_errors():
    pw = {"u": torch.zeros(2, 3, dtype=torch.bool)}
    cp = T.class_pathways(pw, torch.tensor([0, 0]), num_classes=2)
    assert cp["u"][1].all() and not cp["u"][0].any()
    with pytest.raises(ValueError, match="rule"):
        T.class_pathways(pw, torch.tensor([0, 0]), rule="vote")
    with pytest.raises(ValueError, match="j must be"):
        T.class_pathways(pw, torch.tensor([0, 0]), j=0)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        T.class_pathways({"u": torch.zeros(3, dtype=torch.bool)}, torch.tensor([0, 0]))


def test_transfer_equals_own_when_class_samples_share_a_pathway():
    x = torch.randn(18, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(18) % 3
    units = pathway_units(MODEL, x[:1])
    own = Pathway.random(units, 0.4, 18, groups=y, generator=torch.Generator().manual_seed(1))
    own = {n: own[n] for n in own}
    cp = T.class_pathways(own, y)
    tr = T.evaluate_transfer(MODEL, x, cp, y)
    ref = evaluate_pathway(MODEL, x, own, y)
    for k in ("fidelity", "mDC", "mIC", "density_mean"):
        assert tr[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6)
    # apply_class_pathways gives each sample its class's row
    per = T.apply_class_pathways(cp, y)
    assert all(torch.equal(per[n], own[n]) for n in own)


def test_transfer_study_structure_and_random_density():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, 28, 28, generator=g)
    y = torch.arange(30) % 3
    units = pathway_units(MODEL, x[:1])
    train = Pathway.random(units, 0.5, 60, generator=g)
    train = {n: train[n] for n in train}
    ty = torch.arange(60) % 3
    own = Pathway.random(units, 0.5, 30, generator=g)
    res = T.transfer_study(MODEL, x, y, {n: own[n] for n in own}, train, ty, js=(1, 5, "all"))
    assert set(res) == {"majority", "union", "intersection", "own"}
    for rule in T.RULES:
        r = res[rule]
        assert {"fidelity", "mDC", "mIC", "density_mean"} <= set(r)
        assert list(r["by_j"]) == ["1", "5", "all"]
        assert r["fidelity"] == r["by_j"]["all"]["fidelity"]
        for v in r["by_j"].values():
            assert v["random"]["density_mean"] == pytest.approx(v["density_mean"])
    # union grows and intersection shrinks with j
    assert res["union"]["by_j"]["1"]["density_mean"] <= res["union"]["by_j"]["all"]["density_mean"]
    assert res["intersection"]["by_j"]["1"]["density_mean"] >= res["intersection"]["by_j"]["all"]["density_mean"]
    assert res["union"]["by_j"]["1"]["density_mean"] == pytest.approx(res["majority"]["by_j"]["1"]["density_mean"])
