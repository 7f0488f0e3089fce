"""Mode ``anchored`` inside real TRL GRPO runs: a labeller scores a budget of groups, the update uses them."""

import math
import sys
from pathlib import Path

import pytest
from trl import GRPOTrainer

import r2m
from r2m.integrations.trl import R2MReward
from r2m.integrations.trl.labels import OnPolicyLabels

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny


def test_labels_go_to_the_first_groups_of_the_global_batch_only():
    seen = []

    def labeller(prompts, completions, completion_ids, topic, **rest):
        assert rest in ({}, {"constant": 7})  # a column that is not per sample arrives as it is
        seen.append((completions, topic))
        return [float(len(c)) if c != "x" else None for c in completions]

    labels = OnPolicyLabels(labeller, groups=3)
    completions = ["a", "bb", "x", "dddd", "e", "ff"]
    # process 1 of a 12-sample batch of groups of 4 holds samples 6-11: group 1 (6, 7) and group 2 (8-11)
    scores = labels(["p"] * 6, completions, [[1]] * 6, 4, 1, {"topic": list("uvwxyz"), "constant": 7})
    assert seen == [(completions, list("uvwxyz"))]
    assert [None if math.isnan(s) else s for s in scores.tolist()] == [1.0, 2.0, None, 4.0, 1.0, 2.0]
    seen.clear()
    scores = OnPolicyLabels(labeller, groups=2)(["p"] * 6, completions, [[1]] * 6, 4, 1, {"topic": list("uvwxyz")})
    assert seen == [(["a", "bb"], ["u", "v"])]
    assert [math.isnan(s) for s in scores.tolist()] == [False, False, True, True, True, True]
    with pytest.raises(ValueError, match="label_groups must be None"):
        OnPolicyLabels(labeller, groups=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["anchored", "head_only"])
def test_grpo_with_a_gold_labeller_on_one_group_per_batch(mode, tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    calls = []

    def gold(prompts, completions, completion_ids, **kwargs):
        calls.append(len(completions))
        return [float(len(set(ids))) for ids in completion_ids]

    reward = R2MReward(reward_model, reward_tokenizer, labeller=gold, label_groups=1,
                       config=r2m.R2MConfig(lr=1e-2, attn_dim=16, seed=0, mode=mode, anchor_weight=0.5))
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward],
                          args=trl_tiny.args("grpo", str(tmp_path), max_steps=3),
                          train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    trainer.train()
    assert calls == [4, 4, 4]  # one group of 4 per generation batch of 4 groups
    updates = trl_tiny.updates(trainer)
    assert len(updates) == 3 and reward.extra_forwards == 0
    assert all(u["groups_used"] == 1.0 for u in updates)  # per_device 4 = one group per batch
    labelled = [u["groups_labelled"] for u in updates]
    assert all(v in (0.0, 1.0) for v in labelled) and sum(labelled) >= 1  # a tied group gives no pair
    assert all(u["anchor_bt"] > 0 for u in updates if u["groups_labelled"])
    logged = [e for e in trainer.state.log_history if "r2m/labelled_share" in e]
    assert logged and all(e["r2m/labelled_share"] == 1.0 for e in logged)


def test_anchored_needs_a_labeller_and_other_modes_refuse_one():
    _, _, reward_model, reward_tokenizer = trl_tiny.models_()
    with pytest.raises(ValueError, match="mode 'anchored' learns from labels"):
        R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(mode="anchored"))
    with pytest.raises(ValueError, match="labeller is used in modes"):
        R2MReward(reward_model, reward_tokenizer, labeller=lambda **kw: [], config=r2m.R2MConfig(mode="r2m"))
