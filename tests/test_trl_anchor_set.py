"""A fixed anchor set of preference pairs inside real TRL GRPO runs: RTEs once, the policy's states of the pairs from
one counted no-grad forward every ``anchor_every`` R2M updates (none in ``head_only``)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from trl import GRPOTrainer

import r2m
from r2m.integrations.trl import R2MReward

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import test_trl_judge
import trl_tiny

PAIRS = [("w1 w2", "w1 w2 w3", "w9"), ("w4 w5 w6", "w4 w6", "w40 w41 w42"), ("w7", "w7 w8", "w50")]


class AnchorForwardCounter:
    """Counts the policy's no-cache forwards of exactly the anchor set's 2P rows (no trainer pass has 6 rows)."""

    def __init__(self, policy, rows):
        self.count, self.rows = 0, rows
        body = getattr(policy, policy.base_model_prefix)
        self.handle = body.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("past_key_values") is None and input_ids is not None and input_ids.shape[0] == self.rows:
            self.count += 1


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "anchor_every", "steps"), [("anchored", 2, 3), ("anchored", 1, 2),
                                                              ("head_only", 1, 2)])
def test_grpo_with_a_fixed_anchor_set(mode, anchor_every, steps, tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, anchor_pairs=PAIRS, anchor_every=anchor_every,
                       config=r2m.R2MConfig(lr=1e-2, attn_dim=16, seed=0, mode=mode, anchor_weight=0.5))
    counter = AnchorForwardCounter(policy, 2 * len(PAIRS))
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward],
                          args=trl_tiny.args("grpo", str(tmp_path), max_steps=steps),
                          train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    trainer.train()
    counter.handle.remove()
    updates = len(trl_tiny.updates(trainer))
    assert updates == steps  # one generation batch per step
    expected = math.ceil(updates / anchor_every) if mode == "anchored" else 0
    assert reward.anchor_forwards == expected == counter.count
    assert reward.extra_forwards == 0  # the policy's own samples still need none
    assert all(u["anchor_set_bt"] > 0 and math.isfinite(u["loss"]) for u in trl_tiny.updates(trainer))
    logged = [e for e in trainer.state.log_history if "r2m/anchor_set_bt" in e]
    assert len(logged) == updates and all(math.isfinite(e["r2m/anchor_set_bt"]) for e in logged)
    assert [e["r2m/anchor_forwards"] for e in logged][-1] == expected
    rewards = [e["r2m/reward_mean"] for e in trainer.state.log_history if "r2m/reward_mean" in e]
    assert len(rewards) == steps and all(math.isfinite(r) for r in rewards)
    if mode == "anchored":  # the states are of prompt ids as the trainer builds them + response ids + EOS
        eos = [policy_tokenizer.eos_token_id]
        first = policy_tokenizer(text="w1 w2")["input_ids"] + \
            policy_tokenizer(text="w1 w2 w3", add_special_tokens=False)["input_ids"] + eos
        rejected = policy_tokenizer(text="w1 w2")["input_ids"] + \
            policy_tokenizer(text="w9", add_special_tokens=False)["input_ids"] + eos
        states = reward.anchors.states
        assert states.tokens[0] == tuple(first) and states.tokens[len(PAIRS)] == tuple(rejected)
        assert not states.missing and states.hidden.shape[0] == int(states.cu_seqlens[-1])


# the scripted judges judge prompts that start with an even word: the first two pairs share one, the third gets none
JUDGE_PAIRS = [("w2 w12", "w2 w3", "w9"), ("w2 w12", "w5", "w2 w4 w6"), ("w3 w13", "w3", "w8")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spct", "rm_r1"])
def test_grpo_with_a_judge_and_a_fixed_anchor_set(kind, tmp_path):
    """The anchor set's r_base are the judge's rewards for each pair judged as a group of its own (the two
    compared), also where consecutive pairs share a prompt; a pair the judge gives no reward is left out."""
    judge = test_trl_judge.make_judge(kind)
    reward = R2MReward(judge, anchor_pairs=JUDGE_PAIRS,
                       config=test_trl_judge.config(mode="anchored", anchor_weight=0.5))
    policy, policy_tokenizer, *_ = trl_tiny.models_()
    counter = AnchorForwardCounter(policy, 2 * len(JUDGE_PAIRS))
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward], args=test_trl_judge.args(tmp_path),
                          train_dataset=test_trl_judge.dataset(), processing_class=policy_tokenizer)
    anchors, update = [], reward.r2m.update_states
    reward.r2m.update_states = lambda *a, anchor, **k: anchors.append(anchor) or update(*a, anchor=anchor, **k)
    trainer.train()
    counter.handle.remove()

    assert len(trl_tiny.updates(trainer)) == len(anchors) == 3
    assert reward.anchor_forwards == counter.count == 3  # anchor_every=1: one forward per update
    assert all(u["anchor_set_bt"] > 0 and math.isfinite(u["loss"]) for u in trl_tiny.updates(trainer))
    logged = [e for e in trainer.state.log_history if "r2m/anchor_set_bt" in e]
    assert len(logged) == 3 and all(math.isfinite(e["r2m/anchor_set_bt"]) for e in logged)
    assert [e["r2m/anchor_forwards"] for e in logged] == [1.0, 2.0, 3.0]
    judged = [judge.score([p, p], [c, r]).rewards for p, c, r in JUDGE_PAIRS]
    assert all(None not in pair for pair in judged[:2]) and judged[2] == [None, None]
    chosen, rejected = (torch.tensor([math.nan if p[i] is None else p[i] for p in judged]) for i in (0, 1))
    for batch in anchors:
        torch.testing.assert_close(batch.chosen_base, chosen, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(batch.rejected_base, rejected, rtol=0, atol=0, equal_nan=True)
        assert torch.isfinite(batch.chosen_rte[:2]).all() and torch.isfinite(batch.rejected_rte[:2]).all()


def test_anchor_arguments_are_checked():
    _, _, reward_model, reward_tokenizer = trl_tiny.models_()

    def build(mode="anchored", **kwargs):
        return R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(mode=mode), **kwargs)

    build(anchor_pairs=PAIRS)  # anchored needs labels or an anchor set, not both
    build("head_only", anchor_pairs=[list(PAIRS[0])], anchor_every=3)
    with pytest.raises(ValueError, match="anchor_pairs is empty"):
        build(anchor_pairs=[])
    with pytest.raises(ValueError, match=r"anchor_pairs\[1\] must be a \(prompt, chosen, rejected\) tuple"):
        build(anchor_pairs=[PAIRS[0], ("p", "c")])
    with pytest.raises(ValueError, match=r"anchor_pairs\[0\] must hold three texts"):
        build(anchor_pairs=[("p", "c", 3)])
    with pytest.raises(ValueError, match="anchor_pairs mixes texts and conversations"):
        build(anchor_pairs=[PAIRS[0], ([{"role": "user", "content": "p"}], [{"role": "assistant", "content": "a"}],
                                       [{"role": "assistant", "content": "b"}])])
    with pytest.raises(TypeError, match="anchor_pairs must be a sequence"):
        build(anchor_pairs="w1 w2")
    for every in (0, 1.5, True):
        with pytest.raises(ValueError, match="anchor_every must be an int >= 1"):
            build(anchor_pairs=PAIRS, anchor_every=every)
    with pytest.raises(ValueError, match=r"anchor_pairs is used in modes \('anchored', 'head_only'\)"):
        build("r2m", anchor_pairs=PAIRS)
    with pytest.raises(ValueError, match="mode 'anchored' learns from labels"):
        build()


def test_a_judge_that_compares_with_a_dataset_column_cannot_judge_the_anchor_set():
    from r2m.adapters import RMR1Judge

    judge = RMR1Judge(test_trl_judge.make_judge("rm_r1").backend, mode="anchor", reference_column="reference")
    with pytest.raises(ValueError, match="anchor_pairs cannot be judged .*reference_column='reference'"):
        R2MReward(judge, anchor_pairs=PAIRS, config=test_trl_judge.config(mode="anchored"))


def test_lab_run_config_checks_the_anchor_set_fields():
    from r2m.benchmarks.lab_grpo import LabRunConfig

    assert LabRunConfig(anchor_pairs=64, anchor_every=4).anchor_pairs == 64
    with pytest.raises(ValueError, match=r"LabRunConfig.anchor_pairs must be an int >= 0, got -1"):
        LabRunConfig(anchor_pairs=-1)
    with pytest.raises(ValueError, match=r"LabRunConfig.anchor_pairs must be an int >= 0, got 1.5"):
        LabRunConfig(anchor_pairs=1.5)
    with pytest.raises(ValueError, match=r"LabRunConfig.anchor_every must be an int >= 1, got 0"):
        LabRunConfig(anchor_every=0)
