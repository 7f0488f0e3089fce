"""Policy hidden-state capture: the tensor the LM head reads, taken from forwards the trainer already runs.

A forward hook on the policy's transformer body (whose output is the final norm's output: what the LM head
reads) sees three kinds of call:

- generation (``generate`` with a KV cache): the prefill and every decode step; stitched per sample into the
  hidden states of prompt + completion;
- full no-grad forwards (a trainer's log-prob pass, or `HiddenStateCapture.forward`): kept as they are;
- full forwards with gradients (the training pass): handed to ``on_train_forward`` at once (the refresh).

Per sample the captured positions are its tokens except the last one: the S-1 positions a log-prob forward
scores, which are also exactly the positions ``generate`` runs (the final sampled token is never fed back).
A sample's tokens are the ids the trainer runs for it, from its first attended token to its last token that is
attended or not padding: a trainer that masks a completion out of attention (TRL's
``mask_truncated_completions``) still runs its tokens, so the sample keeps its identity (its key is its token
ids, never its mask). Padding before the prompt and after the completion is excluded. A PEFT policy's reference
pass (adapters disabled or another adapter active) runs through the same modules and is ignored.

What is handed out is packed (`r2m.packed.PackedStates`): one gather of the valid positions per captured pass, with the
positions chosen on the host from the masks, so no per-sample tensor work and no device sync beyond reading
the masks and token ids.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from r2m.distributed import zero3_partitioned
from r2m.hf_models import find_body, unwrap
from r2m.packed import PackedStates, offsets

# The KV cache argument of a transformers model body: ``past_key_values`` before transformers 5.24, ``cache`` since.
CACHE_ARGUMENTS = ("past_key_values", "cache")


@dataclass
class _Forward:
    input_ids: Tensor | None
    attention_mask: Tensor | None  # None for a decode step
    hidden: Tensor


def _timed(method: Callable) -> Callable:
    """Add the host time of a `HiddenStateCapture` method to its ``seconds`` (outermost call only)."""
    @functools.wraps(method)
    def timed(self: HiddenStateCapture, *args: object, **kwargs: object) -> object:
        if self._timing:
            return method(self, *args, **kwargs)
        self._timing, start = True, time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self._timing = False

    return timed


class HiddenStateCapture:
    """Forward hook on a causal LM's body that keeps the policy's last-layer hidden states.

    ``offload`` moves what is handed out to CPU. ``keep_generation`` / ``keep_forwards`` choose what is stored
    between `pop_*` calls (the refresh listener ``on_train_forward`` is called either way). ``pad_token_id`` (the
    policy tokenizer's) tells padding from masked-out tokens; without it a sample's tokens are the attended ones,
    and `forward` pads with it. ``seconds`` adds up
    the host time spent in the hook (the refresh listener included), in `pop_*` and in `forward`; device work
    it queued but did not wait for is not in it.
    """

    def __init__(self, model: nn.Module, module: nn.Module | None = None, offload: bool = False,
                 keep_generation: bool = True, keep_forwards: bool = True,
                 on_train_forward: Callable[[PackedStates], None] | None = None, pad_token_id: int | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.module = find_body(model) if module is None else module
        self.offload = offload
        self.keep_generation, self.keep_forwards = keep_generation, keep_forwards
        self.on_train_forward = on_train_forward
        self._params = [name for name in inspect.signature(self.module.forward).parameters
                        if name not in ("args", "kwargs")]
        self._tuner = next((m for m in self.module.modules() if _is_adapter_layer(m)), None)
        self._adapters = self._active_adapters()
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._generation: list[_Forward] = []
        self._forwards: list[_Forward] = []
        self.seconds = 0.0
        self._timing = False

    def attach(self) -> HiddenStateCapture:
        """Start capturing (records the policy's active adapters: later passes with others are ignored)."""
        if self._handle is None:
            self._adapters = self._active_adapters()
            self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def remove(self) -> None:
        """Stop capturing and drop what is kept."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.clear()

    def clear(self) -> None:
        self._generation, self._forwards = [], []

    def __enter__(self) -> HiddenStateCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @_timed
    def pop_generation(self, completions: Sequence[Sequence[int]]) -> PackedStates:
        """States of the last ``generate`` call, stitched for each sample as valid prompt + ``completions[i]``.

        A sample whose fed-back tokens differ from its completion (or a batch of another size) is not found.
        """
        trace, self._generation = self._generation, []
        count = len(completions)
        if not trace or trace[0].hidden.shape[0] != count or trace[0].input_ids is None:
            return PackedStates.none_found(count)
        prefill, steps = trace[0], trace[1:]
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
        width = min(len(steps), max(int(lengths.max()) - 1, 0))
        fed_ok = (lengths >= 1) & (lengths - 1 <= len(steps))
        decoded = torch.arange(width)[None, :] < (lengths - 1)[:, None]
        if width:
            if any(step.input_ids is None for step in steps[:width]):
                return PackedStates.none_found(count)
            fed = torch.cat([step.input_ids for step in steps[:width]], dim=1).cpu()
            wanted = torch.tensor([list(c[:width]) + [-1] * (width - len(c[:width])) for c in completions],
                                  dtype=fed.dtype)
            fed_ok &= ((fed == wanted) | ~decoded).all(dim=1)
        prompt_mask = prefill.attention_mask.bool().cpu() & fed_ok[:, None]
        keep = torch.cat([prompt_mask, decoded & fed_ok[:, None]], dim=1)
        hidden = prefill.hidden
        if width:
            hidden = torch.cat([hidden, *(step.hidden for step in steps[:width])], dim=1)
        packed, kept = _gather(hidden, keep)
        prompts = _row_tokens(prefill.input_ids.cpu(), prompt_mask)
        tokens = [p + tuple(c) if ok else None
                  for p, c, ok in zip(prompts, completions, fed_ok.tolist(), strict=True)]
        return PackedStates(self._keep(packed), offsets(kept), tokens)

    @_timed
    def pop_forwards(self, completions: Sequence[Sequence[int]]) -> PackedStates:
        """States of the most recent full no-grad forwards that together hold exactly ``len(completions)`` rows
        (a trainer's log-prob pass runs in chunks). Row i must end with ``completions[i]``, or it is not found."""
        records, self._forwards = self._forwards, []
        count = len(completions)
        chosen, rows = [], 0
        for record in reversed(records):
            if rows >= count:
                break
            chosen.insert(0, record)
            rows += record.hidden.shape[0]
        if rows != count:
            return PackedStates.none_found(count)
        parts, start = [], 0
        for record in chosen:
            ids = None if record.input_ids is None else record.input_ids.cpu()
            span = self._span(ids, record.attention_mask)
            size = span.shape[0]
            row_tokens = [None] * size if ids is None else _row_tokens(ids, span)
            ok = [t is not None and len(c) > 0 and t[-len(c):] == tuple(c)
                  for t, c in zip(row_tokens, completions[start:start + size], strict=True)]
            packed, kept = _gather(record.hidden, _valid_but_last(span) & torch.tensor(ok)[:, None])
            parts.append(PackedStates(packed, offsets(kept),
                                        [t if found else None for t, found in zip(row_tokens, ok, strict=True)]))
            start += size
        states = PackedStates.concat(parts)
        if states.hidden is not None:
            states.hidden = self._keep(states.hidden)
        return states

    @_timed
    @torch.no_grad()
    def forward(self, sequences: Sequence[Sequence[int]], batch_size: int | None = None, calls: int | None = None,
                model: nn.Module | None = None) -> PackedStates:
        """No-grad forwards of the policy on full token sequences (right padded, ``batch_size`` rows at a time),
        captured by the same hook; returns their states.

        ``calls``: run exactly this many forwards (at least as many as the chunks need), the surplus on a one-token
        sequence whose states are dropped: a sharded model's forward is a collective, so every rank must run the
        same number. ``model``: what to call (default: the model given at construction), e.g. the trainer's
        prepared model when it wraps the one the hook sits in. Under DeepSpeed ZeRO-3 only the transformer body runs
        (its parameters are gathered by ZeRO's hooks on each module): a no-grad call of the LM head module would
        re-partition the head weight that TRL's fused LM-head loss reads directly in the next training pass.
        """
        if any(len(s) == 0 for s in sequences) or not (sequences or calls):
            raise ValueError("forward needs at least one sequence (or calls) and no empty sequence")
        batch_size = batch_size or max(len(sequences), 1)
        chunks = [[list(s) for s in sequences[i:i + batch_size]] for i in range(0, len(sequences), batch_size)]
        if calls is not None and calls < len(chunks):
            raise ValueError(f"forward: calls={calls} is fewer than the {len(chunks)} chunks the sequences need")
        model = self.model if model is None else model
        device = next(self.module.parameters()).device
        if zero3_partitioned(self.module):
            model = self.module
        accepts_logits_to_keep = "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
        pad = 0 if self.pad_token_id is None else self.pad_token_id
        keep, self.keep_forwards = self.keep_forwards, True
        previous, self._forwards = self._forwards, []
        attached = self._handle is not None
        parts = []
        try:
            self.attach()
            for index in range(len(chunks) if calls is None else calls):
                chunk = chunks[index] if index < len(chunks) else [[pad]]
                width = max(len(s) for s in chunk)
                input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk]).to(device)
                attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk]).to(device)
                kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep else {}
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
                states = self.pop_forwards(chunk)
                if index < len(chunks):
                    parts.append(states)
            return PackedStates.concat(parts) if parts else PackedStates.none_found(0)
        finally:
            self.keep_forwards, self._forwards = keep, previous
            if not attached:
                self.remove()

    @_timed
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if self._is_reference_pass():
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        hidden = hidden.detach() if hidden.requires_grad else hidden
        named = dict(zip(self._params, args, strict=False)) | kwargs
        input_ids, mask = named.get("input_ids"), named.get("attention_mask")
        cache = next((named[name] for name in CACHE_ARGUMENTS if named.get(name) is not None), None)
        mask = mask if mask is not None and mask.dim() == 2 else None
        if cache is not None and named.get("use_cache", True) is not False:
            if not self.keep_generation:
                return
            seen = mask.shape[1] if mask is not None else (
                cache.get_seq_length() if hasattr(cache, "get_seq_length") else hidden.shape[1])
            if seen == hidden.shape[1]:
                self._generation, self._forwards = [_Forward(input_ids, _full_mask(mask, hidden), hidden)], []
            elif self._generation:
                self._generation.append(_Forward(input_ids, None, hidden))
        elif torch.is_grad_enabled() and module.training:
            if self.on_train_forward is not None and input_ids is not None:
                input_ids = input_ids.cpu()
                span = self._span(input_ids, _full_mask(mask, hidden))
                packed, kept = _gather(hidden, _valid_but_last(span))
                self.on_train_forward(PackedStates(self._keep(packed), offsets(kept),
                                                     _row_tokens(input_ids, span)))
        elif self.keep_forwards:
            self._forwards.append(_Forward(input_ids, _full_mask(mask, hidden), hidden))

    def _span(self, input_ids: Tensor | None, mask: Tensor) -> Tensor:
        """[B, S] bool (CPU; ``input_ids`` on CPU): each row's tokens as the trainer runs them, from its first
        attended position to its last position that is attended or not padding."""
        mask = mask.bool().cpu()
        if input_ids is None or self.pad_token_id is None:
            return mask
        positions = torch.arange(mask.shape[1])
        first = torch.where(mask.any(dim=1), mask.int().argmax(dim=1), mask.shape[1])
        last = (positions * (mask | (input_ids != self.pad_token_id))).argmax(dim=1)
        return (positions[None, :] >= first[:, None]) & (positions[None, :] <= last[:, None])

    def _is_reference_pass(self) -> bool:
        return self._tuner is not None and (bool(self._tuner.disable_adapters)
                                            or self._active_adapters() != self._adapters)

    def _active_adapters(self) -> list[str] | None:
        return None if self._tuner is None else list(self._tuner.active_adapters)

    def _keep(self, hidden: Tensor) -> Tensor:
        return hidden.to("cpu") if self.offload else hidden


