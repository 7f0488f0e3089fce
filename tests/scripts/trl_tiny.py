"""Tiny offline TRL set-ups shared by the TRL tests and the scripts they launch."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from trl import GRPOConfig, RLOOConfig

from r2m.benchmarks import tiny_models as tiny
from r2m.capture import CACHE_ARGUMENTS

VOCAB_WORDS = 60


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: ids and lengths unrelated to the word-level policy tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(f"w{i}" for i in range(j, j + 10)) for j in range(0, VOCAB_WORDS, 3)]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def dataset(count: int = 16) -> Dataset:
    prompts = [" ".join(f"w{(7 * i + 3 * j) % VOCAB_WORDS}" for j in range(2 + i % 4)) for i in range(count)]
    return Dataset.from_dict({"prompt": prompts})


def models_(policy_family: str = "llama", rm_family: str = "qwen2", policy_hidden: int = 32, rm_hidden: int = 24,
            rm_tokenizer: str = "word", seed: int = 0):
    """(policy, policy tokenizer, reward model, reward tokenizer), random-init from configs."""
    policy_tokenizer = tiny.build_tokenizer(VOCAB_WORDS)
    reward_tokenizer = byte_tokenizer() if rm_tokenizer == "byte" else tiny.build_tokenizer(VOCAB_WORDS)
    torch.manual_seed(seed)
    policy = tiny.build_policy(policy_tokenizer, policy_family, hidden_size=policy_hidden)
    reward_model = tiny.build_reward_model(reward_tokenizer, rm_family, hidden_size=rm_hidden)
    return policy, policy_tokenizer, reward_model, reward_tokenizer


def args(kind: str, output_dir: str, **overrides) -> GRPOConfig | RLOOConfig:
    values = dict(output_dir=output_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=5,
                  max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                  seed=0, disable_tqdm=True, beta=0.0, bf16=False)
    values.update(overrides)
    return (GRPOConfig if kind == "grpo" else RLOOConfig)(**values)


def updates(trainer, after_step: int = 0) -> list[dict[str, float]]:
    """The R2M updates in the trainer's logs, oldest first, ``r2m/`` stripped from the names: R2M logs an update's
    metrics into the log of the step that ran it (at most one update per step in these set-ups). ``after_step``:
    only later steps (a resumed run's log history starts with the checkpoint's)."""
    return [{key[4:]: value for key, value in entry.items() if key.startswith("r2m/")}
            for entry in trainer.state.log_history if "r2m/loss" in entry and entry["step"] > after_step]


class ForwardCounter:
    """Counts the policy's forward passes outside generation (no KV cache): log-prob, reference, training, extra."""

    def __init__(self, policy: torch.nn.Module):
        self.count = 0
        body = getattr(policy, policy.base_model_prefix)
        self.handle = body.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if all(kwargs.get(name) is None for name in CACHE_ARGUMENTS):
            self.count += 1
