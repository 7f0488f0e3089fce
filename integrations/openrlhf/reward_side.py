"""The reward side of R2M in OpenRLHF: scoring and the GREBT update with the policy states kept elsewhere.

Routing ``full`` fetches the policy states (S * D_p numbers per sample) and runs the core unchanged. Routing
``compact`` is the paper's Section 6.1 done exactly with SPEC section 3: the reward side computes u = f(H) and
sends it to where the states live, receives c (and lse) back, and finishes Ĥ = g(c); the update sends dc = dL/dc
and receives du = dL/du, which it backpropagates into q_proj/k_proj (dc itself reaches v_proj/o_proj and the
head). Traffic is 2 * H * D_p numbers per sample for scoring and twice that per update step, whatever the
sequence length.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from r2m.base import R2MModule
from r2m.integrations.openrlhf.policy_side import PolicyStateStore
from r2m.losses import bt_loss, gre_loss, grebt_loss, select_pairs

ROUTINGS = ("full", "compact")


class PolicyEndpoint(Protocol):
    """Where the states of some samples live: ``submit`` starts a `PolicyStateStore` call, ``result`` waits."""

    def submit(self, method: str, *args: Any) -> Any: ...

    def result(self, pending: Any) -> Any: ...


class LocalEndpoint:
    """A `PolicyStateStore` in this process."""

    def __init__(self, store: PolicyStateStore):
        self.store = store

    def submit(self, method: str, *args: Any) -> Any:
        return getattr(self.store, method)(*args)

    def result(self, pending: Any) -> Any:
        return pending


@dataclass
class Traffic:
    """Bytes of tensors and keys sent to and received from the policy side."""

    sent: int = 0
    received: int = 0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}bytes_sent": float(self.sent), f"{prefix}bytes_received": float(self.received)}


def payload_bytes(obj: Any) -> int:
    """Bytes a message carries: tensor data, key strings, numbers (containers add nothing)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, str):
        return len(obj.encode())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(item) for item in obj)
    if isinstance(obj, (bool, int, float)):
        return 8
    return 0


class PolicyFeedback:
    """The reward side's view of the policy states of one batch of samples, which may live on several endpoints.

    ``parts``: (endpoint, positions in the batch) pairs covering every position once. Results come back in batch
    order on ``device``.
    """

    def __init__(self, keys: Sequence[str], parts: Sequence[tuple[PolicyEndpoint, Sequence[int]]],
                 device: torch.device | str = "cpu", traffic: Traffic | None = None):
        covered = sorted(p for _, positions in parts for p in positions)
        if covered != list(range(len(keys))):
            raise ValueError(f"the parts must cover the {len(keys)} samples exactly once, got positions {covered}")
        self.keys = list(keys)
        self.parts = [(endpoint, list(positions)) for endpoint, positions in parts]
        self.device = torch.device(device)
        self.traffic = Traffic() if traffic is None else traffic
        self.ok: Tensor | None = None
        self._tokens: list[str | None] = []

    def hidden(self) -> tuple[Tensor, Tensor]:
        """All states packed in batch order [N, D_p] (as the policy keeps them) and cu_seqlens [B + 1] int32."""
        results = self._call("states", lambda keys, positions: (keys,))
        rows: list[Tensor | None] = [None] * len(self.keys)
        for (_, positions), (hidden, cu_seqlens) in zip(self.parts, results, strict=True):
            for i, position in enumerate(positions):
                rows[position] = hidden[int(cu_seqlens[i]):int(cu_seqlens[i + 1])]
        lengths = torch.tensor([row.shape[0] for row in rows], dtype=torch.int32)
        cu_seqlens = torch.zeros(len(rows) + 1, dtype=torch.int32)
        torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
        return torch.cat(rows).to(self.device), cu_seqlens.to(self.device)

    def attend(self, u: Tensor, keep_for_backward: bool = False) -> tuple[Tensor, Tensor]:
        """c [B, H, D_p] and lse [B, H] for query vectors u [B, H, D_p]; sets ``ok`` [B] (finite states)."""
        u = u.detach().float().cpu()
        results = self._call("attend", lambda keys, positions: (keys, u[positions], keep_for_backward))
        c = torch.zeros(u.shape, dtype=torch.float32, device=self.device)
        lse = torch.zeros(u.shape[:2], dtype=torch.float32, device=self.device)
        ok = torch.zeros(u.shape[0], dtype=torch.bool, device=self.device)
        self._tokens = []
        for (_, positions), (part_c, part_lse, part_ok, token) in zip(self.parts, results, strict=True):
            c[positions] = part_c.to(self.device)
            lse[positions] = part_lse.to(self.device)
            ok[positions] = part_ok.to(self.device)
            self._tokens.append(token)
        self.ok = ok
        return c, lse

    def attend_backward(self, dc: Tensor) -> Tensor:
        """du [B, H, D_p] for dc = dL/dc of the last `attend` kept for backward."""
        if not self._tokens or None in self._tokens:
            raise RuntimeError("attend_backward needs a preceding attend(..., keep_for_backward=True)")
        dc = dc.detach().float().cpu()
        tokens = iter(self._tokens)
        results = self._call("attend_backward", lambda keys, positions: (next(tokens), dc[positions]))
        du = torch.zeros(dc.shape, dtype=torch.float32, device=self.device)
        for (_, positions), part_du in zip(self.parts, results, strict=True):
            du[positions] = part_du.to(self.device)
        self._tokens = []
        return du

    def _call(self, method: str, arguments) -> list[Any]:
        pending = []
        for endpoint, positions in self.parts:
            args = arguments([self.keys[p] for p in positions], positions)
            self.traffic.sent += payload_bytes(args)
            pending.append((endpoint, endpoint.submit(method, *args)))
        results = [endpoint.result(handle) for endpoint, handle in pending]
        self.traffic.received += payload_bytes(results)
        return results


