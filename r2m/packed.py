"""The packed layout of policy states, the one way R2M holds them: sample i's states (its S_i - 1 scored positions,
in order) are ``hidden[cu_seqlens[i]:cu_seqlens[i + 1]]``.

`PackedStates` is the type; `offsets` the one builder of ``cu_seqlens`` and `check_cu_seqlens` its one checker
(run where a layout is built, so nothing downstream, the Triton launcher included, re-checks it with a host sync);
`row_positions` the flat positions of row ranges; `finite_samples` which samples hold only finite states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def offsets(lengths: Tensor) -> Tensor:
    """cu_seqlens [B + 1] (int64, on the device of ``lengths``) of per-sample lengths [B]."""
    lengths = lengths.long()
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def check_cu_seqlens(cu_seqlens: object, batch: int | None, total: int, name: str = "cu_seqlens") -> Tensor:
    """``cu_seqlens`` as int64 on the CPU (one copy if it lives on a device), after checking that it is an integer
    tensor [batch + 1] that starts at 0, never decreases and ends at ``total`` (the packed rows)."""
    size = "batch + 1" if batch is None else f"batch + 1 = {batch + 1}"
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or \
            cu_seqlens.numel() < 1 or (batch is not None and cu_seqlens.numel() != batch + 1):
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else \
            type(cu_seqlens).__name__
        raise ValueError(f"{name} must be an integer tensor of shape [{size}], got {got}")
    cu = cu_seqlens.detach().to("cpu", torch.long)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must start at 0, never decrease and end at total_tokens={total}, got {cu.tolist()}")
    return cu


def row_positions(starts: Tensor, counts: Tensor) -> Tensor:
    """The flat positions starts[i], ..., starts[i] + counts[i] - 1 of each row i, row after row (int64 CPU
    tensors)."""
    return torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts) + torch.arange(int(counts.sum()))


def finite_samples(hidden: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """Which rows of ``hidden`` [N, D] are finite [N] and which samples hold only finite rows [B] (on hidden's device;
    no host sync)."""
    token_ok = torch.isfinite(hidden).all(dim=-1)
    bad = torch.cat([token_ok.new_zeros(1, dtype=torch.long), (~token_ok).long().cumsum(0)])
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
    return token_ok, (bad[cu[1:]] - bad[cu[:-1]]) == 0


@dataclass
class PackedStates:
    """Policy states of a batch, packed: ``hidden`` [N, D] (float, on any device; None only when no sample has
    states) and ``cu_seqlens`` [B + 1] (int64 on the CPU, checked when built).

    ``tokens[i]`` names sample i by the token ids the trainer ran for it (`r2m.capture`); None where sample i could
    not be taken from what was captured (its slot is then empty). States built from tensors get ``()`` per sample.
    """

    hidden: Tensor | None
    cu_seqlens: Tensor
    tokens: list[tuple[int, ...] | None] | None = None

    def __post_init__(self) -> None:
        if self.hidden is not None and (not isinstance(self.hidden, Tensor) or self.hidden.dim() != 2
                                        or not self.hidden.is_floating_point()):
            got = (f"{self.hidden.dtype} {tuple(self.hidden.shape)}" if isinstance(self.hidden, Tensor)
                   else type(self.hidden).__name__)
            raise ValueError(f"packed hidden must be a floating-point tensor [total_tokens, policy_dim], got {got}")
        total = 0 if self.hidden is None else self.hidden.shape[0]
        self.cu_seqlens = check_cu_seqlens(self.cu_seqlens, None, total)
        if self.tokens is None:
            self.tokens = [()] * (self.cu_seqlens.numel() - 1)
        elif len(self.tokens) != self.cu_seqlens.numel() - 1:
            raise ValueError(f"tokens has {len(self.tokens)} entries for {self.cu_seqlens.numel() - 1} samples")

    @classmethod
    def none_found(cls, count: int) -> PackedStates:
        """``count`` samples, none of them found."""
        return cls(None, torch.zeros(count + 1, dtype=torch.long), [None] * count)

    @classmethod
    def from_samples(cls, hidden: Sequence[Tensor | None], tokens: Sequence[tuple[int, ...] | None] | None = None
                     ) -> PackedStates:
        """Per-sample [S_i - 1, D] tensors (None where missing) packed with one copy."""
        tokens = [() if h is not None else None for h in hidden] if tokens is None else list(tokens)
        present = [h for h in hidden if h is not None]
        if not present:
            return cls.none_found(len(hidden))
        lengths = torch.tensor([0 if h is None else h.shape[0] for h in hidden], dtype=torch.long)
        return cls(torch.cat(present), offsets(lengths), tokens)

    @classmethod
    def from_padded(cls, hidden: Tensor, mask: Tensor) -> PackedStates:
        """Padded states [B, S, D] at the positions where ``mask`` [B, S] (bool or 0/1 integers) is set."""
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden must have shape [batch, seq, policy_dim] with a mask, got {got}")
        if not isinstance(mask, Tensor) or mask.shape != hidden.shape[:2]:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (batch, seq of hidden), got {got}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be bool or integer (1 = valid token), got {mask.dtype}")
        mask = mask.to(device=hidden.device, dtype=torch.bool)
        return cls(hidden[mask], offsets(mask.sum(dim=1)))

    @classmethod
    def concat(cls, parts: Sequence[PackedStates]) -> PackedStates:
        """The samples of ``parts`` one after the other."""
        tokens = [t for part in parts for t in part.tokens]
        present = [part.hidden for part in parts if part.hidden is not None]
        if not present:
            return cls.none_found(len(tokens))
        lengths = torch.cat([part.cu_seqlens.diff() for part in parts])
        return cls(present[0] if len(present) == 1 else torch.cat(present), offsets(lengths), tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_seqlen(self) -> int:
        """The longest sample's length (read on the host: no device sync)."""
        return int(self.cu_seqlens.diff().max()) if len(self) else 0

    @property
    def missing(self) -> list[int]:
        """Indices of the samples that were not found."""
        return [i for i, tokens in enumerate(self.tokens) if tokens is None]

    def sample(self, i: int) -> Tensor | None:
        """Sample i's states [S_i - 1, D] (a view), None when it was not found."""
        if self.tokens[i] is None:
            return None
        return self.hidden[int(self.cu_seqlens[i]):int(self.cu_seqlens[i + 1])]

    def replace(self, indices: Sequence[int], other: PackedStates) -> PackedStates:
        """These states with samples ``indices`` taken from ``other``, which holds exactly those samples in order."""
        source = {index: j for j, index in enumerate(indices)}
        hidden = [other.sample(source[i]) if i in source else self.sample(i) for i in range(len(self))]
        tokens = [other.tokens[source[i]] if i in source else self.tokens[i] for i in range(len(self))]
        return PackedStates.from_samples(hidden, tokens)

    def copy_samples_(self, rows: Sequence[int], source: PackedStates, source_rows: Sequence[int]) -> None:
        """Overwrite, in place, the states of samples ``rows`` by those of ``source``'s ``source_rows`` (one gather
        and one scatter). The storage is promoted to a wider dtype that ``source`` brings."""
        if not rows:
            return
        rows_t, src_t = torch.as_tensor(list(rows)), torch.as_tensor(list(source_rows))
        src_start = source.cu_seqlens[src_t]
        lengths = source.cu_seqlens[src_t + 1] - src_start
        dst_start = self.cu_seqlens[rows_t]
        if not torch.equal(self.cu_seqlens[rows_t + 1] - dst_start, lengths):
            raise ValueError("copy_samples_: the source samples do not have the lengths of the samples they replace")
        if list(source_rows) == list(range(len(source))):  # every source sample once, in order: no gather
            values = source.hidden
        else:
            values = source.hidden.index_select(0, row_positions(src_start, lengths).to(source.hidden.device))
        dtype = torch.promote_types(self.hidden.dtype, values.dtype)
        if dtype != self.hidden.dtype:
            self.hidden = self.hidden.to(dtype)
        destination = row_positions(dst_start, lengths).to(self.hidden.device)
        self.hidden.index_copy_(0, destination, values.to(device=self.hidden.device, dtype=dtype))

    def finite(self) -> Tensor:
        """Which samples hold only finite states [B] (bool, on hidden's device)."""
        if self.hidden is None:
            return torch.ones(len(self), dtype=torch.bool)
        return finite_samples(self.hidden, self.cu_seqlens)[1]

    def nonfinite_samples(self) -> int:
        """How many samples hold a non-finite state (one reduction when all are finite)."""
        if self.hidden is None or bool(torch.isfinite(self.hidden.sum())):
            return 0
        return int((~self.finite()).sum())


__all__ = ["PackedStates", "check_cu_seqlens", "finite_samples", "offsets", "row_positions"]
