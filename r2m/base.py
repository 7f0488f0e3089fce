"""R2MModule: the fusion, scoring head, schedule and GREBT update shared by every R2M reward."""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from r2m import checkpoint
from r2m.anchors import AnchorBatch
from r2m.checks import check_int
from r2m.config import LABELLED_MODES, R2MConfig
from r2m.distributed import all_gather, rank_and_world
from r2m.fusion import SequenceToTokenAttention
from r2m.losses import bt_loss, degenerate_groups, gre_loss, grebt_loss, labelled_bt_loss, select_pairs
from r2m.packed import PackedStates, finite_samples
from r2m.schedule import omega

# "attend(u) -> c" (`r2m.fusion`) run wherever the policy states live: query vectors u [B, H, D_p] -> the attended
# states c [B, H, D_p] (differentiable in u when grad is enabled) and which samples had finite states [B] bool.
PolicyContext = Callable[[Tensor], tuple[Tensor, Tensor]]
# What the core takes as policy states: packed states, a context, or None (modes that fuse none).
PolicyInput = PackedStates | PolicyContext | None


@dataclass
class LabelledGroup:
    """A group of samples an update had labels for, kept for ``R2MConfig.label_replay``: RTEs [K, D_rm], policy
    states (None in modes that fuse none), the judge's base rewards [K] (None for a reward model) and labels [K]."""

    rte: Tensor
    states: PackedStates | None
    base_rewards: Tensor | None
    labels: Tensor


