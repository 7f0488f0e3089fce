"""The over-optimisation lab's world: gold reward, biased preference data, exploitable proxy."""

import random

import pytest

from r2m.benchmarks.lab_world import LabConfig, LabWorld


@pytest.fixture(scope="module")
def world():
    return LabWorld(LabConfig(rm_pairs=256, rm_epochs=12, rm_bias=0.8))


def test_gold_reward_by_hand(world):
    prompt = "w2 w4 w6 w8"
    assert world.gold_reward(prompt, "w2 w4 w6 w8") == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)
    assert world.gold_reward(prompt, "w2 w1 w3 w5") == pytest.approx(0.5 * 0.25 + 0.5 * 0.75)
    assert world.gold_reward(prompt, "w0 w0 w2 w1") == pytest.approx(0.5 * 0.25 + 0.5 * 0.25 - 1.0 * 0.5)
    assert world.gold_reward(prompt, "w1 w1 w1 w1") == pytest.approx(0.5 * 0.0 + 0.5 * 0.25)
    assert world.gold_reward(prompt, "") == 0.0


def test_preference_pairs_are_gold_labelled_and_biased(world):
    pairs = world.preference_pairs(200, seed=1)
    assert len(pairs) == 200
    assert all(world.gold_reward(p, c) > world.gold_reward(p, r) for p, c, r in pairs)
    spurious_in_chosen = sum("w0" in c.split() for _, c, _ in pairs) / len(pairs)
    spurious_in_rejected = sum("w0" in r.split() for _, _, r in pairs) / len(pairs)
    assert spurious_in_chosen > 0.6 > spurious_in_rejected
    prompts = world.prompts(50, seed=2)
    assert all(len(set(p.split())) == 4 and "w0" not in p.split() for p in prompts)


def test_proxy_learns_the_data_and_is_exploitable(world):
    pairs = world.preference_pairs(256, seed=0)
    proxy = world.train_proxy(pairs)
    assert world.accuracy(proxy, pairs) > 0.8
    prompts = world.prompts(16, seed=3)
    rng = random.Random(0)
    spam = ["w0 " * 7 + "w0"] * 16
    typical = [world.sample_response(p, rng, spurious=False) for p in prompts]
    assert world.score(proxy, prompts, spam).mean() > world.score(proxy, prompts, typical).mean()
    gold = [(world.gold_reward(p, s), world.gold_reward(p, t)) for p, s, t in zip(prompts, spam, typical, strict=True)]
    assert all(spam_gold < typical_gold for spam_gold, typical_gold in gold)


def test_config_validation():
    with pytest.raises(ValueError, match="rm_bias must be in"):
        LabConfig(rm_bias=2)
    with pytest.raises(ValueError, match="spurious_word 'x9' is not in the vocabulary"):
        LabWorld(LabConfig(spurious_word="x9"))


@pytest.mark.parametrize("module", ["r2m.lab", "r2m.tiny", "r2m.integrations.trl.lab_grpo"])
def test_the_lab_is_not_library_api(module):
    """The lab and the tiny test models are benchmark code (r2m.benchmarks.*), not part of the library."""
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(module)
