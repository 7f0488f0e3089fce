"""OpenRLHF's reward-model and policy Ray actors extended with R2M.

`R2MRewardModelActor` scores with the policy's feedback (routing ``full`` or ``compact``), caches each sample's
reward-token embedding (RTE) and runs the update (`r2m_update`). `R2MPolicyModelActor` keeps the policy's
last-layer states of every forward it runs (experience making and training) and serves them, or the attention
over them, to the reward actor. Both run on GPU and on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
import torch
from openrlhf.trainer.ray.launcher import RewardModelActor
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
from torch import Tensor, nn
from transformers import AutoConfig

import r2m
from r2m.config import R2MConfig
from r2m.distributed import zero3_partitioned
from r2m.integrations.openrlhf.options import R2MOptions
from r2m.integrations.openrlhf.policy_side import PolicyFeedbackCapture, PolicyStateStore, fingerprints
from r2m.integrations.openrlhf.reward_side import PolicyFeedback, R2MRewardSide, Traffic


def actor_class(remote_class: Any) -> type:
    """The plain Python class behind a ``@ray.remote`` actor class (Ray forbids subclassing the remote one)."""
    return remote_class.__ray_metadata__.modified_class.__ray_actor_class__


def device_of(module: nn.Module) -> torch.device:
    """Where a model computes: the device of its first parameter (CPU for a model without any)."""
    parameter = next(module.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def to_cpu(obj: Any) -> Any:
    """Tensors (also inside tuples and lists) moved to CPU, as Ray should ship them."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_cpu(item) for item in obj)
    return obj


