"""A fixed anchor set of preference pairs for R2M's ``anchored`` mode (and its ``head_only`` control) under TRL."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from r2m.anchors import AnchorBatch
from r2m.checks import check_int
from r2m.config import LABELLED_MODES
from r2m.distributed import agree
from r2m.integrations.trl.policy_states import PolicyStateSource
from r2m.packed import PackedStates

Pair = tuple[Any, Any, Any]
Scorer = Callable[[list, list], tuple[Tensor, Tensor | None]]

SCORE_ROWS = 64  # rows per reward-model forward or judge call when the set is scored


class AnchorSet:
    """P fixed (prompt, chosen, rejected) pairs, texts or conversations as the dataset's prompts and the completions
    are, as the R2M update reads them (`r2m.AnchorBatch`).

    Their RTEs (and a judge's rewards) are scored once per training run by `prepare` (the reward model is frozen).
    In fusion modes `batch` refreshes the policy's states of the 2P sequences with one no-grad forward through the
    trainer's model every ``every`` updates (all processes agreeing), cached in between; they are counted in
    ``forwards``.
    """

    def __init__(self, pairs: Sequence[Pair], every: int = 1, mode: str = "anchored"):
        check_int("anchor_every", every, hint=" (R2M updates per refresh of the anchor set's policy states)")
        if mode not in LABELLED_MODES:
            raise ValueError(f"anchor_pairs is used in modes {LABELLED_MODES} (head_only: the control that gives the "
                             f"RM alone the same anchor set), not in mode {mode!r}")
        self.pairs, self.every = _checked(pairs), every
        self.forwards = 0
        self.rte: Tensor | None = None  # [2P, D_rm], chosen then rejected
        self.base_rewards: Tensor | None = None  # [2P], a judge's rewards (NaN where it gave none)
        self.states: PackedStates | None = None
        self._updates = 0

    def prepare(self, score: Scorer) -> None:
        """Score the set and restart the refresh schedule, when training begins. ``score(prompts, responses)``: RTEs
        [n, D_rm] and a judge's rewards [n] (None for a reward model) of rows in pairs, chosen then rejected; a judge
        must judge each pair as a group of its own."""
        self.states, self._updates = None, 0
        prompts = [p for p, _, _ in self.pairs for _ in range(2)]
        responses = [response for _, c, r in self.pairs for response in (c, r)]
        parts = [score(prompts[i:i + SCORE_ROWS], responses[i:i + SCORE_ROWS])
                 for i in range(0, len(prompts), SCORE_ROWS)]
        rte = torch.cat([part[0].to(parts[0][0].device) for part in parts])
        self.rte = torch.cat([rte[0::2], rte[1::2]])
        base = None if parts[0][1] is None else torch.cat([part[1] for part in parts])
        self.base_rewards = None if base is None else torch.cat([base[0::2], base[1::2]])

    def batch(self, source: PolicyStateSource | None, trainer: object, policy_dim: int) -> tuple[AnchorBatch, float]:
        """The set for this update, and the seconds spent refreshing its policy states (not in ``source``'s capture
        time). ``source``: the policy's states in fusion modes, None in ``head_only`` (no forward runs);
        ``trainer``: the TRL trainer (its model, tools and chat template), when known."""
        rte, base, pairs = self.rte, self.base_rewards, len(self.pairs)
        seconds, hidden, cu_seqlens = 0.0, None, None
        if source is not None:
            due = self.states is None or self._updates % self.every == 0
            calls = agree(int(due), source.device)
            if calls:
                capture = source.capture
                before = capture.seconds
                self.states = capture.forward(self.sequences(source, trainer), batch_size=2 * pairs, calls=calls,
                                              model=getattr(trainer, "model", None))
                seconds, capture.seconds = capture.seconds - before, before
                self.forwards += calls
            if self.states.missing:  # a sequence whose states were not found: its pair is left out
                rte = rte.clone()
                rte[self.states.missing] = math.nan
            hidden = self.states.hidden if self.states.hidden is not None else torch.zeros(0, policy_dim)
            cu_seqlens = self.states.cu_seqlens
        self._updates += 1
        return AnchorBatch(rte[:pairs], rte[pairs:], hidden, cu_seqlens, None if base is None else base[:pairs],
                           None if base is None else base[pairs:]), seconds

    def sequences(self, source: PolicyStateSource, trainer: object = None) -> list[list[int]]:
        """The policy's token ids of the 2P sequences, chosen then rejected: the prompt's ids as the trainer builds
        them (`PolicyStateSource.prompt_ids`), the response's text tokenized without special tokens, and the EOS
        token a finished completion ends with."""
        prompt_ids = source.prompt_ids([p for p, _, _ in self.pairs], trainer)
        tokenizer = getattr(source.tokenizer, "tokenizer", source.tokenizer)
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        responses = [c for _, c, _ in self.pairs] + [r for _, _, r in self.pairs]
        response_ids = tokenizer(text=[_response_text(r) for r in responses], add_special_tokens=False)["input_ids"]
        return [list(p) + list(r) + eos for p, r in zip(prompt_ids * 2, response_ids, strict=True)]


def _checked(pairs: Sequence[Pair]) -> list[Pair]:
    """``anchor_pairs`` as a list of (prompt, chosen, rejected), after checking it."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"anchor_pairs must be a sequence of (prompt, chosen, rejected) tuples, got "
                        f"{type(pairs).__name__}")
    if not pairs:
        raise ValueError("anchor_pairs is empty: give at least one (prompt, chosen, rejected) pair, or None")
    checked, kinds = [], set()
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 3:
            raise ValueError(f"anchor_pairs[{i}] must be a (prompt, chosen, rejected) tuple, got {pair!r:.100}")
        conversational = [_is_messages(part) for part in pair]
        if not (all(isinstance(part, str) for part in pair) or all(conversational)):
            raise ValueError(f"anchor_pairs[{i}] must hold three texts, or three conversations (lists of "
                             f"{{'role', 'content'}} messages with text content), got "
                             f"{tuple(type(part).__name__ for part in pair)}")
        kinds.add(all(conversational))
        checked.append(tuple(pair))
    if len(kinds) > 1:
        raise ValueError("anchor_pairs mixes texts and conversations: give one kind, as the dataset's prompts are")
    return checked


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)


def _response_text(response: str | list[dict[str, Any]]) -> str:
    """A response's text: the text itself, or the content of a conversation's messages."""
    return response if isinstance(response, str) else "".join(m["content"] for m in response)
