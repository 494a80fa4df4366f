"""DAQ (1-bit distance-aware quantization): soft and hard behaviour, straight-through, temperature."""

import pytest
import torch

from gencnp_fast.generator.daq import DistanceAwareQuantizer


def test_hard_rounds_to_nearest_level():
    q = DistanceAwareQuantizer()
    s = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.51, 0.9, 1.0])
    assert q(s, "hard").tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_soft_is_differentiable_and_on_the_right_side():
    q = DistanceAwareQuantizer(t0=2.0, sigma=2.0)
    s = torch.linspace(0.01, 0.99, 50, requires_grad=True)
    soft = q(s, "soft")
    assert soft.shape == s.shape
    assert bool(((soft > 0.5) == (s > 0.5)).all())
    assert bool(((soft > 0) & (soft < 1)).all())
    soft.sum().backward()
    assert torch.isfinite(s.grad).all() and bool((s.grad > 0).all())  # monotone in the score
    assert q.raw_temperature.grad is not None and q.raw_temperature.grad.abs() > 0


def test_adaptive_temperature_gives_the_same_gap_everywhere():
    """With the adaptive β, a score near the boundary is rounded as firmly as one near a level."""
    q = DistanceAwareQuantizer(t0=2.0)
    soft = q(torch.tensor([0.6, 0.75, 0.99, 0.4, 0.01]), "soft").detach()
    assert soft[:3].max() - soft[:3].min() < 0.02
    assert soft[3:].max() - soft[3:].min() < 0.02
    expected = torch.sigmoid(q.temperature.detach())
    assert abs(float(soft[2]) - float(expected)) < 0.02


def test_higher_temperature_is_closer_to_hard():
    s = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    err = []
    for t in (1.0, 2.0, 6.0):
        q = DistanceAwareQuantizer(t0=t)
        err.append(float((q(s, "soft") - q(s, "hard")).abs().mean().detach()))
    assert err[0] > err[1] > err[2]
    assert err[2] < 0.02


def test_initial_temperature_and_learning():
    q = DistanceAwareQuantizer(t0=2.0, sigma=2.0)
    assert abs(float(q.temperature.detach()) - 2.0) < 1e-5
    assert q.sigma == 2.0
    assert any(p is q.raw_temperature for p in q.parameters())
    fixed = DistanceAwareQuantizer(t0=2.0, learn_temperature=False)
    assert not list(fixed.parameters())


def test_straight_through_forward_is_hard_backward_is_soft():
    q = DistanceAwareQuantizer()
    s1 = torch.tensor([0.3, 0.7, 0.55], requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    out = q(s1, "ste")
    assert out.tolist() == [0.0, 1.0, 1.0]
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    (q(s2, "soft") * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_gradient_is_bounded_at_the_boundary():
    q = DistanceAwareQuantizer()
    s = torch.tensor([0.5, 0.5001, 0.4999], requires_grad=True)
    q(s, "soft").sum().backward()
    assert torch.isfinite(s.grad).all() and float(s.grad.abs().max()) < 100


def test_bad_mode_and_parameters():
    q = DistanceAwareQuantizer()
    with pytest.raises(ValueError, match="mode"):
        q(torch.rand(3), "round")
    with pytest.raises(ValueError):
        DistanceAwareQuantizer(t0=0.0)
