"""RolloutStore: the policy states R2M holds between scoring a batch and updating on it, for any trainer.

A batch of rollouts is added when it is scored, with the policy states taken then (annotation time). Samples are keyed
by the token ids the trainer runs for them (prompt ids + completion ids), never by masks, so every later pass over the
same tokens names them the same way: `refresh` replaces a sample's states by those of the policy's latest pass over it
(the refresh of the paper's Algorithm 1), and `release` hands a batch to the update once the trainer's progress counter
says the policy's last pass over it has run. `agree` makes a per-process decision collective, so a fallback policy
forward (a collective under FSDP / ZeRO-3) runs on every rank or on none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from r2m.distributed import agree
from r2m.packed import PackedStates


@dataclass
class Rollout:
    """One added batch: its packed states, which row holds which key, and what the integration keeps with it."""

    states: PackedStates
    keys: dict[Hashable, list[int]]
    release_at: int
    payload: Any = None
    refreshed: set[int] = field(default_factory=set)

    @property
    def refreshed_share(self) -> float:
        """Share of the batch's samples whose states came from a later pass than annotation."""
        return len(self.refreshed) / max(len(self.states), 1)


class RolloutStore:
    """Pending batches of policy states, keyed by token ids, refreshed by later passes, released in order."""

    def __init__(self) -> None:
        self.pending: list[Rollout] = []

    def add(self, states: PackedStates, keys: Sequence[Hashable | None], release_at: int,
            payload: Any = None, refreshed: bool = False) -> Rollout:
        """Keep a scored batch: ``keys[i]`` names sample i (None: it is never refreshed). Released once the
        progress passed to `release` reaches ``release_at``; ``refreshed``: its states already come from a later
        pass than annotation."""
        if len(keys) != len(states):
            raise ValueError(f"add got {len(keys)} keys for a batch of {len(states)} samples")
        rows: dict[Hashable, list[int]] = defaultdict(list)
        for row, key in enumerate(keys):
            if key is not None:
                rows[key].append(row)
        rollout = Rollout(states, dict(rows), release_at, payload)
        if refreshed:
            rollout.refreshed.update(row for indices in rows.values() for row in indices)
        self.pending.append(rollout)
        return rollout

    def refresh(self, keys: Sequence[Hashable | None], states: PackedStates) -> int:
        """Replace, in the newest pending batch holding each key, that sample's states by ``states``'s row of the
        same key (every row holding it when a batch has the key twice). Unknown keys are ignored; returns how many
        rows were replaced."""
        if len(keys) != len(states):
            raise ValueError(f"refresh got {len(keys)} keys for {len(states)} captured samples")
        copies: dict[int, tuple[list[int], list[int]]] = {}
        for source, key in enumerate(keys):
            if key is None:
                continue
            for index in range(len(self.pending) - 1, -1, -1):
                rows = self.pending[index].keys.get(key)
                if rows:
                    targets, sources = copies.setdefault(index, ([], []))
                    targets += rows
                    sources += [source] * len(rows)
                    break
        for index, (targets, sources) in copies.items():
            rollout = self.pending[index]
            rollout.states.copy_samples_(targets, states, sources)
            rollout.refreshed.update(targets)
        return sum(len(targets) for targets, _ in copies.values())

    def lookup(self, keys: Sequence[Hashable]) -> PackedStates:
        """The states of ``keys`` (newest batch first, repeats allowed), packed in that order; KeyError names the
        first key no pending batch holds."""
        found: list[Tensor] = []
        tokens: list[tuple] = []
        for key in keys:
            rollout = self._newest(key)
            if rollout is None:
                raise KeyError(key)
            row = rollout.keys[key][0]
            found.append(rollout.states.sample(row))
            tokens.append(rollout.states.tokens[row] or ())
        return PackedStates.from_samples(found, tokens) if found else PackedStates.none_found(0)

    def __contains__(self, key: Hashable) -> bool:
        return self._newest(key) is not None

    def keys(self) -> set[Hashable]:
        """Every key a pending batch holds."""
        return {key for rollout in self.pending for key in rollout.keys}

    def is_refreshed(self, key: Hashable) -> bool:
        """Whether the newest batch holding ``key`` has its states from a later pass than annotation."""
        rollout = self._newest(key)
        return rollout is not None and rollout.keys[key][0] in rollout.refreshed

    def _newest(self, key: Hashable) -> Rollout | None:
        return next((r for r in reversed(self.pending) if key in r.keys), None)

    def release(self, progress: int) -> list[Rollout]:
        """Remove and return, oldest first, the batches whose ``release_at`` <= ``progress``."""
        released = []
        while self.pending and self.pending[0].release_at <= progress:
            released.append(self.pending.pop(0))
        return released

    def clear(self) -> None:
        self.pending = []

    @property
    def stored_bytes(self) -> int:
        """Bytes of policy states held now."""
        return sum(r.states.hidden.nbytes for r in self.pending if r.states.hidden is not None)

__all__ = ["Rollout", "RolloutStore", "agree"]
