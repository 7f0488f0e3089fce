"""A miniature RLHF world whose truth is known (Gao et al.'s synthetic set-up, in miniature).

Prompts are sets of topic words. The gold reward pays for covering the prompt's words and for using many
different words of the "good" half of the vocabulary (odd-numbered words), and penalises a spurious word. The
proxy reward model is trained with Bradley-Terry on a small, biased set of gold-labelled pairs in which the
better response usually carries one spurious word and repeats are rare, so it learns that the spurious word and
good words as such are good: a policy optimised against it can raise the proxy reward by repeating a good word
or emitting the spurious word while the gold reward falls. Everything is built offline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from r2m import tiny
from r2m.losses import bt_loss


@dataclass
class LabConfig:
    """The lab world: its language, its gold reward and how the proxy RM is (mis)trained."""

    vocab_words: int = 24
    prompt_words: int = 4
    response_words: int = 8
    spurious_word: str = "w0"
    spurious_penalty: float = 1.0
    rm_pairs: int = 512
    rm_bias: float = 0.8
    rm_hidden_size: int = 32
    rm_epochs: int = 25
    rm_lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_words >= self.vocab_words - 1:
            raise ValueError(f"LabConfig.prompt_words ({self.prompt_words}) must be below vocab_words - 1 "
                             f"({self.vocab_words - 1})")
        if not 0.0 <= self.rm_bias <= 1.0:
            raise ValueError(f"LabConfig.rm_bias must be in [0, 1], got {self.rm_bias!r}")
        for name in ("response_words", "rm_pairs", "rm_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"LabConfig.{name} must be >= 1, got {getattr(self, name)!r}")


class LabWorld:
    """Prompts, the gold reward, biased preference data and the proxy reward model trained on it."""

    def __init__(self, config: LabConfig | None = None):
        self.config = config or LabConfig()
        self.tokenizer: PreTrainedTokenizerFast = tiny.build_tokenizer(self.config.vocab_words)
        self.words = [f"w{i}" for i in range(self.config.vocab_words) if f"w{i}" != self.config.spurious_word]
        self.good_words = frozenset(word for word in self.words if int(word[1:]) % 2)
        if len(self.words) == self.config.vocab_words:
            raise ValueError(f"LabConfig.spurious_word {self.config.spurious_word!r} is not in the vocabulary "
                             f"w0..w{self.config.vocab_words - 1}")

    def prompts(self, count: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [" ".join(rng.sample(self.words, self.config.prompt_words)) for _ in range(count)]

    def gold_reward(self, prompt: str, response: str) -> float:
        """Half the share of the prompt's words the response covers, plus half its share of distinct good words,
        minus the penalty times its share of spurious words. In [-penalty, 1]."""
        topic, words = set(prompt.split()), response.split()
        if not words:
            return 0.0
        coverage = len(topic & set(words)) / len(topic)
        good = len(self.good_words & set(words)) / len(words)
        spurious = words.count(self.config.spurious_word) / len(words)
        return 0.5 * coverage + 0.5 * good - self.config.spurious_penalty * spurious

    def sample_response(self, prompt: str, rng: random.Random, spurious: bool) -> str:
        """A data-distribution response: some of the prompt's words, filler, and optionally one spurious word."""
        topic = prompt.split()
        words = rng.sample(topic, rng.randint(0, len(topic)))
        words += rng.choices(self.words, k=self.config.response_words - len(words))
        words = words[: self.config.response_words]
        if spurious:
            words[rng.randrange(len(words))] = self.config.spurious_word
        rng.shuffle(words)
        return " ".join(words)

    def preference_pairs(self, count: int, seed: int, bias: float | None = None) -> list[tuple[str, str, str]]:
        """(prompt, chosen, rejected) labelled by the gold reward. With probability ``bias`` the spurious word
        lands in the chosen response (``bias`` 0.5: no correlation)."""
        bias = self.config.rm_bias if bias is None else bias
        rng = random.Random(seed)
        pairs = []
        while len(pairs) < count:
            prompt = self.prompts(1, rng.randrange(1 << 30))[0]
            a, b = (self.sample_response(prompt, rng, spurious=False) for _ in range(2))
            ga, gb = self.gold_reward(prompt, a), self.gold_reward(prompt, b)
            if ga == gb:
                continue
            chosen, rejected = (a, b) if ga > gb else (b, a)
            marked = chosen if rng.random() < bias else rejected
            marked_words = marked.split()
            marked_words[rng.randrange(len(marked_words))] = self.config.spurious_word
            marked_new = " ".join(marked_words)
            chosen, rejected = (marked_new, rejected) if marked is chosen else (chosen, marked_new)
            if self.gold_reward(prompt, chosen) > self.gold_reward(prompt, rejected):
                pairs.append((prompt, chosen, rejected))
        return pairs

    def reward_text(self, prompt: str, response: str) -> str:
        """What the reward model reads."""
        return f"{prompt} {response}".strip()

    def train_proxy(self, pairs: list[tuple[str, str, str]] | None = None) -> PreTrainedModel:
        """A tiny sequence classifier trained with Bradley-Terry on the biased pairs."""
        cfg = self.config
        pairs = self.preference_pairs(cfg.rm_pairs, cfg.seed) if pairs is None else pairs
        torch.manual_seed(cfg.seed)
        model = tiny.build_reward_model(self.tokenizer, "llama", hidden_size=cfg.rm_hidden_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.rm_lr)
        chosen = self._encode([self.reward_text(p, c) for p, c, _ in pairs])
        rejected = self._encode([self.reward_text(p, r) for p, _, r in pairs])
        generator = torch.Generator().manual_seed(cfg.seed)
        model.train()
        for _ in range(cfg.rm_epochs):
            for batch in torch.randperm(len(pairs), generator=generator).split(64):
                loss = bt_loss(model(**{k: v[batch] for k, v in chosen.items()}).logits.squeeze(-1),
                               model(**{k: v[batch] for k, v in rejected.items()}).logits.squeeze(-1)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return model.eval()

    @torch.no_grad()
    def score(self, model: PreTrainedModel, prompts: list[str], responses: list[str]) -> torch.Tensor:
        enc = self._encode([self.reward_text(p, r) for p, r in zip(prompts, responses, strict=False)])
        return model(**enc).logits.squeeze(-1)

    def accuracy(self, model: PreTrainedModel, pairs: list[tuple[str, str, str]]) -> float:
        """Share of gold-labelled pairs the model orders correctly."""
        prompts = [p for p, _, _ in pairs]
        chosen = self.score(model, prompts, [c for _, c, _ in pairs])
        rejected = self.score(model, prompts, [r for _, _, r in pairs])
        return float((chosen > rejected).float().mean())

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, return_tensors="pt", padding=True))
