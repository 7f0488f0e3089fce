"""A fixed anchor set of preference pairs inside real TRL GRPO runs: RTEs once, the policy's states of the pairs from
one counted no-grad forward every ``anchor_every`` R2M updates (none in ``head_only``)."""

import math
import sys
from pathlib import Path

import pytest
from trl import GRPOTrainer

import r2m
from r2m.integrations.trl import R2MReward

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
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
    updates = len(reward.update_stats)
    assert updates == steps  # one generation batch per step
    expected = math.ceil(updates / anchor_every) if mode == "anchored" else 0
    assert reward.anchor_forwards == expected == counter.count
    assert reward.extra_forwards == 0  # the policy's own samples still need none
    assert all(s["anchor_set_bt"] > 0 and math.isfinite(s["loss"]) for s in reward.update_stats)
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
        states = reward._anchor_states
        assert states.tokens[0] == tuple(first) and states.tokens[len(PAIRS)] == tuple(rejected)
        assert not states.missing and states.hidden.shape[0] == int(states.cu_seqlens[-1])


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


def test_lab_run_config_checks_the_anchor_set_fields():
    from r2m.integrations.trl.lab_grpo import LabRunConfig

    assert LabRunConfig(anchor_pairs=64, anchor_every=4).anchor_pairs == 64
    with pytest.raises(ValueError, match="anchor_pairs must be >= 0"):
        LabRunConfig(anchor_pairs=-1)
    with pytest.raises(ValueError, match="anchor_every must be >= 1"):
        LabRunConfig(anchor_every=0)
