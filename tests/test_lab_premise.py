"""The premise check (paper Sec. 3) and the on-policy ranking metric on constructed cases."""

import math

import pytest
import torch

from r2m.benchmarks import tiny_models as tiny
from r2m.benchmarks.lab_world import (
    LabConfig,
    LabWorld,
    class_similarity,
    premise_check,
    probe_accuracy,
    ranking_agreement,
)


def test_class_similarity_of_two_separate_directions():
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    chosen, rejected = e1.repeat(5, 1), 2 * e2.repeat(5, 1)
    assert class_similarity(chosen, rejected) == pytest.approx({"same_class": 1.0, "cross_class": 0.0, "gap": 1.0})
    # centred, the two classes point in opposite directions
    assert class_similarity(chosen, rejected, centre=True) == pytest.approx(
        {"same_class": 1.0, "cross_class": -1.0, "gap": 2.0})


def test_class_similarity_by_hand():
    chosen = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    rejected = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    c = 1 / math.sqrt(2)
    same = 0.5 * (c + 0.0)  # within chosen: cos(0, 45 deg); within rejected: cos(90 deg)
    cross = (0.0 + -1.0 + c + -c) / 4
    assert class_similarity(chosen, rejected) == pytest.approx(
        {"same_class": same, "cross_class": cross, "gap": same - cross})


def test_probe_finds_a_linear_signal_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(400, 8, generator=generator)
    signal = torch.zeros(8)
    signal[3] = 1.0
    train, test = torch.arange(300), torch.arange(300, 400)
    chosen = base + signal + 0.1 * torch.randn(400, 8, generator=generator)
    assert probe_accuracy(chosen, base, train, test) == 1.0
    noise = base + torch.randn(400, 8, generator=generator)
    assert abs(probe_accuracy(noise, base, train, test) - 0.5) < 0.15


def test_ranking_agreement_by_hand():
    gold = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([[0.0, 2.0, 1.0], [5.0, 3.0, 3.0]])
    # group 1: pairs (1>0) right, (2>0) right, (2>1) wrong; group 2: (0>2) right, (1>2) tie; equal gold skipped
    assert ranking_agreement(scores, gold) == pytest.approx((1 + 1 + 0 + 1 + 0.5) / 5)
    assert math.isnan(ranking_agreement(scores, torch.ones(2, 3)))  # no pair differs in gold


def test_premise_check_on_the_lab_world():
    world = LabWorld(LabConfig(rm_pairs=64, rm_epochs=2))
    proxy = world.train_proxy()
    torch.manual_seed(0)
    policy = tiny.build_policy(world.tokenizer, "llama", hidden_size=16).eval()
    pairs = world.preference_pairs(100, seed=1, bias=0.5)
    result = premise_check(world, policy, proxy, pairs, seed=0)
    assert result["pairs"] == 100 and result["test_pairs"] == 30
    for key in ("probe_policy_states", "probe_rm_states", "proxy_rm"):
        assert 0.0 <= result[key] <= 1.0 and (result[key] * 30) == pytest.approx(round(result[key] * 30))
    assert -1.0 <= result["cross_class_cos"] <= 1.0
    assert result["gap_cos"] == pytest.approx(result["same_class_cos"] - result["cross_class_cos"])
