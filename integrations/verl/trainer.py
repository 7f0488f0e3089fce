"""verl's v1 trainer mode ``r2m_sync``: the sync PPO/GRPO trainer with R2M rewards.

One step is verl's sync step with R2M in two places: after ``compute_old_log_prob`` (whose forward left each sample's
states on its actor rank) every actor rank scores its samples, and the R2M reward is added to ``rm_scores`` at each
response's last token (on top of the rule or model reward the rollout computed, as verl sums reward sources); after
``update_actor`` (whose training passes refreshed the states) R2M takes one GREBT step over the step's ``uid``
groups. ``r2m/*`` metrics join verl's. The R2M state is saved in ``<checkpoint>/global_step_N/actor/r2m`` and restored
on resume. Inside, the trainer runs as verl's ``sync`` mode (its replay buffer and checkpoint layout).
"""

from __future__ import annotations

import logging
import os

import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig, open_dict
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path
from verl.utils.metric import reduce_metrics

from r2m.integrations.verl.settings import TRAINER_MODE, check_settings, r2m_config
from r2m.integrations.verl.worker import R2MActorRolloutRefWorker

logger = logging.getLogger(__name__)

ACTOR_ROLES = (Role.ActorRolloutRef, Role.ActorRollout, Role.Actor)


@register_trainer(TRAINER_MODE)
class R2MPPOTrainer(PPOTrainerSync):
    """verl's sync trainer with R2M scoring after the old log-prob pass and an R2M update after the actor update."""

    def __init__(self, config: DictConfig):
        check_settings(config)
        self.r2m_settings = r2m_config(config)
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # verl keys its sync replay buffer and checkpoints on this name
        super().__init__(config)

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        for role in ACTOR_ROLES:
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(R2MActorRolloutRefWorker)

    def _load_checkpoint(self) -> None:
        self.actor_rollout_wg.r2m_init(self.r2m_settings.to_dict(), self.config.r2m.reward_model_path,
                                       self.total_training_steps)
        super()._load_checkpoint()
        folder = self._resumed_folder()
        if folder is not None:
            self.actor_rollout_wg.r2m_load(os.path.join(folder, "actor"))

    def _resumed_folder(self) -> str | None:
        """The global_step folder verl resumed from (None when it started from scratch)."""
        if self.global_steps == 0:
            return None
        if self.config.trainer.resume_mode == "resume_path":
            folder = self.config.trainer.resume_from_path
        else:
            folder = find_latest_ckpt_path(self.config.trainer.default_local_dir)
        return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)

    def _save_checkpoint(self) -> None:
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}", "actor")
        self.actor_rollout_wg.r2m_save(folder)
        super()._save_checkpoint()

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        batch = super()._compute_old_log_prob(batch, metrics)
        batch.extra_info["r2m_step"] = self.global_steps
        self.actor_rollout_wg.r2m_score(batch)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["rm_scores", "r2m_rewards", "r2m_nonfinite"])
        rows = []
        for scores, reward in zip(data["rm_scores"].unbind(), data["r2m_rewards"].tolist(), strict=True):
            scores = scores.clone()
            scores[-1] += reward
            rows.append(scores)
        rm_scores = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                        fields=TensorDict({"rm_scores": rm_scores}, batch_size=len(batch)))
        rewards = data["r2m_rewards"].float()
        metrics.update({"r2m/reward_mean": float(rewards.mean()), "r2m/reward_std": float(rewards.std()),
                        "r2m/nonfinite_rewards": float(data["r2m_nonfinite"].sum())})
        return batch

    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        batch = super()._update_actor(batch, metrics)
        batch.extra_info.update(r2m_step=self.global_steps, r2m_group_size=self.config.actor_rollout_ref.rollout.n)
        output = self.actor_rollout_wg.r2m_update(batch)
        metrics.update(reduce_metrics({k: [v] for k, v in output["metrics"].items()}))
        return batch
