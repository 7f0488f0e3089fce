"""The R2M update over GRPO groups that verl scatters across data-parallel ranks, with the states left where they are.

The core's `update` takes, on each rank, a contiguous equal slice of one group-major batch. verl's ``_balance_batch``
places samples by sequence length, so a ``uid`` group's responses sit on several ranks. Here every rank learns the
small per-sample facts (group id, annotation reward, RTE) of all samples, orders them group-major the same way, and
passes the core its slice of that order. The fusion reads the policy states through a context (the absorbed
"attend(u) -> c" of `r2m.fusion`): the query vectors u of all samples are gathered, each rank attends over the states
it holds, and the attended c (and, backwards, du) go back to the rank whose slice holds the sample. States never
move: 2 H D_p numbers per sample travel each way (the paper's Section 6.1 cut).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from r2m import fusion
from r2m.base import R2MModule
from r2m.distributed import rank_and_world
from r2m.packed import PackedStates, finite_samples


def group_major(group_ids: Sequence[str], group_size: int) -> list[int] | None:
    """Indices of the samples ordered group by group (groups sorted by id, members in the given order), keeping only
    groups of exactly ``group_size`` samples; None when no group is whole."""
    counts = Counter(group_ids)
    whole = sorted(g for g, n in counts.items() if n == group_size)
    if not whole:
        return None
    position = {g: i for i, g in enumerate(whole)}
    return sorted((i for i, g in enumerate(group_ids) if g in position), key=lambda i: (position[group_ids[i]], i))


def grouped_update(rm: R2MModule, rte: Tensor, states: PackedStates, rewards: Tensor, group_ids: Sequence[str],
                   group_size: int, step: int) -> dict[str, float]:
    """One R2M update (`R2MModule.update`) on this rank's samples, grouped by ``group_ids`` across all ranks.

    ``rte`` [B, D_rm], ``states`` (packed, B samples), ``rewards`` [B] (annotation rewards) and ``group_ids`` [B] are
    this rank's; every rank of the default process group calls it at the same point. Groups that do not hold exactly
    ``group_size`` samples in all (verl's padding samples) are left out; so is the whole update, on every rank, when
    the samples left cannot be split equally between the ranks.
    """
    rank, world = rank_and_world()
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if world == 1:
        order = group_major(list(group_ids), group_size)
        if order is None:
            return {"groups_used": 0.0, "update_skipped": 1.0}
        picked = PackedStates.from_samples([states.sample(i) for i in order], [states.tokens[i] for i in order])
        return rm.update(rte[order], picked.hidden, None, rewards[order], group_size, step,
                         cu_seqlens=picked.cu_seqlens)
    if rm.config.mode == "noise":
        raise ValueError("R2MConfig.mode='noise' draws noise from the policy states themselves: with verl's "
                         "data-parallel ranks holding a group's states apart it is not supported (use one rank)")
    facts: list[tuple[list[str], Tensor, Tensor] | None] = [None] * world
    dist.all_gather_object(facts, (list(group_ids), rewards.cpu(), rte.detach().float().cpu()))
    owners = [(r, i) for r, (ids, _, _) in enumerate(facts) for i in range(len(ids))]
    all_ids = [g for ids, _, _ in facts for g in ids]
    order = group_major(all_ids, group_size)
    if order is None or len(order) % world:
        return {"groups_used": 0.0, "update_skipped": 1.0}
    all_rewards = torch.cat([r for _, r, _ in facts])[order]
    all_rte = torch.cat([e for _, _, e in facts])[order]
    share = len(order) // world
    mine = slice(rank * share, (rank + 1) * share)
    held = [position for position, index in enumerate(order) if owners[index][0] == rank]
    local_rows = [owners[order[position]][1] for position in held]
    local = PackedStates.from_samples([states.sample(i) for i in local_rows], [states.tokens[i] for i in local_rows])
    context = _ScatteredContext(local, held, len(order), mine, rm.fusion.resolve_impl(local.hidden))
    device = rm.head.weight.device
    return rm.update(all_rte[mine].to(device), None, None, all_rewards[mine].to(device), group_size, step,
                     context=context)


class _ScatteredContext:
    """The core's PolicyContext for a slice of the group-major batch whose states are spread over the ranks."""

    def __init__(self, local: PackedStates, held: list[int], total: int, mine: slice, impl: str):
        self.local, self.held, self.total, self.mine = local, torch.tensor(held, dtype=torch.long), total, mine
        self.impl = "torch" if impl == "naive" else impl
        finite = torch.ones(len(held), dtype=torch.bool) if local.hidden is None else \
            finite_samples(local.hidden, local.cu_seqlens)[1].cpu()
        self.ok = _scatter_sum(finite.float(), self.held, total)[mine] > 0.5

    def __call__(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return _Attend.apply(u, self), self.ok.to(u.device)

    def attend(self, u_held: Tensor) -> Tensor:
        hidden = self.local.hidden
        if hidden is None:
            return u_held.new_zeros(u_held.shape, dtype=torch.float32)
        hidden = torch.nan_to_num(hidden.to(u_held.device), nan=0.0, posinf=0.0, neginf=0.0)
        c, _ = fusion.attend(hidden, u_held, cu_seqlens=self.local.cu_seqlens.to(u_held.device, torch.int32),
                             impl=self.impl)
        return c


class _Attend(torch.autograd.Function):
    """c of this rank's slice from u of this rank's slice; collective in forward and backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, u: Tensor, context: _ScatteredContext) -> Tensor:
        u_all = _gather_slices(u.detach())
        held = context.held.to(u.device)
        ctx.context, ctx.u_held = context, u_all[held].float()
        c_all = _scatter_sum(context.attend(ctx.u_held), held, context.total)
        return c_all[context.mine].to(u.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dc: Tensor) -> tuple[Tensor, None]:
        context = ctx.context
        held = context.held.to(dc.device)
        dc_held = _gather_slices(dc.contiguous())[held].float()
        u_held = ctx.u_held.requires_grad_(True)
        with torch.enable_grad():
            c = context.attend(u_held)
        du_held = torch.autograd.grad(c, u_held, dc_held)[0] if c.requires_grad else torch.zeros_like(u_held)
        return _scatter_sum(du_held, held, context.total)[context.mine].to(dc.dtype), None


def _gather_slices(tensor: Tensor) -> Tensor:
    """Every rank's equal slice, concatenated in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def _scatter_sum(values: Tensor, positions: Tensor, total: int) -> Tensor:
    """[total, ...] holding each rank's ``values`` at its ``positions`` (each position is held by one rank)."""
    out = values.new_zeros((total, *values.shape[1:]))
    out[positions.to(values.device)] = values
    dist.all_reduce(out)
    return out
