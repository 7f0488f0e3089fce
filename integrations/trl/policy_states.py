"""Where a TRL trainer's policy hidden states come from: the capture plan, and the fallback forward for the rest."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase, TrainingArguments
from trl import RLOOConfig
from trl.data_utils import is_conversational

from r2m.capture import HiddenStateCapture
from r2m.distributed import agree
from r2m.packed import PackedStates

logger = logging.getLogger(__name__)

CAPTURE_SOURCES = ("forward", "generation", "extra")


def capture_plan(args: TrainingArguments) -> str:
    """Which pass gives the policy's hidden states before rewards: ``forward`` (the trainer's own no-grad log-prob
    forward: RLOO always, GRPO with vLLM importance sampling or misaligned generation/optimisation steps),
    ``generation`` (stitched from ``transformers.generate``) or ``extra`` (one no-grad forward of our own)."""
    if isinstance(args, RLOOConfig):
        return "forward"
    misaligned = args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0
    if misaligned or (args.use_vllm and args.vllm_importance_sampling_correction):
        return "forward"
    if args.use_vllm or getattr(args, "use_transformers_continuous_batching", False):
        return "extra"
    return "generation"


class PolicyStateSource:
    """The policy's last-layer states of each scored batch, from the pass `capture_plan` names, and from extra
    no-grad forwards for samples that pass did not hold.

    Whether (and how many) extra forwards run is agreed by all processes, since a sharded policy's forward is a
    collective; they run through the trainer's current (prepared) model, on prompt ids built as the trainer builds
    them (its tools and chat template). Training passes are handed to ``on_train_forward`` (the refresh), if given.
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, processing_class: PreTrainedTokenizerBase,
                 offload: bool, on_train_forward: Callable[[PackedStates], None] | None):
        self.plan = capture_plan(args)
        self.tokenizer = processing_class
        pad_token_id = getattr(getattr(processing_class, "tokenizer", processing_class), "pad_token_id", None)
        self.capture = HiddenStateCapture(model, offload=offload, keep_generation=self.plan == "generation",
                                          keep_forwards=self.plan == "forward", on_train_forward=on_train_forward,
                                          pad_token_id=pad_token_id).attach()
        self.chat_template_kwargs: dict[str, Any] = dict(args.chat_template_kwargs or {})
        self.device = args.device
        self.batch_size = args.per_device_train_batch_size
        self.counts: dict[str, int] = dict.fromkeys(CAPTURE_SOURCES, 0)
        self.extra_forwards = 0

    def take(self, prompts: list, completion_ids: list[list[int]], trainer: object = None
             ) -> tuple[PackedStates, int]:
        """The batch's states, and how many samples needed an extra forward. ``trainer``: the TRL trainer (its
        ``model``, ``tools`` and ``chat_template``), when known."""
        completions = [list(c) for c in completion_ids]
        if self.plan == "forward":
            states = self.capture.pop_forwards(completions)
        elif self.plan == "generation":
            states = self.capture.pop_generation(completions)
        else:
            states = PackedStates.none_found(len(completions))
        self.capture.clear()
        missing = states.missing
        self.counts[self.plan] += len(completions) - len(missing)
        calls = agree(math.ceil(len(missing) / self.batch_size), self.device)
        if calls:
            if missing and self.plan != "extra":
                logger.warning("R2M: %d of %d samples were not in the trainer's own %s pass; running an extra "
                               "policy forward for them", len(missing), len(completions), self.plan)
            prompt_ids = self.prompt_ids([prompts[i] for i in missing], trainer) if missing else []
            sequences = [list(p) + completions[i] for p, i in zip(prompt_ids, missing, strict=True)]
            extra = self.capture.forward(sequences, batch_size=self.batch_size, calls=calls,
                                         model=getattr(trainer, "model", None))
            if missing:
                states = extra if len(missing) == len(completions) else states.replace(missing, extra)
            self.counts["extra"] += len(missing)
            self.extra_forwards += calls
        return states, len(missing)

    def prompt_ids(self, prompts: list, trainer: object = None) -> list[list[int]]:
        """The prompt token ids exactly as TRL's trainers build them for text-only policies."""
        if is_conversational({"prompt": prompts[0]}):
            return self.tokenizer.apply_chat_template(
                conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                tools=getattr(trainer, "tools", None) or None, chat_template=getattr(trainer, "chat_template", None),
                **self.chat_template_kwargs)["input_ids"]
        return self.tokenizer(text=prompts)["input_ids"]

    def take_seconds(self) -> float:
        """Host seconds spent capturing since the previous call."""
        seconds, self.capture.seconds = self.capture.seconds, 0.0
        return seconds

    def remove(self) -> None:
        self.capture.remove()
