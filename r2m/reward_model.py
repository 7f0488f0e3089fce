"""R2MRewardModel: R2M over a Hugging Face ``*ForSequenceClassification`` reward model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from r2m.base import R2MModule
from r2m.config import R2MConfig

HEAD_NAMES = ("score", "classifier", "v_head", "value_head")
# Layers that hand their input on unchanged in eval mode: only these may follow a head's final linear layer.
PASS_THROUGH = (nn.Dropout, nn.Identity, nn.Flatten)


def find_score_head(reward_model: nn.Module) -> str:
    """Name of the scoring head of a Hugging Face ``*ForSequenceClassification`` reward model, one of `HEAD_NAMES`:
    an nn.Linear(hidden_size, 1), or a module whose last layer is one (RoBERTa's classification head)."""
    for name in HEAD_NAMES:
        module = getattr(reward_model, name, None)
        if module is not None:
            _final_linear(module, name)
            return name
    raise ValueError(f"reward_model ({type(reward_model).__name__}) has no linear scoring head named one of "
                     f"{HEAD_NAMES}; pass a Hugging Face *ForSequenceClassification model with num_labels=1 "
                     f"(a generative judge goes through r2m.adapters, or r2m.R2MJudgeModel)")


def find_final_linear(reward_model: nn.Module) -> str:
    """Dotted name of the final linear layer of the reward model's scoring head, the layer whose input R2M uses as
    the reward-token embedding: ``score`` (decoders), ``classifier`` (DeBERTa, ModernBERT), ``classifier.out_proj``
    (RoBERTa)."""
    name = find_score_head(reward_model)
    return _final_linear(getattr(reward_model, name), name)


def _final_linear(module: object, path: str) -> str:
    """The dotted path (below the reward model) of the nn.Linear that computes ``module``'s output last."""
    if isinstance(module, nn.Linear):
        if module.out_features != 1:
            raise ValueError(f"reward_model.{path} has {module.out_features} outputs; a reward model scores with "
                             f"one (num_labels=1)")
        return path
    if not isinstance(module, nn.Module):
        raise ValueError(f"reward_model.{path} is a {type(module).__name__}, not a scoring head: R2M needs a reward "
                         f"model whose head is, or ends in, one nn.Linear(hidden_size, 1)")
    layers = [(name, child) for name, child in module.named_children() if not isinstance(child, PASS_THROUGH)]
    if layers:
        name, last = layers[-1]
        if isinstance(last, nn.Linear) or next(last.children(), None) is not None:
            return _final_linear(last, f"{path}.{name}")
        culprit = f"ends in reward_model.{path}.{name} ({type(last).__name__})"
    else:
        culprit = "has no linear layer"
    raise ValueError(f"reward_model.{path} ({type(module).__name__}) {culprit}, so its score is not a linear "
                     f"function of one nn.Linear's input: R2M needs a head that is, or ends in, an "
                     f"nn.Linear(hidden_size, 1) (only dropout may follow it)")


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

    The wrapped model stays frozen. H, the reward-token embedding, is the input of the model's final linear layer
    (whatever pooler or prediction head runs before it), so ``head``, a float32 copy of that layer trained with
    ``fusion``, reproduces the model's reward exactly; ``original_head`` is the layer itself (the vanilla reward).
    Because the head is linear, the reward is computed in the equal split form w head(H) + (1 - w) head(Ĥ).
    """

    def __init__(self, reward_model: nn.Module, policy_hidden_size: int, config: R2MConfig | None = None):
        if not isinstance(reward_model, nn.Module):
            raise TypeError(f"reward_model must be a torch nn.Module (a Hugging Face *ForSequenceClassification "
                            f"model), got {type(reward_model).__name__}")
        self.head_name = find_final_linear(reward_model)
        original = reward_model.get_submodule(self.head_name)
        head = nn.Linear(original.in_features, 1, bias=original.bias is not None, device=original.weight.device,
                         dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(original.weight)
            if original.bias is not None:
                head.bias.copy_(original.bias)
        super().__init__(original.in_features, policy_hidden_size, config, head)
        self.reward_model = reward_model.requires_grad_(False).eval()

    @property
    def original_head(self) -> nn.Linear:
        """The reward model's own final linear layer: the vanilla reward is ``original_head(rte)``."""
        return self.reward_model.get_submodule(self.head_name)

    @torch.no_grad()
    def rte(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Reward-token embedding [B, D_rm] (the reward model's dtype): the input of its final linear layer in its own
        forward, in eval mode. A decoder scores every position and transformers pools the scores at the rightmost
        token that is not the pad token; its RTE is the layer's input at that token."""
        check_token_batch(input_ids, attention_mask)
        device = next(self.reward_model.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        calls: list[tuple[Tensor, Tensor]] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            calls.append((args[0] if args else kwargs["input"], output))

        handle = self.original_head.register_forward_hook(capture, with_kwargs=True)
        training = self.reward_model.training
        try:
            output = self.reward_model.eval()(input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
            self.reward_model.train(training)
        if len(calls) != 1:
            raise ValueError(f"reward_model.{self.head_name} ran {len(calls)} times in one forward of "
                             f"{type(self.reward_model).__name__}; R2M needs the final linear layer to score each "
                             f"batch once")
        features, scores = calls[0]
        batch = input_ids.shape[0]
        if features.dim() == 3 and features.shape[0] == batch:
            rows = torch.arange(batch, device=features.device)
            last = self._last_token(input_ids.to(features.device))
            features, scores = features[rows, last], scores[rows, last]
        elif features.dim() != 2 or features.shape[0] != batch:
            raise ValueError(f"the input of reward_model.{self.head_name} has shape {tuple(features.shape)}; R2M "
                             f"expects [batch={batch}, {self.rm_dim}] (a pooled encoder) or [batch={batch}, seq, "
                             f"{self.rm_dim}] (a decoder)")
        self._check_logits(getattr(output, "logits", output), scores, batch)
        return features

    def _last_token(self, input_ids: Tensor) -> Tensor:
        """The position transformers pools a decoder's scores at: the rightmost non-pad token (the last one when
        the config has no pad token, which transformers allows for batches of one)."""
        pad_id = self.reward_model.config.get_text_config().pad_token_id
        if pad_id is None:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int32)
        return (positions * (input_ids != pad_id).to(torch.int32)).argmax(-1)

    def _check_logits(self, logits: object, scores: Tensor, batch: int) -> None:
        """The model's logits must be the final linear layer's pooled output, or head(rte) is not its reward."""
        if not isinstance(logits, Tensor) or logits.numel() != batch:
            raise ValueError(f"{type(self.reward_model).__name__} returned no logits of shape [batch={batch}, 1]; R2M "
                             f"wraps *ForSequenceClassification models with num_labels=1")
        scores, logits = scores.reshape(batch).to(logits.dtype), logits.reshape(batch)
        if not bool(((scores == logits) | (scores.isnan() & logits.isnan())).all()):
            raise ValueError(f"{type(self.reward_model).__name__}'s logits are not the output of reward_model."
                             f"{self.head_name} at the token transformers pools (the rightmost non-pad one): its "
                             f"forward changes or pools the score after that layer, so the reward is not a linear "
                             f"function of the layer's input and R2M cannot reproduce it")

    def base_reward(self, rte: Tensor, base_rewards: Tensor | None = None) -> Tensor:
        """head(H): the trainable head on the reward-token embedding."""
        return self.head(rte).squeeze(-1)

    @torch.no_grad()
    def vanilla_reward_from_rte(self, rte: Tensor, base_rewards: Tensor | None = None) -> Tensor:
        """The wrapped reward model's own reward from its RTE, float32 [B]."""
        self._check_rte(rte)
        head = self.original_head
        return head(rte.to(device=head.weight.device, dtype=head.weight.dtype)).squeeze(-1).float()
