"""Preference labels on the policy's own samples, for R2M's ``anchored`` mode (and its ``head_only`` control)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from r2m.checks import check_int

Labeller = Callable[..., list[float | None]]


class OnPolicyLabels:
    """Scores a labelling budget of each generation batch's groups with a user-given labeller.

    ``labeller`` has a TRL reward function's signature, ``labeller(prompts=..., completions=..., completion_ids=...,
    **dataset_columns) -> list[float | None]``: a gold function, a stronger judge from ``r2m.adapters``, or a lookup
    of human labels. Only the samples of the first ``groups`` groups of the global batch are sent to it (all groups
    when None); within a group the update pairs its highest- and lowest-scored response.
    """

    def __init__(self, labeller: Labeller, groups: int | None = None):
        if not callable(labeller):
            raise TypeError(f"labeller must be callable like a TRL reward function, got {type(labeller).__name__}")
        check_int("label_groups", groups, optional=True, hint=" (None: every group)")
        self.labeller, self.groups = labeller, groups
        self.seconds = 0.0

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], group_size: int,
                 process_index: int, columns: dict[str, Any]) -> Tensor:
        """Scores [B] (float32, NaN where unlabelled) of this process's samples, the ``process_index``-th contiguous
        slice of the global group-major batch."""
        start = time.perf_counter()
        batch = len(prompts)
        offset = process_index * batch
        chosen = [i for i in range(batch) if self.groups is None or (offset + i) // group_size < self.groups]
        scores = torch.full((batch,), math.nan)
        if chosen:
            given = self.labeller(prompts=[prompts[i] for i in chosen], completions=[completions[i] for i in chosen],
                                  completion_ids=[completion_ids[i] for i in chosen],
                                  **{k: _subset(v, chosen, batch) for k, v in columns.items()})
            if len(given) != len(chosen):
                raise ValueError(f"the labeller returned {len(given)} scores for {len(chosen)} samples")
            scores[chosen] = torch.tensor([math.nan if s is None else float(s) for s in given])
        self.seconds += time.perf_counter() - start
        return scores


def _subset(value: Any, rows: list[int], batch: int) -> Any:
    """A per-sample column's ``rows``; anything else as it is."""
    return [value[i] for i in rows] if isinstance(value, (list, tuple)) and len(value) == batch else value
