"""The reward side of R2M in OpenRLHF: scoring and the GREBT update with the policy states kept elsewhere.

Routing ``full`` fetches the policy states (S * D_p numbers per sample) and runs the core unchanged. Routing ``compact``
is the paper's Section 6.1 done exactly with the absorbed algebra of `r2m.fusion`: the reward side computes u = f(H) and
sends it to where the states live, receives c (and lse) back, and finishes Ĥ = g(c); the update sends dc = dL/dc and
receives du = dL/du, which it backpropagates into q_proj/k_proj (dc itself reaches v_proj/o_proj and the head). Traffic
is 2 * H * D_p numbers per sample for scoring and twice that per update step, whatever the sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from r2m.base import PolicyContext, R2MModule
from r2m.integrations.openrlhf.policy_side import PolicyStateStore
from r2m.packed import PackedStates

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

    def states(self) -> PackedStates:
        """All states packed in batch order (in the dtype the policy keeps them), on ``device``."""
        results = self._call("states", lambda keys, positions: (keys,))
        rows: list[Tensor | None] = [None] * len(self.keys)
        for (_, positions), (hidden, cu_seqlens) in zip(self.parts, results, strict=True):
            part = PackedStates(hidden, cu_seqlens)
            for i, position in enumerate(positions):
                rows[position] = part.sample(i)
        states = PackedStates.from_samples(rows)
        states.hidden = states.hidden.to(self.device)
        return states

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
        return self.rm.score(rte, self._states(rte, feedback), step)

    def update(self, rte: Tensor, feedback: PolicyFeedback | None, rewards: Tensor, group_size: int,
               step: int) -> dict[str, float]:
        """One GREBT update on groups of ``group_size`` consecutive samples (as `R2MModule.update`)."""
        return self.rm.update_states(rte, self._states(rte, feedback), rewards, group_size, step)

    def _states(self, rte: Tensor, feedback: PolicyFeedback | None) -> PackedStates | PolicyContext | None:
        """What the core reads of the policy: nothing, the fetched states (``full``) or a remote attend
        (``compact``)."""
        if not self.needs_policy:
            return None
        feedback = _require(feedback)
        return feedback.states() if self.routing == "full" else self._context(rte, feedback)

    def _context(self, rte: Tensor, feedback: PolicyFeedback) -> PolicyContext:
        """"attend(u) -> c" on the policy actors: u travels there, c (and, in a backward, dc/du) travels back."""
        if len(feedback.keys) != rte.shape[0]:
            raise ValueError(f"the policy feedback describes {len(feedback.keys)} samples but rte has {rte.shape[0]}")

        def attend(u: Tensor) -> tuple[Tensor, Tensor]:
            context = _RemoteAttend.apply(u, feedback) if torch.is_grad_enabled() else feedback.attend(u)[0]
            return context, feedback.ok

        return attend


def _require(feedback: PolicyFeedback | None) -> PolicyFeedback:
    if feedback is None:
        raise ValueError("this R2M mode reads the policy's hidden states: pass the batch's PolicyFeedback")
    return feedback
