"""The GREBT loss (paper Eqs. 5-7) and the pseudo-label pair selection of Algorithm 1."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# A group whose rewards spread (population std) at most GRE_REL_EPS * max_j |r_j| (GRE_ABS_EPS near zero) counts as
# all-equal: its GRE term is the constant log K with exactly zero gradient, as the paper shows it is in the limit.
# Why 1e-4: a float32 reward of magnitude M from a D-wide linear head carries a rounding error of about
# sqrt(D) * 6e-8 * M (~4e-6 M at D = 4096), so a spread below ~1e-4 M mostly ranks rounding noise, which the z-scores
# would blow up to O(1) and the 1/std gradient would follow; a spread a reward model means (>= 0.01% of its scale)
# keeps its GRE term. It also bounds the gradient of every non-degenerate group: |dL/dr|_2 <= 2 log K / std
# < 2 log K / (1e-4 max|r|). The absolute floor only matters for rewards within ~1e-8 of zero.
GRE_REL_EPS = 1e-4
GRE_ABS_EPS = 1e-12


def _check_groups(name: str, rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"{name} must have shape [groups, group_size], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 responses per group, got group_size {rewards.shape[1]}")
    if not rewards.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {rewards.dtype}")


def bt_loss(r_w: Tensor, r_l: Tensor) -> Tensor:
    """Bradley-Terry loss -log sigmoid(r_w - r_l) per group, shape [G]."""
    if r_w.shape != r_l.shape:
        raise ValueError(f"bt_loss: r_w and r_l must have the same shape, got {tuple(r_w.shape)} and "
                         f"{tuple(r_l.shape)}")
    return -F.logsigmoid(r_w - r_l)


def _spread(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group: rewards minus their mean [G, K], population variance [G, 1], degenerate [G, 1] bool."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    var = centred.square().mean(dim=1, keepdim=True)
    with torch.no_grad():
        scale = rewards.abs().amax(dim=1, keepdim=True)
        degenerate = var.sqrt() <= (GRE_REL_EPS * scale).clamp_min(GRE_ABS_EPS)
    return centred, var, degenerate


def degenerate_groups(rewards: Tensor) -> Tensor:
    """Which groups [G] (bool) `gre_loss` treats as ties: rewards spread at most ``GRE_REL_EPS`` of the group's
    largest magnitude (float32 resolution), or ``GRE_ABS_EPS`` near zero."""
    _check_groups("degenerate_groups: rewards", rewards)
    return _spread(rewards)[2].squeeze(1)


def gre_loss(rewards: Tensor) -> Tensor:
    """Group reward entropy -sum_j p_j log p_j with p = softmax of the group-standardised rewards, shape [G].

    Uses the population std. A group whose rewards are tied up to float32 resolution (`degenerate_groups`) gets the
    constant log K and a gradient of exactly zero, never NaN.
    """
    _check_groups("gre_loss: rewards", rewards)
    centred, var, degenerate = _spread(rewards)
    z = centred / torch.where(degenerate, torch.ones_like(var), var).sqrt()
    log_p = torch.log_softmax(z, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    uniform = torch.full_like(entropy, math.log(rewards.shape[1]))
    return torch.where(degenerate.squeeze(1), uniform, entropy)


def select_pairs(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Winner (highest reward) and loser (lowest) per group, and whether the group has a pair at all.

    A group has no pair when all its rewards are equal or any is non-finite. Returns (winner [G], loser [G],
    valid [G] bool); winner/loser are indices into the group.
    """
    _check_groups("select_pairs: rewards", rewards)
    finite = torch.isfinite(rewards).all(dim=1)
    safe = torch.where(torch.isfinite(rewards), rewards, torch.zeros_like(rewards))
    winner = safe.argmax(dim=1)
    loser = safe.argmin(dim=1)
    spread = safe.gather(1, winner[:, None]) > safe.gather(1, loser[:, None])
    return winner, loser, finite & spread.squeeze(1)


def labelled_bt_loss(rewards: Tensor, labels: Tensor, pairs: str = "extremes") -> tuple[Tensor, Tensor]:
    """Bradley-Terry loss per group of ``rewards`` [G, K] against a labeller's scores ``labels`` [G, K], and which
    groups have a labelled pair ([G] bool: every label finite, not all equal).

    ``pairs="extremes"``: the group's highest- against its lowest-labelled sample (as `select_pairs` picks them);
    ``"all"``: the mean over every pair of samples whose labels differ, the better-labelled one as winner.
    """
    _check_groups("labelled_bt_loss: rewards", rewards)
    if labels.shape != rewards.shape:
        raise ValueError(f"labelled_bt_loss: labels must have the shape of rewards {tuple(rewards.shape)}, got "
                         f"{tuple(labels.shape)}")
    if pairs == "extremes":
        winner, loser, valid = select_pairs(labels)
        return bt_loss(rewards.gather(1, winner[:, None]).squeeze(1),
                       rewards.gather(1, loser[:, None]).squeeze(1)), valid
    if pairs != "all":
        raise ValueError(f"labelled_bt_loss: pairs must be 'extremes' or 'all', got {pairs!r}")
    finite = torch.isfinite(labels).all(dim=1)
    safe = torch.where(finite[:, None], labels, torch.zeros_like(labels))
    better = safe[:, :, None] > safe[:, None, :]  # [G, i, j]: i is labelled better than j
    margins = rewards[:, :, None] - rewards[:, None, :]
    loss = torch.where(better, -F.logsigmoid(margins), torch.zeros_like(margins)).sum(dim=(1, 2))
    count = better.sum(dim=(1, 2))
    return loss / count.clamp_min(1), finite & (count > 0)


def grebt_loss(
    rewards: Tensor, winner: Tensor, loser: Tensor, alpha: float, valid: Tensor | None = None
) -> Tensor:
    """(1 - alpha) L_BT + alpha L_GRE, averaged over groups (paper Eq. 7).

    ``valid`` marks the groups that have a pair; groups without one contribute their GRE term only.
    """
    _check_groups("grebt_loss: rewards", rewards)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"grebt_loss: alpha must be in [0, 1], got {alpha!r}")
    groups = rewards.shape[0]
    for name, index in (("winner", winner), ("loser", loser)):
        if index.shape != (groups,) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"grebt_loss: {name} must be an integer tensor of shape [{groups}], got "
                             f"{index.dtype} {tuple(index.shape)}")
    if groups == 0:
        return rewards.sum()
    r_w = rewards.gather(1, winner.long()[:, None]).squeeze(1)
    r_l = rewards.gather(1, loser.long()[:, None]).squeeze(1)
    bt = bt_loss(r_w, r_l)
    if valid is not None:
        bt = torch.where(valid, bt, torch.zeros_like(bt))
    return ((1.0 - alpha) * bt + alpha * gre_loss(rewards)).mean()
