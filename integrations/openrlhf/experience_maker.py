"""OpenRLHF's experience maker with R2M: the reward forward gets the policy's feedback, and the round's update.

OpenRLHF 0.11 dispatches the reward forward before the policy's log-prob forward and runs them concurrently. R2M's
reward needs the states that forward produces, so the reward dispatch is held until the policy's is out, and
each reward batch is told which policy actor runs its log-prob forward and which ref to wait on. Nothing else of
``make_experience`` changes.
"""

from __future__ import annotations

import math
from typing import Any

import ray
import torch
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from r2m.integrations.openrlhf.options import R2MOptions
from r2m.integrations.openrlhf.policy_side import fingerprints


def chunk_owner(item: int, num_items: int, num_actors: int, duplicates: int) -> int:
    """Index of the actor that runs item ``item`` of a ``RayActorGroup.async_run_method_batch`` call over
    ``num_items`` items (the first of its ring/tensor-parallel duplicates)."""
    effective = num_actors // duplicates
    chunk_size = math.ceil(num_items / effective)
    return (item // chunk_size) * duplicates


class R2MExperienceMaker(RemoteExperienceMaker):
    """``RemoteExperienceMaker`` whose reward forward gets the policy feedback, plus `r2m_update` for the round.

    ``r2m_step`` (the policy step t of w(t)) is set by the trainer before each round; ``total_steps`` is T (None:
    the reward actors' ``R2MConfig.total_steps``).
    """

    def __init__(self, *args: Any, total_steps: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.r2m_step = 0
        self.r2m_total_steps = total_steps
        self._round: list[tuple[int, str, float]] = []
        self._held_reward: tuple[bool, dict[str, Any], list] | None = None
        self._actor_refs: list | None = None

    @torch.no_grad()
    def make_experience_batch(self, rollout_samples: list) -> list:
        experiences = super().make_experience_batch(rollout_samples)
        self._round = []
        for experience in experiences:
            keys = fingerprints(experience.sequences, experience.attention_mask)
            rewards = experience.rewards.float().tolist()
            self._round += list(zip(experience.index, keys, rewards, strict=True))
        return experiences

    @torch.no_grad()
    def make_experience(self, samples_list: list) -> list:
        self._held_reward, self._actor_refs = None, None
        try:
            return super().make_experience(samples_list)
        finally:
            self._held_reward, self._actor_refs = None, None

    def _dispatch_forward(self, group: Any, sync_condition: bool, **kwargs: Any) -> list:
        if group is not None and group is self.reward_model_group:
            pending: list = []
            self._held_reward = (sync_condition, kwargs, pending)
            if self._actor_refs is not None:
                self._dispatch_reward()
            return pending
        refs = super()._dispatch_forward(group, sync_condition, **kwargs)
        if group is not None and group is self.actor_model_group:
            self._actor_refs = refs
            if self._held_reward is not None:
                self._dispatch_reward()
        return refs

    def _dispatch_reward(self) -> None:
        sync_condition, kwargs, pending = self._held_reward
        self._held_reward = None
        handles = self.actor_model_group._actor_handlers
        duplicates = self.actor_model_group.duplicate_actors
        count = len(kwargs["sequences"])
        feedback = []
        for item in range(count):
            owner = chunk_owner(item, count, len(handles), duplicates)
            feedback.append({"policy": handles[owner], "ready": self._actor_refs[owner], "step": self.r2m_step,
                             "total_steps": self.r2m_total_steps})
        pending.extend(super()._dispatch_forward(self.reward_model_group, sync_condition, **kwargs,
                                                 r2m_feedback=feedback))

    def r2m_update(self, step: int) -> dict[str, float]:
        """The R2M update of the last round (after the policy's training on it), then the round's states and RTEs
        are dropped. Groups: ``n_samples_per_prompt`` consecutive rollout samples; annotation rewards: those the
        advantages were computed from. Returns the update's statistics as ``r2m/...`` metrics."""
        if not self._round:
            return {}
        rows = sorted(self._round)
        keys = [key for _, key, _ in rows]
        rewards = torch.tensor([reward for _, _, reward in rows], dtype=torch.float32)
        group_size = self.args.rollout.n_samples_per_prompt
        policy = self.actor_model_group._actor_handlers[::self.actor_model_group.duplicate_actors]
        reward_actors = self.reward_model_group._actor_handlers
        if len(keys) % len(reward_actors):
            raise ValueError(f"the R2M update splits the round's {len(keys)} samples evenly over the "
                             f"{len(reward_actors)} reward actors: make the rollout size a multiple of it")
        needs_policy = R2MOptions.from_args(self.args).config().uses_fusion
        holder = _holders(ray.get([actor.r2m_held.remote() for actor in policy])) if needs_policy else {}
        rte_holder = _holders([dict.fromkeys(cached, False)
                               for cached in ray.get([actor.r2m_held_rtes.remote() for actor in reward_actors])])
        missing = [key for key in keys if key not in rte_holder]
        if missing:
            raise RuntimeError(f"no reward actor cached the RTE of {len(missing)} of {len(keys)} samples")
        per_actor = len(keys) // len(reward_actors)
        calls = []
        for rank, actor in enumerate(reward_actors):
            part = keys[rank * per_actor:(rank + 1) * per_actor]
            parts = _policy_parts(part, holder, policy) if needs_policy else []
            elsewhere: dict[int, list[str]] = {}
            for key in part:
                if rte_holder[key] != rank:
                    elsewhere.setdefault(rte_holder[key], []).append(key)
            rte_refs = [reward_actors[peer].r2m_rtes.remote(peer_keys) for peer, peer_keys in elsewhere.items()]
            calls.append(actor.r2m_update.remote(part, rewards[rank * per_actor:(rank + 1) * per_actor], group_size,
                                                 step, self.r2m_total_steps, parts, rte_refs))
        stats = ray.get(calls)[0]
        ray.get([actor.r2m_clear.remote() for actor in [*policy, *reward_actors]])
        self._round = []
        return {f"r2m/{name}": value for name, value in stats.items()}


def _holders(held: list[dict[str, bool]]) -> dict[str, int]:
    """key -> index of the actor to read it from: the first holding states from a training pass (the freshest:
    with dynamic batching a sample may be trained on another actor than the one that made its experience), else
    the first holding it at all."""
    holder: dict[str, int] = {}
    for index, keys in enumerate(held):
        for key, trained in keys.items():
            if key not in holder or (trained and not held[holder[key]][key]):
                holder[key] = index
    return holder


def _policy_parts(keys: list[str], holder: dict[str, int], policy: list) -> list[tuple[Any, list[int]]]:
    missing = [key for key in keys if key not in holder]
    if missing:
        raise RuntimeError(f"no policy actor holds the hidden states of {len(missing)} of {len(keys)} samples")
    positions: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        positions.setdefault(holder[key], []).append(position)
    return [(policy[index], items) for index, items in positions.items()]
