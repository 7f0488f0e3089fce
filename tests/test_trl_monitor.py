"""The over-optimisation monitor (``r2m/state_similarity``) in modes without fusion: R2MReward(monitor=True) in
real TRL runs on tiny models (CPU), against an independent full forward of the policy."""

import itertools
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trl import GRPOTrainer, RLOOTrainer

import r2m
from r2m.integrations.trl import R2MReward

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny

TRAINERS = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}
STEPS = 3


def config(**overrides):
    return r2m.R2MConfig(**{"lr": 1e-2, "attn_dim": 16, "seed": 0, "omega_min": 0.6, **overrides})


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def full_forward_similarity(policy, tokenizer, prompts, completion_ids, group_size):
    """The monitor computed directly: each sample alone through a copy of the policy (no padding, no cache), its
    final-norm states at the positions that predict its completion tokens mean-pooled, and per group the mean cosine
    over ordered pairs of distinct responses; the mean over groups."""
    with torch.random.fork_rng():  # building the copy draws random weights: leave the trainer's sampling alone
        copy = type(policy)(policy.config).eval()
    copy.load_state_dict(policy.state_dict())
    body = getattr(copy, copy.base_model_prefix)
    pooled = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completion_ids, strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = torch.tensor([list(prompt_ids) + list(completion)])
            states = body(input_ids=ids, use_cache=False).last_hidden_state[0]
            pooled.append(states[len(prompt_ids) - 1: len(prompt_ids) + len(completion) - 1].mean(0))
    groups = []
    for start in range(0, len(pooled), group_size):
        rows = pooled[start:start + group_size]
        groups.append(statistics.fmean([float(F.cosine_similarity(rows[i], rows[j], dim=0))
                                        for i, j in itertools.permutations(range(group_size), 2)]))
    return statistics.fmean(groups)


def run(kind, tmp_path, mode, monitor, expect=None):
    """One tiny run of R2MReward in ``mode``; returns (trainer, reward, policy forward count, per-call records of
    the rewards, the bytes of hidden states held and, with ``expect``, the directly computed similarity)."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    counter = trl_tiny.ForwardCounter(policy)
    reward = R2MReward(reward_model, reward_tokenizer, config=config(mode=mode), monitor=monitor)
    calls = []
    call = reward.__call__

    class Spy(type(reward)):
        def __call__(self, *args, **kwargs):
            out = call(*args, **kwargs)
            direct = None
            if expect:
                direct = full_forward_similarity(self._policy, policy_tokenizer, kwargs["prompts"],
                                                 kwargs["completion_ids"], self._group_size)
            calls.append({"rewards": out, "held": self.stored_hidden_bytes, "direct": direct})
            return out

    reward.__class__ = Spy
    trainer = TRAINERS[kind](model=policy, reward_funcs=[reward], callbacks=[reward],
                             args=trl_tiny.args(kind, str(tmp_path / f"{mode}-{monitor}"), max_steps=STEPS),
                             train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    reward.before = {part: {k: v.clone() for k, v in getattr(reward.r2m, part).state_dict().items()}
                     for part in ("fusion", "head")}
    trainer.train()
    return trainer, reward, counter.count, calls


def trl_vanilla_forwards(kind, tmp_path):
    """Policy forwards of TRL's own reward-model path (no R2M at all)."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    counter = trl_tiny.ForwardCounter(policy)
    TRAINERS[kind](model=policy, reward_funcs=[reward_model], reward_processing_classes=[reward_tokenizer],
                   args=trl_tiny.args(kind, str(tmp_path / "trl"), max_steps=STEPS),
                   train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer).train()
    return counter.count


@pytest.mark.slow
@pytest.mark.parametrize("kind, plan", [("grpo", "generation"), ("rloo", "forward")])
def test_vanilla_mode_monitor_matches_a_full_forward_without_extra_forwards(kind, plan, tmp_path):
    trainer, reward, forwards, calls = run(kind, tmp_path, "vanilla", monitor=True, expect=True)
    similarity = logged(trainer, "r2m/state_similarity")
    assert len(similarity) == STEPS and all(-1.0 <= s <= 1.0 for s in similarity)
    assert similarity == pytest.approx([c["direct"] for c in calls], abs=1e-4)
    assert len({round(s, 6) for s in similarity}) > 1  # the policy moves: a real signal, not a constant
    assert reward.capture_plan == plan and reward.extra_forwards == 0 and reward.capture_counts["extra"] == 0
    assert logged(trainer, "r2m/extra_forward_share") == [0.0] * STEPS
    # the monitor's states are neither held for nor used by the update
    assert [c["held"] for c in calls] == [0] * STEPS and reward.stored_hidden_bytes == 0
    assert logged(trainer, "r2m/hidden_nonfinite") == [0.0] * STEPS

    off_trainer, off_reward, off_forwards, off_calls = run(kind, tmp_path, "vanilla", monitor=False)
    assert logged(off_trainer, "r2m/state_similarity") == [] and off_reward.capture_plan is None
    # the monitor changes nothing the trainer sees, and costs no policy forward beyond TRL's own vanilla run
    assert [c["rewards"] for c in calls] == [c["rewards"] for c in off_calls]
    assert forwards == off_forwards == trl_vanilla_forwards(kind, tmp_path) > 0


@pytest.mark.slow
def test_head_only_mode_monitor_logs_and_the_update_trains_only_the_head(tmp_path):
    trainer, reward, _, calls = run("grpo", tmp_path, "head_only", monitor=True, expect=True)
    similarity = logged(trainer, "r2m/state_similarity")
    assert len(similarity) == STEPS and all(math.isfinite(s) and -1.0 <= s <= 1.0 for s in similarity)
    assert similarity == pytest.approx([c["direct"] for c in calls], abs=1e-4)
    assert [c["held"] for c in calls] == [0] * STEPS and reward.extra_forwards == 0
    updates = trl_tiny.updates(trainer)
    assert len(updates) == STEPS and all(u["refreshed"] == 0.0 for u in updates)
    for key, value in reward.r2m.fusion.state_dict().items():
        assert torch.equal(value, reward.before["fusion"][key]), f"the fusion changed: {key}"
    assert any(not torch.equal(v, reward.before["head"][k]) for k, v in reward.r2m.head.state_dict().items())


def test_monitor_argument():
    _, _, reward_model, reward_tokenizer = trl_tiny.models_()
    assert R2MReward(reward_model, reward_tokenizer, config=config()).monitor is True
    assert R2MReward(reward_model, reward_tokenizer, config=config(mode="vanilla")).monitor is False
    assert R2MReward(reward_model, reward_tokenizer, config=config(mode="vanilla"), monitor=True).monitor is True
    assert R2MReward(reward_model, reward_tokenizer, config=config(), monitor=False).monitor is False
    for bad in ("yes", 1, 0.0):
        with pytest.raises(TypeError, match="monitor must be True, False or None"):
            R2MReward(reward_model, reward_tokenizer, config=config(), monitor=bad)
