"""The one-line wrap: any supported reward model or judge -> its R2M reward."""

from __future__ import annotations

from torch import nn

from r2m.base import R2MModule
from r2m.config import R2MConfig
from r2m.judge_model import R2MJudgeModel
from r2m.reward_model import R2MRewardModel


def wrap(reward_model: nn.Module, policy_hidden_size: int, config: R2MConfig | None = None) -> R2MModule:
    """Turn a reward model into an R2M reward.

    A Hugging Face ``*ForSequenceClassification`` model (a scoring head named one of ``score``, ``classifier``,
    ``v_head``, ``value_head`` that is, or ends in, an nn.Linear(hidden_size, 1): decoders, DeBERTa, ModernBERT,
    RoBERTa) gives an `R2MRewardModel`; a judge from ``r2m.adapters`` running a local model (it has a
    ``judge_model``) gives an `R2MJudgeModel` over the judge's hidden states.
    """
    judge_model = getattr(reward_model, "judge_model", None)
    if isinstance(judge_model, nn.Module):
        return R2MJudgeModel(judge_model, policy_hidden_size, config)
    if not isinstance(reward_model, nn.Module):
        raise TypeError(f"reward_model must be a torch nn.Module (a Hugging Face reward model) or an r2m.adapters "
                        f"judge with a local model, got {type(reward_model).__name__}")
    return R2MRewardModel(reward_model, policy_hidden_size, config)
