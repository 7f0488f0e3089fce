"""What R2M reads of a Hugging Face model and tokenizer: the transformer body, and padding. Nothing here changes
the user's model or tokenizer for good."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP-style ``.module`` and PEFT wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def find_body(model: nn.Module) -> nn.Module:
    """The transformer body a Hugging Face model runs before its head (its ``base_model_prefix`` attribute, else
    ``get_decoder()``), unwrapping DDP-style ``.module`` and PEFT wrappers. Its output is what the head reads."""
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and body is not model:
        return body
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    raise ValueError(f"cannot find the transformer body of {type(model).__name__}: pass a Hugging Face model (with "
                     f"`base_model_prefix` or `get_decoder()`) or the body itself")


def padding_tokenizer(tokenizer: Any, name: str = "tokenizer") -> Any:
    """``tokenizer`` when it has a pad token, else a copy that pads with its EOS token (the given one is unchanged).
    ``name`` is the argument named in the error when it has neither."""
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(f"{name} has neither a pad token nor an EOS token to pad batches with")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def pad_token_id_set(model: nn.Module, pad_token_id: int | None) -> Iterator[None]:
    """Inside, the model's (text) config carries ``pad_token_id`` (which transformers pools sequence-classification
    scores by) when it has none of its own; restored on exit."""
    config = model.config.get_text_config()
    if config.pad_token_id is not None or pad_token_id is None:
        yield
        return
    config.pad_token_id = pad_token_id
    try:
        yield
    finally:
        config.pad_token_id = None


__all__ = ["find_body", "pad_token_id_set", "padding_tokenizer", "unwrap"]
