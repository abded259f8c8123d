"""Router / projector shapes and routing behaviour (hard top-1 un-renormalised, soft, K=1, K=0)."""

from __future__ import annotations

import pytest
import torch

from mixsp_core.models.routing import Projector, RoutedProjector, Router


def test_projector_widths_follow_mult():
    proj = Projector(8, mult=10)
    assert proj.fc1.weight.shape == (80, 8) and proj.fc2.weight.shape == (8, 80)
    assert proj(torch.randn(3, 8)).shape == (3, 8)


def test_residual_projector_starts_as_identity_and_adds_its_input():
    proj = Projector(4, mult=2, residual=True)
    x = torch.randn(5, 4)
    assert torch.equal(proj(x), x)
    torch.nn.init.normal_(proj.fc2.weight)
    assert torch.allclose(proj(x), x + proj.fc2(torch.relu(proj.fc1(x))))


def test_router_gives_probabilities():
    probs = Router(6, 3)(torch.randn(4, 6))
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(4))


def _fixed_router(rp: RoutedProjector, logits_bias: list[float]) -> None:
    """Make the router ignore its input and output fixed logits."""
    with torch.no_grad():
        rp.router.gate.weight.zero_()
        rp.router.gate.bias.copy_(torch.tensor(logits_bias))


def test_hard_routing_keeps_top1_probability_unrenormalised():
    torch.manual_seed(0)
    rp = RoutedProjector(dim=4, router_dim=6, num_projectors=2, mode="hard", mult=2)
    _fixed_router(rp, [0.0, 1.0])  # p = softmax([0, 1]) = [0.269, 0.731]
    h, r = torch.randn(3, 4), torch.randn(3, 6)
    out = rp(h, r)
    p_top = torch.softmax(torch.tensor([0.0, 1.0]), 0)[1]
    assert out.choice.tolist() == [1, 1, 1]
    assert torch.allclose(out.gate[:, 0], torch.zeros(3))
    assert torch.allclose(out.gate[:, 1], p_top.expand(3))
    assert torch.allclose(out.z, p_top * rp.projectors[1](h), atol=1e-6)  # not p=1: un-renormalised


def test_hard_routing_picks_per_row_and_passes_gradient_to_router():
    torch.manual_seed(0)
    rp = RoutedProjector(dim=4, router_dim=4, num_projectors=2, mode="hard", mult=2)
    with torch.no_grad():
        rp.router.gate.weight.copy_(torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]]))
        rp.router.gate.bias.zero_()
    r = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    h = torch.randn(2, 4)
    out = rp(h, r)
    assert out.choice.tolist() == [0, 1]
    assert torch.allclose(out.z[0], out.gate[0, 0] * rp.projectors[0](h[:1])[0], atol=1e-6)
    assert torch.allclose(out.z[1], out.gate[1, 1] * rp.projectors[1](h[1:])[0], atol=1e-6)
    out.z.sum().backward()
    assert rp.router.gate.weight.grad is not None and rp.router.gate.weight.grad.abs().sum() > 0


def test_soft_routing_mixes_all_projectors():
    torch.manual_seed(0)
    rp = RoutedProjector(dim=4, router_dim=6, num_projectors=3, mode="soft", mult=2)
    _fixed_router(rp, [0.0, 1.0, 2.0])
    h = torch.randn(2, 4)
    out = rp(h, torch.randn(2, 6))
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    expected = sum(p[k] * rp.projectors[k](h) for k in range(3))
    assert torch.allclose(out.z, expected, atol=1e-6)
    assert torch.allclose(out.gate, out.probs)


def test_single_projector_has_no_router_and_zero_is_identity():
    one = RoutedProjector(dim=4, router_dim=8, num_projectors=1)
    assert one.router is None
    h = torch.randn(2, 4)
    out = one(h)
    assert out.gate is None and torch.allclose(out.z, one.projectors[0](h))
    none = RoutedProjector(dim=4, router_dim=8, num_projectors=0)
    assert torch.equal(none(h).z, h)


def test_bad_mode_and_missing_router_input():
    with pytest.raises(ValueError, match="routing mode"):
        RoutedProjector(4, 4, 2, mode="top2")
    with pytest.raises(ValueError, match="router_input"):
        RoutedProjector(4, 4, 2)(torch.randn(1, 4))