def _is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (duck-typed: PEFT stays optional): adapter state exposed as properties."""
    return all(isinstance(getattr(type(module), name, None), property)
               for name in ("disable_adapters", "active_adapters"))


def _full_mask(mask: Tensor | None, hidden: Tensor) -> Tensor:
    return mask if mask is not None else torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)


def _valid_but_last(mask: Tensor) -> Tensor:
    """[B, S] bool: each row's valid positions except its last valid one (the S-1 scored positions)."""
    positions = torch.arange(mask.shape[1])
    last = (positions * mask).argmax(dim=1)
    return mask & (positions[None, :] != last[:, None])


def _gather(hidden: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """hidden [B, S, D] at the positions ``keep`` [B, S] (bool, CPU), row by row in order: packed [N, D] (a new
    tensor, so the pass's activations are not pinned) and the count per row [B]."""
    flat = keep.reshape(-1).nonzero().squeeze(1)
    packed = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device))
    return packed, keep.sum(dim=1)


def _row_tokens(input_ids: Tensor, mask: Tensor) -> list[tuple[int, ...]]:
    """Each row's token ids where ``mask`` (CPU tensors)."""
    flat = input_ids[mask].tolist()
    bounds = offsets(mask.sum(dim=1)).tolist()
    return [tuple(flat[a:b]) for a, b in itertools.pairwise(bounds)]
