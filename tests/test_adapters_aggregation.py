"""Pairwise schedules, comparison tallies, win rates, Bradley-Terry (vs a float64 likelihood maximiser), voting."""

import math

import numpy as np
import pytest
import torch

from r2m.adapters import aggregation as agg


def test_round_robin_pairs():
    assert agg.round_robin_pairs(3, both_orders=False) == [(0, 1), (0, 2), (1, 2)]
    assert agg.round_robin_pairs(3) == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    for k in range(1, 7):
        assert len(agg.round_robin_pairs(k)) == k * (k - 1)
        assert len(set(agg.round_robin_pairs(k, both_orders=False))) == k * (k - 1) // 2
    with pytest.raises(ValueError, match="num_players must be an int >= 1"):
        agg.round_robin_pairs(0)


def test_anchor_pairs_call_counts():
    assert agg.anchor_pairs(4, 0, both_orders=False) == [(1, 0), (2, 0), (3, 0)]
    assert agg.anchor_pairs(3, 1) == [(0, 1), (1, 0), (2, 1), (1, 2)]
    for k in range(1, 9):
        assert len(agg.anchor_pairs(k, k - 1, both_orders=False)) == k - 1
        assert len(agg.anchor_pairs(k, 0)) == 2 * (k - 1)
    with pytest.raises(ValueError, match="anchor must index one of the 3 players"):
        agg.anchor_pairs(3, 3)


def test_comparison_matrix_known_values():
    pairs = [(0, 1), (1, 0), (0, 2), (2, 1)]
    points = agg.comparison_matrix(3, pairs, ["A", "B", None, "B"])
    np.testing.assert_array_equal(points, [[0, 2, 0.5], [0, 0, 1], [0.5, 0, 0]])
    np.testing.assert_array_equal(points + points.T, [[0, 2, 1], [2, 0, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="got 4 pairs but 3 verdicts"):
        agg.comparison_matrix(3, pairs, ["A", "B", None])
    with pytest.raises(ValueError, match="a verdict must be 'A', 'B' or None"):
        agg.comparison_matrix(2, [(0, 1)], ["C"])
    with pytest.raises(ValueError, match="cannot be compared with itself"):
        agg.comparison_matrix(2, [(1, 1)], ["A"])


def test_win_rates_known_values():
    points = np.array([[0, 2, 0.5], [0, 0, 1], [0.5, 0, 0]])
    np.testing.assert_allclose(agg.win_rates(points), [2.5 / 3, 1 / 3, 0.5 / 2])
    lonely = agg.win_rates(np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]]))
    assert lonely[:2].tolist() == [1.0, 0.0] and math.isnan(lonely[2])


def verdicts_of(pairs, judge):
    return [judge(a, b) for a, b in pairs]


def test_position_swapping_cancels_a_position_biased_judge():
    always_a = lambda a, b: "A"  # noqa: E731
    both = agg.round_robin_pairs(3)
    np.testing.assert_allclose(agg.win_rates(agg.comparison_matrix(3, both, verdicts_of(both, always_a))), 0.5)
    one = agg.round_robin_pairs(3, both_orders=False)
    np.testing.assert_allclose(agg.win_rates(agg.comparison_matrix(3, one, verdicts_of(one, always_a))),
                               [1.0, 0.5, 0.0])
    quality = [2, 0, 5]
    fair = lambda a, b: "A" if quality[a] > quality[b] else "B"  # noqa: E731
    np.testing.assert_allclose(agg.win_rates(agg.comparison_matrix(3, both, verdicts_of(both, fair))),
                               [0.5, 0.0, 1.0])


def reference_bt(points, prior):
    """Penalised BT maximum likelihood by direct optimisation in float64 (independent of the MM code)."""
    points = torch.as_tensor(points, dtype=torch.float64)
    met = (points + points.T) > 0
    weights = (points + 0.5 * prior) * met
    theta = torch.zeros(points.shape[0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        diff = theta[:, None] - theta[None, :]
        loss = -(weights * torch.nn.functional.logsigmoid(diff)).sum() + 1e-3 * theta.sum() ** 2
        loss.backward()
        return loss

    for _ in range(5):
        optimiser.step(closure)
    theta = theta.detach()
    return (theta - theta.mean()).numpy()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prior", [0.5, 1.0, 3.0])
def test_bradley_terry_matches_likelihood_maximiser(seed, prior):
    rng = np.random.default_rng(seed)
    k = 3 + seed
    pairs = agg.round_robin_pairs(k)
    strength = rng.normal(size=k) * 2
    verdicts = [("A" if rng.random() < 1 / (1 + np.exp(strength[b] - strength[a])) else "B")
                if rng.random() > 0.15 else None for a, b in pairs]
    points = agg.comparison_matrix(k, pairs, verdicts)
    np.testing.assert_allclose(agg.bradley_terry(points, prior), reference_bt(points, prior), atol=1e-6)


def test_bradley_terry_is_finite_when_someone_wins_everything():
    pairs = agg.round_robin_pairs(4)
    order = [3, 0, 2, 1]  # strict ranking: every comparison goes to the higher-ranked player
    verdicts = [("A" if order.index(a) < order.index(b) else "B") for a, b in pairs]
    points = agg.comparison_matrix(4, pairs, verdicts)
    theta = agg.bradley_terry(points, prior=1.0)
    assert np.isfinite(theta).all() and abs(theta.sum()) < 1e-9
    assert list(np.argsort(-theta)) == order
    np.testing.assert_allclose(theta, reference_bt(points, 1.0), atol=1e-6)
    spread = [np.ptp(agg.bradley_terry(points, prior)) for prior in (0.25, 1.0, 4.0)]
    assert spread[0] > spread[1] > spread[2] > 0


def test_bradley_terry_anchor_star_and_idle_players():
    pairs = agg.anchor_pairs(4, 0)
    points = agg.comparison_matrix(5, pairs, ["A", "B", "B", "A", None, None])
    theta = agg.bradley_terry(points)
    assert math.isnan(theta[4]) and np.isfinite(theta[:4]).all()
    np.testing.assert_allclose(theta[:4], reference_bt(points[:4, :4], 1.0), atol=1e-6)
    assert np.isnan(agg.bradley_terry(np.zeros((2, 2)))).all()
    with pytest.raises(ValueError, match="prior must be a finite number > 0"):
        agg.bradley_terry(points, prior=0.0)
    with pytest.raises(ValueError, match="points must be a square matrix"):
        agg.bradley_terry(np.zeros((2, 3)))


def test_select_voters():
    assert agg.select_voters([0, 2, 3], None, None) == [0, 2, 3]
    meta = [0.9, 5.0, 0.1, 0.9, float("nan")]
    assert agg.select_voters([0, 2, 3, 4], meta, 2) == [0, 3]  # sample 1 is not valid; 0 and 3 tie: both kept
    assert agg.select_voters([0, 2, 3, 4], meta, 1) == [0]  # a tie goes to the earlier sample
    assert agg.select_voters([2, 4], meta, 1) == [2]  # NaN ranks last
    assert agg.select_voters([0, 2], meta, 5) == [0, 2]
    assert agg.select_voters([], meta, 2) == []


def test_vote():
    assert agg.vote([[7, 3], [9, 1], [8, 2]]) == [24.0, 6.0]
    assert agg.vote([[7, 3], [9, 1]], "mean") == [8.0, 2.0]
    assert agg.vote([]) is None
    with pytest.raises(ValueError, match="reduce must be 'sum' or 'mean'"):
        agg.vote([[1]], "max")
