"""An over-optimisation signal from the states R2M already holds: how alike a group's responses look to the policy.

The paper (Section 3) observes that as a policy over-optimises a reward model, its responses to one prompt collapse
onto similar last-layer representations. `group_state_similarity` measures exactly that on the captured states:
each response's states are mean-pooled over the positions that generate it, and a group's similarity is the mean
cosine similarity over its pairs of responses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from r2m.checks import check_int
from r2m.packed import row_positions


def pooled_response_states(hidden: Tensor, cu_seqlens: Tensor, response_lengths: Sequence[int]) -> Tensor:
    """Mean of each sample's last ``response_lengths[i]`` states (the positions whose outputs are its response
    tokens), float32 [B, D]. ``hidden`` [N, D] packed with ``cu_seqlens`` [B + 1]; a sample with no such position
    gives zeros."""
    if len(response_lengths) != cu_seqlens.numel() - 1:
        raise ValueError(f"response_lengths has {len(response_lengths)} entries for {cu_seqlens.numel() - 1} samples")
    ends, firsts = cu_seqlens[1:].long().cpu(), cu_seqlens[:-1].long().cpu()
    starts = torch.maximum(ends - torch.as_tensor(list(response_lengths), dtype=torch.long), firsts)
    counts = (ends - starts).clamp_min(0)
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    positions = row_positions(starts, counts)
    device = hidden.device
    sums = torch.zeros(counts.numel(), hidden.shape[-1], device=device).index_add_(
        0, rows.to(device), hidden.index_select(0, positions.to(device)).float())
    return sums / counts.clamp_min(1).to(device)[:, None]


def group_state_similarity(pooled: Tensor, group_size: int) -> Tensor:
    """Mean pairwise cosine similarity of the pooled states [G * K, D] within each group of ``group_size``
    consecutive samples -> [G]. Zero vectors count as similarity 0."""
    check_int("group_size", group_size, minimum=2)
    if pooled.dim() != 2 or pooled.shape[0] % group_size:
        raise ValueError(f"pooled must have shape [groups * group_size={group_size}, D], got {tuple(pooled.shape)}")
    unit = F.normalize(pooled.float(), dim=-1).view(-1, group_size, pooled.shape[-1])
    gram = unit @ unit.transpose(1, 2)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    return off_diagonal / (group_size * (group_size - 1))
