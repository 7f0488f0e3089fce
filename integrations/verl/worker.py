"""verl's actor worker with R2M on it: states captured from the actor's own passes, scoring and updates next to them.

`R2MActorRolloutRefWorker` extends verl's ``ActorRolloutRefWorker``. Its actor's transformer body carries a
`VerlStateCapture`: ``compute_log_prob`` (the old-policy pass) keeps each sample's states on the rank that ran it,
and ``update_actor``'s training forwards refresh them. Registered methods, dispatched like ``compute_log_prob`` so
each rank gets back the samples whose states it holds:

- ``r2m_init``: wraps the reward model, loaded whole and frozen on every actor rank (each rank scores its own samples
  where their states live, so no policy state crosses ranks; the cost is one copy of the reward model's weights per
  rank, as verl's colocated reward model has); fusion and head start from rank 0's weights;
- ``r2m_score``: the R2M reward of each sample (the reward model reads prompt + response decoded from the policy's
  token ids and tokenised with its own tokenizer, in chunks of the log-prob micro-batch size); a reward that is
  not finite is replaced by 0 and counted;
- ``r2m_update``: one GREBT step after the actor update, groups by ``uid`` across ranks (`grouped_update`);
- ``r2m_save`` / ``r2m_load``: the R2M state next to verl's actor checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name
from verl.workers.engine_workers import ActorRolloutRefWorker

from r2m.base import R2MModule
from r2m.buffer import RolloutStore
from r2m.config import R2MConfig
from r2m.hf_models import pad_token_id_set, padding_tokenizer
from r2m.integrations.verl import compat
from r2m.integrations.verl.capture import TokenKey, VerlStateCapture
from r2m.integrations.verl.update import grouped_update
from r2m.wrap import wrap

logger = logging.getLogger(__name__)
compat.apply()

R2M_STATE_DIR = "r2m"  # inside verl's actor checkpoint folder


def sample_keys(data: TensorDict) -> list[TokenKey]:
    """Each sample's key: its token ids (prompt + response), as the capture names it."""
    return [tuple(row.tolist()) for row in data["input_ids"].unbind()]


def sequence_scores(data: TensorDict) -> Tensor:
    """Each sample's score (its token-level ``rm_scores`` summed), zeros when the batch has none."""
    if "rm_scores" not in data.keys():
        return torch.zeros(len(data))
    return torch.stack([row.float().sum() for row in data["rm_scores"].unbind()])


