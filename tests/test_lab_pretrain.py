"""The lab's pretraining stage: SFT on gold-good responses raises the policy's gold reward; the result is cached."""

import statistics

import pytest
from transformers import AutoModelForCausalLM

from r2m.benchmarks.lab_grpo import LabRunConfig, initial_policy
from r2m.benchmarks.lab_world import LabConfig, LabWorld, PretrainConfig

SMALL = PretrainConfig(examples=1024, epochs=4, lr=3e-3)


@pytest.fixture(scope="module")
def world():
    return LabWorld(LabConfig(rm_pairs=64, rm_epochs=1))


def sampled_gold(world, path, prompts):
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    responses = world.sample(policy, prompts, temperature=0.7, seed=0)
    return statistics.fmean(world.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True))


def test_good_responses_are_the_best_of_n_by_gold(world):
    prompts = world.prompts(200, seed=5)
    best = world.good_responses(prompts, best_of=4, seed=0)
    single = world.good_responses(prompts, best_of=1, seed=0)
    assert world.spurious_share(best) == 0.0
    assert statistics.fmean(map(world.gold_reward, prompts, best)) > statistics.fmean(
        map(world.gold_reward, prompts, single)) + 0.1


def test_pretrained_policy_beats_the_random_init_on_gold_and_is_cached(world, tmp_path, monkeypatch):
    run = LabRunConfig(policy_hidden_size=32, sft=SMALL)
    random_init = initial_policy(world, LabRunConfig(policy_hidden_size=32, pretrain=False), tmp_path)
    pretrained = initial_policy(world, run, tmp_path)
    assert pretrained != random_init and pretrained.parent == tmp_path
    prompts = world.prompts(128, seed=3)
    assert sampled_gold(world, pretrained, prompts) > sampled_gold(world, random_init, prompts) + 0.1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached policy was trained again")

    monkeypatch.setattr(LabWorld, "pretrain", no_training)
    assert initial_policy(world, run, tmp_path) == pretrained
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([pretrained.name, random_init.name])
    # another pretraining config or seed is another policy
    with pytest.raises(AssertionError, match="trained again"):
        initial_policy(world, LabRunConfig(policy_hidden_size=32, sft=PretrainConfig(examples=512)), tmp_path)


def test_pretrain_config_validation():
    with pytest.raises(ValueError, match="PretrainConfig.best_of must be an int >= 1"):
        PretrainConfig(best_of=0)
