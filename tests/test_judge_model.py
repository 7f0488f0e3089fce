"""R2MJudgeModel: R2M over a generative judge's hidden states (Eq. 4's split form)."""

from types import SimpleNamespace

import pytest
import torch

import r2m
from r2m.benchmarks import tiny_models as tiny

POLICY_DIM = 16


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture
def judge(tokenizer):
    torch.manual_seed(0)
    return tiny.build_policy(tokenizer, "qwen2", hidden_size=32)


def make(judge, **overrides):
    cfg = r2m.R2MConfig(**{"total_steps": 8, "lr": 1e-2, "attn_dim": 16, "seed": 0, **overrides})
    return r2m.wrap(SimpleNamespace(judge_model=judge), POLICY_DIM, cfg)


def test_wrap_dispatches_judges(judge):
    model = make(judge)
    assert isinstance(model, r2m.R2MJudgeModel) and model.rm_dim == 32
    assert torch.equal(model.head.bias, torch.zeros(1))
    with pytest.raises(TypeError, match="reward_model must be a torch nn.Module"):
        r2m.wrap(object(), POLICY_DIM)


def test_rte_is_last_attended_hidden_state_for_both_paddings(judge, tokenizer):
    model = make(judge)
    texts = ["w1 w2 w3 w4", "w5 w6"]
    out = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        out[side] = model.rte(enc.input_ids, enc.attention_mask)
    single = judge.model(tokenizer(["w5 w6"], return_tensors="pt").input_ids).last_hidden_state[0, -1]
    torch.testing.assert_close(out["right"][1], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["left"], out["right"], atol=1e-5, rtol=1e-5)


def test_untrained_reward_is_the_scaled_judge_reward(judge):
    model = make(judge)
    rte, hidden = torch.randn(6, 32), torch.randn(6, 5, POLICY_DIM)
    mask = torch.ones(6, 5, dtype=torch.bool)
    base = torch.randn(6)
    for step in range(9):
        torch.testing.assert_close(model.reward_from_rte(rte, hidden, mask, step, base_rewards=base),
                                   model.omega_at(step) * base)


def test_update_trains_fusion_and_head_only(judge):
    model = make(judge)
    before = {k: v.clone() for k, v in judge.state_dict().items()}
    rte, hidden = torch.randn(8, 32), torch.randn(8, 5, POLICY_DIM)
    mask = torch.ones(8, 5, dtype=torch.bool)
    base = torch.randn(8)
    head_before = model.head.weight.clone()
    for step in range(3):
        stats = model.update(rte, hidden, mask, base, group_size=4, step=step, base_rewards=base)
    assert stats["groups_used"] == 2
    assert all(torch.equal(v, judge.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(model.head.weight, head_before)
    assert torch.count_nonzero(model.fusion.o_proj.weight) > 0


def test_missing_or_nan_judge_rewards(judge):
    model = make(judge)
    rte, hidden = torch.randn(8, 32), torch.randn(8, 5, POLICY_DIM)
    mask = torch.ones(8, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="base_rewards .* is required for a judge"):
        model.reward_from_rte(rte, hidden, mask, 0)
    with pytest.raises(ValueError, match=r"base_rewards must have shape \[batch=8\]"):
        model.reward_from_rte(rte, hidden, mask, 0, base_rewards=torch.zeros(3))
    base = torch.randn(8)
    base[2] = float("nan")
    rewards = model.reward_from_rte(rte, hidden, mask, 0, base_rewards=base)
    assert torch.isnan(rewards[2]) and torch.isfinite(rewards[[0, 1, 3, 4, 5, 6, 7]]).all()
    stats = model.update(rte, hidden, mask, base, group_size=4, step=0, base_rewards=base)
    assert (stats["groups_used"], stats["groups_skipped"]) == (1, 1)


def test_checkpoint_round_trip_and_kind_check(judge, tokenizer, tmp_path):
    model = make(judge)
    rte, hidden, base = torch.randn(4, 32), torch.randn(4, 3, POLICY_DIM), torch.randn(4)
    mask = torch.ones(4, 3, dtype=torch.bool)
    model.update(rte, hidden, mask, base, 2, 1, base_rewards=base)
    model.save_pretrained(tmp_path / "judge")
    loaded = r2m.R2MJudgeModel.from_pretrained(judge, tmp_path / "judge")
    with pytest.warns(DeprecationWarning, match="the reward model comes first"):
        older = r2m.R2MJudgeModel.from_pretrained(tmp_path / "judge", judge)
    for restored in (loaded, older):
        assert isinstance(restored, r2m.R2MJudgeModel)
        assert all(torch.equal(a, b) for a, b in zip(model.trainable_parameters(), restored.trainable_parameters(),
                                                     strict=True))
    with pytest.raises(TypeError, match="from_pretrained takes the reward model"):
        r2m.R2MJudgeModel.from_pretrained(SimpleNamespace(judge_model=judge), tmp_path / "judge")
    rm = tiny.build_reward_model(tokenizer, "qwen2", hidden_size=32)
    scalar = r2m.wrap(rm, POLICY_DIM, model.config)
    with pytest.raises(ValueError, match="kind: checkpoint 'R2MJudgeModel' vs this model 'R2MRewardModel'"):
        scalar.load_state(tmp_path / "judge")