class _RemoteAttend(torch.autograd.Function):
    """c = attend(u) computed where the policy states live; the backward ships dc there and du back."""

    @staticmethod
    def forward(ctx, u: Tensor, feedback: PolicyFeedback) -> Tensor:
        ctx.feedback = feedback
        return feedback.attend(u, keep_for_backward=True)[0]

    @staticmethod
    def backward(ctx, dc: Tensor) -> tuple[Tensor, None]:
        return ctx.feedback.attend_backward(dc), None


class R2MRewardSide:
    """Scores and updates an R2M reward whose policy states are reached through a `PolicyFeedback`.

    ``full`` routing runs the core (`R2MModule.reward_from_rte` / `update`) on fetched states; ``compact``
    runs the same computation split at "attend(u) -> c". Both give the same rewards and the same update.
    """

    def __init__(self, rm: R2MModule, routing: str = "full"):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if routing == "compact" and rm.config.mode == "noise":
            raise ValueError("mode 'noise' draws noise matched to the policy states themselves: use routing 'full'")
        self.rm = rm
        self.routing = routing

    @property
    def needs_policy(self) -> bool:
        """Whether scoring reads the policy states (not in ``vanilla`` and ``head_only`` modes)."""
        return self.rm.config.uses_fusion

    @torch.no_grad()
    def rewards(self, rte: Tensor, feedback: PolicyFeedback | None, step: int) -> Tensor:
        """R2M rewards [B] (float32) at policy step ``step``; the vanilla reward where an input is not finite."""
        if not self.needs_policy:
            return self.rm.reward_from_rte(rte, None, None, step)
        feedback = _require(feedback)
        if self.routing == "full":
            hidden, cu_seqlens = feedback.hidden()
            return self.rm.reward_from_rte(rte, hidden, None, step, cu_seqlens=cu_seqlens)
        vanilla = self.rm.vanilla_reward_from_rte(rte)
        fused, usable = self._fused(rte, feedback, step, with_grad=False)
        return torch.where(usable & torch.isfinite(fused), fused, vanilla)

    def update(self, rte: Tensor, feedback: PolicyFeedback | None, rewards: Tensor, group_size: int,
               step: int) -> dict[str, float]:
        """One GREBT update on groups of ``group_size`` consecutive samples (as `R2MModule.update`)."""
        if not self.needs_policy:
            return self.rm.update(rte, None, None, rewards, group_size, step)
        feedback = _require(feedback)
        if self.routing == "full":
            hidden, cu_seqlens = feedback.hidden()
            return self.rm.update(rte, hidden, None, rewards, group_size, step, cu_seqlens=cu_seqlens)
        return self._compact_update(rte, feedback, rewards, group_size, step)

    def _compact_update(self, rte: Tensor, feedback: PolicyFeedback, rewards: Tensor, group_size: int,
                        step: int) -> dict[str, float]:
        start = time.perf_counter()
        rm = self.rm
        device = rm.head.weight.device
        rewards = torch.as_tensor(rewards)
        if rewards.dim() != 1 or rewards.shape[0] != rte.shape[0]:
            raise ValueError(f"rewards must have shape [batch={rte.shape[0]}] (one annotation reward per sample), "
                             f"got {tuple(rewards.shape)}")
        rewards = rewards.float()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"group_size must be an int >= 2 (responses per prompt), got {group_size!r}")
        rank, world = _rank_and_world()
        all_rewards = _all_gather(rewards.to(device), world)
        if all_rewards.numel() % group_size:
            raise ValueError(f"the batch has {all_rewards.numel()} samples in all, not a whole number of groups of "
                             f"group_size={group_size}")
        w = rm.omega_at(step)
        stats = {"omega": w, "loss": 0.0, "bt": 0.0, "gre": 0.0}
        groups = all_rewards.numel() // group_size
        if not rm.config.trains:
            return {**stats, "groups_used": 0.0, "groups_skipped": 0.0, "update_ms": 0.0}
        fused, usable = self._fused(rte, feedback, step, with_grad=True)
        sample_ok = _all_gather((usable & torch.isfinite(rewards.to(device))).float(), world).bool()
        group_ok = sample_ok.view(groups, group_size).all(dim=1)
        annotation = torch.where(sample_ok, all_rewards, torch.zeros_like(all_rewards)).view(groups, group_size)
        winner, loser, has_pair = select_pairs(annotation[group_ok])
        used = int(group_ok.sum())
        for inner in range(rm.config.update_steps if used else 0):
            if inner:
                fused, _ = self._fused(rte, feedback, step, with_grad=True)
            gathered = _all_gather(fused.detach(), world).requires_grad_(True)
            group_rewards = gathered.view(groups, group_size)[group_ok]
            loss = grebt_loss(group_rewards, winner, loser, rm.config.effective_alpha, has_pair)
            loss.backward()
            rm.optimizer.zero_grad(set_to_none=False)
            fused.backward(gathered.grad.view(world, -1)[rank])
            _step(rm, world)
            with torch.no_grad():
                bt = bt_loss(group_rewards.gather(1, winner[:, None]), group_rewards.gather(1, loser[:, None]))
                stats.update(loss=float(loss), gre=float(gre_loss(group_rewards).mean()),
                             bt=float(bt[has_pair].mean()) if bool(has_pair.any()) else 0.0)
        return {**stats, "groups_used": float(used), "groups_skipped": float(groups - used),
                "update_ms": 1000.0 * (time.perf_counter() - start)}

    def _fused(self, rte: Tensor, feedback: PolicyFeedback, step: int, with_grad: bool) -> tuple[Tensor, Tensor]:
        """Trainable reward [B] and which samples had finite inputs (non-finite RTEs are zeroed first)."""
        rm = self.rm
        if not isinstance(rte, Tensor) or rte.dim() != 2 or rte.shape[1] != rm.rm_dim:
            got = tuple(rte.shape) if isinstance(rte, Tensor) else type(rte).__name__
            raise ValueError(f"rte must have shape [batch, rm_dim={rm.rm_dim}], got {got}")
        if len(feedback.keys) != rte.shape[0]:
            raise ValueError(f"the policy feedback describes {len(feedback.keys)} samples but rte has {rte.shape[0]}")
        rte = rte.to(device=rm.head.weight.device, dtype=rm.head.weight.dtype)
        usable = torch.isfinite(rte).all(dim=1)
        rte = torch.where(usable[:, None], rte, torch.zeros_like(rte))
        w = rm.omega_at(step)
        with torch.set_grad_enabled(with_grad):
            base = rm.base_reward(rte, None)
            u = rm.fusion.query_vectors(rte)
            context = _RemoteAttend.apply(u, feedback) if with_grad else feedback.attend(u)[0]
            feature = rm.fusion.project_context(context)
            fused = w * base + (1.0 - w) * rm.head(feature).squeeze(-1)
        return fused, usable & feedback.ok.to(usable.device) & torch.isfinite(base)


def _require(feedback: PolicyFeedback | None) -> PolicyFeedback:
    if feedback is None:
        raise ValueError("this R2M mode reads the policy's hidden states: pass the batch's PolicyFeedback")
    return feedback


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor: Tensor, world: int) -> Tensor:
    """Every rank's equal-sized 1-D slice, concatenated in rank order (identity on one process)."""
    if world == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.numel()], device=tensor.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must update on the same number of samples, got {[int(s) for s in sizes]}")
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _step(rm: R2MModule, world: int) -> None:
    params: list[nn.Parameter] = rm.trainable_parameters()
    if world > 1:
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    if rm.config.max_grad_norm is not None:
        nn.utils.clip_grad_norm_(params, rm.config.max_grad_norm)
    rm.optimizer.step()