class R2MModule(nn.Module):
    """An R2M reward r = w(t) r_base + (1 - w(t)) head(Ĥ), Ĥ = fusion(RTE, policy hidden states) (paper Eq. 4).

    Subclasses say what the reward-token embedding (`rte`) and the base reward are. Only ``fusion`` and ``head``
    train (``head`` alone in ``head_only`` mode, where the RTE stands in for Ĥ). They and the optimizer state stay
    float32: ``.to(dtype)``, ``.half()`` and the like cast only the wrapped model, devices move everything.
    """

    def __init__(self, rm_dim: int, policy_hidden_size: int, config: R2MConfig | None, head: nn.Linear):
        super().__init__()
        config = R2MConfig() if config is None else config
        if not isinstance(config, R2MConfig):
            raise TypeError(f"config must be an r2m.R2MConfig, got {type(config).__name__}")
        check_int("policy_hidden_size", policy_hidden_size, hint=" (the policy's hidden size)")
        self.config = config
        self.rm_dim, self.policy_dim = rm_dim, policy_hidden_size
        device = head.weight.device
        self.fusion = SequenceToTokenAttention(rm_dim, policy_hidden_size,
                                               config.resolved_attn_dim(rm_dim, policy_hidden_size),
                                               config.num_heads, config.impl).to(device)
        if config.fusion_init == "random":
            self.fusion.o_proj.reset_parameters()
        self.head = head
        self.total_steps: int | None = config.total_steps
        self.optimizer = torch.optim.Adam(self.trainable_parameters(), lr=config.lr)
        # Mode "noise": each sample's noise is drawn from a generator seeded by this seed and the sample's RTE, so a
        # sample sees the same noise at annotation and in the update, on any device (`_matched_noise`).
        self.noise_seed = config.seed if config.seed is not None else torch.Generator().seed() % 2**62
        # kappa of ``fused_scale="base_spread"``: what the trained term is multiplied by (set by each update).
        self.fused_scale_factor = 1.0
        # ``label_replay``: the labelled groups of earlier updates, oldest first.
        self.replayed_groups: deque[LabelledGroup] = deque(maxlen=max(config.label_replay, 1))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> R2MModule:
        """What ``.to``/``.cuda``/``.half``/... run. The wrapped model gets ``fn``; so do fusion, head and the
        optimizer state unless ``fn`` casts float32 tensors (a probe tells), in which case they only follow it to
        its device and stay float32."""
        probe = fn(torch.zeros((), dtype=torch.float32))
        trainable_fn = fn if probe.dtype == torch.float32 else (lambda t: t.to(probe.device))
        super()._apply(fn, recurse=False)
        if recurse:
            for module in self.children():
                module._apply(trainable_fn if module is self.fusion or module is self.head else fn)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if key != "step":  # Adam keeps its step count on the CPU (it is not capturable here)
                    state[key] = value.to(probe.device)
        return self

    def rte(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Reward-token embedding [B, D_rm] of the reward model's input."""
        raise NotImplementedError

    def base_reward(self, rte: Tensor, base_rewards: Tensor | None) -> Tensor:
        """r_base [B] of Eq. 4's split form (differentiable where it is trained)."""
        raise NotImplementedError

    @torch.no_grad()
    def vanilla_reward_from_rte(self, rte: Tensor, base_rewards: Tensor | None = None) -> Tensor:
        """The unmodified reward model's reward [B] (float32)."""
        raise NotImplementedError

    def _weights(self) -> list[nn.Parameter]:
        """Fusion and head weights (what ``update_size`` measures)."""
        return [*self.fusion.parameters(), *self.head.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What `update` trains: the head alone in ``head_only`` mode, fusion and head otherwise."""
        modules = [self.head] if self.config.mode == "head_only" else [self.fusion, self.head]
        return [p for module in modules for p in module.parameters()]

    def omega_at(self, step: int) -> float:
        """w(t) for the current policy step (paper Eq. 4), T = ``total_steps``."""
        if self.total_steps is None:
            raise ValueError("total_steps is unknown: set R2MConfig.total_steps or `rm.total_steps` "
                             "(the trainer integrations set it from max_steps)")
        return omega(step, self.total_steps, self.config.omega_min)

    @torch.no_grad()
    def reward_from_rte(self, rte: Tensor, hidden: Tensor | None, mask: Tensor | None, step: int,
                        cu_seqlens: Tensor | None = None, base_rewards: Tensor | None = None,
                        context: PolicyContext | None = None) -> Tensor:
        """R2M reward [B] (float32) from cached RTEs and the policy's hidden states at policy step ``step``.

        hidden: padded [B, S, D_p] with mask [B, S], or packed [N, D_p] with cu_seqlens [B + 1]; or, instead of
        hidden, a ``context`` that attends over states kept elsewhere (only u and c travel). A sample whose
        inputs or fused reward are not finite gets the vanilla reward instead: the fusion never adds a NaN.
        Packs the states and calls `score`.
        """
        return self.score(rte, self.policy_input(hidden, mask, cu_seqlens, context), step, base_rewards)

    @torch.no_grad()
    def score(self, rte: Tensor, states: PolicyInput, step: int, base_rewards: Tensor | None = None) -> Tensor:
        """R2M reward [B] (float32) of samples with RTEs ``rte`` and policy states ``states`` (`PackedStates`, a
        `PolicyContext`, or None in the modes that fuse none) at policy step ``step`` (Eq. 4); the vanilla reward
        where an input or the fused reward is not finite."""
        vanilla = self.vanilla_reward_from_rte(rte, base_rewards)
        if self.config.mode == "vanilla":
            return vanilla
        rewards, usable = self._rewards(rte, states, step, base_rewards)
        return torch.where(usable & torch.isfinite(rewards), rewards, vanilla)

    def update(self, rte: Tensor, hidden: Tensor | None, mask: Tensor | None, rewards: Tensor, group_size: int,
               step: int, cu_seqlens: Tensor | None = None, base_rewards: Tensor | None = None,
               context: PolicyContext | None = None, labels: Tensor | None = None,
               anchor: AnchorBatch | None = None) -> dict[str, float]:
        """One GREBT update (`update_states`) with the policy states given as in `reward_from_rte`."""
        return self.update_states(rte, self.policy_input(hidden, mask, cu_seqlens, context), rewards, group_size,
                                  step, base_rewards=base_rewards, labels=labels, anchor=anchor)

    def update_states(self, rte: Tensor, states: PolicyInput, rewards: Tensor, group_size: int, step: int, *,
                      base_rewards: Tensor | None = None, labels: Tensor | None = None,
                      anchor: AnchorBatch | None = None) -> dict[str, float]:
        """One GREBT update of fusion and head (paper Sec. 4.2, Algorithm 1) on groups of ``group_size`` consecutive
        samples, with their policy states ``states`` (as in `score`).

        ``rewards`` are the annotation rewards the policy was trained on (they pick each group's winner and
        loser). Under torch.distributed each rank passes its contiguous, equal-sized slice of the global
        group-major batch; only per-sample rewards travel, and every rank ends with identical weights.
        Groups with a non-finite reward, RTE or hidden state are skipped and counted (``groups_skipped``); groups
        whose fused rewards are tied for the GRE term (`r2m.losses.degenerate_groups`) are counted in
        ``groups_degenerate`` (of the last of ``update_steps``). ``update_size`` is ||theta' - theta|| / ||theta||
        over the fusion and head weights (0 when nothing trained).

        ``labels`` (modes ``anchored`` and ``head_only``): a labeller's score per sample [B], NaN where unlabelled.
        A group whose samples all have a label gets labelled pairs (``label_pairs``: its highest- and lowest-labelled
        sample, or every pair whose labels differ), and ``anchor_weight`` x the mean Bradley-Terry loss over those
        groups joins GREBT (``groups_labelled``, ``anchor_bt``), of the fused rewards or, with
        ``label_term="trained"``, of the trained term head(Ĥ) alone; with ``labels_replace_pseudo`` a labelled group
        has no pseudo-label pair.

        ``anchor`` (modes ``anchored`` and ``head_only``): a fixed anchor set of preference pairs (`r2m.AnchorBatch`:
        their RTEs and, in ``anchored``, the current policy's states of them). ``anchor_weight`` x the mean
        Bradley-Terry loss of their R2M rewards (the same w(t) and fusion; head(Ĥ) alone with
        ``label_term="trained"``) joins the loss in each of ``update_steps`` (``anchor_set_bt``), even when no group
        is usable. Under torch.distributed every rank passes the same anchor set; rank 0 alone back-propagates the
        term, so the summed gradient counts it once. ``labels`` and ``anchor`` may be given together.
        """
        start = time.perf_counter()
        device = self.head.weight.device
        rewards = _check_rewards(rewards, rte.shape[0] if isinstance(rte, Tensor) else None)
        check_int("group_size", group_size, minimum=2, hint=" (responses per prompt)")
        anchor_set = self._check_anchor(anchor)
        rank, world = rank_and_world()
        replay = self._check_replay(states, world) if labels is not None else []
        all_rewards = all_gather(rewards.to(device), world)
        if all_rewards.numel() % group_size:
            raise ValueError(f"the batch has {all_rewards.numel()} samples in all, not a whole number of groups of "
                             f"group_size={group_size}")
        w = self.omega_at(step)
        stats = {"omega": w, "loss": 0.0, "bt": 0.0, "gre": 0.0, "update_size": 0.0}
        groups = all_rewards.numel() // group_size
        if not self.config.trains:
            return {**stats, "groups_used": 0.0, "groups_skipped": 0.0, "groups_degenerate": 0.0, "update_ms": 0.0}
        before = [p.detach().clone() for p in self._weights()]
        base, trained, usable = self._reward_parts(rte, states, base_rewards, with_grad=True)
        sample_ok = all_gather((usable & torch.isfinite(rewards.to(device))).float(), world).bool()
        group_ok = sample_ok.view(groups, group_size).all(dim=1)
        if self.config.fused_scale == "base_spread":
            self.fused_scale_factor = _spread_bound(all_gather(base.detach(), world).view(groups, group_size),
                                                    all_gather(trained.detach(), world).view(groups, group_size),
                                                    group_ok)
        stats["fused_scale"] = self.fused_scale_factor
        annotation = torch.where(sample_ok, all_rewards, torch.zeros_like(all_rewards)).view(groups, group_size)
        winner, loser, has_pair = select_pairs(annotation[group_ok])
        label_scores = self._gathered_labels(labels, rewards.shape[0], group_ok, group_size, world)
        labelled = torch.zeros_like(has_pair) if label_scores is None else select_pairs(label_scores)[2]
        if self.config.labels_replace_pseudo:
            has_pair = has_pair & ~labelled
        on_trained = self.config.label_term == "trained"
        stats["anchor_bt"] = stats["anchor_set_bt"] = 0.0
        used, degenerate = int(group_ok.sum()), 0
        for inner in range(self.config.update_steps if used or anchor_set is not None else 0):
            if inner:
                base, trained, _ = self._reward_parts(rte, states, base_rewards, with_grad=True)
            fused = self._mix(base, trained, w)
            gathered = all_gather(fused.detach(), world).requires_grad_(True)
            group_rewards = gathered.view(groups, group_size)[group_ok]
            loss = grebt_loss(group_rewards, winner, loser, self.config.effective_alpha, has_pair)
            # the labelled pairs' term, on the fused reward or (label_term="trained") on head(Ĥ) alone
            gathered_trained = None
            if on_trained and bool(labelled.any()):
                gathered_trained = all_gather(trained.detach(), world).requires_grad_(True)
            if bool(labelled.any()) or replay:
                scored = gathered_trained.view(groups, group_size)[group_ok] if on_trained else group_rewards
                anchor = labelled_bt_loss(scored, label_scores, self.config.label_pairs)[0][labelled]
                if replay:
                    anchor = torch.cat([anchor, self._replay_bt(replay, step)])
                loss = loss + self.config.anchor_weight * anchor.mean()
                stats["anchor_bt"] = float(anchor.detach().mean())
            self.optimizer.zero_grad(set_to_none=False)
            if anchor_set is not None:  # the same set on every rank: only rank 0's copy carries a gradient
                set_bt = self._anchor_set_bt(anchor_set, step, with_grad=rank == 0)
                if set_bt is not None:
                    loss = loss + self.config.anchor_weight * set_bt
                    stats["anchor_set_bt"] = float(set_bt.detach())
            loss.backward()  # into the gathered rewards' .grad (and, for the anchor set, into fusion and head)
            outputs, grads = [fused], [gathered.grad.view(world, -1)[rank]]
            if gathered_trained is not None:
                outputs.append(trained)
                grads.append(gathered_trained.grad.view(world, -1)[rank])
            torch.autograd.backward(outputs, grads)
            self._step(world)
            with torch.no_grad():
                bt = bt_loss(group_rewards.gather(1, winner[:, None]), group_rewards.gather(1, loser[:, None]))
                stats.update(loss=float(loss), gre=float(gre_loss(group_rewards).mean()) if used else 0.0,
                             bt=float(bt[has_pair].mean()) if bool(has_pair.any()) else 0.0)
                degenerate = int(degenerate_groups(group_rewards).sum())
        stats["update_size"] = _relative_change(before, self._weights())
        if self.config.label_replay and label_scores is not None:
            self._keep_labelled(rte, states, base_rewards, label_scores, labelled, group_ok, group_size)
        return {**stats, "groups_used": float(used), "groups_skipped": float(groups - used),
                "groups_degenerate": float(degenerate), "groups_labelled": float(labelled.sum()),
                "groups_replayed": float(len(replay)),
                "update_ms": 1000.0 * (time.perf_counter() - start)}

    def policy_input(self, hidden: Tensor | None, mask: Tensor | None, cu_seqlens: Tensor | None,
                     context: PolicyContext | None) -> PolicyInput:
        """The policy states of `reward_from_rte` / `update`'s arguments as `score` / `update_states` take them:
        packed and checked (once, here), the context itself, or None where the mode fuses none."""
        if not self.config.uses_fusion:
            return None
        if context is not None:
            return context
        if hidden is None:
            return None
        if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
            raise TypeError(f"hidden must be a floating-point tensor, got "
                            f"{hidden.dtype if isinstance(hidden, Tensor) else type(hidden).__name__}")
        if (mask is None) == (cu_seqlens is None):
            raise ValueError("pass exactly one of mask (with padded hidden [B, S, D_p]) or cu_seqlens (with packed "
                             "hidden [N, D_p])")
        return PackedStates.from_padded(hidden, mask) if mask is not None else PackedStates(hidden, cu_seqlens)

    def _check_anchor(self, anchor: AnchorBatch | None) -> AnchorBatch | None:
        if anchor is None:
            return None
        if not isinstance(anchor, AnchorBatch):
            raise TypeError(f"anchor must be an r2m.AnchorBatch (the anchor set's RTEs and policy states), got "
                            f"{type(anchor).__name__}")
        if self.config.mode not in LABELLED_MODES:
            raise ValueError(f"anchor (a fixed anchor set) is used in modes {LABELLED_MODES} (R2MConfig.mode), not "
                             f"{self.config.mode!r}")
        if anchor.chosen_rte.shape[1] != self.rm_dim:
            raise ValueError(f"anchor.chosen_rte and rejected_rte must have shape [pairs, rm_dim={self.rm_dim}], got "
                             f"{tuple(anchor.chosen_rte.shape)}")
        if self.config.uses_fusion and anchor.hidden is None:
            raise ValueError(f"mode {self.config.mode!r} fuses the policy's states: the anchor needs hidden and "
                             f"cu_seqlens (the current policy's states of its 2P sequences, chosen then rejected)")
        return anchor

    def _anchor_set_bt(self, anchor: AnchorBatch, step: int, with_grad: bool) -> Tensor | None:
        """Mean Bradley-Terry loss of the R2M rewards over the anchor set's usable pairs (None if none is)."""
        rewards, usable = self._labelled_rewards(anchor.rte, anchor.states, step, anchor.base_rewards, with_grad)
        pairs = anchor.pairs
        ok = usable & torch.isfinite(rewards.detach())
        ok = ok[:pairs] & ok[pairs:]
        if not bool(ok.any()):
            return None
        return bt_loss(rewards[:pairs][ok], rewards[pairs:][ok]).mean()

    def _check_replay(self, states: PolicyInput, world: int) -> list[LabelledGroup]:
        """The groups ``label_replay`` replays in this update (none when it is 0), after checking that it can."""
        if not self.config.label_replay:
            return []
        if world > 1:
            raise ValueError("R2MConfig.label_replay keeps labelled groups in one process; it is not supported under "
                             "torch.distributed (set label_replay=0)")
        if callable(states):
            raise ValueError("R2MConfig.label_replay keeps the labelled groups' policy states: pass them as tensors "
                             "(hidden), not a context (set label_replay=0)")
        return list(self.replayed_groups)

    def _keep_labelled(self, rte: Tensor, states: PolicyInput, base_rewards: Tensor | None, label_scores: Tensor,
                       labelled: Tensor, group_ok: Tensor, group_size: int) -> None:
        """Add this update's labelled groups to ``replayed_groups`` (as they were scored: detached copies)."""
        groups = torch.nonzero(group_ok).squeeze(1)[labelled].tolist()
        for group, labels in zip(groups, label_scores[labelled], strict=True):
            rows = slice(group * group_size, (group + 1) * group_size)
            kept = None  # from_samples packs with one copy: nothing of this batch's storage is held
            if isinstance(states, PackedStates):
                kept = PackedStates.from_samples([states.sample(i).detach() for i in range(rows.start, rows.stop)])
            base = None if base_rewards is None else base_rewards[rows].clone()
            self.replayed_groups.append(LabelledGroup(rte[rows].detach().clone(), kept, base, labels.clone()))

    def _replay_bt(self, replay: list[LabelledGroup], step: int) -> Tensor:
        """Per replayed group with a labelled pair, its Bradley-Terry loss under the current weights (the reward
        ``label_term`` names)."""
        rte = torch.cat([g.rte for g in replay])
        states = None if replay[0].states is None else PackedStates.concat([g.states for g in replay])
        base = None if replay[0].base_rewards is None else torch.cat([g.base_rewards for g in replay])
        rewards, usable = self._labelled_rewards(rte, states, step, base, with_grad=True)
        labels = torch.stack([g.labels for g in replay])
        rewards = torch.where(usable, rewards, torch.zeros_like(rewards)).view(len(replay), -1)
        losses, valid = labelled_bt_loss(rewards, labels, self.config.label_pairs)
        return losses[valid & usable.view(len(replay), -1).all(dim=1)]

    def _labelled_rewards(self, rte: Tensor, states: PolicyInput, step: int, base_rewards: Tensor | None,
                          with_grad: bool) -> tuple[Tensor, Tensor]:
        """What a labelled pair is scored by (``label_term``): the fused reward, or head(Ĥ) alone; and which samples
        had finite inputs."""
        if self.config.label_term == "trained":
            _, trained, usable = self._reward_parts(rte, states, base_rewards, with_grad)
            return trained, usable
        return self._rewards(rte, states, step, base_rewards, with_grad=with_grad)

    def _gathered_labels(self, labels: Tensor | None, batch: int, group_ok: Tensor, group_size: int,
                         world: int) -> Tensor | None:
        """The labeller's scores of the usable groups [used, K] (gathered from every rank), or None without labels."""
        if labels is None:
            return None
        if self.config.mode not in LABELLED_MODES:
            raise ValueError(f"labels are used in modes {LABELLED_MODES} (R2MConfig.mode), not {self.config.mode!r}")
        labels = torch.as_tensor(labels, dtype=torch.float32)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape [batch={batch}] (a score per sample, NaN where unlabelled), "
                             f"got {tuple(labels.shape)}")
        return all_gather(labels.to(group_ok.device), world).view(-1, group_size)[group_ok]

    def _step(self, world: int) -> None:
        params = self.trainable_parameters()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        if self.config.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()

    def _rewards(self, rte: Tensor, states: PolicyInput, step: int, base_rewards: Tensor | None,
                 with_grad: bool = False) -> tuple[Tensor, Tensor]:
        """Trainable reward [B] and which samples had finite inputs. Non-finite inputs are zeroed first."""
        w = self.omega_at(step)
        base, trained, usable = self._reward_parts(rte, states, base_rewards, with_grad)
        with torch.set_grad_enabled(with_grad):
            return self._mix(base, trained, w), usable

    def _mix(self, base: Tensor, trained: Tensor, w: float) -> Tensor:
        """Eq. 4 in its split form, w r_base + (1 - w) head(Ĥ); with ``fused_scale="base_spread"`` the trained
        term is multiplied by kappa (`fused_scale_factor`)."""
        if self.config.fused_scale == "base_spread":
            trained = self.fused_scale_factor * trained
        return w * base + (1.0 - w) * trained

    def _reward_parts(self, rte: Tensor, states: PolicyInput, base_rewards: Tensor | None,
                      with_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """r_base [B], the trained term head(Ĥ) [B] (head(H) where the mode uses no fusion) and which samples had
        finite inputs. Non-finite inputs are zeroed first."""
        rte = self._check_rte(rte)
        usable = torch.isfinite(rte).all(dim=1)
        rte = torch.where(usable[:, None], rte, torch.zeros_like(rte))
        with torch.set_grad_enabled(with_grad):
            base = self.base_reward(rte, base_rewards)
            if not self.config.uses_fusion:
                feature = rte
            elif isinstance(states, PackedStates):
                states, states_ok = self._clean_states(states, rte)
                feature, usable = self.fusion.forward_states(rte, states), usable & states_ok
            elif callable(states):
                if self.config.mode == "noise":
                    raise ValueError("mode 'noise' draws noise matched to the policy states themselves: pass hidden, "
                                     "not a context")
                attended, context_ok = states(self.fusion.query_vectors(rte))
                feature, usable = self.fusion.project_context(attended), usable & context_ok.to(usable.device)
            else:
                raise ValueError(f"hidden (the policy's hidden states) is required in mode {self.config.mode!r}")
            return base, self.head(feature).squeeze(-1), usable & torch.isfinite(base)

    def _clean_states(self, states: PackedStates, rte: Tensor) -> tuple[PackedStates, Tensor]:
        """The states on this module's device with non-finite rows zeroed (noise in their place in ``noise`` mode),
        and which samples were finite."""
        if len(states) != rte.shape[0] or states.hidden is None:
            raise ValueError(f"the policy states hold {len(states)} samples"
                             f"{'' if states.hidden is not None else ', none of them found'}; rte has {rte.shape[0]}")
        if states.hidden.shape[-1] != self.policy_dim:
            raise ValueError(f"hidden's last dimension must be policy_dim={self.policy_dim} (the policy's hidden "
                             f"size), got shape {tuple(states.hidden.shape)}")
        hidden = states.hidden.to(self.head.weight.device)
        token_ok, sample_ok = finite_samples(hidden, states.cu_seqlens)
        if not bool(token_ok.all()):
            hidden = torch.where(token_ok[:, None], hidden, hidden.new_zeros(()))
        if self.config.mode == "noise":
            hidden = self._matched_noise(hidden, states.cu_seqlens, rte)
        return PackedStates(hidden, states.cu_seqlens, states.tokens), sample_ok

    def _matched_noise(self, hidden: Tensor, cu_seqlens: Tensor, rte: Tensor) -> Tensor:
        """Gaussian noise with each sample's mean and variance over its policy states (R2M w/ Noise); a sample's
        standard-normal draw depends only on ``noise_seed`` and its RTE, so annotation and update agree."""
        keys = rte.detach().float().cpu().numpy()  # one transfer for the whole batch
        lengths = cu_seqlens.diff()
        segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(hidden.device)
        count = (lengths * hidden.shape[-1]).clamp_min(1).float().to(hidden.device)
        mean = torch.zeros_like(count).index_add_(0, segment, hidden.float().sum(-1)) / count
        centred = (hidden.float() - mean[segment, None]).square().sum(-1)
        var = torch.zeros_like(count).index_add_(0, segment, centred) / count
        noise = torch.cat([self._sample_noise(keys[i], (int(n), hidden.shape[-1]), hidden.device)
                           for i, n in enumerate(lengths.tolist())])
        return (mean[segment, None] + var[segment, None].sqrt() * noise).to(hidden.dtype)

    def _sample_noise(self, key: np.ndarray, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Standard-normal noise of ``shape`` from a generator seeded by ``noise_seed`` and a sample's RTE ``key``."""
        digest = hashlib.blake2b(key.tobytes(), digest_size=8,
                                 key=self.noise_seed.to_bytes(8, "little")).digest()
        generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") % 2**63)
        return torch.randn(shape, generator=generator, device=device)

    def _check_rte(self, rte: Tensor) -> Tensor:
        if not isinstance(rte, Tensor) or rte.dim() != 2 or rte.shape[1] != self.rm_dim:
            got = tuple(rte.shape) if isinstance(rte, Tensor) else type(rte).__name__
            raise ValueError(f"rte must have shape [batch, rm_dim={self.rm_dim}] (from `rm.rte`), got {got}")
        if not rte.is_floating_point():
            raise TypeError(f"rte must be a floating-point tensor, got {rte.dtype}")
        return rte.to(device=self.head.weight.device, dtype=self.head.weight.dtype)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the fusion, the head and the optimizer state (safetensors), the config and the run state (JSON);
        see `r2m.checkpoint`."""
        checkpoint.save(self, save_directory)

    @classmethod
    def from_pretrained(cls, reward_model: nn.Module, path: str | os.PathLike | None = None, *args: Any,
                        config: R2MConfig | None = None, save_directory: str | os.PathLike | None = None
                        ) -> R2MModule:
        """Rebuild an R2M reward saved by `save_pretrained` around ``reward_model`` (the same frozen model).

        ``from_pretrained(reward_model, path, *, config=None)``; ``config`` (default: the checkpoint's) may change
        the fields of `r2m.checkpoint.TRAINING_FIELDS`. The earlier forms (path first, config by position,
        ``save_directory=``) still work for this release, with a DeprecationWarning.
        """
        given = [a for a in (reward_model, path) if a is not None] + list(args)
        reward_model, path, config = checkpoint.pretrained_arguments(given, config, save_directory)
        meta = checkpoint.read_config(path)
        model = cls(reward_model, meta["policy_dim"], config if config is not None else
                    checkpoint.config_from(meta, path))
        model.load_state(path)
        return model

    def load_state(self, save_directory: str | os.PathLike) -> None:
        """Restore fusion, head, optimizer and run state in place from `save_pretrained` output, after checking that
        the checkpoint was made for the same kind of reward, dimensions and structural config (`r2m.checkpoint`).

        A change of a training field (lr, alpha, ...) is kept (the optimizer takes this config's ``lr``) and warned
        about.
        """
        checkpoint.load(self, save_directory)


def _spread_bound(base: Tensor, trained: Tensor, group_ok: Tensor) -> float:
    """kappa = min(1, s_base / s_trained): s the mean over the usable groups of each term's population std within a
    group ([groups, K] inputs). 1 when no group is usable or the trained term does not spread (nothing to bound)."""
    if not bool(group_ok.any()):
        return 1.0
    s_base = base[group_ok].double().std(dim=1, correction=0).mean()
    s_trained = trained[group_ok].double().std(dim=1, correction=0).mean()
    if not bool(torch.isfinite(s_base) & torch.isfinite(s_trained)) or float(s_trained) <= 0.0:
        return 1.0
    return float(min(1.0, float(s_base / s_trained)))


def _relative_change(before: list[Tensor], after: list[Tensor]) -> float:
    """||after - before|| / ||before|| over all tensors (0 when ``before`` is all zeros)."""
    with torch.no_grad():
        delta = torch.stack([(a.detach() - b).double().square().sum() for a, b in zip(after, before, strict=True)])
        norm = torch.stack([b.double().square().sum() for b in before]).sum().sqrt()
        return float(delta.sum().sqrt() / norm) if float(norm) > 0 else 0.0


def _check_rewards(rewards: Tensor, batch: int | None) -> Tensor:
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1 or (batch is not None and rewards.shape[0] != batch):
        raise ValueError(f"rewards must have shape [batch={batch}] (one annotation reward per sample), got "
                         f"{tuple(rewards.shape)}")
    return rewards.float()
