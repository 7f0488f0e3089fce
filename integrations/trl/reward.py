"""R2MReward: one object that is both the TRL reward function and the `TrainerCallback` driving R2M."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import (
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from trl import GRPOConfig, RLOOConfig
from trl.data_utils import apply_chat_template, is_conversational

from r2m.adapters import GenerativeJudge
from r2m.base import R2MModule
from r2m.buffer import Rollout, RolloutStore
from r2m.config import LABELLED_MODES, R2MConfig
from r2m.distributed import rank_and_world
from r2m.hf_models import pad_token_id_set
from r2m.integrations.trl.anchor_set import AnchorSet, Pair
from r2m.integrations.trl.checkpoints import find_checkpoint, given_checkpoint, r2m_checkpoint_dir
from r2m.integrations.trl.labels import Labeller, OnPolicyLabels
from r2m.integrations.trl.loading import RewardModelSource, load_reward
from r2m.integrations.trl.metrics import METRICS, TrainerMetrics, metrics_doc
from r2m.integrations.trl.policy_states import CAPTURE_SOURCES, PolicyStateSource, capture_plan
from r2m.monitor import group_state_similarity, pooled_response_states
from r2m.packed import PackedStates
from r2m.wrap import wrap

logger = logging.getLogger(__name__)

UPDATE_METRICS = {m.name for m in METRICS if m.when == "update"}


@dataclass
class _Scored:
    """What the update needs of a scored training batch besides its policy states (a `Rollout`'s payload)."""

    rte: Tensor
    rewards: Tensor
    base_rewards: Tensor | None
    step: int
    labels: Tensor | None


class R2MReward(TrainerCallback):
    """An R2M reward for TRL's ``GRPOTrainer`` and ``RLOOTrainer``: pass the same object as a reward function
    and as a callback.

    >>> r2m_reward = R2MReward(reward_model, reward_tokenizer, config=R2MConfig())
    >>> GRPOTrainer(model=policy, reward_funcs=[r2m_reward], callbacks=[r2m_reward], ...)

    ``reward_model``: a Hugging Face ``*ForSequenceClassification`` model (num_labels=1), a local path loaded
    with ``AutoModelForSequenceClassification`` (``model_init_kwargs`` are passed on; ``trust_remote_code`` stays
    off unless given there), an already wrapped `r2m.R2MRewardModel`, or a generative judge from ``r2m.adapters``
    running a local model (``TransformersBackend``). ``reward_tokenizer`` defaults to the path's tokenizer; a judge
    brings its own. The policy's hidden states come from forwards the trainer already runs (see `capture_plan`);
    the fusion and head are updated once per generation batch, after the policy's last pass over it, and saved
    with the trainer's checkpoints.

    With a judge (`r2m.R2MJudgeModel`) each call runs ``judge.score`` once: its rewards are r_base of
    r = w(t) r_base + (1 - w(t)) phi(Ĥ) and its hidden state at the end of its input is the RTE (both cached for the
    update); its text and counts go to TRL through ``judge.log``. A completion the judge gave no reward gets None,
    and its group is skipped in the update.

    Metrics: one table of names and meanings, `r2m.integrations.trl.metrics.METRICS` (listed at the end); they go
    to the trainer's logs (``trainer.state.log_history``, W&B, TensorBoard): a reward call's through TRL's
    ``log_metric``, an update's into the log of the step that ran it.

    ``monitor``: whether to log ``r2m/state_similarity``. None (default): in the modes that hold the policy's states
    anyway (all but ``vanilla`` and ``head_only``); True: in every mode (in ``vanilla`` and ``head_only`` the states
    are captured from the same trainer passes for the monitor alone, neither kept nor used by the update, and cost an
    extra forward only where `capture_plan` says ``extra``); False: never.

    ``labeller`` (modes ``anchored`` and ``head_only``): labels the first ``label_groups`` groups of every
    generation batch (all when None; see `OnPolicyLabels`), and the update adds a Bradley-Terry term on them
    (``R2MConfig.anchor_weight``).

    ``anchor_pairs`` (modes ``anchored`` and ``head_only``; the cheaper alternative to a labeller, and either or both
    may be given): a small fixed set of (prompt, chosen, rejected) preference pairs, texts or conversations as the
    dataset's prompts and the completions are (`AnchorSet`). Their RTEs are computed once when training begins (the
    RM is frozen; a judge judges each pair as a group of its own, and its rewards are their r_base); in ``anchored``
    the policy's states of the 2P sequences (prompt ids as the trainer builds them, then the response's ids without
    special tokens and EOS) come from one no-grad forward through the trainer's model every ``anchor_every`` R2M
    updates, cached in between; ``head_only`` runs none. Each update adds ``R2MConfig.anchor_weight`` x their
    Bradley-Terry loss (`r2m.AnchorBatch`). Their forwards are counted in `anchor_forwards` (not in `extra_forwards`
    or ``r2m/capture_ms``).

    After training, `r2m_model` is the trained R2M reward and `save_pretrained` writes it (reload it with
    ``r2m.R2MRewardModel.from_pretrained(reward_model, path)``).
    """

    def __init__(self, reward_model: RewardModelSource,
                 reward_tokenizer: PreTrainedTokenizerBase | None = None, config: R2MConfig | None = None,
                 name: str = "r2m", model_init_kwargs: dict[str, Any] | None = None,
                 labeller: Labeller | None = None, label_groups: int | None = None, monitor: bool | None = None,
                 anchor_pairs: Sequence[Pair] | None = None, anchor_every: int = 1):
        if monitor is not None and not isinstance(monitor, bool):
            raise TypeError(f"monitor must be True, False or None, got {monitor!r}")
        loaded = load_reward(reward_model, reward_tokenizer, config, model_init_kwargs)
        self.reward_model, self.tokenizer, self.judge = loaded.model, loaded.tokenizer, loaded.judge
        self.r2m: R2MModule | None = loaded.r2m
        self.config = loaded.config
        if self.config.mode == "anchored" and labeller is None and anchor_pairs is None:
            raise ValueError("mode 'anchored' learns from labels on the policy's own samples or on a fixed anchor set: "
                             "pass labeller= (a gold function, an r2m.adapters judge or a lookup of human labels) "
                             "and/or anchor_pairs= ((prompt, chosen, rejected) preference pairs)")
        if labeller is not None and self.config.mode not in LABELLED_MODES:
            raise ValueError(f"labeller is used in modes {LABELLED_MODES} (head_only: the control that gives the RM "
                             f"alone the same labels), not in mode {self.config.mode!r}")
        self.labels = None if labeller is None else OnPolicyLabels(labeller, label_groups)
        if anchor_pairs is not None and getattr(self.judge, "reference_column", None) is not None:
            raise ValueError(f"anchor_pairs cannot be judged by a judge that compares with a dataset column "
                             f"(reference_column={self.judge.reference_column!r}): the anchor pairs have no dataset "
                             f"columns; use a judge without reference_column")
        self.anchors = None if anchor_pairs is None else AnchorSet(anchor_pairs, anchor_every, self.config.mode)
        self.monitor = self.config.uses_fusion if monitor is None else monitor
        self.__name__ = name
        self._source: PolicyStateSource | None = None  # set by the trainer, when the mode uses policy states
        self._ready = False
        self._policy: nn.Module | None = None
        self._chat_template_kwargs: dict[str, Any] = {}
        self._group_size = self._generate_every = 0
        self._store = RolloutStore()
        self._micro_steps = 0
        self._calls = 0
        self._resume_dir: Path | None = None
        self._metrics = TrainerMetrics()

    # ---- the reward function -----------------------------------------------------------------------------------

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 trainer_state: TrainerState | None = None, log_extra: Callable[[str, list], None] | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **dataset_columns: Any) -> list[float | None]:
        """The annotation step (paper Algorithm 1): R2M rewards for this process's samples from the frozen reward
        model and the policy's states of them; a reward that is not finite is returned as None."""
        step = self._begin_call(trainer_state, log_metric)
        # the policy's states first: nothing the reward model or judge runs can then be mistaken for them
        states, extra, capture_ms = self._policy_states(prompts, completion_ids)
        rte, base_rewards = self._score(prompts, completions, log_extra, log_metric, dataset_columns)
        fused = states if self.config.uses_fusion else None  # without fusion, states serve the monitor only
        rewards = self.r2m.score(rte, fused, step, base_rewards)  # w(t) r_base + (1 - w(t)) phi(Ĥ), Eq. 4
        vanilla = self.r2m.vanilla_reward_from_rte(rte, base_rewards)
        rewards, vanilla = torch.stack([rewards, vanilla.to(rewards.device)]).cpu()  # one transfer to the host
        finite = torch.isfinite(rewards)
        labels = None
        if self._policy.training:  # kept for the update after the policy's last pass over this batch
            labels = self._label(prompts, completions, completion_ids, dataset_columns)
            held = fused if fused is not None else PackedStates.none_found(len(rewards))
            self._store.add(held, held.tokens, self._micro_steps + self._generate_every,
                            _Scored(rte, torch.where(finite, rewards, torch.nan), base_rewards, step, labels))
        metrics = {"r2m/reward_mean": _mean(rewards[finite]),
                   "r2m/vanilla_reward_mean": _mean(vanilla[torch.isfinite(vanilla)]),
                   "r2m/omega": self.r2m.omega_at(step), "r2m/extra_forward_share": extra / len(rewards),
                   "r2m/capture_ms": capture_ms, "r2m/reward_nonfinite": float((~finite).sum()),
                   "r2m/hidden_nonfinite": float(fused.nonfinite_samples() if fused is not None else 0)}
        if labels is not None:
            metrics["r2m/labelled_share"] = float(torch.isfinite(labels).float().mean())
            metrics["r2m/label_ms"], self.labels.seconds = 1000 * self.labels.seconds, 0.0
        similarity = self._state_similarity(states, completion_ids)
        if similarity is not None:
            metrics["r2m/state_similarity"] = similarity
        self._metrics.log_call(metrics, log_metric)
        return [float(r) if ok else None for r, ok in zip(rewards.tolist(), finite.tolist(), strict=True)]

    @property
    def capture_plan(self) -> str | None:
        """Where the policy states come from (see `capture_plan`); None before a trainer set it up, or when neither
        the mode nor the monitor uses them."""
        return None if self._source is None else self._source.plan

    @property
    def capture_counts(self) -> dict[str, int]:
        """Samples whose states came from each source (``forward``, ``generation``, ``extra``)."""
        return dict.fromkeys(CAPTURE_SOURCES, 0) if self._source is None else dict(self._source.counts)

    @property
    def extra_forwards(self) -> int:
        """Policy forwards R2M ran itself (0 unless the trainer's own passes lacked some samples)."""
        return 0 if self._source is None else self._source.extra_forwards

    @property
    def anchor_forwards(self) -> int:
        """No-grad policy forwards R2M ran for the anchor set's states (one per refresh; none in ``head_only``)."""
        return 0 if self.anchors is None else self.anchors.forwards

    @property
    def stored_hidden_bytes(self) -> int:
        """Bytes of policy hidden states held now for the coming updates."""
        return self._store.stored_bytes

    @property
    def r2m_model(self) -> R2MModule:
        """The R2M reward being trained (fusion, head and the frozen reward model or judge)."""
        if self.r2m is None:
            raise RuntimeError("R2MReward has no R2M model yet: a trainer builds it (pass the object in "
                               "callbacks=[...])")
        return self.r2m

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the trained fusion, head and optimizer state (safetensors + JSON) to ``save_directory``."""
        self.r2m_model.save_pretrained(save_directory)

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore the R2M state from a trainer checkpoint directory (or its ``r2m`` subdirectory) when training
        starts; only needed when resuming from a checkpoint outside the trainer's ``output_dir``."""
        self._resume_dir = given_checkpoint(checkpoint_dir)

    # ---- the callback ----------------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, processing_class: PreTrainedTokenizerBase | None = None,
                    **kwargs: Any) -> None:
        if not isinstance(args, (GRPOConfig, RLOOConfig)):
            raise TypeError(f"R2MReward works with TRL's GRPOTrainer and RLOOTrainer (GRPOConfig / RLOOConfig "
                            f"arguments); this trainer has {type(args).__name__}")
        if args.num_generations < 2:
            raise ValueError(f"R2M updates on groups of responses per prompt: num_generations must be >= 2, got "
                             f"{args.num_generations}")
        policy_dim = model.config.get_text_config().hidden_size
        if self.judge is not None and _shares_parameters(model, self.reward_model):
            raise ValueError("the judge runs the policy's own model: R2M freezes the judge model, so give the judge a "
                             "separate copy of it")
        if self.r2m is None:
            self.r2m = self._wrap(policy_dim, args)
        elif self.r2m.policy_dim != policy_dim:
            raise ValueError(f"the R2MRewardModel was built for policy_hidden_size={self.r2m.policy_dim} but the "
                             f"policy's hidden size is {policy_dim}")
        if self._source is not None:
            self._source.remove()
            self._source = None
        if self.config.uses_fusion or self.monitor:  # without fusion the states serve the monitor only: no refresh
            self._source = PolicyStateSource(model, args, processing_class, self.config.hidden_offload,
                                             self._refresh if self.config.uses_fusion else None)
        self._policy = model
        self._chat_template_kwargs = dict(args.chat_template_kwargs or {})
        self._group_size = args.num_generations
        self._generate_every = args.steps_per_generation * args.num_iterations
        self._ready = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.r2m.total_steps = self.config.total_steps or state.max_steps
        self._store.clear()
        self._micro_steps, self._calls = 0, 0
        if self.anchors is not None:
            self.anchors.prepare(self._score_pairs)
        if self._resume_dir is None and state.global_step > 0:
            self._resume_dir = find_checkpoint(args, state)
        if self._resume_dir is not None:
            self.r2m.load_state(self._resume_dir)
            self.r2m.total_steps = self.config.total_steps or state.max_steps
            self._resume_dir = None
        elif rank_and_world()[1] > 1:
            with torch.no_grad():
                for param in self.r2m.trainable_parameters():
                    dist.broadcast(param.data, src=0)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._advance()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._advance()
        if self._calls == 0 and self._micro_steps >= self._generate_every:
            raise RuntimeError("R2MReward is a callback of this trainer but was never called as a reward function: "
                               "pass the same object in reward_funcs=[...] as well as in callbacks=[...]")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if args.should_save:
            self.r2m.save_pretrained(r2m_checkpoint_dir(args, state.global_step))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._store.clear()

    # ---- internals -------------------------------------------------------------------------------------------

    def _begin_call(self, trainer_state: TrainerState | None, log_metric: Callable[[str, float], None] | None) -> int:
        """The policy step of this reward call (T set where still unknown)."""
        if not self._ready:
            raise RuntimeError("R2MReward was called as a reward function before a trainer set it up: pass the same "
                               "object in callbacks=[...] as well as in reward_funcs=[...]")
        self._calls += 1
        self._metrics.bind(log_metric)
        step = trainer_state.global_step if trainer_state is not None else 0
        if self.r2m.total_steps is None:
            self.r2m.total_steps = self.config.total_steps or max(1, step, getattr(trainer_state, "max_steps", 0))
        return step

    def _policy_states(self, prompts: list, completion_ids: list[list[int]]) -> tuple[PackedStates | None, int, float]:
        """The policy's states of the batch (None when neither the mode nor the monitor uses them), how many samples
        needed an extra forward, and the host ms spent capturing since the previous batch."""
        if self._source is None:
            return None, 0, 0.0
        states, extra = self._source.take(prompts, completion_ids, self._metrics.trainer)
        return states, extra, 1000 * self._source.take_seconds()

    def _label(self, prompts: list, completions: list, completion_ids: list[list[int]],
               columns: dict[str, Any]) -> Tensor | None:
        """The labeller's scores of this process's samples (modes with a labeller), NaN where unlabelled."""
        if self.labels is None:
            return None
        return self.labels(prompts, completions, completion_ids, self._group_size, rank_and_world()[0], columns)

    def _wrap(self, policy_dim: int, args: TrainingArguments) -> R2MModule:
        device = next(self.reward_model.parameters()).device
        if device.type == "cpu" and args.device.type != "cpu":
            self.reward_model.to(args.device)
        seed = self.config.seed if self.config.seed is not None else args.seed
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(seed)
            return wrap(self.judge if self.judge is not None else self.reward_model, policy_dim, self.config)

    def _score(self, prompts: list, completions: list, log_extra: Callable[[str, list], None] | None,
               log_metric: Callable[[str, float], None] | None, columns: dict[str, Any],
               judge: GenerativeJudge | None = None) -> tuple[Tensor, Tensor | None]:
        """RTEs [B, D_rm] and, for a judge, its rewards [B] (NaN where it gave none): one reward-model forward or
        one call of ``judge`` (default: ours)."""
        if self.judge is None:
            encoded = self.tokenizer(text=self._reward_texts(prompts, completions), return_tensors="pt",
                                     padding=True, padding_side="right", add_special_tokens=False)
            with pad_token_id_set(self.reward_model, self.tokenizer.pad_token_id):
                return self.r2m.rte(encoded["input_ids"], encoded["attention_mask"]), None
        judge = self.judge if judge is None else judge
        result = judge.score(prompts, completions, **columns)
        judge.log(result, log_extra, log_metric)
        base_rewards = torch.tensor([math.nan if r is None else float(r) for r in result.rewards])
        if result.rte is None:
            logger.warning("R2M: the judge returned no hidden states for this batch; its rewards are used as they are")
            return torch.full((len(prompts), self.r2m.rm_dim), math.nan), base_rewards
        return result.rte, base_rewards

    def _score_pairs(self, prompts: list, responses: list) -> tuple[Tensor, Tensor | None]:
        """`_score` of rows in preference pairs (the anchor set's): a judge judges each pair as a group of its own,
        the two compared, also where consecutive pairs share a prompt."""
        judge = None
        if self.judge is not None:
            judge = copy.copy(self.judge)
            judge.group_size = 2
        return self._score(prompts, responses, None, None, {}, judge)

    def _reward_texts(self, prompts: list, completions: list) -> list[str]:
        if is_conversational({"prompt": prompts[0]}):
            return [apply_chat_template({"messages": p + c}, self.tokenizer, **self._chat_template_kwargs)["text"]
                    for p, c in zip(prompts, completions, strict=True)]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def _state_similarity(self, states: PackedStates | None, completion_ids: list[list[int]]) -> float | None:
        """Mean over the batch's groups of how alike the policy's states of a group's responses are (`r2m.monitor`);
        None with the monitor off, without states or when the gathered batch is not whole groups."""
        if not self.monitor or states is None or states.hidden is None:
            return None
        pooled = pooled_response_states(states.hidden, states.cu_seqlens, [len(c) for c in completion_ids])
        accelerator = getattr(self._metrics.trainer, "accelerator", None)
        if accelerator is not None:
            pooled = accelerator.gather(pooled.to(accelerator.device))
        if pooled.shape[0] % self._group_size:
            return None
        return float(group_state_similarity(pooled, self._group_size).mean())

    def _refresh(self, captured: PackedStates) -> None:
        """Replace annotation-time states by those of the policy's latest training pass over the same samples."""
        self._store.refresh(captured.tokens, captured)

    def _advance(self) -> None:
        self._micro_steps += 1
        for rollout in self._store.release(self._micro_steps):
            self._update(rollout)

    def _update(self, rollout: Rollout) -> None:
        """The R2M update on a batch the policy has finished with (its states refreshed by the last pass)."""
        scored: _Scored = rollout.payload
        anchor, anchor_seconds = (None, 0.0) if self.anchors is None else self.anchors.batch(
            self._source if self.config.uses_fusion else None, self._metrics.trainer, self.r2m.policy_dim)
        stats = self.r2m.update_states(scored.rte, rollout.states if self.config.uses_fusion else None,
                                       scored.rewards, self._group_size, scored.step, base_rewards=scored.base_rewards,
                                       labels=scored.labels, anchor=anchor)
        stats["refreshed"] = rollout.refreshed_share
        if anchor is None:
            stats.pop("anchor_set_bt", None)
        else:
            stats.update(anchor_forwards=float(self.anchors.forwards), anchor_ms=1000 * anchor_seconds)
        self._metrics.log_update({f"r2m/{key}": float(value) for key, value in stats.items()
                                  if f"r2m/{key}" in UPDATE_METRICS})


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    ours = {id(p) for p in b.parameters()}
    return any(id(p) in ours for p in a.parameters())


def _mean(values: Tensor) -> float:
    return float(values.float().mean()) if values.numel() else math.nan


R2MReward.__doc__ += metrics_doc()

__all__ = ["CAPTURE_SOURCES", "R2MReward", "capture_plan"]
