"""Generative reward adapters: RM-R1 (pairwise rubric judge) and SPCT / DeepSeek-GRM (pointwise principles and
critique judge), run on a local transformers model or an OpenAI-compatible server, usable as TRL and OpenRLHF
reward functions and as the base of an R2M reward (``r2m.wrap(judge, ...)``)."""

from r2m.adapters.backends import Generation, JudgeBackend, OpenAIChatBackend, TransformersBackend
from r2m.adapters.meta_rm import SequenceClassifierRater
from r2m.adapters.reward_function import (
    AsyncJudgeRewardFunction,
    GenerativeJudge,
    JudgeResult,
    openrlhf_reward_func,
)
from r2m.adapters.rm_r1 import RMR1Judge, parse_verdict
from r2m.adapters.spct import SPCTJudge, parse_scores

__all__ = ["AsyncJudgeRewardFunction", "Generation", "GenerativeJudge", "JudgeBackend", "JudgeResult",
           "OpenAIChatBackend", "RMR1Judge", "SPCTJudge", "SequenceClassifierRater", "TransformersBackend",
           "openrlhf_reward_func", "parse_scores", "parse_verdict"]
