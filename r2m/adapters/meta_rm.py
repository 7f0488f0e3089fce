"""A scalar reward model as the meta reward model of SPCT's guided voting."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from r2m.checks import check_int
from r2m.hf_models import pad_token_id_set, padding_tokenizer


class SequenceClassifierRater:
    """Rates judge outputs with a Hugging Face ``*ForSequenceClassification`` model (num_labels=1): the judge's
    prompt as the user turn and its output as the assistant turn, through the rater's chat template (plain
    concatenation when it has none), right padded, in batches of ``batch_size``.

    ``model`` may be a loaded model or a local path (``model_init_kwargs`` are passed to ``from_pretrained``).
    """

    def __init__(self, model: nn.Module | str | os.PathLike, tokenizer: Any = None, batch_size: int = 8,
                 max_length: int | None = None, model_init_kwargs: dict[str, Any] | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            path = model
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                       **(model_init_kwargs or {}))
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers *ForSequenceClassification model or a local path to one, "
                            f"got {type(model).__name__}")
        if tokenizer is None:
            raise ValueError("tokenizer (the meta reward model's tokenizer) is required when model is not a path")
        check_int("batch_size", batch_size)
        self.model, self.tokenizer = model.eval(), padding_tokenizer(tokenizer)
        self.batch_size, self.max_length = batch_size, max_length

    def texts(self, judge_prompts: Sequence[str], judge_outputs: Sequence[str]) -> list[str]:
        """What the rater reads for each judge output."""
        if getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template([{"role": "user", "content": p},
                                                        {"role": "assistant", "content": o}], tokenize=False)
                    for p, o in zip(judge_prompts, judge_outputs, strict=True)]
        return [p + o for p, o in zip(judge_prompts, judge_outputs, strict=True)]

    @torch.no_grad()
    def __call__(self, judge_prompts: Sequence[str], judge_outputs: Sequence[str]) -> list[float]:
        """One rating per judge output (the model's logit)."""
        texts = self.texts(judge_prompts, judge_outputs)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        device = next(self.model.parameters()).device
        ratings: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     padding_side="right", truncation=self.max_length is not None,
                                     max_length=self.max_length, add_special_tokens=not templated).to(device)
            with pad_token_id_set(self.model, self.tokenizer.pad_token_id):
                ratings.extend(self.model(**encoded).logits[:, 0].float().tolist())
        return ratings
