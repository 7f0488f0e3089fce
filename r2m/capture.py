"""Policy hidden-state capture: the tensor the LM head reads, taken from forwards the trainer already runs.

A forward hook on the policy's transformer body (whose output is the final norm's output: what the LM head
reads) sees three kinds of call:

- generation (``generate`` with a KV cache): the prefill and every decode step; stitched per sample into the
  hidden states of prompt + completion;
- full no-grad forwards (a trainer's log-prob pass, or `HiddenStateCapture.forward`): kept as they are;
- full forwards with gradients (the training pass): handed to ``on_train_forward`` at once (the refresh).

Per sample the captured positions are the valid tokens except the last one: the S-1 positions a log-prob
forward scores, which are also exactly the positions ``generate`` runs (the final sampled token is never fed
back). Padding and tokens after the completion are excluded. A PEFT policy's reference pass (adapters disabled
or another adapter active) runs through the same modules and is ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class CapturedStates:
    """Per-sample policy states: ``hidden[i]`` is [S_i - 1, D_p] for the valid tokens ``tokens[i]`` (length S_i),
    or None where sample i could not be taken from what was captured."""

    hidden: list[Tensor | None]
    tokens: list[tuple[int, ...] | None]


@dataclass
class _Forward:
    input_ids: Tensor | None
    attention_mask: Tensor
    hidden: Tensor


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP-style ``.module`` and PEFT wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def find_backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (unwrapping DDP-style ``.module`` and PEFT wrappers)."""
    model = _unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and body is not model:
        return body
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    raise ValueError(f"cannot find the transformer body of {type(model).__name__}: pass a Hugging Face causal LM "
                     f"(with `base_model_prefix` or `get_decoder()`) or the body itself as `module`")


