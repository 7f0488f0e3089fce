"""R2MReward inside real TRL GRPOTrainer / RLOOTrainer runs on tiny models (CPU)."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from trl import GRPOTrainer, RLOOTrainer

import r2m
from r2m.integrations.trl import R2MReward
from r2m.integrations.trl.policy_states import PolicyStateSource

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny

TRAINERS = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}
R2M_METRICS = ("r2m/loss", "r2m/bt", "r2m/gre", "r2m/omega", "r2m/reward_mean", "r2m/vanilla_reward_mean",
               "r2m/groups_skipped", "r2m/groups_degenerate", "r2m/update_ms", "r2m/extra_forward_share",
               "r2m/capture_ms", "r2m/state_similarity")


def config(**overrides):
    return r2m.R2MConfig(**{"lr": 1e-2, "attn_dim": 16, "seed": 0, "omega_min": 0.6, **overrides})


def spy_rewards(reward, stored=None):
    """Record every list of rewards the trainer receives from ``reward`` (and, into ``stored``, the prompts, the
    completions' ids and the bytes of hidden states ``reward`` holds right after the call)."""
    seen = []
    call = reward.__call__

    class Spy(type(reward)):
        def __call__(self, *args, **kwargs):
            out = call(*args, **kwargs)
            seen.append(out)
            if stored is not None:
                stored.append((kwargs["prompts"], kwargs["completion_ids"], self.stored_hidden_bytes))
            return out

    reward.__class__ = Spy
    return seen


def train(kind, tmp_path, reward, policy, policy_tokenizer, reward_funcs=None, **arg_overrides):
    trainer = TRAINERS[kind](model=policy, reward_funcs=reward_funcs or [reward], callbacks=[reward],
                             args=trl_tiny.args(kind, str(tmp_path / kind), **arg_overrides),
                             train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    trainer.train()
    return trainer


def logged(trainer, key):
    return [(entry["step"], entry[key]) for entry in trainer.state.log_history if key in entry]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_training_run(kind, tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=config())
    stored = []
    seen = spy_rewards(reward, stored)
    body_before = {k: v.clone() for k, v in reward_model.state_dict().items()}
    trainer = TRAINERS[kind](model=policy, reward_funcs=[reward], callbacks=[reward],
                             args=trl_tiny.args(kind, str(tmp_path), max_steps=4),
                             train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    fusion_before = {k: v.clone() for k, v in reward.r2m.fusion.state_dict().items()}
    head_before = {k: v.clone() for k, v in reward.r2m.head.state_dict().items()}
    trainer.train()

    assert len(seen) == 4 and all(r is not None and math.isfinite(r) for rewards in seen for r in rewards)
    for key, value in reward_model.state_dict().items():
        assert torch.equal(value, body_before[key]), f"the reward model changed: {key}"
    assert any(not torch.equal(v, fusion_before[k]) for k, v in reward.r2m.fusion.state_dict().items())
    assert any(not torch.equal(v, head_before[k]) for k, v in reward.r2m.head.state_dict().items())
    for key in R2M_METRICS:
        assert len(logged(trainer, key)) == 4, key
    assert all(-1.0 <= value <= 1.0 for _, value in logged(trainer, "r2m/state_similarity"))
    for step, value in logged(trainer, "r2m/omega"):  # rewards of log step s were computed at global_step s - 1
        assert value == pytest.approx(r2m.omega(step - 1, 4, 0.6))
    assert [v for _, v in logged(trainer, "r2m/extra_forward_share")] == [0.0] * 4
    assert all(v > 0 for _, v in logged(trainer, "r2m/capture_ms"))
    # each batch is updated on before the next is scored: what is held is that batch's S - 1 states per sample
    for prompts, completion_ids, held in stored:
        rows = sum(len(policy_tokenizer(p)["input_ids"]) + len(c) - 1
                   for p, c in zip(prompts, completion_ids, strict=True))
        assert held == rows * policy.config.hidden_size * 4
    assert reward.stored_hidden_bytes == 0  # nothing held after training
    assert reward.capture_plan == ("generation" if kind == "grpo" else "forward") and reward.extra_forwards == 0
    updates = trl_tiny.updates(trainer)
    assert len(updates) == 4 and all(u["refreshed"] == 1.0 for u in updates)


@pytest.mark.slow
@pytest.mark.parametrize("kind, overrides, plan", [
    ("rloo", {}, "forward"),
    ("grpo", {}, "generation"),
    ("grpo", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}, "generation"),
    ("grpo", {"steps_per_generation": 2}, "forward"),  # generation and optimisation steps misaligned
])
def test_no_extra_policy_forward(kind, overrides, plan, tmp_path):
    counts = {}
    for variant in ("vanilla", "r2m"):
        policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
        counter = trl_tiny.ForwardCounter(policy)
        if variant == "vanilla":  # TRL's own reward-model path
            trainer = TRAINERS[kind](model=policy, reward_funcs=[reward_model],
                                     reward_processing_classes=[reward_tokenizer],
                                     args=trl_tiny.args(kind, str(tmp_path / variant), **overrides),
                                     train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
            trainer.train()
        else:
            reward = R2MReward(reward_model, reward_tokenizer, config=config())
            trainer = train(kind, tmp_path / variant, reward, policy, policy_tokenizer, **overrides)
            assert reward.capture_plan == plan and reward.extra_forwards == 0
            assert reward.capture_counts[plan] > 0 and reward.capture_counts["extra"] == 0
            assert all(u["refreshed"] == 1.0 for u in trl_tiny.updates(trainer))
        counts[variant] = counter.count
    assert counts["r2m"] == counts["vanilla"] > 0


@pytest.mark.slow
def test_extra_forward_when_the_trainer_runs_none(tmp_path):
    """Continuous batching bypasses the model's own forward: one no-grad forward on the trainer's token ids."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=config())
    trainer = train("grpo", tmp_path, reward, policy, policy_tokenizer, max_steps=2,
                    use_transformers_continuous_batching=True)
    assert reward.capture_plan == "extra" and reward.extra_forwards == 2
    assert [v for _, v in logged(trainer, "r2m/extra_forward_share")] == [1.0, 1.0]
    # the training pass saw exactly the token sequences of the extra forward: every sample was refreshed
    assert all(u["refreshed"] == 1.0 for u in trl_tiny.updates(trainer))


@pytest.mark.slow
@pytest.mark.parametrize("policy_family, rm_family", [("gpt2", "llama"), ("qwen2", "gpt2")])
def test_heterogeneous_policy_and_reward_model(policy_family, rm_family, tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_(
        policy_family, rm_family, policy_hidden=40, rm_hidden=24, rm_tokenizer="byte")
    reward = R2MReward(reward_model, reward_tokenizer, config=config(hidden_offload=True))
    seen = spy_rewards(reward)
    trainer = train("grpo", tmp_path, reward, policy, policy_tokenizer, max_steps=2, bf16=True)  # CPU autocast
    assert reward.r2m.policy_dim == 40 and reward.r2m.rm_dim == 24
    assert all(math.isfinite(r) for rewards in seen for r in rewards)
    assert len(trl_tiny.updates(trainer)) == 2 and reward.extra_forwards == 0


@pytest.mark.slow
def test_mixes_with_other_reward_functions_and_accepts_a_path(tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_(rm_tokenizer="byte")
    reward_model.save_pretrained(tmp_path / "rm")
    reward_tokenizer.save_pretrained(tmp_path / "rm")
    reward = R2MReward(str(tmp_path / "rm"), config=config(), name="r2m_rm")

    def length_reward(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    trainer = train("grpo", tmp_path, reward, policy, policy_tokenizer, reward_funcs=[length_reward, reward],
                    max_steps=2)
    assert logged(trainer, "rewards/r2m_rm/mean") and logged(trainer, "rewards/length_reward/mean")
    assert len(trl_tiny.updates(trainer)) == 2


@pytest.mark.slow
def test_lora_policy_reference_pass_is_not_captured(tmp_path):
    """RLOO with a LoRA policy and beta > 0: the reference log-probs come from the same modules with the adapter
    disabled, right after the policy's own log-prob pass. R2M must use the adapted policy's states."""
    peft = pytest.importorskip("peft")
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=config())
    used = []
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = RLOOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward],
                          args=trl_tiny.args("rloo", str(tmp_path), max_steps=1, beta=0.1, learning_rate=0.0),
                          train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer, peft_config=lora)
    take = reward._source.take
    reward._source.take = lambda *a: used.append(take(*a)) or used[-1]
    trainer.train()
    model = trainer.model
    body = model.get_base_model().model
    (states, extra), = used
    assert extra == 0 and reward.capture_plan == "forward" and states.missing == []
    with torch.no_grad():
        for i, sequence in enumerate(states.tokens):
            ids = torch.tensor([sequence])
            sample = states.sample(i)
            torch.testing.assert_close(sample, body(input_ids=ids).last_hidden_state[0, :-1], rtol=1e-5, atol=1e-5)
            with model.disable_adapter():
                assert not torch.allclose(sample, body(input_ids=ids).last_hidden_state[0, :-1], atol=1e-3)


@pytest.mark.slow
def test_non_finite_reward_model_output_never_reaches_the_trainer(tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=config())
    seen = spy_rewards(reward)

    def poison(module, args, output):
        output.last_hidden_state[0] = float("nan")

    reward_model.model.register_forward_hook(poison)
    trainer = train("grpo", tmp_path, reward, policy, policy_tokenizer, max_steps=2)
    assert all(rewards[0] is None for rewards in seen)
    assert all(r is None or math.isfinite(r) for rewards in seen for r in rewards)
    assert [v for _, v in logged(trainer, "r2m/reward_nonfinite")] == [1.0, 1.0]
    assert [u["groups_skipped"] for u in trl_tiny.updates(trainer)] == [1.0, 1.0]
    assert all(torch.isfinite(p).all() for p in reward.r2m.trainable_parameters())


@pytest.mark.slow
def test_evaluation_rewards_do_not_enter_the_update(tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=config())
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward],
                          args=trl_tiny.args("grpo", str(tmp_path), max_steps=2, eval_strategy="steps", eval_steps=1,
                                             per_device_eval_batch_size=4),
                          train_dataset=trl_tiny.dataset(), eval_dataset=trl_tiny.dataset(4),
                          processing_class=policy_tokenizer)
    trainer.train()
    assert len(trl_tiny.updates(trainer)) == 2
    assert logged(trainer, "eval_r2m/reward_mean")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vanilla", "head_only"])
def test_modes_without_policy_states_capture_nothing(mode, tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=config(mode=mode))
    trainer = train("grpo", tmp_path, reward, policy, policy_tokenizer, max_steps=2)
    assert reward.capture_plan is None and reward.extra_forwards == 0 and len(trl_tiny.updates(trainer)) == 2
    assert [v for _, v in logged(trainer, "r2m/capture_ms")] == [0.0, 0.0]


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w0 {% endif %}")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"use_transformers_continuous_batching": True}])
def test_conversational_prompts(overrides, tmp_path):
    """Chat prompts: the RM reads the chat-templated conversation; the extra forward rebuilds TRL's prompt ids."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    policy_tokenizer.chat_template = reward_tokenizer.chat_template = CHAT_TEMPLATE
    reward = R2MReward(reward_model, reward_tokenizer, config=config())
    texts = []
    reward_texts = reward._reward_texts
    reward._reward_texts = lambda *a: texts.append(reward_texts(*a)) or texts[-1]
    dataset = trl_tiny.dataset().map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward],
                          args=trl_tiny.args("grpo", str(tmp_path), max_steps=2, **overrides),
                          train_dataset=dataset, processing_class=policy_tokenizer)
    trainer.train()
    prompts = {row["prompt"] for row in trl_tiny.dataset()}
    assert all(any(text.startswith(p + " ") for p in prompts) for text in texts[0])  # the templated conversation
    assert reward.capture_counts["extra"] == (8 if overrides else 0)
    assert all(u["refreshed"] == 1.0 for u in trl_tiny.updates(trainer))


@pytest.mark.slow
def test_states_stitched_during_generate_equal_a_full_forward(tmp_path, monkeypatch):
    """GRPO default: h taken from generate's prefill + decode steps equals a full fp32 forward of each sample."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=config())
    used = []
    take = PolicyStateSource.take
    # a copy of what annotation saw: the refresh later overwrites the batch's states in place
    monkeypatch.setattr(PolicyStateSource, "take",
                        lambda *a: used.append(copy.deepcopy(take(*a))) or copy.deepcopy(used[-1]))
    train("grpo", tmp_path, reward, policy, policy_tokenizer, max_steps=1, learning_rate=0.0,
          per_device_train_batch_size=12)
    (states, extra), = used
    assert extra == 0 and reward.capture_plan == "generation" and states.missing == []
    assert len({len(t) for t in states.tokens}) > 1  # ragged prompts: generation ran left-padded
    body = policy.model
    with torch.no_grad():
        for i, sequence in enumerate(states.tokens):
            expected = body(input_ids=torch.tensor([sequence])).last_hidden_state[0, :-1]
            torch.testing.assert_close(states.sample(i), expected, rtol=1e-5, atol=1e-5)
