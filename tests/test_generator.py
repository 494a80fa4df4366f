"""GEN-CNP parts (RFE, PDN, RPD) and the GenCNP module: shapes, gradients, frozen target, checkpoints."""

import pytest
import torch

from gencnp_fast.generator import (GenCNP, PathwayDistillationNetwork, RecursiveFeatureEmbedder,
                                   RecursivePathwayDecoder, distill_kl, supervised_contrastive)
from gencnp_fast.model import Pathway, capture_units
from gencnp_fast.models import mnist_resnet, mnist_vgg


def tiny_vgg():
    torch.manual_seed(0)
    return mnist_vgg(width=4).eval()


def test_rfe_shapes_and_gradients():
    rfe = RecursiveFeatureEmbedder([3, 5, 7], d=8)
    feats = [torch.randn(4, 3, 6, 6, requires_grad=True), torch.randn(4, 5, 3, 3), torch.randn(4, 7)]
    e, h = rfe(feats)
    assert [t.shape for t in e] == [torch.Size([4, 8])] * 3
    assert [t.shape for t in h] == [torch.Size([4, 8])] * 3
    h[-1].sum().backward()
    assert feats[0].grad is not None and feats[0].grad.abs().sum() > 0  # deep state sees shallow features
    assert all(p.grad is not None for p in rfe.parameters())
    with pytest.raises(ValueError):
        rfe(feats[:2])


def test_pdn_shapes_losses_and_gradients():
    pdn = PathwayDistillationNetwork(d=8, code_dim=6, num_classes=3)
    h = [torch.randn(5, 8, requires_grad=True) for _ in range(4)]
    c, logits = pdn(h)
    assert c.shape == (5, 6) and logits.shape == (5, 3)
    teacher = torch.randn(5, 3)
    kd = distill_kl(teacher, logits, tau=2.0)
    labels = torch.tensor([0, 0, 1, 1, 2])
    sc = supervised_contrastive(c, labels, 0.2)
    (kd + sc).backward()
    assert all(p.grad is not None for p in pdn.parameters())
    assert float(distill_kl(teacher, teacher, 2.0)) < 1e-6


def test_supervised_contrastive_prefers_clustered_codes():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    assert supervised_contrastive(clustered, labels) < supervised_contrastive(mixed, labels)
    assert float(supervised_contrastive(clustered, torch.tensor([0, 1, 2, 3]))) == 0.0  # no positives


def test_rpd_scores_shapes_range_and_gradients():
    rpd = RecursivePathwayDecoder([3, 5, 7], d=8, code_dim=6, init_bias=3.0)  # s ≈ 0.95
    c = torch.randn(4, 6, requires_grad=True)
    e = [torch.randn(4, 8) for _ in range(3)]
    s = rpd(c, e)
    assert [t.shape for t in s] == [torch.Size([4, 3]), torch.Size([4, 5]), torch.Size([4, 7])]
    assert all(bool(((t > 0) & (t < 1)).all()) for t in s)
    assert all(bool((t > 0.9).all()) for t in s)  # starts from the dense pathway
    s[0].sum().backward()  # the shallowest scores depend on the code through the whole recurrence
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_gencnp_forward_gives_pathway_and_scores():
    target = tiny_vgg()
    x = torch.rand(3, 1, 28, 28)
    gen = GenCNP(target, x, d=16, code_dim=16)
    out = gen(x)  # training mode: soft masks
    assert isinstance(out.pathway, Pathway) and out.pathway.batch_size == 3
    assert list(out.pathway) == gen.unit_names == [u.name for u in gen.units]
    for u in gen.units:
        assert out.pathway[u.name].dtype == torch.bool and out.pathway[u.name].shape == (3, u.channels)
        assert out.scores[u.name].shape == (3, u.channels)
        assert out.masks[u.name].dtype == torch.float32
        assert not bool(((out.masks[u.name] == 0) | (out.masks[u.name] == 1)).all())  # soft
    gen.eval()
    hard = gen(x)
    for n in gen.unit_names:
        assert bool(((hard.masks[n] == 0) | (hard.masks[n] == 1)).all())
        assert torch.equal(hard.masks[n].bool(), hard.pathway[n])
    torch.testing.assert_close(out.target_logits, target(x))
    assert out.class_logits.shape == (3, 10) and out.code.shape == (3, 16)


