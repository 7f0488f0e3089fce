"""R2MRewardModel: R2M over a Hugging Face ``*ForSequenceClassification`` reward model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from r2m.base import R2MModule
from r2m.config import R2MConfig

HEAD_NAMES = ("score", "classifier", "v_head", "value_head")


def find_score_head(reward_model: nn.Module) -> str:
    """Name of the linear scoring head of a Hugging Face ``*ForSequenceClassification`` reward model."""
    for name in HEAD_NAMES:
        module = getattr(reward_model, name, None)
        if isinstance(module, nn.Linear):
            if module.out_features != 1:
                raise ValueError(f"reward_model.{name} has {module.out_features} outputs; a reward model scores "
                                 f"with one (num_labels=1)")
            return name
        if module is not None:
            raise ValueError(f"reward_model.{name} is a {type(module).__name__}, not a linear scoring head: R2M needs "
                             f"a reward model whose head is one nn.Linear(hidden_size, 1)")
    raise ValueError(f"reward_model ({type(reward_model).__name__}) has no linear scoring head named one of "
                     f"{HEAD_NAMES}; pass a Hugging Face *ForSequenceClassification model with num_labels=1 "
                     f"(a generative judge goes through r2m.adapters, or r2m.R2MJudgeModel)")


def find_body(model: nn.Module) -> nn.Module:
    """The transformer body a Hugging Face model runs before its head (its ``base_model_prefix`` attribute)."""
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is model:
        raise ValueError(f"{type(model).__name__} has no transformer body at `base_model_prefix` ({prefix!r}); "
                         f"pass a Hugging Face model")
    return body


def check_token_batch(input_ids: Tensor, attention_mask: Tensor | None) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (seq length 0): the reward model needs at least one token")


class R2MRewardModel(R2MModule):
    """A scalar reward model made policy-aware: r = head(w(t) H + (1 - w(t)) Ĥ) (paper Eq. 4).

    The wrapped model stays frozen; ``head`` is a float32 copy of its scoring head and trains with ``fusion``.
    The original head still gives the vanilla reward. Because the head is linear, the reward is computed in the
    equal split form w head(H) + (1 - w) head(Ĥ).
    """

    def __init__(self, reward_model: nn.Module, policy_hidden_size: int, config: R2MConfig | None = None):
        self.head_name = find_score_head(reward_model)
        find_body(reward_model)
        original = getattr(reward_model, self.head_name)
        head = nn.Linear(original.in_features, 1, bias=original.bias is not None, device=original.weight.device)
        with torch.no_grad():
            head.weight.copy_(original.weight)
            if original.bias is not None:
                head.bias.copy_(original.bias)
        super().__init__(original.in_features, policy_hidden_size, config, head)
        self.reward_model = reward_model.requires_grad_(False).eval()

    @property
    def original_head(self) -> nn.Linear:
        return getattr(self.reward_model, self.head_name)

    @torch.no_grad()
    def rte(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Reward-token embedding [B, D_rm]: the hidden state the RM's head reads, pooled as transformers pools it
        (the rightmost token that is not the pad token)."""
        check_token_batch(input_ids, attention_mask)
        device = self.original_head.weight.device
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        hidden = find_body(self.reward_model)(input_ids, attention_mask=attention_mask).last_hidden_state
        pad_id = self.reward_model.config.get_text_config().pad_token_id
        batch = input_ids.shape[0]
        if pad_id is None:
            if batch != 1:
                raise ValueError("the reward model's config has no pad_token_id, so (as in transformers) only "
                                 "batches of one can be scored; set reward_model.config.pad_token_id")
            last = torch.full((1,), input_ids.shape[1] - 1, device=device)
        else:
            positions = torch.arange(input_ids.shape[1], device=device, dtype=torch.int32)
            last = (positions * (input_ids != pad_id).to(torch.int32)).argmax(-1)
        return hidden[torch.arange(batch, device=device), last]

    def base_reward(self, rte: Tensor, base_rewards: Tensor | None = None) -> Tensor:
        """head(H): the trainable head on the reward-token embedding."""
        return self.head(rte).squeeze(-1)

    @torch.no_grad()
    def vanilla_reward_from_rte(self, rte: Tensor, base_rewards: Tensor | None = None) -> Tensor:
        """The wrapped reward model's own reward from its RTE, float32 [B]."""
        self._check_rte(rte)
        head = self.original_head
        return head(rte.to(device=head.weight.device, dtype=head.weight.dtype)).squeeze(-1).float()
