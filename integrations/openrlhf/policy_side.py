"""The policy side of R2M in OpenRLHF: capture of the policy's last-layer states and the attention next to them.

States are kept per sample under a fingerprint of the sample's valid token ids, so the experience-making
forward, the training passes (which see the samples re-batched, shuffled and without their rollout index) and
the reward actor (which sees the same tokens) all name a sample the same way. Identical token sequences have
identical states under the same weights, so sharing a key is exact.

Per sample the kept positions are the valid tokens except the last one: the S-1 positions a log-prob forward
scores (the convention of ``r2m.capture``).
"""

from __future__ import annotations

import hashlib
import inspect
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from r2m import fusion
from r2m.buffer import RolloutStore
from r2m.hf_models import find_body
from r2m.packed import PackedStates, finite_samples


def fingerprints(sequences: Tensor, attention_mask: Tensor) -> list[str]:
    """One key per row: a hash of the row's valid token ids (where ``attention_mask`` is set)."""
    if sequences.dim() != 2 or attention_mask.shape != sequences.shape:
        raise ValueError(f"fingerprints needs sequences [B, S] and an attention_mask of the same shape, got "
                         f"{tuple(sequences.shape)} and {tuple(attention_mask.shape)}")
    ids = sequences.detach().to("cpu", torch.int64)
    mask = attention_mask.detach().to("cpu").bool()
    return [hashlib.blake2b(ids[i][mask[i]].numpy().tobytes(), digest_size=16).hexdigest() for i in range(len(ids))]