def rte_from_last_hidden(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The reward-token embedding [B, D]: the last-layer state at the last attended token of each row, the position
    OpenRLHF's reward model reads; ``hidden`` padded [B, S, D] or packed [1, valid tokens, D]."""
    mask = attention_mask.to(hidden.device).long()
    if hidden.dim() == 3 and hidden.shape[:2] == mask.shape:
        last = mask.shape[1] - 1 - mask.fliplr().argmax(dim=1)
        return hidden[torch.arange(mask.shape[0], device=hidden.device), last]
    ends = mask.sum(dim=1).cumsum(0) - 1
    if hidden.dim() == 3 and hidden.shape[0] == 1 and hidden.shape[1] == int(mask.sum()):
        return hidden[0, ends]
    raise ValueError(f"cannot align the reward model's hidden states {tuple(hidden.shape)} with the attention mask "
                     f"{tuple(mask.shape)}")


def policy_hidden_size(args: Any, options: R2MOptions) -> int:
    """``--r2m_policy_hidden_size``, or the hidden size in the policy checkpoint's config."""
    if options.policy_hidden_size is not None:
        return options.policy_hidden_size
    config = AutoConfig.from_pretrained(args.actor.model_name_or_path)
    return config.get_text_config().hidden_size


class RayEndpoint:
    """A policy actor's `PolicyStateStore`, reached through its ``r2m_*`` Ray methods."""

    def __init__(self, handle: Any):
        self.handle = handle

    def submit(self, method: str, *args: Any) -> Any:
        return getattr(self.handle, f"r2m_{method}").remote(*args)

    def result(self, pending: Any) -> Any:
        return ray.get(pending)


class R2MRewardModelActorBase(actor_class(RewardModelActor)):
    """OpenRLHF's ``RewardModelActor`` with the R2M fusion and head (see `R2MRewardModelActor`)."""

    r2m: R2MRewardSide | None = None

    def init_model_from_pretrained(self, strategy: Any, pretrain: str) -> None:
        super().init_model_from_pretrained(strategy, pretrain)
        options = R2MOptions.from_args(strategy.args)
        if options.enable:
            self.r2m_setup(options.config(), policy_hidden_size(strategy.args, options), options.routing,
                           options.load_path)

    def r2m_setup(self, config: R2MConfig, policy_hidden_size: int, routing: str = "compact",
                  load_path: str | None = None) -> None:
        """Wrap the loaded reward model (``self.model``: OpenRLHF's reward model, bare or in a DeepSpeed engine)."""
        model = self._reward_module()
        head = getattr(model, getattr(model, "value_head_prefix", "score"), None)
        gathered = nullcontext()
        if head is not None and zero3_partitioned(head.weight):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([head.weight])
        with gathered:
            rm = r2m.wrap(model, policy_hidden_size, config)
        if load_path is not None:
            rm.load_state(load_path)
        self.r2m = R2MRewardSide(rm, routing)
        self._rte: dict[str, Tensor] = {}
        self._traffic = Traffic()

    def forward(self, sequences: torch.LongTensor, attention_mask: Tensor | None = None, packed_seq_lens: Any = None,
                pad_sequence: bool = False, r2m_feedback: dict[str, Any] | None = None) -> Tensor:
        """Rewards [B] (CPU). With ``r2m_feedback`` (the policy actor holding this batch's states, a ref to wait on
        until it has them, the policy step and T) the R2M reward; without, the reward model's own."""
        device = device_of(self.model)
        with torch.no_grad():
            reward, output = self.model(sequences.to(device), attention_mask.to(device), return_output=True,
                                        ring_attn_group=self._ring_attn_group(), pad_sequence=True,
                                        packed_seq_lens=packed_seq_lens)
        if self.r2m is None or r2m_feedback is None:
            return reward.to("cpu")
        rte = rte_from_last_hidden(output["last_hidden_state"], attention_mask).float()
        keys = fingerprints(sequences, attention_mask)
        self._rte.update(zip(keys, rte.cpu(), strict=True))
        if r2m_feedback["total_steps"] is not None:
            self.r2m.rm.total_steps = r2m_feedback["total_steps"]
        feedback = None
        if self.r2m.needs_policy:
            ray.wait([r2m_feedback["ready"]], fetch_local=False)
            feedback = self._feedback(keys, [(r2m_feedback["policy"], range(len(keys)))])
        rewards = self.r2m.rewards(rte, feedback, r2m_feedback["step"])
        return self._normalized(rewards).cpu()

    def r2m_update(self, keys: Sequence[str], rewards: Tensor, group_size: int, step: int, total_steps: int | None,
                   policy_parts: Sequence[tuple[Any, Sequence[int]]], rte_refs: Sequence[Any] = ()
                   ) -> dict[str, float]:
        """One R2M update on the samples ``keys`` (group-major; under torch.distributed this rank's contiguous
        slice) with the annotation ``rewards`` the advantages were computed from. ``policy_parts``: (policy actor,
        positions) pairs saying where each sample's states live; ``rte_refs``: refs to {key: RTE} dicts from the
        reward actors that scored samples this one did not."""
        rtes = dict(self._rte)
        for part in ray.get(list(rte_refs)):
            rtes.update(part)
        missing = [key for key in keys if key not in rtes]
        if missing:
            raise KeyError(f"no cached RTE for {len(missing)} of {len(keys)} samples: R2M updates on the samples it "
                           f"scored")
        rte = torch.stack([rtes[key] for key in keys])
        if total_steps is not None:
            self.r2m.rm.total_steps = total_steps
        feedback = self._feedback(keys, policy_parts) if self.r2m.needs_policy else None
        sent, received = self._traffic.sent, self._traffic.received
        stats = self.r2m.update(rte, feedback, torch.as_tensor(rewards, dtype=torch.float32), group_size, step)
        stats["update_bytes"] = float(self._traffic.sent - sent + self._traffic.received - received)
        return stats

    def r2m_rtes(self, keys: Sequence[str]) -> dict[str, Tensor]:
        """Cached RTEs of ``keys`` (for the reward actor that updates on them)."""
        return {key: self._rte[key] for key in keys if key in self._rte}

    def r2m_held_rtes(self) -> list[str]:
        """Keys of the samples whose RTE this actor cached."""
        return list(self._rte)

    def r2m_clear(self) -> None:
        """Forget the cached RTEs (after the round's update)."""
        self._rte.clear()

    def r2m_traffic(self) -> dict[str, float]:
        """Bytes exchanged with the policy actors so far."""
        return self._traffic.as_dict()

    def r2m_state_dict(self) -> dict[str, Tensor]:
        """Fusion and head weights (CPU copies)."""
        modules = {"fusion": self.r2m.rm.fusion, "head": self.r2m.rm.head}
        return {f"{prefix}.{k}": v.detach().cpu().clone()
                for prefix, module in modules.items() for k, v in module.state_dict().items()}

    def r2m_save(self, path: str) -> None:
        """Write the R2M checkpoint (fusion, head, optimizer; safetensors + JSON) to ``path``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.r2m.rm.save_pretrained(path)

    def _feedback(self, keys: Sequence[str], parts: Sequence[tuple[Any, Sequence[int]]]) -> PolicyFeedback:
        return PolicyFeedback(keys, [(RayEndpoint(handle), list(positions)) for handle, positions in parts],
                              device=self.r2m.rm.head.weight.device, traffic=self._traffic)

    def _normalized(self, rewards: Tensor) -> Tensor:
        model = self._reward_module()
        if getattr(model, "normalize_reward", False) and not model.training:
            return (rewards - model.mean.to(rewards)) / model.std.to(rewards)
        return rewards

    def _reward_module(self) -> nn.Module:
        return self.model.module if isinstance(getattr(self.model, "module", None), nn.Module) else self.model

    def _ring_attn_group(self) -> Any:
        return getattr(getattr(self, "strategy", None), "ring_attn_group", None)


class R2MPolicyModelActorBase(actor_class(PolicyModelActor)):
    """OpenRLHF's ``PolicyModelActor`` that keeps its last-layer states for R2M (see `R2MPolicyModelActor`)."""

    _r2m_store: PolicyStateStore | None = None

    def init_model_from_pretrained(self, strategy: Any, pretrain: str, max_steps: int | None = None,
                                   vllm_engines: Any = None) -> None:
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        options = R2MOptions.from_args(strategy.args)
        duplicates = strategy.args.ds.ring_attn_size * strategy.args.ds.tensor_parallel_size
        if options.enable and options.config().uses_fusion and self._rank % duplicates == 0:
            self.r2m_attach(options.hidden_offload, options.impl)

    def r2m_attach(self, offload: bool = False, impl: str = "auto") -> None:
        """Start keeping the last-layer states of every forward of ``self.actor`` (an OpenRLHF ``Actor``)."""
        self._r2m_store = PolicyStateStore(offload=offload, impl=impl)
        self._r2m_capture = PolicyFeedbackCapture(self.actor, self._r2m_store)

    def forward(self, sequences: torch.LongTensor, action_mask: Any = None, attention_mask: Tensor | None = None,
                packed_seq_lens: Any = None, mm_train_inputs_list: Any = None) -> Tensor:
        """OpenRLHF's log-prob forward, on the model's own device (no CUDA assumed)."""
        device = device_of(self.actor)
        mm_inputs = {}
        if mm_train_inputs_list and getattr(self.actor, "is_vlm", False):
            from openrlhf.utils.vlm_utils import merge_mm_train_inputs

            mm_inputs = merge_mm_train_inputs(mm_train_inputs_list, device)
        self.actor.eval()
        with torch.no_grad():
            action_log_probs = self.actor(sequences.to(device), action_mask.to(device), attention_mask.to(device),
                                          ring_attn_group=self.strategy.ring_attn_group, **mm_inputs)
        self.actor.train()
        return action_log_probs.to("cpu")

    def r2m_states(self, keys: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Packed states of ``keys`` and their cu_seqlens (routing ``full``)."""
        return to_cpu(self._store().states(keys))

    def r2m_attend(self, keys: Sequence[str], u: Tensor, keep_for_backward: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, str | None]:
        """c, lse, ok (and a backward token) for query vectors u (routing ``compact``)."""
        return to_cpu(self._store().attend(keys, u, keep_for_backward))

    def r2m_attend_backward(self, token: str, dc: Tensor) -> Tensor:
        """du for dc = dL/dc of a kept `r2m_attend` (routing ``compact``)."""
        return to_cpu(self._store().attend_backward(token, dc))

    def r2m_held(self) -> dict[str, bool]:
        """Key -> "from a training pass" for the samples whose states this actor keeps."""
        return {} if self._r2m_store is None else self._r2m_store.held()

    def r2m_clear(self) -> None:
        """Drop the kept states (after the round's update)."""
        if self._r2m_store is not None:
            self._r2m_store.clear()

    def _store(self) -> PolicyStateStore:
        if self._r2m_store is None:
            raise RuntimeError("this policy actor keeps no R2M states: call r2m_attach (init_model_from_pretrained "
                               "does with --r2m_enable)")
        return self._r2m_store


R2MRewardModelActor = ray.remote(num_gpus=1)(R2MRewardModelActorBase)
R2MPolicyModelActor = ray.remote(num_gpus=1)(R2MPolicyModelActorBase)
