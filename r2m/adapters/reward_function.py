"""What every judge shares: grouping a batch by prompt, and the TRL and OpenRLHF reward-function forms."""

from __future__ import annotations

import asyncio
import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from r2m.adapters.backends import Generation, JudgeBackend
from r2m.adapters.conversation import Message, response_text, to_messages
from r2m.checks import check_int

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Group:
    """Consecutive completions of one prompt: their batch ``indices``, the prompt as ``messages``, the completion
    texts as ``responses``, and each dataset column's value for the prompt (that of its first completion)."""

    indices: list[int]
    messages: list[Message]
    responses: list[str]
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgeResult:
    """A judge's verdict on a batch.

    ``rewards``: one per completion, None where the judge gave nothing usable. ``details``: the judge's text behind
    each reward (for completion logs). ``metrics``: counts for the batch (calls, unparseable outputs, ...).
    ``rte``: [batch, D_judge] float32, each completion's reward-token embedding for R2M: the judge's last hidden
    state at the end of its input, averaged over the judge inputs that show the completion (NaN where none did, e.g.
    a lone completion in round-robin mode); None unless the backend is local.
    """

    rewards: list[float | None]
    details: list[str]
    metrics: dict[str, float]
    rte: Tensor | None = None


def split_groups(prompts: Sequence[Any], completions: Sequence[Any], group_size: int | None = None,
                 columns: dict[str, Sequence[Any]] | None = None) -> list[Group]:
    """Groups of consecutive completions that share a prompt (TRL's and OpenRLHF's layout), or fixed chunks of
    ``group_size`` (which must then share their prompt)."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions (one prompt per completion)")
    columns = {k: v for k, v in (columns or {}).items()
               if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == len(prompts)}
    if group_size is not None:
        check_int("group_size", group_size, optional=True)
        if len(prompts) % group_size:
            raise ValueError(f"the batch of {len(prompts)} completions is not a whole number of groups of "
                             f"group_size={group_size}")
        bounds = list(range(0, len(prompts) + 1, group_size))
        for start, end in itertools.pairwise(bounds):
            if any(prompts[i] != prompts[start] for i in range(start, end)):
                raise ValueError(f"completions {start}..{end - 1} do not share one prompt: with group_size="
                                 f"{group_size} each group must be that many completions of the same prompt in a row")
    else:
        bounds = [0] + [i for i in range(1, len(prompts)) if prompts[i] != prompts[i - 1]] + [len(prompts)]
        bounds = sorted(set(bounds))
    return [Group(list(range(start, end)), to_messages(prompts[start]),
                  [response_text(completions[i]) for i in range(start, end)],
                  {k: v[start] for k, v in columns.items()})
            for start, end in itertools.pairwise(bounds)]


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def mean_rte(generations: Sequence[Generation], members: Sequence[Sequence[int]]) -> Tensor | None:
    """[len(members), D] float32: for each completion, the mean RTE of the generations (judge inputs) that show it,
    NaN for a completion no input showed; None unless every generation carries an RTE."""
    if not generations or any(g.rte is None for g in generations):
        return None
    stacked = torch.stack([g.rte for g in generations]).float()
    empty = torch.full_like(stacked[0], float("nan"))
    return torch.stack([stacked[list(m)].mean(dim=0) if m else empty for m in members])


class GenerativeJudge(ABC):
    """A generative judge usable as a TRL reward function (sync, or async through `async_reward_function`), as an
    OpenRLHF ``reward_func``, and as the base of an R2M reward (``r2m.wrap(judge, ...)``, local backends).

    Completions are grouped by prompt (consecutive equal prompts, or fixed ``group_size``). A group split across
    processes is judged on each process over the part it holds.
    """

    def __init__(self, backend: JudgeBackend, name: str, group_size: int | None = None):
        if not isinstance(backend, JudgeBackend):
            raise TypeError(f"backend must be an r2m.adapters JudgeBackend (TransformersBackend, OpenAIChatBackend), "
                            f"got {type(backend).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        check_int("group_size", group_size, optional=True)
        self.backend = backend
        self.group_size = group_size
        self.__name__ = name

    @property
    def judge_model(self) -> nn.Module | None:
        """The local judge model (None for a remote backend): what ``r2m.wrap`` reads the RTE from."""
        return self.backend.judge_model

    @abstractmethod
    async def _score_groups(self, groups: list[Group], batch_size: int) -> JudgeResult:
        """Judge every group; results are in batch order."""

    async def ascore(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> JudgeResult:
        """Rewards, judge texts, counts and (local backend) RTEs for a batch of prompt/completion pairs."""
        groups = split_groups(prompts, completions, self.group_size, columns)
        if not groups:
            return JudgeResult([], [], {})
        return await self._score_groups(groups, len(prompts))

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> JudgeResult:
        """`ascore` from synchronous code."""
        return run_sync(self.ascore(prompts, completions, **columns))

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 trainer_state: Any = None, log_extra: Callable[[str, list], None] | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **columns: Any) -> list[float | None]:
        """TRL reward function: one reward per completion (None where the judge gave nothing usable)."""
        result = self.score(prompts, completions, **columns)
        self.log(result, log_extra, log_metric)
        return result.rewards

    @property
    def async_reward_function(self) -> AsyncJudgeRewardFunction:
        """This judge as an async TRL reward function: TRL runs async reward functions concurrently."""
        return AsyncJudgeRewardFunction(self)

    def reward_func(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                    missing_reward: float = 0.0) -> dict[str, Any]:
        """OpenRLHF's ``reward_func(queries, prompts, labels)``: ``queries`` are prompt + response texts.

        The response is the query after its prompt; ``labels`` are available to the judge as the column
        ``label``. Rewards the judge could not give become ``missing_reward``. Returns OpenRLHF's dict of
        ``rewards``, ``scores`` and per-sample ``extra_logs``.
        """
        completions = [q[len(p):] if q.startswith(p) else q for q, p in zip(queries, prompts, strict=True)]
        columns = {"label": list(labels)} if labels is not None else {}
        result = self.score(list(prompts), completions, **columns)
        self.log(result, None, None)
        rewards = torch.tensor([missing_reward if r is None else r for r in result.rewards], dtype=torch.float32)
        extra = {f"{self.__name__}/{k}": torch.full((len(queries),), float(v)) for k, v in result.metrics.items()}
        return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": extra}

    def log(self, result: JudgeResult, log_extra: Callable[[str, list], None] | None,
            log_metric: Callable[[str, float], None] | None) -> None:
        """Send the judge texts to TRL's completion table, the counts to its metrics and to this module's logger."""
        if log_extra is not None:
            log_extra(f"{self.__name__}/judge", list(result.details))
        if log_metric is not None:
            for key, value in result.metrics.items():
                log_metric(f"{self.__name__}/{key}", float(value))
        missing = sum(r is None for r in result.rewards)
        summary = ", ".join(f"{k}={v:g}" for k, v in result.metrics.items())
        if missing:
            logger.warning("%s: no reward for %d of %d completions (%s)", self.__name__, missing,
                           len(result.rewards), summary)
        else:
            logger.info("%s: %s", self.__name__, summary)


class AsyncJudgeRewardFunction:
    """A judge as an async TRL reward function (same name, rewards and logging as the judge)."""

    def __init__(self, judge: GenerativeJudge):
        self.judge = judge
        self.__name__ = judge.__name__

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       trainer_state: Any = None, log_extra: Callable[[str, list], None] | None = None,
                       log_metric: Callable[[str, float], None] | None = None, **columns: Any) -> list[float | None]:
        result = await self.judge.ascore(prompts, completions, **columns)
        self.judge.log(result, log_extra, log_metric)
        return result.rewards


def openrlhf_reward_func(judge: GenerativeJudge, missing_reward: float = 0.0) -> Callable[..., dict[str, Any]]:
    """A plain function ``reward_func(queries, prompts, labels)`` over ``judge``, for the file OpenRLHF loads with
    ``--remote_rm_url path/to/file.py`` (Ray remotes plain functions, not bound methods)."""

    def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None
                    ) -> dict[str, Any]:
        return judge.reward_func(queries, prompts, labels, missing_reward)

    return reward_func