def test_gencnp_gradients_reach_every_part_but_not_the_target():
    target = tiny_vgg()
    x = torch.rand(4, 1, 28, 28)
    gen = GenCNP(target, x, d=16, code_dim=16)
    out = gen(x, mode="soft")
    loss = sum(m.sum() for m in out.masks.values()) + out.class_logits.sum() + out.code.sum()
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, name
    assert all(not p.requires_grad for p in target.parameters())
    assert not target.training
    assert not any(k.startswith("target") for k in gen.state_dict())
    assert not ({id(p) for p in target.parameters()} & {id(p) for p in gen.parameters()})


def test_generator_from_captured_features_matches_forward():
    target = tiny_vgg()
    x = torch.rand(2, 1, 28, 28)
    gen = GenCNP(target, x, d=16, code_dim=16).eval()
    logits, feats = capture_units(target, x)
    a = gen.from_features(feats, logits)
    b = gen(x)
    for n in gen.unit_names:
        assert torch.equal(a.pathway[n], b.pathway[n])


def test_wrong_image_shape_is_a_clear_error():
    target = tiny_vgg()
    gen = GenCNP(target, torch.rand(1, 1, 28, 28), d=8, code_dim=8)
    with pytest.raises(ValueError, match="do not fit"):
        gen(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="do not fit"):
        GenCNP(target, torch.rand(1, 3, 32, 32))


def test_checkpoint_roundtrip(tmp_path):
    target = tiny_vgg()
    x = torch.rand(5, 1, 28, 28)
    torch.manual_seed(1)
    gen = GenCNP(target, x, d=16, code_dim=8, init_bias=0.0).eval()
    path = tmp_path / "generator.pt"
    gen.save(path)
    gen2 = GenCNP.load(path, target)
    assert gen2.config == gen.config
    a, b = gen.explain(x), gen2.explain(x)
    for n in gen.unit_names:
        assert torch.equal(a[n], b[n])


def test_checkpoint_for_another_model_is_rejected(tmp_path):
    gen = GenCNP(tiny_vgg(), torch.rand(1, 1, 28, 28), d=8, code_dim=8)
    path = tmp_path / "generator.pt"
    gen.save(path)
    other = mnist_resnet(width=4).eval()
    with pytest.raises(ValueError, match="another model"):
        GenCNP.load(path, other)
    wider = mnist_vgg(width=8).eval()
    with pytest.raises(ValueError, match="another model"):
        GenCNP.load(path, wider)


def test_corrupt_or_foreign_checkpoint_is_rejected(tmp_path):
    target = tiny_vgg()
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x80\x02this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        GenCNP.load(bad, target)
    gen = GenCNP(target, torch.rand(1, 1, 28, 28), d=8, code_dim=8)
    good = tmp_path / "g.pt"
    gen.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        GenCNP.load(truncated, target)
    state = torch.load(good, weights_only=False)
    for key, value in (("init_bias", -6.4e206), ("sigma", float("nan")), ("t0", float("inf")), ("d", 1 << 20)):
        odd = tmp_path / f"config_{key}.pt"
        torch.save(dict(state, config=dict(state["config"], **{key: value})), odd)
        with pytest.raises(ValueError, match="generator config must hold"):  # not a crash in the constructor
            GenCNP.load(odd, target)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a GEN-CNP"):
        GenCNP.load(foreign, target)
    with pytest.raises(ValueError, match="does not exist"):
        GenCNP.load(tmp_path / "missing.pt", target)


