"""The policy's last-layer states from the forwards verl's FSDP engine already runs, kept per sample by token ids.

verl's ``FSDPEngineWithLMHead.forward_step`` calls ``self.module(input_ids=..., attention_mask=..., position_ids=...)``
in one of two layouts: packed (``use_remove_padding``, verl's default) ``input_ids`` [1, nnz] with no attention mask,
a sample starting wherever ``position_ids`` is 0; or padded ``input_ids`` [B, S] with an ``attention_mask`` [B, S]
(right padding). A forward hook on the transformer body (whose output is what the LM head reads) sees both. Per sample
the kept positions are its tokens but the last (the S-1 positions a log-prob pass scores, as in ``r2m.capture``), and
its key is the tuple of its token ids (prompt + response): verl re-batches and shuffles samples between the log-prob
pass and the update's mini-batches, and the ids name a sample the same way in every pass.

A no-grad pass (``compute_log_prob``) adds a batch to the `RolloutStore`; a pass with gradients (``update_actor``)
refreshes the samples it holds, so after the update each sample's states come from the last optimisation pass over it
(the refresh of the paper's Algorithm 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from r2m.buffer import RolloutStore
from r2m.hf_models import find_body
from r2m.packed import PackedStates

TokenKey = tuple[int, ...]


def split_forward(hidden: Tensor, input_ids: Tensor, attention_mask: Tensor | None,
                  position_ids: Tensor | None) -> tuple[list[Tensor], list[TokenKey]]:
    """Per-sample states (valid positions but the last) and token ids of one body call in verl's packed or padded
    layout."""
    if attention_mask is None:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or position_ids is None:
            raise ValueError(f"a packed forward needs input_ids [1, nnz] and position_ids, got input_ids "
                             f"{tuple(input_ids.shape)}")
        positions = position_ids.reshape(-1, input_ids.shape[1])[0].cpu()  # mrope: its first (temporal) row
        starts = (positions == 0).nonzero().squeeze(1).tolist()
        bounds = [*starts, input_ids.shape[1]]
        ids = input_ids[0].cpu().tolist()
        spans = list(itertools.pairwise(bounds))
        return [hidden[0, a:b - 1] for a, b in spans], [tuple(ids[a:b]) for a, b in spans]
    mask = attention_mask.bool()
    ids = input_ids.cpu()
    host_mask = mask.cpu()
    rows = [hidden[i][mask[i]][:-1] for i in range(mask.shape[0])]
    return rows, [tuple(ids[i][host_mask[i]].tolist()) for i in range(mask.shape[0])]


class VerlStateCapture:
    """Forward hook on a verl actor's transformer body that fills a `RolloutStore` keyed by token ids.

    ``active`` says whether no-grad passes are kept (the worker turns it on for the policy's log-prob pass only, not
    for a reference pass through the same module); passes with gradients always refresh. ``offload`` keeps the states
    in CPU memory.
    """

    def __init__(self, module: nn.Module, store: RolloutStore, offload: bool = False):
        self.body = find_body(module)
        self.store = store
        self.offload = offload
        self.active = False
        self.refreshed = 0
        self._handle = self.body.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        training = torch.is_grad_enabled() and module.training
        if not (training or self.active):
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        rows, keys = split_forward(hidden.detach(), input_ids, kwargs.get("attention_mask"),
                                   kwargs.get("position_ids"))
        states = self._pack(rows, keys)
        if training:
            self.refreshed += self.store.refresh(keys, states)
        else:
            self.store.add(states, keys, release_at=0)

    def _pack(self, rows: Sequence[Tensor], keys: Sequence[TokenKey]) -> PackedStates:
        states = PackedStates.from_samples(list(rows), list(keys))
        if self.offload and states.hidden is not None:
            states.hidden = states.hidden.to("cpu")
        return states
