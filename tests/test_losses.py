"""GREBT loss pieces against float64 references written from the paper's equations."""

import math

import pytest
import torch

from r2m import losses


def reference_gre(rewards):
    out = []
    for row in rewards.double().tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        z = [(r - mean) / std for r in row]
        norm = sum(math.exp(v) for v in z)
        p = [math.exp(v) / norm for v in z]
        out.append(-sum(pi * math.log(pi) for pi in p))
    return torch.tensor(out, dtype=torch.float64)


def test_bt_loss_matches_reference():
    r_w, r_l = torch.randn(6), torch.randn(6)
    expected = torch.tensor([math.log1p(math.exp(-(a - b))) for a, b in zip(r_w.tolist(), r_l.tolist(), strict=False)])
    torch.testing.assert_close(losses.bt_loss(r_w, r_l), expected.float())


def test_gre_loss_matches_reference_and_bounds():
    rewards = torch.randn(5, 8) * 3
    out = losses.gre_loss(rewards)
    torch.testing.assert_close(out.double(), reference_gre(rewards), atol=1e-5, rtol=1e-5)
    assert (out <= math.log(8) + 1e-6).all() and (out > 0).all()


def test_gre_gradient_matches_float64_autograd():
    rewards = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    losses.gre_loss(rewards).sum().backward()
    eps = 1e-6
    fd = torch.zeros_like(rewards)
    for i in range(4):
        for j in range(6):
            plus, minus = rewards.detach().clone(), rewards.detach().clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            fd[i, j] = (reference_gre(plus).sum() - reference_gre(minus).sum()) / (2 * eps)
    torch.testing.assert_close(rewards.grad, fd, atol=1e-6, rtol=1e-5)


def test_all_equal_group_is_finite_with_exactly_zero_gradient():
    rewards = torch.tensor([[0.7] * 4, [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    out = losses.gre_loss(rewards)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(math.log(4))
    out.sum().backward()
    assert torch.equal(rewards.grad[0], torch.zeros(4))
    assert torch.isfinite(rewards.grad).all() and rewards.grad[1].abs().sum() > 0


def test_select_pairs():
    rewards = torch.tensor([[0.1, 0.9, -0.3], [2.0, 2.0, 2.0], [1.0, float("nan"), 0.0], [0.0, -1.0, 5.0]])
    winner, loser, valid = losses.select_pairs(rewards)
    assert winner.tolist()[0] == 1 and loser.tolist()[0] == 2
    assert winner.tolist()[3] == 2 and loser.tolist()[3] == 1
    assert valid.tolist() == [True, False, False, True]


def test_grebt_combines_terms():
    rewards = torch.randn(3, 4, requires_grad=True)
    winner, loser, valid = losses.select_pairs(torch.randn(3, 4))
    alpha = 0.3
    out = losses.grebt_loss(rewards, winner, loser, alpha, valid)
    rows = torch.arange(3)
    bt = losses.bt_loss(rewards[rows, winner], rewards[rows, loser]) * valid
    expected = ((1 - alpha) * bt + alpha * reference_gre(rewards.detach()).float()).mean()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.backward()
    assert torch.isfinite(rewards.grad).all()


def test_grebt_alpha_extremes():
    rewards = torch.randn(2, 5)
    winner, loser, _valid = losses.select_pairs(rewards)
    rows = torch.arange(2)
    torch.testing.assert_close(losses.grebt_loss(rewards, winner, loser, 0.0),
                               losses.bt_loss(rewards[rows, winner], rewards[rows, loser]).mean())
    torch.testing.assert_close(losses.grebt_loss(rewards, winner, loser, 1.0), losses.gre_loss(rewards).mean())


@pytest.mark.parametrize("call, message", [
    (lambda: losses.gre_loss(torch.randn(6)), r"shape \[groups, group_size\]"),
    (lambda: losses.gre_loss(torch.randn(3, 1)), "at least 2 responses"),
    (lambda: losses.bt_loss(torch.randn(3), torch.randn(4)), "same shape"),
    (lambda: losses.grebt_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                               torch.ones(2, dtype=torch.long), 1.5), "alpha must be in"),
    (lambda: losses.grebt_loss(torch.randn(2, 3), torch.zeros(3, dtype=torch.long),
                               torch.ones(2, dtype=torch.long), 0.3), "winner must be an integer tensor"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def spread_group(scale, std, k=4, dtype=torch.float32):
    """A group of K rewards around ``scale`` with population std ``std`` (before rounding to ``dtype``)."""
    pattern = torch.linspace(-1.0, 1.0, k, dtype=torch.float64)
    pattern = pattern / pattern.square().mean().sqrt()
    return (scale + std * pattern).to(dtype)[None]


@pytest.mark.parametrize("scale", [1.0, 1e3, -1e-3, 30.0])
def test_degenerate_threshold_is_relative_to_the_rewards_scale(scale):
    threshold = losses.GRE_REL_EPS * abs(scale)
    for factor in (1e-3, 0.5, 0.9):  # ties up to float32 resolution: constant log K, exactly zero gradient
        rewards = spread_group(scale, factor * threshold).requires_grad_(True)
        assert losses.degenerate_groups(rewards).tolist() == [True]
        out = losses.gre_loss(rewards)
        out.sum().backward()
        assert out.item() == pytest.approx(math.log(4)) and torch.equal(rewards.grad, torch.zeros_like(rewards))
    for factor in (1.1, 2.0, 10.0, 1e3):  # a real spread: finite gradient bounded by 2 log K / std
        rewards = spread_group(scale, factor * threshold).requires_grad_(True)
        assert losses.degenerate_groups(rewards).tolist() == [False]
        losses.gre_loss(rewards).sum().backward()
        norm = rewards.grad.norm().item()
        std = rewards.detach().double().std(correction=0).item()
        assert 0 < norm <= 2 * math.log(4) / std and math.isfinite(norm)
        assert norm <= 2 * math.log(4) / threshold


def test_old_absolute_cliff_is_gone():
    """Rewards of scale 1 spread by 2e-6 (float32 noise there): the old absolute 1e-6 threshold gave a ~7e4
    gradient; now the group is a tie with zero gradient."""
    rewards = spread_group(1.0, 2e-6).requires_grad_(True)
    losses.gre_loss(rewards).sum().backward()
    assert torch.equal(rewards.grad, torch.zeros_like(rewards))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_gre_just_above_the_threshold_matches_float64_reference(dtype, tolerance):
    for scale in (1.0, 250.0):
        rewards = torch.cat([spread_group(scale, 1.5 * losses.GRE_REL_EPS * scale, k=6, dtype=dtype),
                             (scale + torch.randn(1, 6, dtype=dtype) * 2e-3 * scale)])
        torch.testing.assert_close(losses.gre_loss(rewards).double(), reference_gre(rewards), atol=tolerance,
                                   rtol=0)


def test_tiny_and_zero_rewards_never_give_nan():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1e-14, -1e-14, 0.0], [5e-12, 2e-12, 0.0]], requires_grad=True)
    out = losses.gre_loss(rewards)
    out.sum().backward()
    assert losses.degenerate_groups(rewards).tolist() == [True, True, False]
    assert torch.isfinite(out).all() and torch.isfinite(rewards.grad).all()
    assert torch.equal(rewards.grad[:2], torch.zeros(2, 3)) and rewards.grad[2].abs().sum() > 0