def autograd_and_inference_agree(gen, feats, logits):
    """The generator's scores, masks and code with autograd (the per-unit training path) and without (batched)."""
    with torch.enable_grad():
        a = gen.from_features(feats, logits.detach(), "hard")
    with torch.no_grad():
        b = gen.from_features(feats, logits.detach(), "hard")
    for n in gen.unit_names:
        torch.testing.assert_close(b.scores[n], a.scores[n].detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(b.pathway[n], a.pathway[n])
    torch.testing.assert_close(b.code, a.code.detach(), rtol=1e-5, atol=1e-6)


def test_inference_path_matches_the_autograd_path():
    """Without autograd the generator runs its units batched (the GRU recurrences in one call each, the per-unit
    embeddings and heads as one baddbmm over a cached, zero-padded weight stack): the same scores and masks as the
    per-unit path it takes for training, also after the weights change (the stack is rebuilt)."""
    torch.manual_seed(0)
    target = tiny_vgg()
    x = torch.randn(5, 1, 28, 28)
    gen = GenCNP(target, x[:1], d=16, code_dim=8).eval()
    logits, feats = capture_units(target, x)
    feats = {k: v.detach() for k, v in feats.items()}
    for step in range(2):
        autograd_and_inference_agree(gen, feats, logits)
        with torch.no_grad():  # an optimizer step's in-place update: the cached stacks must follow
            gen.rpd.heads[0].weight.add_(0.5)
            gen.rfe.embed[1].proj.bias.sub_(0.25)
            gen.rfe.embed[0].norm.weight.mul_(1.5)  # the cached LayerNorm affine stack too


# ---------------------------------------------------------------------------------------------------------------
# the compiled small-batch helpers of the inference path (csrc/generator_ops.cpp)

@pytest.mark.parametrize("T,B,I,H,bias", [(6, 1, 64, 64, True), (1, 1, 3, 5, True), (7, 16, 20, 9, True),
                                          (4, 3, 11, 13, False)])
def test_compiled_gru_sequence_matches_torch(T, B, I, H, bias):
    from gencnp_fast import _C

    g = torch.Generator().manual_seed(T * 100 + B)
    cell = torch.nn.GRUCell(I, H, bias=bias)
    x, h0 = torch.randn(T, B, I, generator=g), torch.randn(B, H, generator=g)
    params = [cell.weight_ih, cell.weight_hh] + ([cell.bias_ih, cell.bias_hh] if bias else [])
    with torch.no_grad():
        want, _ = torch._VF.gru(x, h0.unsqueeze(0), params, bias, 1, 0.0, False, False, False)
        got = _C.gru_sequence(x, h0, *params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_gru_sequence_refuses_bad_shapes():
    from gencnp_fast import _C

    cell = torch.nn.GRUCell(4, 6)
    x, h0 = torch.randn(3, 2, 4), torch.randn(2, 6)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"h0 must be \[B, H\]"):
            _C.gru_sequence(x, h0[:1], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        with pytest.raises(RuntimeError, match=r"w_ih must be \[3H, I\]"):
            _C.gru_sequence(x[..., :3], h0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        with pytest.raises(RuntimeError, match="float32"):
            _C.gru_sequence(x.double(), h0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        with pytest.raises(RuntimeError, match="both biases or none"):
            _C.gru_sequence(x, h0, cell.weight_ih, cell.weight_hh, cell.bias_ih, None)


def test_compiled_pooling_matches_mean_and_amax():
    from gencnp_fast import _C

    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 5, 9, 7, generator=g), torch.randn(2, 3, 1, 1, generator=g),
             torch.randn(2, 6, generator=g), torch.randn(2, 4, 33, generator=g)]
    feats[0][1, 2, 4, 4] = float("nan")
    feats[3][0, 1, 7] = float("inf")
    feats[3][0, 2, :] = float("-inf")
    pooled = torch.full((4, 2, 14), 7.0)
    _C.pool_units(feats, pooled)
    for l, f in enumerate(feats):
        c = f.shape[1]
        mean, mx = (f, f) if f.dim() == 2 else (f.flatten(2).mean(2), f.flatten(2).amax(2))
        torch.testing.assert_close(pooled[l, :, :c], mean, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(pooled[l, :, c:2 * c].isnan(), mx.isnan())
        assert torch.equal(pooled[l, :, c:2 * c].nan_to_num(), mx.nan_to_num())
        assert (pooled[l, :, 2 * c:] == 7.0).all()  # the padding is left alone
    with pytest.raises(RuntimeError, match="the buffer holds"):
        _C.pool_units([torch.randn(2, 9, 3, 3)], torch.zeros(1, 2, 14))
    with pytest.raises(RuntimeError, match="with B = 2"):
        _C.pool_units([torch.randn(3, 5, 3, 3)], torch.zeros(1, 2, 14))


@pytest.mark.parametrize("batch", [1, 16, 17])
def test_inference_path_on_both_sides_of_the_small_batch_limit(batch):
    """Up to SMALL_BATCH samples the recurrences and poolings run in the compiled helpers, above it in ATen: both
    give the autograd path's scores and masks."""
    from gencnp_fast.generator import rfe

    assert rfe.SMALL_BATCH == 16
    torch.manual_seed(1)
    target = tiny_vgg()
    x = torch.randn(batch, 1, 28, 28)
    gen = GenCNP(target, x[:1], d=16, code_dim=8).eval()
    logits, feats = capture_units(target, x)
    feats = {k: v.detach() for k, v in feats.items()}
    autograd_and_inference_agree(gen, feats, logits)
