"""Tiny offline verl set-ups shared by the verl tests and the scripts they launch (CPU, no generation)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from r2m.benchmarks import tiny_models as tiny

VOCAB_WORDS = 60
# Loaded by `import verl` in every process (this one and Ray actors): the CPU platform test double.
CPU_PLATFORM_ENV = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "verl_cpu_platform"}
TESTS = Path(__file__).resolve().parents[1]


def use_cpu_platform() -> None:
    """Select the CPU test double before verl is imported (and in the Ray actors started later)."""
    os.environ.update(CPU_PLATFORM_ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def save_models(directory: str | Path, policy_hidden: int = 32, rm_hidden: int = 24, seed: int = 0,
                chat_template: bool = False) -> tuple[str, str]:
    """A tiny Llama policy and a tiny Llama reward model (each with its word-level tokenizer; ``chat_template``: one
    that joins the messages' contents, for verl's dataset) saved under ``directory``; returns their paths."""
    directory = Path(directory)
    tokenizer = tiny.build_tokenizer(VOCAB_WORDS)
    if chat_template:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(seed)
    policy = tiny.build_policy(tokenizer, "llama", hidden_size=policy_hidden)
    reward_model = tiny.build_reward_model(tiny.build_tokenizer(VOCAB_WORDS), "llama", hidden_size=rm_hidden)
    paths = []
    for name, model in (("policy", policy), ("reward", reward_model)):
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
        paths.append(str(directory / name))
    return paths[0], paths[1]


# verl's ppo_trainer settings for a tiny CPU run: FSDP2 actor without offload, sdpa attention, micro-batches of 2 (so
# a log-prob pass runs in several chunks), GRPO with 4 responses per prompt.
CPU_OVERRIDES = ["+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
                 "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",
                 "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                 "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                 "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
                 "actor_rollout_ref.actor.fsdp_config.param_offload=false",
                 "actor_rollout_ref.actor.fsdp_config.optimizer_offload=false",
                 "actor_rollout_ref.actor.use_kl_loss=false", "algorithm.use_kl_in_reward=false",
                 "actor_rollout_ref.rollout.n=4", "algorithm.adv_estimator=grpo", "trainer.device=cpu"]


def verl_config(policy_path: str, overrides: list[str] = ()) -> DictConfig:
    """verl's own ppo_trainer config with `CPU_OVERRIDES` and the policy at ``policy_path``."""
    import verl.trainer.config as verl_config_package

    base = [f"actor_rollout_ref.model.path={policy_path}", *CPU_OVERRIDES]
    with initialize_config_dir(config_dir=os.path.dirname(verl_config_package.__file__), version_base=None):
        return compose(config_name="ppo_trainer", overrides=[*base, *overrides])


def rollouts(prompts: int, group_size: int, seed: int = 0) -> list[dict]:
    """Canned rollouts as verl's agent loop writes them (one dict per response, prompt + response token ids):
    ``prompts`` groups of ``group_size`` responses of varied lengths, each group under one ``uid``."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for p in range(prompts):
        prompt = torch.randint(4, 4 + VOCAB_WORDS, (3 + p % 3,), generator=generator)
        for k in range(group_size):
            response = torch.randint(4, 4 + VOCAB_WORDS, (2 + (p + k) % 4,), generator=generator)
            ids = torch.cat([prompt, response])
            ones = torch.ones(len(response), dtype=torch.long)
            samples.append({"prompts": prompt, "responses": response, "input_ids": ids,
                            "position_ids": torch.arange(len(ids)), "attention_mask": torch.ones_like(ids),
                            "response_mask": ones, "loss_mask": ones, "uid": f"prompt{p}"})
    return samples


def batch(samples: list[dict], **meta: object):
    """The samples as the TensorDict verl's workers receive (nested token fields), with ``meta`` as non-tensor data."""
    from verl.utils import tensordict_utils as tu

    data = tu.list_of_dict_to_tensordict(samples)
    tu.assign_non_tensor(data, **meta)
    return data


def training_fields(samples: list[dict], seed: int = 0) -> list[dict]:
    """``samples`` with what ``update_actor`` reads: old log-probs (zeros), advantages (random) and token scores."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for sample in samples:
        n = len(sample["responses"])
        scores = torch.zeros(n)
        scores[-1] = float(torch.randn(1, generator=generator))
        out.append({**sample, "old_log_probs": torch.zeros(n), "advantages": torch.randn(n, generator=generator),
                    "rm_scores": scores})
    return out


UPDATE_META = {"calculate_entropy": False, "temperature": 1.0, "epochs": 2, "seed": 1,
               "dataloader_kwargs": {"shuffle": True}}


def hf_states(policy_path: str, sequences: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """A plain Hugging Face forward of each sequence: its body's last-layer states at all positions but the last."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.model(torch.tensor([list(s)])).last_hidden_state[0, :-1] for s in sequences]
