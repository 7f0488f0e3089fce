"""From judge outputs to rewards: pairwise schedules, comparison tallies, win rates, Bradley-Terry, and voting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from r2m.checks import check_int

Verdict = Literal["A", "B"]
Pair = tuple[int, int]


def round_robin_pairs(num_players: int, both_orders: bool = True) -> list[Pair]:
    """Every pair ``(shown as A, shown as B)`` once (i < j), or in both orders to cancel position bias."""
    check_int("num_players", num_players)
    pairs = [(i, j) for i in range(num_players) for j in range(i + 1, num_players)]
    return [p for i, j in pairs for p in ((i, j), (j, i))] if both_orders else pairs


def anchor_pairs(num_players: int, anchor: int, both_orders: bool = True) -> list[Pair]:
    """Each player against ``anchor`` only: ``(player, anchor)``, and ``(anchor, player)`` too with both orders."""
    check_int("num_players", num_players)
    if not 0 <= anchor < num_players:
        raise ValueError(f"anchor must index one of the {num_players} players, got {anchor}")
    others = [i for i in range(num_players) if i != anchor]
    return [p for i in others for p in ((i, anchor), (anchor, i))] if both_orders else [(i, anchor) for i in others]


def comparison_matrix(num_players: int, pairs: Sequence[Pair], verdicts: Sequence[Verdict | None]) -> np.ndarray:
    """Points matrix [n, n] (float64): ``points[i, j]`` is what i scored against j, 1 per win and 1/2 per draw.

    ``verdicts[c]`` is ``"A"`` when ``pairs[c][0]`` won, ``"B"`` when ``pairs[c][1]`` won, None for a draw (an
    unparseable verdict counts as a draw). ``points + points.T`` is the number of games per pair.
    """
    if len(pairs) != len(verdicts):
        raise ValueError(f"got {len(pairs)} pairs but {len(verdicts)} verdicts")
    points = np.zeros((num_players, num_players))
    for (a, b), verdict in zip(pairs, verdicts, strict=True):
        if a == b:
            raise ValueError(f"a player cannot be compared with itself (pair {(a, b)})")
        if verdict == "A":
            points[a, b] += 1.0
        elif verdict == "B":
            points[b, a] += 1.0
        elif verdict is None:
            points[a, b] += 0.5
            points[b, a] += 0.5
        else:
            raise ValueError(f"a verdict must be 'A', 'B' or None, got {verdict!r}")
    return points


def win_rates(points: np.ndarray) -> np.ndarray:
    """Each player's points over its games (NaN for a player without games)."""
    points = _check_points(points)
    games = (points + points.T).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(games > 0, points.sum(axis=1) / games, np.nan)


def bradley_terry(points: np.ndarray, prior: float = 1.0, tol: float = 1e-12, max_iter: int = 100_000) -> np.ndarray:
    """Bradley-Terry log-strengths (mean zero over the players that played; NaN for the others).

    Maximises sum_ij P_ij log sigmoid(theta_i - theta_j) with Hunter's MM (Zermelo) iterations, where P is
    ``points`` plus ``prior`` drawn games added to every pair that met: the estimate stays finite when a player
    wins (or loses) everything. The pairs that met must connect the players that played.
    """
    points = _check_points(points)
    if not (math.isfinite(prior) and prior > 0):
        raise ValueError(f"prior must be a finite number > 0 (draws added per compared pair), got {prior!r}")
    strengths = np.full(points.shape[0], np.nan)
    games = points + points.T
    active = games.sum(axis=1) > 0
    if not active.any():
        return strengths
    met = games[np.ix_(active, active)] > 0
    wins = points[np.ix_(active, active)] + 0.5 * prior * met
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    log_pi = np.zeros(int(active.sum()))
    for _ in range(max_iter):
        pi = np.exp(log_pi)
        updated = np.log(total_wins) - np.log((games / (pi[:, None] + pi[None, :])).sum(axis=1))
        updated -= updated.mean()
        done = np.max(np.abs(updated - log_pi)) < tol
        log_pi = updated
        if done:
            break
    strengths[active] = log_pi
    return strengths


def select_voters(valid: Sequence[int], meta_scores: Sequence[float] | None, k_meta: int | None) -> list[int]:
    """The samples that vote, in sample order: all ``valid`` ones, or the ``k_meta`` valid ones the meta reward
    model rated highest (``meta_scores[s]`` for sample s; a tie goes to the earlier sample, NaN ranks last)."""
    valid = list(valid)
    if meta_scores is None or k_meta is None or k_meta >= len(valid):
        return valid
    check_int("k_meta", k_meta)

    def rank(s: int) -> tuple[float, int]:
        score = float(meta_scores[s])
        return (-score if math.isfinite(score) else math.inf, s)

    return sorted(sorted(valid, key=rank)[:k_meta])


def vote(scores: Sequence[Sequence[float]], reduce: Literal["sum", "mean"] = "sum") -> list[float] | None:
    """Per-response reward from the voting samples' score lists: their sum (DeepSeek-GRM voting) or mean; None
    when no sample votes."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if not scores:
        return None
    totals = np.asarray(scores, dtype=np.float64).sum(axis=0)
    return (totals / len(scores) if reduce == "mean" else totals).tolist()


def _check_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] != points.shape[1]:
        raise ValueError(f"points must be a square matrix [players, players], got shape {points.shape}")
    if not np.isfinite(points).all() or (points < 0).any():
        raise ValueError("points must be finite and >= 0")
    return points