class R2MActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor worker with an R2M reward beside the actor (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.store = RolloutStore()
        self.capture: VerlStateCapture | None = None
        self.r2m: R2MModule | None = None
        self.reward_tokenizer = None
        self.policy_tokenizer = None
        self._rte: dict[TokenKey, Tensor] = {}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        super().init_model()
        if self.actor is not None:
            self.capture = VerlStateCapture(self.actor.engine.module, self.store)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data: TensorDict) -> TensorDict:
        # A reference pass through the actor (LoRA adapters disabled) is not the policy: it is not kept.
        reference = tu.get(data, key="no_lora_adapter", default=False)
        self.capture.active = self.r2m is not None and not reference
        if self.capture.active:  # a new batch: what an earlier one left (no update ran on it) is dropped
            self.store.clear()
            self._rte.clear()
        try:
            return super().compute_log_prob(data)
        finally:
            self.capture.active = False

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def r2m_init(self, config: dict, reward_model_path: str, total_steps: int) -> None:
        """Load the reward model whole and frozen on this rank and wrap it; fusion and head start as rank 0's."""
        r2m_config = R2MConfig(**config)
        reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_path, dtype=torch.float32)
        reward_model = reward_model.to(get_device_name())
        self.reward_tokenizer = padding_tokenizer(AutoTokenizer.from_pretrained(reward_model_path), "reward tokenizer")
        self.policy_tokenizer = AutoTokenizer.from_pretrained(self.config.model.get("tokenizer_path")
                                                              or self.config.model.path)
        hidden_size = self.actor.engine.module.config.get_text_config().hidden_size
        self.r2m = wrap(reward_model, policy_hidden_size=hidden_size, config=r2m_config)
        self.r2m.total_steps = r2m_config.total_steps or total_steps
        self.capture.offload = r2m_config.hidden_offload
        if dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in [*self.r2m.fusion.parameters(), *self.r2m.head.parameters()]:
                dist.broadcast(tensor.data, src=0)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def r2m_score(self, data: TensorDict) -> TensorDict:
        """``r2m_rewards`` [B] of this rank's samples at policy step ``r2m_step`` (R2M rewards, 0 where not finite)
        and ``r2m_nonfinite`` [B] (1 where a reward was replaced)."""
        step = int(tu.get(data, key="r2m_step"))
        keys = sample_keys(data)
        states = self.store.lookup(keys)
        rte = self._reward_token_embeddings(keys)
        rewards = self.r2m.reward_from_rte(rte, states.hidden, None, step, cu_seqlens=states.cu_seqlens).cpu()
        self._rte.update({key: row for key, row in zip(keys, rte.cpu(), strict=True)})
        finite = torch.isfinite(rewards)
        return TensorDict({"r2m_rewards": torch.where(finite, rewards, torch.zeros_like(rewards)),
                           "r2m_nonfinite": (~finite).float()}, batch_size=len(keys))

    def _reward_token_embeddings(self, keys: list[TokenKey]) -> Tensor:
        """RTEs [B, D_rm] (float32) of the samples, in reward-model forwards of the actor's log-prob micro-batch
        size: the reward model reads prompt + response decoded from the policy's ids, tokenised its own way."""
        texts = self.policy_tokenizer.batch_decode([list(k) for k in keys], skip_special_tokens=True)
        chunk = self.config.rollout.get("log_prob_micro_batch_size_per_gpu") or len(texts)
        parts = []
        with pad_token_id_set(self.r2m.reward_model, self.reward_tokenizer.pad_token_id):
            for start in range(0, len(texts), chunk):
                encoded = self.reward_tokenizer(text=texts[start:start + chunk], return_tensors="pt", padding=True,
                                                padding_side="right", add_special_tokens=False)
                parts.append(self.r2m.rte(encoded["input_ids"], encoded["attention_mask"]).float())
        return torch.cat(parts)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def r2m_update(self, data: TensorDict) -> TensorDict:
        """One R2M update on the batch just trained on (annotation rewards: each sample's ``rm_scores`` sum), with
        its refreshed states; then this batch's states and RTEs are dropped."""
        step = int(tu.get(data, key="r2m_step"))
        group_size = int(tu.get(data, key="r2m_group_size"))
        keys = sample_keys(data)
        try:
            states = self.store.lookup(keys)
            rte = torch.stack([self._rte[key] for key in keys])
            stats = grouped_update(self.r2m, rte, states, sequence_scores(data), list(data["uid"]), group_size,
                                   step)
            stats["refreshed_share"] = sum(self.store.is_refreshed(k) for k in keys) / max(len(keys), 1)
        finally:
            self.store.clear()
            self._rte.clear()
        metrics = {f"r2m/{name}": float(value) for name, value in stats.items() if math.isfinite(float(value))}
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics})

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def r2m_weights(self) -> dict[str, Tensor]:
        """This rank's fusion and head weights (CPU copies)."""
        named = {f"fusion.{k}": v for k, v in self.r2m.fusion.state_dict().items()}
        named.update({f"head.{k}": v for k, v in self.r2m.head.state_dict().items()})
        return {k: v.detach().cpu().clone() for k, v in named.items()}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def r2m_save(self, actor_checkpoint_dir: str) -> None:
        """Write the R2M state (fusion, head, optimizer, config) into ``<actor checkpoint>/r2m`` (rank 0)."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.r2m.save_pretrained(Path(actor_checkpoint_dir) / R2M_STATE_DIR)
        if dist.is_initialized():
            dist.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def r2m_load(self, actor_checkpoint_dir: str) -> None:
        """Restore the R2M state saved by `r2m_save` (every rank)."""
        self.r2m.load_state(Path(actor_checkpoint_dir) / R2M_STATE_DIR)
