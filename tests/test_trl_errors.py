"""R2MReward: clear errors at construction (or at the first step for wiring mistakes), and the capture plan."""

import sys
from pathlib import Path

import pytest
from transformers import Trainer, TrainingArguments
from trl import GRPOTrainer

import r2m
from r2m.benchmarks import tiny_models as tiny
from r2m.integrations.trl import R2MReward, capture_plan

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny


def grpo(reward_funcs, callbacks, tmp_path, **overrides):
    policy, policy_tokenizer, *_ = trl_tiny.models_()
    return GRPOTrainer(model=policy, reward_funcs=reward_funcs, callbacks=callbacks,
                       args=trl_tiny.args("grpo", str(tmp_path), max_steps=1, **overrides),
                       train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)


def test_reward_model_must_be_a_sequence_classifier():
    tokenizer = tiny.build_tokenizer()
    with pytest.raises(ValueError, match="scoring head"):
        R2MReward(tiny.build_policy(tokenizer), tokenizer)
    with pytest.raises(TypeError, match="reward_model must be"):
        R2MReward(object(), tokenizer)
    with pytest.raises(ValueError, match="reward_tokenizer is required"):
        R2MReward(tiny.build_reward_model(tokenizer))
    with pytest.raises(TypeError, match="R2MConfig"):
        R2MReward(tiny.build_reward_model(tokenizer), tokenizer, config={"lr": 1.0})


def test_policy_hidden_size_mismatch_fails_when_the_trainer_is_built(tmp_path):
    *_, reward_model, reward_tokenizer = trl_tiny.models_()
    wrapped = r2m.wrap(reward_model, policy_hidden_size=99, config=r2m.R2MConfig(attn_dim=16))
    reward = R2MReward(wrapped, reward_tokenizer)
    with pytest.raises(ValueError, match="policy_hidden_size=99 but the policy's hidden size is 32"):
        grpo([reward], [reward], tmp_path)


def test_unsupported_trainer_fails_when_built(tmp_path):
    policy, _, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer)
    with pytest.raises(TypeError, match="GRPOTrainer and RLOOTrainer"):
        Trainer(model=policy, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]), callbacks=[reward])


@pytest.mark.parametrize("as_reward, as_callback, message", [
    (True, False, "callbacks="), (False, True, "reward_funcs=")])
def test_half_wired_reward_fails_at_the_first_step(as_reward, as_callback, message, tmp_path):
    *_, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(attn_dim=16))

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    trainer = grpo([reward] if as_reward else [length_reward], [reward] if as_callback else [], tmp_path)
    with pytest.raises(RuntimeError, match=message):
        trainer.train()


def test_capture_plan(tmp_path):
    def plan(kind, **overrides):
        return capture_plan(trl_tiny.args(kind, str(tmp_path), **overrides))

    assert plan("rloo") == "forward"
    assert plan("grpo") == "generation"
    assert plan("grpo", steps_per_generation=2) == "forward"
    assert plan("grpo", num_iterations=2) == "forward"
    assert plan("grpo", gradient_accumulation_steps=2) == "generation"  # steps_per_generation follows: aligned
    assert plan("grpo", use_vllm=True) == "forward"  # importance-sampling correction on by default
    assert plan("grpo", use_vllm=True, vllm_importance_sampling_correction=False) == "extra"
    assert plan("grpo", use_transformers_continuous_batching=True) == "extra"
