"""OpenRLHF's PPO trainer (PPO, REINFORCE++, GRPO, RLOO, ... estimators) with R2M's per-round update."""

from __future__ import annotations

import os
from typing import Any

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer

from r2m.integrations.openrlhf.actors import actor_class
from r2m.integrations.openrlhf.experience_maker import R2MExperienceMaker
from r2m.integrations.openrlhf.options import R2MOptions, default_total_steps


class R2MPPOTrainerBase(actor_class(PPOTrainer)):
    """OpenRLHF's ``PPOTrainer`` whose experience maker feeds the policy's states to the reward, and which runs the
    R2M update after each training round (before the next experience batch). R2M checkpoints are written next to
    OpenRLHF's."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        options = R2MOptions.from_args(self.args)
        total_steps = options.total_steps or default_total_steps(
            len(self.prompts_dataloader), self.args.rollout.batch_size, self.args.train.num_episodes)
        self.experience_maker = R2MExperienceMaker(
            self.actor_model_group, self.critic_model_group, self.reward_model_group, self.reference_model_group,
            self.kl_ctl, self.strategy, self.tokenizer, total_steps=total_steps)

    def train_step(self, rollout_samples: list, global_step: int) -> tuple[dict, int]:
        self.experience_maker.r2m_step = global_step
        return super().train_step(rollout_samples, global_step)

    def ppo_train(self, global_steps: int) -> dict:
        status = super().ppo_train(global_steps)
        status.update(self.experience_maker.r2m_update(global_steps))
        return status

    def save_logs_and_checkpoints(self, global_step: int, logs_dict: dict | None = None,
                                  client_states: dict | None = None) -> None:
        super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
        if global_step % self.args.ckpt.save_steps == 0:
            self.r2m_save(os.path.join(self.args.ckpt.path, f"r2m_global_step{global_step}"))

    def fit(self, global_step: int = 0) -> None:
        super().fit(global_step)
        self.r2m_save(os.path.join(self.args.ckpt.output_dir, "r2m"))

    def r2m_save(self, path: str) -> None:
        """Write the R2M fusion, head and optimizer state (identical on every reward actor) to ``path``."""
        ray.get(self.reward_model_group._actor_handlers[0].r2m_save.remote(path))


R2MPPOTrainer = ray.remote(R2MPPOTrainerBase)
