"""``fused_scale="base_spread"``: the trained term of the reward is bounded to the base reward's within-group spread."""

import copy
import json

import pytest
import torch

import r2m
from r2m import losses
from r2m.benchmarks import tiny_models as tiny

POLICY_DIM, GROUP, GROUPS = 24, 4, 3


@pytest.fixture
def reward_model():
    torch.manual_seed(0)
    return tiny.build_reward_model(tiny.build_tokenizer(), "llama", hidden_size=32)


def make(reward_model, o_proj_std=3.0, **overrides):
    cfg = r2m.R2MConfig(**{"total_steps": 10, "lr": 1e-2, "attn_dim": 16, "num_heads": 2, "seed": 0,
                           "max_grad_norm": None, "fused_scale": "base_spread", **overrides})
    model = r2m.wrap(reward_model, POLICY_DIM, cfg)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=o_proj_std)
    return model


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    rte = torch.randn(GROUPS * GROUP, 32, generator=generator)
    hidden = torch.randn(GROUPS * GROUP, 6, POLICY_DIM, generator=generator)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (GROUPS * GROUP,), generator=generator)[:, None]
    rewards = torch.randn(GROUPS * GROUP, generator=generator)
    return rte, hidden, mask, rewards


def reference_parts(model, rte, hidden, mask):
    """head(H) and head(Ĥ) in float64 with the naive attention (an independent computation)."""
    reference = copy.deepcopy(model)
    reference.fusion.double(), reference.head.double()
    reference.fusion.impl = "naive"
    h64 = torch.where(mask[..., None], hidden.double(), 0.0)
    base = reference.head(rte.double()).squeeze(-1)
    trained = reference.head(reference.fusion(rte.double(), h64, mask)).squeeze(-1)
    return reference, base, trained


def spread(x):
    return x.view(-1, GROUP).std(dim=1, correction=0).mean()


def test_config_names_the_choices():
    with pytest.raises(ValueError, match="fused_scale must be one of"):
        r2m.R2MConfig(fused_scale="group")


def test_update_bounds_the_trained_spread_and_matches_a_float64_reference(reward_model):
    model = make(reward_model)
    rte, hidden, mask, rewards = batch(seed=1)
    step = 6
    w = r2m.omega(step, 10, 0.6)
    reference, base, trained = reference_parts(model, rte, hidden, mask)
    kappa = min(1.0, float(spread(base.detach()) / spread(trained.detach())))
    assert kappa < 0.5  # the set-up: a trained term far wider than the RM's own
    scores = (w * base + (1 - w) * kappa * trained).view(GROUPS, GROUP)
    winner, loser, valid = losses.select_pairs(rewards.double().view(GROUPS, GROUP))
    loss = losses.grebt_loss(scores, winner, loser, 0.3, valid)
    loss.backward()

    assert model.fused_scale_factor == 1.0  # before any update, the paper's mix
    stats = model.update(rte, hidden, mask, rewards, GROUP, step)
    assert stats["fused_scale"] == pytest.approx(kappa, rel=1e-5) == model.fused_scale_factor
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters(), strict=False):
        if param.requires_grad and ref.grad is not None:
            torch.testing.assert_close(param.grad.double(), ref.grad, atol=1e-6, rtol=1e-4, msg=name)
    # scoring uses kappa from then on: w head(H) + (1 - w) kappa head(Ĥ) with the updated weights
    _, base_after, trained_after = reference_parts(model, rte, hidden, mask)
    expected = w * base_after + (1 - w) * kappa * trained_after
    got = model.reward_from_rte(rte, torch.where(mask[..., None], hidden, 0.0), mask, step)
    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    # at the batch it was measured on, the bounded trained term spreads exactly as wide as the base reward
    assert float(spread(kappa * trained.detach())) == pytest.approx(float(spread(base.detach())), rel=1e-9)


def test_a_trained_term_narrower_than_the_base_is_not_amplified(reward_model):
    model = make(reward_model, o_proj_std=1e-4)
    rte, hidden, mask, rewards = batch(seed=2)
    stats = model.update(rte, hidden, mask, rewards, GROUP, 3)
    assert stats["fused_scale"] == 1.0


def test_untrained_zero_init_fusion_still_scores_like_the_rm(reward_model):
    model = make(reward_model, o_proj_std=0.0)
    torch.nn.init.zeros_(model.fusion.o_proj.weight)
    rte, hidden, mask, rewards = batch(seed=3)
    model.update(rte, hidden, mask, rewards, GROUP, 0)  # a zero trained spread leaves kappa at 1
    assert model.fused_scale_factor == 1.0


def test_mode_none_is_the_paper_mix_bit_for_bit(reward_model):
    rte, hidden, mask, rewards = batch(seed=4)
    paper = make(copy.deepcopy(reward_model), fused_scale="none")
    bounded = make(copy.deepcopy(reward_model), fused_scale="base_spread")
    bounded.load_state_dict(paper.state_dict())
    torch.testing.assert_close(bounded.reward_from_rte(rte, hidden, mask, 5),
                               paper.reward_from_rte(rte, hidden, mask, 5), rtol=0, atol=0)  # kappa starts at 1
    stats = paper.update(rte, hidden, mask, rewards, GROUP, 5)
    assert stats["fused_scale"] == 1.0 == paper.fused_scale_factor


def test_checkpoint_keeps_kappa_and_old_checkpoints_load_with_one(reward_model, tmp_path):
    model = make(reward_model)
    rte, hidden, mask, rewards = batch(seed=5)
    model.update(rte, hidden, mask, rewards, GROUP, 2)
    assert model.fused_scale_factor < 1
    model.save_pretrained(tmp_path / "ckpt")
    loaded = r2m.R2MRewardModel.from_pretrained(reward_model, tmp_path / "ckpt")
    assert loaded.fused_scale_factor == model.fused_scale_factor
    torch.testing.assert_close(loaded.reward_from_rte(rte, hidden, mask, 2),
                               model.reward_from_rte(rte, hidden, mask, 2), rtol=0, atol=0)
    meta_path = tmp_path / "ckpt" / "r2m_config.json"
    meta = json.loads(meta_path.read_text())
    state = json.loads((tmp_path / "ckpt" / "r2m_state.json").read_text())
    del state["fused_scale_factor"], meta["config"]["fused_scale"]  # written before the option existed
    (tmp_path / "ckpt" / "r2m_state.json").write_text(json.dumps(state))
    meta_path.write_text(json.dumps(meta))
    old = r2m.R2MRewardModel.from_pretrained(reward_model, tmp_path / "ckpt")
    assert old.config.fused_scale == "none"
    assert old.fused_scale_factor == 1.0


def test_head_only_and_non_finite_groups(reward_model):
    model = make(reward_model, mode="head_only")
    rte, hidden, mask, rewards = batch(seed=6)
    assert model.update(rte, None, None, rewards, GROUP, 1)["fused_scale"] == 1.0  # both terms are head(H)
    model = make(copy.deepcopy(reward_model))
    hidden[0, 0, 0] = float("nan")  # group 0 is skipped: kappa comes from groups 1 and 2 only
    _, base, trained = reference_parts(model, rte[GROUP:], torch.where(mask[GROUP:, :, None], hidden[GROUP:], 0.0),
                                       mask[GROUP:])
    stats = model.update(rte, hidden, mask, rewards, GROUP, 1)
    assert stats["groups_skipped"] == 1.0
    assert stats["fused_scale"] == pytest.approx(min(1.0, float(spread(base.detach()) / spread(trained.detach()))),
                                                 rel=1e-5)
