"""A miniature RLHF world whose truth is known (Gao et al.'s synthetic set-up, in miniature).

Prompts are sets of topic words. The gold reward pays for covering the prompt's words and for using many
different words of the "good" half of the vocabulary (odd-numbered words), and penalises a spurious word. The
proxy reward model is trained with Bradley-Terry on a biased set of gold-labelled pairs in which the better
response more often carries one spurious word (65% of pairs by default) and repeats are rare, so it learns that the
spurious word and good words as such are good: a policy optimised against it can raise the proxy reward by repeating a
good word or emitting the spurious word while the gold reward falls. Everything is built offline.

The paper's premise (its Section 3) is a *pretrained* policy whose last-layer states carry preference information
beyond the reward model's semantics: `LabWorld.pretrain` fine-tunes a policy on data responses (optionally the best
of n by gold), and `premise_check` measures the premise on gold-labelled pairs (class similarity of the pooled
states, a linear probe against the proxy reward model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from r2m.benchmarks import tiny_models
from r2m.checks import check_int
from r2m.losses import bt_loss


@dataclass
class LabConfig:
    """The lab world: its language, its gold reward and how the proxy RM is (mis)trained.

    ``rm_bias``: how often the better response of a proxy-RM training pair carries the spurious word (0.5: no
    correlation). ``rm_repeat_share``: the share of the RM's training responses that repeat one or two words over
    their whole length (gold-labelled like the rest), so that the proxy sees what repetition is worth (0: repeats are
    rare, and the proxy is free to pay for a repeated good word: an exploit its bias does not cause). The ``rm_*``
    fields shape the proxy RM only, not the policy's pretraining data.
    """

    vocab_words: int = 24
    prompt_words: int = 4
    response_words: int = 8
    spurious_word: str = "w0"
    spurious_penalty: float = 1.0
    rm_pairs: int = 2048
    rm_bias: float = 0.65
    rm_hidden_size: int = 32
    rm_epochs: int = 25
    rm_lr: float = 3e-3
    rm_repeat_share: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_words >= self.vocab_words - 1:
            raise ValueError(f"LabConfig.prompt_words ({self.prompt_words}) must be below vocab_words - 1 "
                             f"({self.vocab_words - 1})")
        for name in ("rm_bias", "rm_repeat_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"LabConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("response_words", "rm_pairs", "rm_epochs"):
            check_int(f"LabConfig.{name}", getattr(self, name))


@dataclass
class PretrainConfig:
    """Supervised fine-tuning that makes the lab's policy a pretrained one: each training response is the best, by
    gold reward, of ``best_of`` data-distribution responses to its prompt (rejection-sampling SFT; 1, the default:
    plain data-distribution responses, so that the policy starts where the proxy still ranks its samples better
    than chance and gold can first rise). ``spurious_share``: the share of training responses that carry the
    spurious word once (0: none, and a policy that never emits it cannot find the exploit the proxy's bias pays for).
    """

    examples: int = 8192
    best_of: int = 1
    spurious_share: float = 0.0
    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.spurious_share <= 1.0:
            raise ValueError(f"PretrainConfig.spurious_share must be in [0, 1], got {self.spurious_share!r}")
        for name in ("examples", "best_of", "epochs", "batch_size"):
            check_int(f"PretrainConfig.{name}", getattr(self, name))


class LabWorld:
    """Prompts, the gold reward, biased preference data and the proxy reward model trained on it."""

    def __init__(self, config: LabConfig | None = None):
        self.config = config or LabConfig()
        self.tokenizer: PreTrainedTokenizerFast = tiny_models.build_tokenizer(self.config.vocab_words)
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

    def sample_response(self, prompt: str, rng: random.Random, spurious: bool, repeat_share: float = 0.0) -> str:
        """A data-distribution response: some of the prompt's words, filler, and optionally one spurious word; with
        probability ``repeat_share`` instead one or two words repeated over the whole response."""
        if repeat_share and rng.random() < repeat_share:
            words = rng.choices(rng.sample(self.words, rng.randint(1, 2)), k=self.config.response_words)
            if spurious:
                words[rng.randrange(len(words))] = self.config.spurious_word
            return " ".join(words)
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
            a, b = (self.sample_response(prompt, rng, spurious=False, repeat_share=self.config.rm_repeat_share)
                    for _ in range(2))
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

    def good_responses(self, prompts: list[str], best_of: int, seed: int, spurious_share: float = 0.0) -> list[str]:
        """Per prompt the best, by gold reward, of ``best_of`` data-distribution responses, each carrying the spurious
        word with probability ``spurious_share`` (0, the default: none has the spurious
        word)."""
        rng = random.Random(seed)
        return [max((self.sample_response(p, rng, spurious=bool(spurious_share) and rng.random() < spurious_share)
                     for _ in range(best_of)),
                    key=lambda r, p=p: self.gold_reward(p, r)) for p in prompts]

    def spurious_share(self, responses: list[str]) -> float:
        """Share of responses that contain the spurious word."""
        return sum(self.config.spurious_word in r.split() for r in responses) / max(1, len(responses))

    def encode_responses(self, prompts: list[str], responses: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Policy input prompt + response, right-padded: input_ids, attention_mask and response_mask (the
        response's own token positions), each [B, S]."""
        rows = [(self.tokenizer(p).input_ids, self.tokenizer(r).input_ids)
                for p, r in zip(prompts, responses, strict=True)]
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        attention, response = (torch.zeros(len(rows), width, dtype=torch.bool) for _ in range(2))
        for i, (prompt_ids, response_ids) in enumerate(rows):
            ids[i, : len(prompt_ids) + len(response_ids)] = torch.tensor(prompt_ids + response_ids)
            attention[i, : len(prompt_ids) + len(response_ids)] = True
            response[i, len(prompt_ids): len(prompt_ids) + len(response_ids)] = True
        return ids, attention, response

    def pretrain(self, policy: PreTrainedModel, config: PretrainConfig, seed: int,
                 progress: str | None = None) -> list[float]:
        """Fine-tune ``policy`` in place on data responses, each the best of ``config.best_of`` by gold (next-token
        loss on the response tokens only); returns the mean loss per epoch. ``progress``: a progress bar of that
        title over the batches."""
        prompts = self.prompts(config.examples, seed=20_000 + seed)
        ids, attention, response = self.encode_responses(prompts, self.good_responses(prompts, config.best_of, seed,
                                                                                config.spurious_share))
        labels = ids.masked_fill(~response, -100)
        optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        policy.train()
        per_epoch = -(-len(prompts) // config.batch_size)
        with tqdm(total=config.epochs * per_epoch, desc=progress, disable=progress is None, leave=False,
                  dynamic_ncols=True) as bar:
            for _ in range(config.epochs):
                total = 0.0
                batches = torch.randperm(len(prompts), generator=generator).split(config.batch_size)
                for batch in batches:
                    loss = policy(input_ids=ids[batch], attention_mask=attention[batch], labels=labels[batch]).loss
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                    bar.update()
                losses.append(total / len(batches))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        policy.eval()
        return losses

    @torch.no_grad()
    def sample(self, policy: PreTrainedModel, prompts: list[str], temperature: float, seed: int) -> list[str]:
        """One sampled response per prompt, as the RL trainer samples them (``response_words`` new tokens)."""
        enc = self.tokenizer([f"{p} " for p in prompts], return_tensors="pt", padding=True, padding_side="left")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = policy.generate(**enc, do_sample=True, temperature=temperature,
                                  max_new_tokens=self.config.response_words, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)

    def reward_text(self, prompt: str, response: str) -> str:
        """What the reward model reads."""
        return f"{prompt} {response}".strip()

    def train_proxy(self, pairs: list[tuple[str, str, str]] | None = None, progress: str | None = None,
                    bias: float | None = None) -> PreTrainedModel:
        """A tiny sequence classifier trained with Bradley-Terry on the world's biased pairs (``bias``: another
        spurious correlation for them, 0.5 none); ``progress``: a progress bar of that title over the batches."""
        cfg = self.config
        pairs = self.preference_pairs(cfg.rm_pairs, cfg.seed, bias) if pairs is None else pairs
        torch.manual_seed(cfg.seed)
        model = tiny_models.build_reward_model(self.tokenizer, "llama", hidden_size=cfg.rm_hidden_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.rm_lr)
        chosen = self._encode([self.reward_text(p, c) for p, c, _ in pairs])
        rejected = self._encode([self.reward_text(p, r) for p, _, r in pairs])
        generator = torch.Generator().manual_seed(cfg.seed)
        model.train()
        with tqdm(total=cfg.rm_epochs * -(-len(pairs) // 64), desc=progress, disable=progress is None, leave=False,
                  dynamic_ncols=True) as bar:
            for _ in range(cfg.rm_epochs):
                for batch in torch.randperm(len(pairs), generator=generator).split(64):
                    loss = bt_loss(model(**{k: v[batch] for k, v in chosen.items()}).logits.squeeze(-1),
                                   model(**{k: v[batch] for k, v in rejected.items()}).logits.squeeze(-1)).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    bar.update()
                bar.set_postfix(bt=f"{loss.item():.3f}")
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


def ranking_agreement(scores: Tensor, gold: Tensor) -> float:
    """How ``scores`` rank samples by gold: the share of within-group pairs of different gold reward that they
    order as gold does, a tie counting half; scores and gold [G, K]. NaN when no such pair has finite scores."""
    score_gap = scores[:, :, None] - scores[:, None, :]
    valid = (gold[:, :, None] > gold[:, None, :]) & torch.isfinite(score_gap)
    agree = (score_gap > 0).double() + 0.5 * (score_gap == 0).double()
    return float(agree[valid].mean()) if bool(valid.any()) else float("nan")


# ---- the premise check (paper Section 3) -------------------------------------------------------------------------

@torch.no_grad()
def policy_states(policy: PreTrainedModel, world: LabWorld, prompts: list[str], responses: list[str]) -> Tensor:
    """The policy's last-layer states (after its final norm) mean-pooled over each response's tokens, [B, D]."""
    ids, attention, response = world.encode_responses(prompts, responses)
    hidden = policy.base_model(input_ids=ids, attention_mask=attention).last_hidden_state.float()
    weights = response[..., None].float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def reward_token_states(reward_model: PreTrainedModel, world: LabWorld, prompts: list[str],
                        responses: list[str]) -> Tensor:
    """The reward model's last-layer state at the token its head reads (its semantics), [B, D_rm]."""
    enc = world._encode([world.reward_text(p, r) for p, r in zip(prompts, responses, strict=True)])
    hidden = reward_model.base_model(**enc).last_hidden_state.float()
    return hidden[torch.arange(hidden.shape[0]), enc["attention_mask"].sum(1) - 1]


def class_similarity(chosen: Tensor, rejected: Tensor, centre: bool = False) -> dict[str, float]:
    """Mean cosine similarity within the preferred states, within the dispreferred ones (``same_class``: their
    mean) and across the two sets (``cross_class``); ``centre`` first subtracts the mean of all states."""
    states = torch.cat([chosen, rejected]).double()
    if centre:
        states = states - states.mean(0)
    unit = F.normalize(states, dim=1)
    a, b = unit[: len(chosen)], unit[len(chosen):]

    def within(x: Tensor) -> float:
        gram = x @ x.T
        return float((gram.sum() - gram.diagonal().sum()) / (len(x) * (len(x) - 1)))

    same = 0.5 * (within(a) + within(b))
    return {"same_class": same, "cross_class": float((a @ b.T).mean()), "gap": same - float((a @ b.T).mean())}


def probe_accuracy(chosen: Tensor, rejected: Tensor, train: Tensor, test: Tensor, l2: float = 1e-3) -> float:
    """A linear probe on state differences: logistic regression (no intercept, features scaled on the train
    split) fitted on ``train`` pairs in both orders; returns the share of ``test`` pairs it orders correctly."""
    diff = (chosen - rejected).double()
    scale = diff[train].std(0).clamp_min(1e-8)
    x = diff[train] / scale
    x, y = torch.cat([x, -x]), torch.cat([torch.ones(len(train)), torch.zeros(len(train))]).double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((diff[test] / scale) @ weight > 0).double().mean())


def premise_check(world: LabWorld, policy: PreTrainedModel, proxy: PreTrainedModel,
                  pairs: list[tuple[str, str, str]], seed: int, train_share: float = 0.7) -> dict[str, float]:
    """The paper's premise on gold-labelled ``pairs`` (prompt, preferred, dispreferred): class similarity of the
    policy's pooled states (raw and centred), a linear probe on their differences, the same probe on the proxy RM's
    reward-token states, and the proxy RM's own accuracy; accuracies on the same held-out ``1 - train_share``."""
    prompts = [p for p, _, _ in pairs]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    cut = int(train_share * len(pairs))
    train, test = order[:cut], order[cut:]
    states = [policy_states(policy, world, prompts, [pair[i] for pair in pairs]) for i in (1, 2)]
    semantics = [reward_token_states(proxy, world, prompts, [pair[i] for pair in pairs]) for i in (1, 2)]
    scores = [world.score(proxy, prompts, [pair[i] for pair in pairs]) for i in (1, 2)]
    raw, centred = class_similarity(*states), class_similarity(*states, centre=True)
    return {"pairs": len(pairs), "test_pairs": len(test),
            **{f"{k}_cos": v for k, v in raw.items()}, **{f"{k}_cos_centred": v for k, v in centred.items()},
            "probe_policy_states": probe_accuracy(*states, train, test),
            "probe_rm_states": probe_accuracy(*semantics, train, test),
            "proxy_rm": float((scores[0][test] > scores[1][test]).double().mean())}
