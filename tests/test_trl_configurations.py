"""R2MReward under the option combinations practitioners run, against the same run with TRL's own reward path."""

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer, RLOOTrainer

import r2m
import r2m.benchmarks.tiny_models
from r2m.integrations.trl import R2MReward

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny

TRAINERS = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}
# Every option the integration's first tests did not use, at once: several passes per generation batch, generation
# batches spanning several optimizer steps, a KL term against a reference model loaded from disk, truncated
# completions masked out of attention and loss, and R2M mixed with a rule reward under weights.
COMBINED = {
    "grpo": dict(num_iterations=2, steps_per_generation=4, gradient_accumulation_steps=2, beta=0.04,
                 loss_type="dr_grpo", scale_rewards="batch", mask_truncated_completions=True,
                 reward_weights=[1.0, 0.5], max_steps=8),
    "rloo": dict(num_iterations=2, steps_per_generation=2, gradient_accumulation_steps=1, beta=0.04,
                 mask_truncated_completions=True, reward_weights=[1.0, 0.5], max_steps=4),
}


def length_reward(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def saved_policy(tmp_path):
    """The tiny policy loaded from disk, so the trainer can build its reference model from ``name_or_path``."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    policy.save_pretrained(tmp_path / "policy")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "policy"), policy_tokenizer, reward_model, reward_tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_combined_options_need_no_extra_forward_and_refresh_every_sample(kind, tmp_path):
    options = COMBINED[kind]
    counts, calls = {}, []
    for variant in ("vanilla", "r2m"):
        policy, policy_tokenizer, reward_model, reward_tokenizer = saved_policy(tmp_path / variant)
        counter = trl_tiny.ForwardCounter(policy)
        if variant == "vanilla":  # TRL's own reward-model path, same options
            reward_funcs, callbacks, processing = [reward_model, length_reward], [], [reward_tokenizer, None]
        else:
            reward = R2MReward(reward_model, reward_tokenizer,
                               config=r2m.R2MConfig(lr=1e-2, attn_dim=16, seed=0))
            class Recording(R2MReward):
                def __call__(self, *args, **kwargs):
                    out = R2MReward.__call__(self, *args, **kwargs)
                    calls.append((kwargs["completion_ids"], out))
                    return out

            reward.__class__ = Recording
            reward_funcs, callbacks, processing = [reward, length_reward], [reward], None
        trainer = TRAINERS[kind](model=policy, reward_funcs=reward_funcs, callbacks=callbacks,
                                 reward_processing_classes=processing,
                                 args=trl_tiny.args(kind, str(tmp_path / variant / "out"), **options),
                                 train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
        trainer.train()
        counts[variant] = counter.count

    assert counts["r2m"] == counts["vanilla"] > 0
    assert reward.extra_forwards == 0 and reward.capture_counts["extra"] == 0
    eos = policy_tokenizer.eos_token_id
    truncated = [c for completion_ids, _ in calls for c in completion_ids if c[-1] != eos]
    assert truncated, "the run must contain truncated completions for mask_truncated_completions to matter"
    assert all(r is not None and math.isfinite(r) for _, rewards in calls for r in rewards)
    updates = trl_tiny.updates(trainer)
    assert updates and all(u["refreshed"] == 1.0 for u in updates)
    history = [entry for entry in trainer.state.log_history if "r2m/refreshed" in entry]
    assert history and all(entry["r2m/refreshed"] == 1.0 for entry in history)
    assert all(entry["r2m/extra_forward_share"] == 0.0
               for entry in trainer.state.log_history if "r2m/extra_forward_share" in entry)


@pytest.mark.slow
def test_masked_truncated_samples_are_refreshed_with_the_training_pass_states(tmp_path):
    """A truncated completion's states after the refresh are the trainer's training pass over its full token ids
    (completion masked out of attention, as TRL runs it), not the annotation-time states."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(lr=1e-2, attn_dim=16, seed=0))
    released = []
    update = reward._update
    reward._update = lambda rollout: released.append(rollout) or update(rollout)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward],
                          args=trl_tiny.args("grpo", str(tmp_path), max_steps=1, learning_rate=0.0,
                                             mask_truncated_completions=True),
                          train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    trainer.train()
    (rollout,) = released
    assert rollout.refreshed_share == 1.0
    body, eos = trainer.model.model, policy_tokenizer.eos_token_id
    checked = 0
    with torch.no_grad():
        for key, (row, *_) in rollout.keys.items():
            completion_start = len(key) - 5  # max_completion_length: a truncated completion fills it
            if key[-1] in (eos, policy_tokenizer.pad_token_id) or completion_start < 1:
                continue
            ids = torch.tensor([key])
            mask = torch.ones_like(ids)
            mask[0, completion_start:] = 0
            expected = body(input_ids=ids, attention_mask=mask).last_hidden_state[0, :-1]
            torch.testing.assert_close(rollout.states.sample(row), expected, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked > 0


@pytest.mark.slow
@pytest.mark.parametrize("rm_family", ["deberta-v2", "modernbert", "gpt_neox"])
def test_encoder_and_neox_reward_models_score_exactly_their_logits_at_the_start(rm_family, tmp_path):
    """At t = 0, w = 1: R2M's reward is the wrapped RM's own score of each prompt + completion."""
    policy, policy_tokenizer, _, reward_tokenizer = trl_tiny.models_()
    torch.manual_seed(1)
    reward_model = r2m.benchmarks.tiny_models.build_reward_model(reward_tokenizer, rm_family, hidden_size=32).eval()
    reward = R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(lr=1e-2, attn_dim=16, seed=0))
    calls = []

    class Recording(R2MReward):
        def __call__(self, *args, **kwargs):
            out = R2MReward.__call__(self, *args, **kwargs)
            calls.append((kwargs["prompts"], kwargs["completions"], out))
            return out

    reward.__class__ = Recording
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward],
                          args=trl_tiny.args("grpo", str(tmp_path), max_steps=2, mask_truncated_completions=True),
                          train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    trainer.train()
    prompts, completions, rewards = calls[0]
    with torch.no_grad():
        expected = [float(reward_model(**reward_tokenizer(p + c, return_tensors="pt", add_special_tokens=False)).logits)
                    for p, c in zip(prompts, completions, strict=True)]
    assert rewards == pytest.approx(expected, abs=1e-5)
    updates = trl_tiny.updates(trainer)
    assert len(updates) == 2 and all(u["refreshed"] == 1.0 for u in updates)