def pack(states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-sample [S_i, D] tensors -> packed [sum S_i, D] and cu_seqlens [B + 1] (int32)."""
    if not states:
        raise ValueError("pack needs at least one sample")
    lengths = torch.tensor([s.shape[0] for s in states], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(states) + 1, dtype=torch.int32)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    return torch.cat(list(states)), cu_seqlens.to(states[0].device)


class HiddenStateCapture:
    """Forward hook on a causal LM's body that keeps the policy's last-layer hidden states.

    ``offload`` moves what is kept to CPU. ``keep_generation`` / ``keep_forwards`` choose what is stored between
    `pop_*` calls (the refresh listener ``on_train_forward`` is called either way).
    """

    def __init__(self, model: nn.Module, module: nn.Module | None = None, offload: bool = False,
                 keep_generation: bool = True, keep_forwards: bool = True,
                 on_train_forward: Callable[[CapturedStates], None] | None = None):
        self.model = model
        self.module = find_backbone(model) if module is None else module
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

    def pop_generation(self, completions: Sequence[Sequence[int]]) -> CapturedStates:
        """States of the last ``generate`` call, stitched for each sample as valid prompt + ``completions[i]``.

        A sample whose fed-back tokens differ from its completion (or a batch of another size) gets None.
        """
        trace, self._generation = self._generation, []
        count = len(completions)
        result = CapturedStates([None] * count, [None] * count)
        if not trace or trace[0].hidden.shape[0] != count or trace[0].input_ids is None:
            return result
        prefill, steps = trace[0], trace[1:]
        if any(step.input_ids is None for step in steps):
            return result
        fed = torch.cat([step.input_ids for step in steps], dim=1).cpu() if steps else None
        decoded = torch.cat([step.hidden for step in steps], dim=1) if steps else None
        prompt_mask = prefill.attention_mask.bool().cpu()
        prompt_ids = prefill.input_ids.cpu()
        for i, completion in enumerate(completions):
            completion = list(completion)
            if not completion:
                continue
            length = len(completion) - 1
            if length > (0 if fed is None else fed.shape[1]):
                continue
            if length and fed[i, :length].tolist() != completion[:length]:
                continue
            prompt = prompt_mask[i]
            parts = [_select(prefill.hidden[i], prompt)] + ([decoded[i, :length]] if length else [])
            result.hidden[i] = self._keep(torch.cat(parts))
            result.tokens[i] = tuple(prompt_ids[i, prompt].tolist() + completion)
        return result

    def pop_forwards(self, completions: Sequence[Sequence[int]]) -> CapturedStates:
        """States of the most recent full no-grad forwards that together hold exactly ``len(completions)`` rows
        (a trainer's log-prob pass runs in chunks). Row i must end with ``completions[i]``, or it gets None."""
        records, self._forwards = self._forwards, []
        count = len(completions)
        result = CapturedStates([None] * count, [None] * count)
        chosen, rows = [], 0
        for record in reversed(records):
            if rows >= count:
                break
            chosen.insert(0, record)
            rows += record.hidden.shape[0]
        if rows != count:
            return result
        i = 0
        for record in chosen:
            states = _valid_states(record)
            for hidden, tokens in zip(*states, strict=True):
                completion = tuple(completions[i])
                if tokens is not None and completion and tokens[-len(completion):] == completion:
                    result.hidden[i], result.tokens[i] = self._keep(hidden), tokens
                i += 1
        return result

    @torch.no_grad()
    def forward(self, sequences: Sequence[Sequence[int]], batch_size: int | None = None) -> CapturedStates:
        """No-grad forwards of the policy on full token sequences (right padded, ``batch_size`` rows at a time),
        captured by the same hook; returns their states."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("forward needs at least one sequence and no empty sequence")
        batch_size = batch_size or len(sequences)
        device = next(self.module.parameters()).device
        accepts_logits_to_keep = "logits_to_keep" in inspect.signature(_unwrap(self.model).forward).parameters
        keep, self.keep_forwards = self.keep_forwards, True
        previous, self._forwards = self._forwards, []
        attached = self._handle is not None
        result = CapturedStates([], [])
        try:
            self.attach()
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start:start + batch_size]
                width = max(len(s) for s in chunk)
                input_ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
                attention_mask = torch.zeros_like(input_ids)
                for i, seq in enumerate(chunk):
                    input_ids[i, : len(seq)] = torch.as_tensor(list(seq), device=device)
                    attention_mask[i, : len(seq)] = 1
                kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep else {}
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
                states = self.pop_forwards(chunk)
                result.hidden += states.hidden
                result.tokens += states.tokens
            return result
        finally:
            self.keep_forwards, self._forwards = keep, previous
            if not attached:
                self.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if self._is_reference_pass():
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        named = dict(zip(self._params, args, strict=False)) | kwargs
        input_ids, mask, cache = named.get("input_ids"), named.get("attention_mask"), named.get("past_key_values")
        hidden = hidden.detach()
        if mask is not None and mask.dim() == 2:
            seen = mask.shape[1]
        else:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else hidden.shape[1]
        record = _Forward(None if input_ids is None else input_ids.detach(), mask.detach(), hidden)
        if cache is not None and named.get("use_cache", True) is not False:
            if not self.keep_generation:
                return
            if seen == hidden.shape[1]:
                self._generation, self._forwards = [record], []
            elif self._generation:
                self._generation.append(record)
        elif torch.is_grad_enabled() and module.training:
            if self.on_train_forward is not None:
                hiddens, tokens = _valid_states(record)
                self.on_train_forward(CapturedStates([self._keep(h) for h in hiddens], tokens))
        elif self.keep_forwards:
            self._forwards.append(record)

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


def _valid_states(record: _Forward) -> tuple[list[Tensor], list[tuple[int, ...] | None]]:
    """Per row: hidden states at the valid positions but the last, and the valid token ids."""
    mask = record.attention_mask.bool().cpu()
    ids = None if record.input_ids is None else record.input_ids.cpu()
    hiddens, tokens = [], []
    for i in range(record.hidden.shape[0]):
        valid = mask[i]
        hiddens.append(_select(record.hidden[i], valid)[:-1].clone())
        tokens.append(None if ids is None else tuple(ids[i, valid].tolist()))
    return hiddens, tokens


def _select(rows: Tensor, valid: Tensor) -> Tensor:
    """``rows[valid]`` for a CPU bool mask; a slice when the valid positions are contiguous (padding only at the
    ends, as trainers lay out prompt + completion), so a device tensor needs no host sync."""
    positions = valid.nonzero().flatten()
    if positions.numel() == 0:
        return rows[:0]
    start, stop = int(positions[0]), int(positions[-1]) + 1
    if stop - start == positions.numel():
        return rows[start:stop]
    return rows[positions.to(rows.device)]
