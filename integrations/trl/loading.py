"""What the user gave `R2MReward` as its reward model, resolved: the frozen model, its tokenizer, a judge, an R2M
reward already built, and the config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations import deepspeed as hf_deepspeed

from r2m.adapters import GenerativeJudge
from r2m.config import R2MConfig
from r2m.distributed import zero3_partitioned
from r2m.hf_models import find_body, padding_tokenizer
from r2m.judge_model import R2MJudgeModel
from r2m.reward_model import R2MRewardModel, find_score_head

RewardModelSource = nn.Module | str | os.PathLike | GenerativeJudge


@dataclass
class LoadedReward:
    """``model``: the frozen reward model (or the judge's model); ``tokenizer``: its tokenizer, able to pad (None
    for a judge, which brings its own); ``judge``: the generative judge, if one was given; ``r2m``: the R2M reward
    when an `r2m.R2MRewardModel` was given (else a trainer builds it); ``config``: the R2M config."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    judge: GenerativeJudge | None
    r2m: R2MRewardModel | None
    config: R2MConfig


def load_reward(reward_model: RewardModelSource, reward_tokenizer: PreTrainedTokenizerBase | None,
                config: R2MConfig | None, model_init_kwargs: dict[str, Any] | None) -> LoadedReward:
    """Resolve `R2MReward`'s ``reward_model`` (a ``*ForSequenceClassification`` model, a local path to one, an
    `r2m.R2MRewardModel` or an ``r2m.adapters`` judge with a local model) and check that R2M can wrap it."""
    judge, built = None, None
    if isinstance(reward_model, GenerativeJudge):
        model = _judge_model(reward_model)
        if reward_tokenizer is not None:
            raise ValueError("reward_tokenizer is not used with a judge: the judge's backend has its own tokenizer")
        judge = reward_model
    elif isinstance(reward_model, R2MJudgeModel):
        raise TypeError("R2MReward builds the R2MJudgeModel itself: pass the r2m.adapters judge (it writes the "
                        "judge's prompts and reads its verdicts), not an R2MJudgeModel")
    elif isinstance(reward_model, R2MRewardModel):
        if config is not None and config != reward_model.config:
            raise ValueError("config differs from the config of the given R2MRewardModel: pass one or the other")
        built, model, config = reward_model, reward_model.reward_model, reward_model.config
    elif isinstance(reward_model, (str, os.PathLike)):
        model = _load_whole(reward_model, model_init_kwargs or {})
    elif isinstance(reward_model, nn.Module):
        model = reward_model
    else:
        raise TypeError(f"reward_model must be a Hugging Face *ForSequenceClassification model, a local path to "
                        f"one, an r2m.R2MRewardModel or an r2m.adapters judge, got {type(reward_model).__name__}")
    if judge is None:
        find_score_head(model)
    find_body(model)
    if zero3_partitioned(model):
        raise ValueError("the reward model's parameters are partitioned by DeepSpeed ZeRO-3 (it was built under "
                         "deepspeed.zero.Init, e.g. loaded after a ZeRO-3 GRPOConfig/RLOOConfig was created); R2M "
                         "needs it whole: build it before the trainer arguments, or pass its path to R2MReward")
    if config is not None and not isinstance(config, R2MConfig):
        raise TypeError(f"config must be an r2m.R2MConfig, got {type(config).__name__}")
    tokenizer = None if judge is not None else _reward_tokenizer(reward_tokenizer, reward_model, model)
    return LoadedReward(model, tokenizer, judge, built, config or R2MConfig())


def _load_whole(path: str | os.PathLike, init_kwargs: dict[str, Any]) -> nn.Module:
    """The reward model at ``path``, loaded whole even while a ZeRO-3 trainer config is live (transformers would
    partition it under ``deepspeed.zero.Init``; R2M keeps the frozen RM unsharded beside the policy)."""
    live = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = live() if live is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **init_kwargs)
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def _judge_model(judge: GenerativeJudge) -> nn.Module:
    model = judge.judge_model
    if not isinstance(model, nn.Module):
        raise ValueError(f"R2M needs the judge's hidden states (its last hidden state at the end of its input is the "
                         f"reward-token embedding), which only a judge running a local model has; this "
                         f"{type(judge).__name__} runs on {type(judge.backend).__name__}. Give the judge a "
                         f"TransformersBackend, or pass the judge itself in reward_funcs=[...] as a plain reward "
                         f"function")
    return model


def _reward_tokenizer(tokenizer: PreTrainedTokenizerBase | None, source: object,
                      model: nn.Module) -> PreTrainedTokenizerBase:
    """The reward model's tokenizer, able to pad (`r2m.hf_models.padding_tokenizer`: the user's is not changed)."""
    if tokenizer is None:
        path = source if isinstance(source, (str, os.PathLike)) else getattr(model, "name_or_path", "")
        if not path or not os.path.isdir(path):
            raise ValueError("reward_tokenizer is required when the reward model is not given as a local path")
        tokenizer = AutoTokenizer.from_pretrained(path)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"reward_tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    return padding_tokenizer(tokenizer, "reward_tokenizer")


__all__ = ["LoadedReward", "RewardModelSource", "load_reward"]
