"""Where judges run: a local transformers model (`TransformersBackend`) or an OpenAI-compatible chat-completions
server such as vLLM or SGLang (`OpenAIChatBackend`). Both are async, so judges can run side by side."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from r2m.adapters.conversation import Message
from r2m.checks import check_int
from r2m.hf_models import find_body, padding_tokenizer

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429})


@dataclass
class Generation:
    """The judge's replies to one request.

    ``texts`` holds one reply per requested sample, or is empty when the request failed (``error`` says why).
    ``rte`` is the judge's last-layer hidden state at the last token of its input [D_judge] (local models only).
    """

    texts: list[str]
    error: str | None = None
    attempts: int = 1
    rte: Tensor | None = None


class JudgeBackend(ABC):
    """Generates judge replies for chat conversations."""

    @abstractmethod
    async def generate(self, conversations: Sequence[list[Message]], num_samples: int = 1) -> list[Generation]:
        """One `Generation` per conversation, each with ``num_samples`` sampled replies (or an error)."""

    @property
    def judge_model(self) -> nn.Module | None:
        """The local judge model, when there is one (what `r2m.wrap` builds an R2M reward over)."""
        return None


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    check_int("max_new_tokens", max_new_tokens)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


class TransformersBackend(JudgeBackend):
    """A local causal LM judge run with ``transformers`` ``generate``: chat template, left padding, batches of
    ``batch_size`` conversations, sampling with ``temperature`` and ``top_p``, or greedy when ``temperature`` is 0
    (then the ``num_samples`` replies are one greedy reply repeated).

    Each `Generation` also carries the RTE (taken from the prefill generation already runs: no extra forward).
    ``model`` may be a loaded model or a local path (loaded with ``AutoModelForCausalLM``; ``model_init_kwargs``
    are passed on, ``trust_remote_code`` stays off unless given there).
    """

    def __init__(self, model: nn.Module | str | os.PathLike, tokenizer: Any = None, *, max_new_tokens: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                 chat_template_kwargs: dict[str, Any] | None = None, generation_kwargs: dict[str, Any] | None = None,
                 model_init_kwargs: dict[str, Any] | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            path = model
            model = AutoModelForCausalLM.from_pretrained(path, **(model_init_kwargs or {}))
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
            raise TypeError(f"model must be a transformers causal LM (with .generate) or a local path to one, got "
                            f"{type(model).__name__}")
        if tokenizer is None or not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise ValueError("tokenizer (a transformers tokenizer of the judge) is required when model is not a path")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the judge's tokenizer has no chat_template: set tokenizer.chat_template to the judge's "
                             "chat format")
        _check_sampling(max_new_tokens, temperature, top_p)
        check_int("batch_size", batch_size)
        self.model = model.eval()
        self.tokenizer = padding_tokenizer(tokenizer)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, float(temperature), float(top_p)
        self.batch_size = batch_size
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.generation_kwargs = dict(generation_kwargs or {})
        self._lock = threading.Lock()

    @property
    def judge_model(self) -> nn.Module:
        return self.model

    def render(self, conversation: list[Message]) -> str:
        """The judge's input text for a conversation: its chat template with the generation prompt."""
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                  **self.chat_template_kwargs)

    async def generate(self, conversations: Sequence[list[Message]], num_samples: int = 1) -> list[Generation]:
        check_int("num_samples", num_samples)
        return await asyncio.to_thread(self.generate_sync, conversations, num_samples)

    def generate_sync(self, conversations: Sequence[list[Message]], num_samples: int = 1) -> list[Generation]:
        """`generate` without an event loop."""
        check_int("num_samples", num_samples)
        texts = [self.render(list(c)) for c in conversations]
        results: list[Generation] = []
        with self._lock:
            for start in range(0, len(texts), self.batch_size):
                results.extend(self._generate_batch(texts[start:start + self.batch_size], num_samples))
        return results

    def _generate_batch(self, texts: list[str], num_samples: int) -> list[Generation]:
        device = next(self.model.parameters()).device
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                                 add_special_tokens=False).to(device)
        width = encoded["input_ids"].shape[1]
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} \
            if self.temperature > 0 else {"do_sample": False}
        # greedy replies are identical: generate one and repeat it
        returned = num_samples if self.temperature > 0 else 1
        prefill: list[Tensor] = []

        def keep_prefill(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0]
            if not prefill and hidden.shape[1] == width:
                prefill.append(hidden[:, -1].detach())

        handle = find_body(self.model).register_forward_hook(keep_prefill)
        try:
            with torch.no_grad():
                output = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens,
                                             num_return_sequences=returned, pad_token_id=self.tokenizer.pad_token_id,
                                             **sampling, **self.generation_kwargs)
        finally:
            handle.remove()
        replies = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        # generate repeats each input `returned` times in a row, for the prefill as for the outputs
        rte = prefill[0][::returned] if prefill else None
        if rte is None:
            logger.warning("the judge's prefill was not seen as one forward over the whole input: no RTE returned")
        samples = [replies[i * returned:(i + 1) * returned] * (num_samples // returned) for i in range(len(texts))]
        return [Generation(samples[i], rte=None if rte is None else rte[i]) for i in range(len(texts))]


class OpenAIChatBackend(JudgeBackend):
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, ...), called with ``httpx``.

    Every request has a ``timeout`` (seconds); timeouts, connection errors, 408/409/425/429/5xx responses and
    malformed bodies are retried up to ``max_retries`` times, waiting ``backoff * 2**attempt`` seconds (at most
    ``max_backoff``) in between; other 4xx responses are not retried. At most ``max_concurrency`` requests are in
    flight per event loop. A request that still fails gives a `Generation` with no texts and the error.
    ``num_samples`` replies are asked for with the API's ``n``; ``extra_body`` is merged into every request.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_tokens: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, timeout: float = 120.0, max_retries: int = 3,
                 backoff: float = 1.0, max_backoff: float = 30.0, max_concurrency: int = 16,
                 extra_body: dict[str, Any] | None = None):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}")
        _check_sampling(max_tokens, temperature, top_p)
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (name == "timeout" and value == 0):
                raise ValueError(f"{name} must be a number of seconds {'> 0' if name == 'timeout' else '>= 0'}, "
                                 f"got {value!r}")
        check_int("max_retries", max_retries, minimum=0)
        check_int("max_concurrency", max_concurrency)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_tokens, self.temperature, self.top_p = max_tokens, float(temperature), float(top_p)
        self.timeout, self.max_retries = float(timeout), max_retries
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.max_concurrency = max_concurrency
        self.extra_body = dict(extra_body or {})
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
            weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_semaphores"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._semaphores = weakref.WeakKeyDictionary()

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop]

    async def generate(self, conversations: Sequence[list[Message]], num_samples: int = 1) -> list[Generation]:
        import httpx

        check_int("num_samples", num_samples)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), limits=limits, headers=headers) as client:
            return list(await asyncio.gather(*(self._request(client, list(c), num_samples) for c in conversations)))

    async def _request(self, client: Any, messages: list[Message], num_samples: int) -> Generation:
        import httpx

        payload = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                   "temperature": self.temperature, "top_p": self.top_p, "n": num_samples, **self.extra_body}
        error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                async with self._semaphore():
                    response = await client.post(self.url, json=payload)
            except httpx.TimeoutException:
                error = f"timed out after {self.timeout:g} s"
                continue
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code in RETRY_STATUSES or response.status_code >= 500:
                    continue
                break
            texts = _choice_texts(response)
            if texts is None:
                error = f"malformed chat-completions body: {response.text[:200]!r}"
                continue
            return Generation(texts, attempts=attempt + 1)
        logger.warning("judge request to %s failed after %d attempt(s): %s", self.url, attempt + 1, error)
        return Generation([], error=error, attempts=attempt + 1)


def _choice_texts(response: Any) -> list[str] | None:
    """The message contents of a chat-completions response, or None when the body is not one."""
    try:
        body = response.json()
        choices = sorted(body["choices"], key=lambda choice: choice.get("index", 0))
        texts = [choice["message"]["content"] or "" for choice in choices]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not texts or not all(isinstance(t, str) for t in texts):
        return None
    return texts
