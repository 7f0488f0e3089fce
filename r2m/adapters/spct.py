"""SPCT / DeepSeek-GRM pointwise judge: principles, a critique of each response, integer scores 1-10 for all
responses of a query in one final line; inference-time scaling by voting over k samples, optionally guided by a
meta reward model that keeps only the ``k_meta`` samples it rates highest."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from r2m.adapters.aggregation import select_voters, vote
from r2m.adapters.backends import Generation, JudgeBackend
from r2m.adapters.conversation import Message, is_single_turn, render_turns, strip_thinking
from r2m.adapters.reward_function import GenerativeJudge, Group, JudgeResult, mean_rte
from r2m.checks import check_int

MIN_SCORE, MAX_SCORE = 1, 10

MetaRewardModel = Callable[[list[str], list[str]], Sequence[float] | Awaitable[Sequence[float]]]

INSTRUCTIONS = """\
You are an impartial judge. Below are a query and {count} candidate response{plural}. Assess how well each \
response serves the query.

1. Principles: first state the principles (evaluation criteria) that matter most for this query, each with a \
weight; the weights add up to 100%.
2. Critique: then go through the responses one by one, from Response 1 to Response {count}, and critique each \
against the principles.
3. Scores: finally give every response an integer score from {low} (poor) to {high} (excellent)."""

FINAL_LINE = """\
End your reply with one final line that lists the scores in the order of the responses, in exactly this form:
Scores: [{placeholders}]"""

_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_SCORES_LINE = re.compile(r"\bscores?\b[*_\s]*[:：][*_ \t]*(\[[^\]\n]*\]|[^\n]*)", re.IGNORECASE)
_SEPARATORS = re.compile(r"[,;\s]+")
_INTEGER = re.compile(r"[+-]?\d+")


def parse_scores(text: str | None, num_responses: int) -> list[int] | None:
    """The LAST score list outside thinking blocks: a ``Scores: [s1, s2, ...]`` line (this module's prompt) or a
    DeepSeek-GRM ``\\boxed{s1, s2, ...}``. None unless it holds exactly ``num_responses`` integers in 1..10."""
    if not isinstance(text, str):
        return None
    text = strip_thinking(text)
    candidates = [(m.start(), m.group(1)) for m in _BOXED.finditer(text)]
    candidates += [(m.start(), m.group(1)) for m in _SCORES_LINE.finditer(text)]
    if not candidates:
        return None
    body = max(candidates)[1].strip().strip("[]()").strip()
    tokens = [t for t in _SEPARATORS.split(body) if t]
    if len(tokens) != num_responses or not all(_INTEGER.fullmatch(t) for t in tokens):
        return None
    scores = [int(t) for t in tokens]
    return scores if all(MIN_SCORE <= s <= MAX_SCORE for s in scores) else None


def build_prompt(conversation: Sequence[Message], responses: Sequence[str]) -> str:
    """The judge's user turn: instructions, the query (or conversation so far), every response, the final line."""
    count = len(responses)
    if count < 1:
        raise ValueError("build_prompt needs at least one response")
    head = INSTRUCTIONS.format(count=count, plural="" if count == 1 else "s", low=MIN_SCORE, high=MAX_SCORE)
    if is_single_turn(conversation):
        query = f"[Query]\n{conversation[0]['content']}"
    else:
        query = f"[Conversation]\n{render_turns(conversation, {'user': 'User', 'assistant': 'Assistant'})}"
    shown = "\n\n".join(f"[Response {i}]\n{r}\n[End of Response {i}]" for i, r in enumerate(responses, 1))
    tail = FINAL_LINE.format(placeholders=", ".join(f"score of Response {i}" for i in range(1, count + 1)))
    return f"{head}\n\n{query}\n\n{shown}\n\n{tail}"


class SPCTJudge(GenerativeJudge):
    """SPCT / DeepSeek-GRM pointwise judge: one request per prompt judges all its completions.

    ``num_samples`` replies are sampled (inference-time scaling; the backend should sample, temperature > 0);
    each reply whose final score list parses votes, and a completion's reward is the ``reduce`` ("sum" or "mean")
    of its scores over the votes. With ``meta_rm`` (a callable ``(judge_prompts, judge_outputs) -> ratings``,
    sync or async, e.g. `r2m.adapters.meta_rm.SequenceClassifierRater`) only the ``k_meta`` valid replies it
    rates highest vote (default: half of ``num_samples``, rounded up). Malformed replies are dropped and counted;
    a prompt without a valid reply gives None rewards.
    """

    def __init__(self, backend: JudgeBackend, *, num_samples: int = 1, reduce: Literal["sum", "mean"] = "sum",
                 meta_rm: MetaRewardModel | None = None, k_meta: int | None = None, group_size: int | None = None,
                 name: str = "spct"):
        super().__init__(backend, name, group_size)
        check_int("num_samples", num_samples)
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        if meta_rm is not None and not callable(meta_rm):
            raise TypeError(f"meta_rm must be callable (judge_prompts, judge_outputs) -> ratings, got "
                            f"{type(meta_rm).__name__}")
        if k_meta is not None:
            if meta_rm is None:
                raise ValueError("k_meta selects the samples a meta reward model rates highest: pass meta_rm too")
            check_int("k_meta", k_meta, maximum=num_samples, hint=" (at most num_samples)")
        self.num_samples, self.reduce = num_samples, reduce
        self.meta_rm = meta_rm
        self.k_meta = k_meta if k_meta is not None or meta_rm is None else math.ceil(num_samples / 2)

    async def _score_groups(self, groups: list[Group], batch_size: int) -> JudgeResult:
        prompts = [build_prompt(g.messages, g.responses) for g in groups]
        generations = await self.backend.generate([[{"role": "user", "content": p}] for p in prompts],
                                                  self.num_samples)
        parsed = [[parse_scores(t, len(g.responses)) for t in gen.texts] for g, gen in zip(groups, generations,
                                                                                               strict=True)]
        valid = [[s for s, scores in enumerate(p) if scores is not None] for p in parsed]
        ratings = await self._rate(prompts, generations, valid)

        rewards: list[float | None] = [None] * batch_size
        details = [""] * batch_size
        members: list[list[int]] = [[] for _ in range(batch_size)]
        voters_total = 0
        for g, group in enumerate(groups):
            voters = select_voters(valid[g], ratings[g], self.k_meta)
            voters_total += len(voters)
            totals = vote([parsed[g][s] for s in voters], self.reduce)
            text = _describe(generations[g].texts, parsed[g], ratings[g], set(voters), generations[g].error)
            for local, index in enumerate(group.indices):
                rewards[index] = None if totals is None else float(totals[local])
                details[index] = f"(response {local + 1} of {len(group.indices)})\n{text}"
                members[index] = [g]
        samples = sum(len(gen.texts) for gen in generations)
        metrics = {"requests": float(len(groups)), "failed": float(sum(not gen.texts for gen in generations)),
                   "retries": float(sum(gen.attempts - 1 for gen in generations)), "samples": float(samples),
                   "dropped_samples": float(samples - sum(map(len, valid))), "voters": voters_total / len(groups),
                   "no_reward": float(sum(r is None for r in rewards))}
        return JudgeResult(rewards, details, metrics, mean_rte(generations, members))

    async def _rate(self, prompts: list[str], generations: Sequence[Generation], valid: list[list[int]]
                    ) -> list[list[float] | None]:
        """Meta-RM ratings per group and sample (NaN for samples not rated), in one call over all valid samples."""
        if self.meta_rm is None:
            return [None] * len(valid)
        keys = [(g, s) for g, samples in enumerate(valid) for s in samples]
        if not keys:
            return [None] * len(valid)
        rated = self.meta_rm([prompts[g] for g, _ in keys], [generations[g].texts[s] for g, s in keys])
        if inspect.isawaitable(rated):
            rated = await rated
        rated = [float(r) for r in rated]
        if len(rated) != len(keys):
            raise ValueError(f"meta_rm returned {len(rated)} ratings for {len(keys)} judge outputs")
        ratings = [[math.nan] * len(gen.texts) for gen in generations]
        for (g, s), rating in zip(keys, rated, strict=True):
            ratings[g][s] = rating
        return ratings


def _describe(texts: Sequence[str], parsed: Sequence[list[int] | None], ratings: Sequence[float] | None,
              voters: set[int], error: str | None) -> str:
    """The judge's samples with what became of each: scores, meta rating, vote or drop."""
    if not texts:
        return f"(request failed: {error})"
    parts = []
    for s, (text, scores) in enumerate(zip(texts, parsed, strict=True)):
        meta = "" if ratings is None or math.isnan(ratings[s]) else f", meta {ratings[s]:.4g}"
        status = "malformed, dropped" if scores is None else ("voted" if s in voters else "not selected")
        parts.append(f"=== sample {s + 1}: scores {scores}{meta}, {status} ===\n{text}")
    return "\n\n".join(parts)
