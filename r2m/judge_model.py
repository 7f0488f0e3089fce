"""R2MJudgeModel: R2M over a generative judge, r = w(t) r_judge + (1 - w(t)) phi(Ĥ): the split form of the paper's
Eq. 4 (exact for a linear head) with the judge's own score in place of phi(H)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from r2m.base import R2MModule
from r2m.config import R2MConfig
from r2m.hf_models import find_body
from r2m.reward_model import check_token_batch


class R2MJudgeModel(R2MModule):
    """A generative judge (any Hugging Face LM) made policy-aware.

    The judge's own score r_judge is the base reward; its last hidden state at the end of its input is the RTE;
    ``head`` is a fresh linear phi (bias zero), so an untrained R2M ranks responses exactly as the judge does.
    """

    def __init__(self, judge_model: nn.Module, policy_hidden_size: int, config: R2MConfig | None = None):
        body = find_body(judge_model)
        hidden_size = judge_model.config.get_text_config().hidden_size
        device = next(body.parameters()).device
        head = nn.Linear(hidden_size, 1, device=device)
        nn.init.zeros_(head.bias)
        super().__init__(hidden_size, policy_hidden_size, config, head)
        self.judge_model = judge_model.requires_grad_(False).eval()

    @torch.no_grad()
    def rte(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The judge's last-layer hidden state at the last attended token of each input [B, D_judge]."""
        check_token_batch(input_ids, attention_mask)
        body = find_body(self.judge_model)
        device = next(body.parameters()).device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        hidden = body(input_ids, attention_mask=attention_mask).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=device)
        last = (positions * (attention_mask != 0)).argmax(-1)
        return hidden[torch.arange(input_ids.shape[0], device=device), last]

    def base_reward(self, rte: Tensor, base_rewards: Tensor | None) -> Tensor:
        """The judge's score for each sample (a constant of the update)."""
        if base_rewards is None:
            raise ValueError("base_rewards (the judge's own rewards, one per sample) is required for a judge")
        base_rewards = torch.as_tensor(base_rewards, dtype=torch.float32, device=self.head.weight.device)
        if base_rewards.shape != (rte.shape[0],):
            raise ValueError(f"base_rewards must have shape [batch={rte.shape[0]}], got {tuple(base_rewards.shape)}")
        return base_rewards

    @torch.no_grad()
    def vanilla_reward_from_rte(self, rte: Tensor, base_rewards: Tensor | None = None) -> Tensor:
        """The judge's own reward (NaN where it gave none)."""
        return self.base_reward(self._check_rte(rte), base_rewards)
