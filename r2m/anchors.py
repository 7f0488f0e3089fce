"""A small fixed anchor set of preference pairs for the update of modes ``anchored`` and ``head_only``.

The cheaper alternative to labelling the policy's own samples: P gold-labelled (prompt, chosen, rejected) pairs are
scored once by the frozen reward model (their RTEs), and, in fusion modes, with the current policy's states of those
pairs (refreshed now and then by one no-grad policy forward). `R2MModule.update(anchor=...)` adds
``anchor_weight`` x the mean Bradley-Terry loss of their R2M rewards to GREBT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r2m.packed import PackedStates, check_cu_seqlens


@dataclass
class AnchorBatch:
    """P preference pairs as the R2M update reads them.

    ``chosen_rte``, ``rejected_rte``: [P, D_rm] reward-token embeddings of prompt + chosen and prompt + rejected.
    ``hidden`` [N, D_p] and ``cu_seqlens`` [2P + 1] (fusion modes; None in ``head_only``): the policy's states of the
    2P sequences packed as one batch, the P chosen sequences first and then the P rejected ones (sample i < P is
    pair i's chosen response, sample P + i its rejected one). ``chosen_base``, ``rejected_base`` [P]: r_base of a
    generative judge (`R2MJudgeModel`), None for a reward model. A pair with a non-finite RTE, state or base reward
    is left out of the term.
    """

    chosen_rte: Tensor
    rejected_rte: Tensor
    hidden: Tensor | None = None
    cu_seqlens: Tensor | None = None
    chosen_base: Tensor | None = None
    rejected_base: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("chosen_rte", "rejected_rte"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point():
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"AnchorBatch.{name} must be a floating-point tensor [pairs, rm_dim], got {got}")
        if self.chosen_rte.shape != self.rejected_rte.shape:
            raise ValueError(f"AnchorBatch.chosen_rte and rejected_rte must have the same shape [pairs, rm_dim], got "
                             f"{tuple(self.chosen_rte.shape)} and {tuple(self.rejected_rte.shape)}")
        pairs = self.pairs
        if pairs < 1:
            raise ValueError("AnchorBatch needs at least one pair")
        for name in ("chosen_base", "rejected_base"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Tensor) or value.shape != (pairs,)):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"AnchorBatch.{name} must be None or a tensor [pairs={pairs}], got {got}")
        if (self.chosen_base is None) != (self.rejected_base is None):
            raise ValueError("AnchorBatch: give both chosen_base and rejected_base or neither")
        if (self.hidden is None) != (self.cu_seqlens is None):
            raise ValueError("AnchorBatch: give both hidden and cu_seqlens (the policy's packed states of the 2P "
                             "sequences) or neither")
        if self.hidden is not None:
            if not isinstance(self.hidden, Tensor) or self.hidden.dim() != 2 or not self.hidden.is_floating_point():
                got = (f"{self.hidden.dtype} {tuple(self.hidden.shape)}" if isinstance(self.hidden, Tensor)
                       else type(self.hidden).__name__)
                raise ValueError(f"AnchorBatch.hidden must be a floating-point packed tensor [total_tokens, "
                                 f"policy_dim], got {got}")
            # chosen sequences first, then rejected: 2P samples
            cu = check_cu_seqlens(self.cu_seqlens, 2 * pairs, self.hidden.shape[0], "AnchorBatch.cu_seqlens")
            self._states = PackedStates(self.hidden, cu)

    @property
    def states(self) -> PackedStates | None:
        """The policy's states of the 2P sequences (chosen then rejected), packed; None without them."""
        return self._states if self.hidden is not None else None

    @property
    def pairs(self) -> int:
        """P, the number of pairs."""
        return self.chosen_rte.shape[0]

    @property
    def rte(self) -> Tensor:
        """[2P, D_rm]: chosen then rejected, the layout of ``hidden``."""
        return torch.cat([self.chosen_rte, self.rejected_rte])

    @property
    def base_rewards(self) -> Tensor | None:
        """[2P] (chosen then rejected), or None."""
        return None if self.chosen_base is None else torch.cat([self.chosen_base, self.rejected_base]).float()


__all__ = ["AnchorBatch"]
