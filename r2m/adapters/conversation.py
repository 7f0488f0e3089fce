"""Trainer inputs (plain text or chat messages) turned into what a judge shows: messages, questions, responses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text parts of a multimodal list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    raise TypeError(f"message content must be a string or a list of content parts, got {type(content).__name__}")


def to_messages(prompt: str | Sequence[Message]) -> list[Message]:
    """A prompt as chat messages: a plain-text prompt is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [{"role": m["role"], "content": content_text(m.get("content"))} for m in prompt]
    raise TypeError("a prompt must be a string or a list of chat messages ({'role': ..., 'content': ...})")


def response_text(completion: str | Sequence[Message]) -> str:
    """A completion's text: the string itself, or the contents of its (assistant) messages joined."""
    if isinstance(completion, str):
        return completion
    return "\n".join(m["content"] for m in to_messages(completion) if m["content"])


def is_single_turn(messages: Sequence[Message]) -> bool:
    """Whether the conversation is one user question with nothing before it."""
    return len(messages) == 1 and messages[0]["role"] == "user"


def render_turns(messages: Sequence[Message], labels: dict[str, str]) -> str:
    """Messages as ``Label: content`` paragraphs; roles missing from ``labels`` are title-cased."""
    return "\n\n".join(f"{labels.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def strip_thinking(text: str) -> str:
    """``text`` without reasoning: ``<think>...</think>`` blocks, everything before a stray ``</think>`` (the judge's
    chat template opened the block), and an unclosed ``<think>`` to the end (generation stopped while thinking)."""
    text = _THINK_BLOCK.sub("", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _THINK_OPEN.search(text)
    return text[:opened.start()] if opened else text
