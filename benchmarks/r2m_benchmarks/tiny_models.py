"""Tiny offline models and tokenizers for demos and tests: nothing is downloaded."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
# Causal LMs: reward models that pool the rightmost non-pad token, and policies.
DECODER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo2", "gpt_neox", "gpt2")
# Bidirectional encoders (reward models only): a pooler or prediction head runs before the final linear layer.
ENCODER_FAMILIES = ("deberta-v2", "modernbert", "roberta")
FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES


def build_tokenizer(vocab_words: int = 60, prefix: str = "w") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``<prefix>0 .. <prefix>{vocab_words-1}`` plus special tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"{prefix}{i}": len(SPECIAL_TOKENS) + i for i in range(vocab_words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def _config(family: str, tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int, num_heads: int = 2,
            num_kv_heads: int = 1, intermediate_size: int | None = None, max_positions: int = 512,
            **extra) -> PretrainedConfig:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    intermediate_size = intermediate_size or 2 * hidden_size
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=num_layers,
                                    n_head=num_heads, n_inner=intermediate_size, n_positions=max_positions, **ids,
                                    **extra)
    common = {"vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": intermediate_size,
              "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
              "max_position_embeddings": max_positions, **ids}
    if family in ENCODER_FAMILIES:
        # roberta offsets its positions by pad_token_id + 1
        encoder = {"modernbert": {"cls_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.eos_token_id},
                   "roberta": {"max_position_embeddings": max_positions + tokenizer.pad_token_id + 1}}
        return AutoConfig.for_model(family, **{**common, **encoder.get(family, {})}, **extra)
    if family == "gpt_neox":
        return AutoConfig.for_model(family, tie_word_embeddings=False, **common, **extra)
    head_dim = {"head_dim": hidden_size // num_heads} if family in ("gemma", "gemma2", "qwen3") else {}
    return AutoConfig.for_model(family, num_key_value_heads=num_kv_heads, tie_word_embeddings=False, **head_dim,
                                **common, **extra)


def build_reward_model(tokenizer: PreTrainedTokenizerFast, family: str = "llama", hidden_size: int = 32,
                       num_layers: int = 2, **architecture: int) -> PreTrainedModel:
    """A randomly initialised ``*ForSequenceClassification`` reward model (num_labels=1) of any of `FAMILIES`.
    ``architecture``: ``num_heads``, ``num_kv_heads``, ``intermediate_size``, ``max_positions``."""
    config = _config(family, tokenizer, hidden_size, num_layers, num_labels=1, **architecture)
    return AutoModelForSequenceClassification.from_config(config)


def build_policy(tokenizer: PreTrainedTokenizerFast, family: str = "llama", hidden_size: int = 32,
                 num_layers: int = 2, **architecture: int) -> PreTrainedModel:
    """A randomly initialised causal LM policy of any of `DECODER_FAMILIES` (``architecture`` as in
    `build_reward_model`)."""
    if family not in DECODER_FAMILIES:
        raise ValueError(f"a policy is a causal LM: family must be one of {DECODER_FAMILIES}, got {family!r}")
    return AutoModelForCausalLM.from_config(_config(family, tokenizer, hidden_size, num_layers, **architecture))
