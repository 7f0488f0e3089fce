"""A generative judge (``r2m.adapters``) as OpenRLHF's ``reward_func``, for ``--reward.remote_url <this file>``.

OpenRLHF loads this file inside each vLLM rollout engine and calls ``reward_func(queries, prompts, labels)`` with
one prompt + response at a time. The judge is configured by environment variables (set them for the Ray workers,
e.g. ``ray job submit --runtime-env-json '{"env_vars": {...}}'``):

- ``R2M_JUDGE``: ``spct`` (pointwise principles + critique, DeepSeek-GRM) or ``rm_r1`` (pairwise RM-R1, run in
  anchor mode against the dataset's label as the reference answer: a lone response has no pair otherwise);
- ``R2M_JUDGE_URL``, ``R2M_JUDGE_MODEL``: an OpenAI-compatible chat-completions server (vLLM, SGLang) and the
  served model name; optional ``R2M_JUDGE_API_KEY``;
- optional: ``R2M_JUDGE_NUM_SAMPLES`` (spct votes, default 1), ``R2M_JUDGE_TEMPERATURE`` (default 0, or 0.7 with
  several votes), ``R2M_JUDGE_MAX_TOKENS`` (1024), ``R2M_JUDGE_TIMEOUT`` (120 s), ``R2M_JUDGE_MISSING_REWARD``
  (reward when the judge gives none, default 0), ``R2M_JUDGE_LAYOUT`` (rm_r1: instruct or reasoning).

This path scores with the judge alone: OpenRLHF's remote reward gets no policy hidden states, so there is no R2M
fusion here (R2M in OpenRLHF needs a reward model actor: ``--reward.model_name_or_path`` with ``--r2m_enable``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from r2m.adapters import GenerativeJudge, OpenAIChatBackend, RMR1Judge, SPCTJudge, openrlhf_reward_func

JUDGES = ("spct", "rm_r1")


def judge_from_env(env: Mapping[str, str]) -> tuple[GenerativeJudge, float]:
    """The judge and the missing-reward value the ``R2M_JUDGE*`` variables describe."""
    kind = env.get("R2M_JUDGE")
    if kind not in JUDGES:
        raise ValueError(f"set R2M_JUDGE to one of {JUDGES} (got {kind!r}) to use {__file__} as OpenRLHF's "
                         f"--reward.remote_url")
    missing = [name for name in ("R2M_JUDGE_URL", "R2M_JUDGE_MODEL") if not env.get(name)]
    if missing:
        raise ValueError(f"set {' and '.join(missing)}: the judge's OpenAI-compatible server and served model name")
    num_samples = int(env.get("R2M_JUDGE_NUM_SAMPLES", "1"))
    temperature = float(env.get("R2M_JUDGE_TEMPERATURE", "0.7" if num_samples > 1 else "0.0"))
    backend = OpenAIChatBackend(env["R2M_JUDGE_URL"], env["R2M_JUDGE_MODEL"], api_key=env.get("R2M_JUDGE_API_KEY"),
                                max_tokens=int(env.get("R2M_JUDGE_MAX_TOKENS", "1024")), temperature=temperature,
                                timeout=float(env.get("R2M_JUDGE_TIMEOUT", "120")))
    if kind == "spct":
        judge: GenerativeJudge = SPCTJudge(backend, num_samples=num_samples)
    else:
        judge = RMR1Judge(backend, mode="anchor", reference_column="label",
                          layout=env.get("R2M_JUDGE_LAYOUT", "instruct"))
    return judge, float(env.get("R2M_JUDGE_MISSING_REWARD", "0.0"))


def build_reward_func(env: Mapping[str, str]) -> Callable[..., dict[str, Any]]:
    """OpenRLHF's ``reward_func(queries, prompts, labels) -> {"rewards", "scores", "extra_logs"}`` over the judge."""
    judge, missing_reward = judge_from_env(env)
    return openrlhf_reward_func(judge, missing_reward)


reward_func = build_reward_func(os.environ)
