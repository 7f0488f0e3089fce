"""The RTE is the input of the reward model's final linear layer, for every supported reward-model family."""

import pytest
import torch
from torch import nn

import r2m
from r2m.benchmarks import tiny_models as tiny

POLICY_DIM = 16
TEXTS = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11", "w12", "w13 w14 w15 w16 w17", "w18 w19 w20 w21"]
FINAL_LINEAR = {"deberta-v2": "classifier", "modernbert": "classifier", "roberta": "classifier.out_proj"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def encode(tokenizer, side, texts=TEXTS):
    tokenizer.padding_side = side
    return tokenizer(texts, return_tensors="pt", padding=True)


def reference_rte(rm, family, enc):
    """The final linear layer's input, rebuilt from the body's hidden states and the family's own pooling."""
    body = getattr(rm, rm.base_model_prefix)
    hidden = body(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    if family == "deberta-v2":
        return rm.pooler(hidden)
    if family == "modernbert":
        return rm.head(hidden[:, 0])
    if family == "roberta":
        return torch.tanh(rm.classifier.dense(hidden[:, 0]))
    pad = rm.config.pad_token_id
    last = [max(j for j, token in enumerate(row) if token != pad) for row in enc.input_ids.tolist()]
    return hidden[torch.arange(len(last)), torch.tensor(last)]


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_head_of_rte_is_the_reward_model_logits(tokenizer, family, side):
    torch.manual_seed(3)
    rm = tiny.build_reward_model(tokenizer, family).eval()
    enc = encode(tokenizer, side)
    wrapped = r2m.wrap(rm, POLICY_DIM, r2m.R2MConfig(total_steps=4, attn_dim=8))
    assert wrapped.original_head is rm.get_submodule(FINAL_LINEAR.get(family, "score"))
    assert wrapped.head.weight.dtype == torch.float32 and wrapped.head is not wrapped.original_head
    rte = wrapped.rte(enc.input_ids, enc.attention_mask)
    with torch.no_grad():
        logits = rm(**enc).logits.squeeze(-1)
        torch.testing.assert_close(rte, reference_rte(rm, family, enc), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wrapped.head(rte).squeeze(-1), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wrapped.vanilla_reward_from_rte(rte), logits, atol=1e-5, rtol=1e-5)
    assert not wrapped.original_head._forward_hooks


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_untrained_r2m_keeps_the_reward_models_ranking(tokenizer, family):
    torch.manual_seed(4)
    rm = tiny.build_reward_model(tokenizer, family).eval()
    enc = encode(tokenizer, "right")
    wrapped = r2m.wrap(rm, POLICY_DIM, r2m.R2MConfig(total_steps=4, attn_dim=8, seed=0))
    rte = wrapped.rte(enc.input_ids, enc.attention_mask)
    with torch.no_grad():
        order = rm(**enc).logits.squeeze(-1).argsort()
    hidden, mask = torch.randn(len(TEXTS), 5, POLICY_DIM), torch.ones(len(TEXTS), 5, dtype=torch.bool)
    for step in range(5):
        assert torch.equal(wrapped.reward_from_rte(rte, hidden, mask, step).argsort(), order), step


def test_rte_runs_in_eval_mode_and_restores_the_mode(tokenizer):
    torch.manual_seed(5)
    rm = tiny.build_reward_model(tokenizer, "roberta", hidden_dropout_prob=0.5)
    wrapped = r2m.wrap(rm, POLICY_DIM, r2m.R2MConfig(total_steps=4, attn_dim=8))
    enc = encode(tokenizer, "right")
    expected = wrapped.rte(enc.input_ids, enc.attention_mask)
    wrapped.train()
    torch.testing.assert_close(wrapped.rte(enc.input_ids, enc.attention_mask), expected, atol=0, rtol=0)
    assert rm.training


def test_dropout_after_the_final_linear_is_accepted(tokenizer):
    torch.manual_seed(6)
    rm = tiny.build_reward_model(tokenizer, "llama").eval()
    rm.score = nn.Sequential(nn.Dropout(0.1), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 1)), nn.Dropout(0.1))
    wrapped = r2m.wrap(rm, POLICY_DIM, r2m.R2MConfig(total_steps=4, attn_dim=8))
    assert wrapped.head_name == "score.1.1" and wrapped.rm_dim == 32
    enc = encode(tokenizer, "left")
    rte = wrapped.rte(enc.input_ids, enc.attention_mask)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.head(rte).squeeze(-1), rm(**enc).logits.squeeze(-1), atol=1e-5, rtol=1e-5)


class ScaledHead(nn.Module):
    """Ends in a Linear, but squashes its score in the forward: invisible to the structure."""

    def __init__(self, hidden_size):
        super().__init__()
        self.out_proj = nn.Linear(hidden_size, 1)

    def forward(self, hidden):
        return torch.tanh(self.out_proj(hidden))


@pytest.mark.parametrize("head, message", [
    (lambda: nn.Sequential(nn.Linear(32, 1), nn.Tanh()),
     r"reward_model\.score \(Sequential\) ends in reward_model\.score\.1 \(Tanh\), so its score is not a linear "
     r"function of one nn\.Linear's input"),
    (lambda: nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.LayerNorm(32)), r"ends in reward_model\.score\.2 "
     r"\(LayerNorm\).*R2M needs a head that is, or ends in, an nn\.Linear\(hidden_size, 1\)"),
    (lambda: nn.Sequential(nn.Dropout(0.1)), r"reward_model\.score \(Sequential\) has no linear layer"),
    (lambda: nn.Sequential(nn.Linear(32, 2)), r"reward_model\.score\.0 has 2 outputs.*num_labels=1"),
])
def test_non_linear_heads_are_refused(tokenizer, head, message):
    rm = tiny.build_reward_model(tokenizer, "llama")
    rm.score = head()
    with pytest.raises(ValueError, match=message):
        r2m.wrap(rm, POLICY_DIM)


def test_a_score_changed_after_the_final_linear_is_refused_when_scoring(tokenizer):
    rm = tiny.build_reward_model(tokenizer, "qwen2").eval()
    rm.score = ScaledHead(32)
    wrapped = r2m.wrap(rm, POLICY_DIM, r2m.R2MConfig(total_steps=4, attn_dim=8))
    enc = encode(tokenizer, "right")
    with pytest.raises(ValueError, match=r"logits are not the output of reward_model\.score\.out_proj"):
        wrapped.rte(enc.input_ids, enc.attention_mask)
    assert not wrapped.original_head._forward_hooks


def test_policy_families_are_decoders(tokenizer):
    with pytest.raises(ValueError, match="a policy is a causal LM: family must be one of"):
        tiny.build_policy(tokenizer, "deberta-v2")
