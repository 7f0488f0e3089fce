"""`r2m bench ceiling`: labelled on-policy pairs, the proxy's ordering of them and the probes' held-out accuracy."""

import pytest
import torch

from r2m.benchmarks import ceiling as bench
from r2m.benchmarks import tiny_models
from r2m.benchmarks.lab_world import LabConfig, LabWorld
from r2m.cli import BENCHMARKS


def test_labelled_pairs_are_every_within_group_pair_of_different_gold():
    gold = torch.tensor([[0.2, 0.5, 0.5], [1.0, 1.0, 1.0], [0.0, -1.0, 3.0]])
    better, worse, group = bench.labelled_pairs(gold)
    expected = {(g * 3 + i, g * 3 + j, g) for g in range(3) for i in range(3) for j in range(3)
                if gold[g, i] > gold[g, j]}
    assert set(zip(better.tolist(), worse.tolist(), group.tolist(), strict=True)) == expected
    assert len(expected) == 5  # group 0: 2 pairs, group 1 (all tied): none, group 2: 3 pairs


def test_ordered_share_counts_ties_half():
    scores = torch.tensor([3.0, 1.0, 1.0, 0.0])
    better, worse = torch.tensor([0, 1, 3]), torch.tensor([1, 2, 0])
    assert bench.ordered_share(scores, better, worse) == pytest.approx((1 + 0.5 + 0) / 3)


def test_ceiling_on_a_tiny_world_reports_accuracies_of_held_out_pairs():
    torch.manual_seed(0)
    world = LabWorld(LabConfig(rm_pairs=64, rm_epochs=2))
    proxy = world.train_proxy()
    policy = tiny_models.build_policy(world.tokenizer, "llama", hidden_size=16).eval()
    result = bench.ceiling(world, proxy, policy, groups=8, size=4, temperature=1.0, seed=0, epochs=2)
    assert result["pairs_train"] > 0 and result["pairs_test"] > 0
    for key in bench.FEATURES:
        assert 0.0 <= result[key] <= 1.0, key
    with pytest.raises(ValueError, match="raise --prompts"):
        bench.ceiling(world, proxy, policy, groups=1, size=4, temperature=1.0, seed=0)


def test_the_benchmark_is_a_cli_command_and_checks_its_flags():
    assert "ceiling" in BENCHMARKS
    with pytest.raises(SystemExit, match="--prompts must be >= 2, got 1"):
        bench.main(["--prompts", "1", "--quick"])


def test_the_update_column_trains_an_r2m_reward_on_the_labelled_groups():
    torch.manual_seed(0)
    world = LabWorld(LabConfig(rm_pairs=64, rm_epochs=2))
    proxy = world.train_proxy()
    policy = tiny_models.build_policy(world.tokenizer, "llama", hidden_size=16).eval()
    prompts = [p for p in world.prompts(4, seed=1) for _ in range(4)]
    responses = world.sample(policy, prompts, 1.0, seed=0)
    gold = torch.tensor([world.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]).view(4, 4)
    before = world.score(proxy, prompts, responses)
    for mode in bench.UPDATE_MODES:
        scores = bench.update_scores(world, proxy, policy, prompts, responses, gold, mode, epochs=3, seed=0)
        assert scores.shape == (16,) and torch.isfinite(scores).all()
        assert not torch.allclose(scores, before)  # trained: it no longer scores as the proxy does
    assert torch.equal(world.score(proxy, prompts, responses), before)  # the proxy itself is left as it was