def rows_from_output(hidden: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """Per-sample states at the valid positions but the last, from a body output that is either padded
    [B, S, D] (aligned with ``attention_mask`` [B, S]) or packed [1, N, D] (OpenRLHF's ``packing_samples``:
    the valid tokens of all rows, row after row)."""
    mask = attention_mask.to(hidden.device).bool()
    if hidden.dim() == 3 and hidden.shape[:2] == mask.shape:
        return [hidden[i][mask[i]][:-1] for i in range(mask.shape[0])]
    lengths = mask.sum(dim=1).tolist()
    if hidden.dim() == 3 and hidden.shape[0] == 1 and hidden.shape[1] == sum(lengths):
        return [row[:-1] for row in torch.split(hidden[0], lengths)]
    raise ValueError(f"cannot align the policy body's output {tuple(hidden.shape)} with the attention mask "
                     f"{tuple(mask.shape)}: expected padded [B, S, D] or packed [1, valid tokens, D] (ring attention "
                     f"shards sequences and is not supported with R2M)")


@dataclass
class _Saved:
    """What one `attend` call keeps for its backward."""

    keys: list[str]
    u: Tensor


class PolicyStateStore:
    """Policy last-layer states per sample, and the sequence-to-token attention computed where they live.

    The states sit in ``rollouts``, an `r2m.buffer.RolloutStore` keyed by `fingerprints`: a forward without
    gradients (experience making) adds a batch, a training forward refreshes the newest batch holding each of its
    samples (a sample not held yet is added, marked refreshed). ``attend(keys, u) -> (c, lse, ok, token)`` and
    ``attend_backward(token, dc) -> du`` are the absorbed "attend(u) -> c" (`r2m.fusion.attend`) and its gradient
    w.r.t. u (the policy states get none). ``offload`` keeps the states in CPU memory; the attention then runs on
    CPU. ``impl``: ``torch`` (any device), ``triton`` (the fused kernel of ``r2m.kernels``), ``auto`` (``triton``
    for CUDA states, ``torch`` otherwise).
    """

    def __init__(self, offload: bool = False, impl: str = "auto"):
        self.offload = offload
        # ``naive`` projects keys and values, which live on the reward side: here it is the absorbed ``torch``.
        self.impl = "torch" if impl == "naive" else impl
        self.rollouts = RolloutStore()
        self._saved: dict[str, _Saved] = {}

    def put(self, keys: Sequence[str], states: Sequence[Tensor], trained: bool = False) -> None:
        """Keep the states [S_i - 1, D_p] of each sample; ``trained``: they come from a training pass (they replace
        the kept ones, or are added marked refreshed)."""
        if len(keys) != len(states):
            raise ValueError(f"put got {len(keys)} keys for {len(states)} state tensors")
        rows = [state.detach() for state in states]
        if not rows:
            return
        # Batches are never released: the driver drops a round's states with `clear` after its update.
        if not trained:
            self.rollouts.add(self._packed(rows), keys, release_at=0)
            return
        held = self.rollouts.keys()
        known = [i for i, key in enumerate(keys) if key in held]
        new = [i for i, key in enumerate(keys) if key not in held]
        if known:
            self.rollouts.refresh([keys[i] for i in known], self._packed([rows[i] for i in known]))
        if new:
            self.rollouts.add(self._packed([rows[i] for i in new]), [keys[i] for i in new], release_at=0,
                              refreshed=True)

    def held(self) -> dict[str, bool]:
        """Key -> whether its states come from a training pass, for every sample whose states are kept."""
        return {key: self.rollouts.is_refreshed(key) for key in self.rollouts.keys()}

    def clear(self) -> None:
        """Drop every kept state and every pending backward."""
        self.rollouts.clear()
        self._saved.clear()

    def states(self, keys: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Packed states [N, D_p] of ``keys`` in that order (repeats allowed) and cu_seqlens [B + 1] int32."""
        try:
            found = self.rollouts.lookup(keys)
        except KeyError:
            missing = [key for key in keys if key not in self.rollouts]
            raise KeyError(f"no policy states for {len(missing)} of {len(keys)} samples (first: {missing[0]}); they "
                           f"are captured by this policy actor's forward on the same tokens") from None
        return found.hidden, found.cu_seqlens.to(torch.int32)

    @torch.no_grad()
    def attend(self, keys: Sequence[str], u: Tensor, keep_for_backward: bool = False
               ) -> tuple[Tensor, Tensor, Tensor, str | None]:
        """c [B, H, D_p] (float32), lse [B, H] (float32; -inf for an empty sample), ok [B] (every state finite;
        non-finite states are zeroed first, as the core does) and, with ``keep_for_backward``, the token that
        `attend_backward` takes."""
        hidden, cu_seqlens, ok = self._clean(keys)
        c, lse = fusion.attend(hidden, u, cu_seqlens=cu_seqlens, impl=self.impl)
        token = None
        if keep_for_backward:
            token = uuid.uuid4().hex
            self._saved[token] = _Saved(list(keys), u.detach())
        return c, lse, ok, token

    def attend_backward(self, token: str, dc: Tensor) -> Tensor:
        """du [B, H, D_p] for dc = dL/dc of the `attend` call that returned ``token``: the gradient of the same
        `r2m.fusion.attend` w.r.t. u."""
        saved = self._saved.pop(token, None)
        if saved is None:
            raise KeyError(f"no pending attention for token {token!r} (already used, or the states were cleared)")
        if dc.shape != saved.u.shape:
            raise ValueError(f"dc must have the shape of c {tuple(saved.u.shape)}, got {tuple(dc.shape)}")
        hidden, cu_seqlens, _ = self._clean(saved.keys)
        u = saved.u.float().requires_grad_(True)
        with torch.enable_grad():
            c, _ = fusion.attend(hidden, u, cu_seqlens=cu_seqlens, impl=self.impl)
        return torch.autograd.grad(c, u, dc.to(device=c.device, dtype=c.dtype))[0]

    def _packed(self, rows: list[Tensor]) -> PackedStates:
        packed = PackedStates.from_samples(rows)  # the store names samples by key, not by token ids
        if self.offload:
            packed.hidden = packed.hidden.to("cpu")
        return packed

    def _clean(self, keys: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        hidden, cu_seqlens = self.states(keys)
        token_ok, ok = finite_samples(hidden, cu_seqlens)
        if not bool(token_ok.all()):
            hidden = torch.where(token_ok[:, None], hidden, hidden.new_zeros(()))
        return hidden, cu_seqlens.to(hidden.device), ok.cpu()


class PolicyFeedbackCapture:
    """Hooks that keep the policy's last-layer states of every forward of an OpenRLHF ``Actor`` in a store.

    A pre-hook on the actor module reads the call's ``sequences`` and ``attention_mask``; a hook on the
    transformer body (whose output is what the LM head reads) takes its output. Every forward writes, so after a
    training round the store holds the states of the last optimisation pass over each sample (the refresh of
    the paper's Algorithm 1), and before it those of the experience-making forward.
    """

    def __init__(self, actor: nn.Module, store: PolicyStateStore, body: nn.Module | None = None):
        self.actor = actor
        self.store = store
        self.body = find_body(getattr(actor, "model", actor)) if body is None else body
        self._signature = inspect.signature(actor.forward)
        self._call: tuple[Tensor, Tensor] | None = None
        self._handles = [actor.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.body.register_forward_hook(self._after),
                         actor.register_forward_hook(self._done)]

    def remove(self) -> None:
        """Detach the hooks (the store keeps what it has)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        sequences, mask = bound.get("sequences"), bound.get("attention_mask")
        if sequences is None or mask is None:
            raise ValueError("R2M capture needs the actor to be called with sequences and an attention_mask")
        self._call = (sequences, mask)

    def _after(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._call is None:
            return
        sequences, mask = self._call
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self.store.put(fingerprints(sequences, mask), rows_from_output(hidden.detach(), mask),
                       trained=torch.is_grad_enabled())

    def _done(self, module: nn.Module, args: tuple, output: object) -> None:
        self._call = None
