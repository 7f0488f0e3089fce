"""Mode ``anchored``: GREBT plus a weighted Bradley-Terry term on labelled pairs of the policy's own samples; and the
random-init fusion option."""

import copy
import math

import pytest
import torch

import r2m
from r2m import losses
from r2m.benchmarks import tiny_models as tiny

POLICY_DIM, GROUP = 24, 4


@pytest.fixture
def reward_model():
    torch.manual_seed(0)
    return tiny.build_reward_model(tiny.build_tokenizer(), "llama", hidden_size=32)


def make(reward_model, **overrides):
    cfg = r2m.R2MConfig(**{"total_steps": 10, "lr": 1e-2, "attn_dim": 16, "num_heads": 2, "seed": 0,
                           "mode": "anchored", "anchor_weight": 0.7, "max_grad_norm": None, **overrides})
    model = r2m.wrap(reward_model, POLICY_DIM, cfg)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.2)
    return model


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    rte = torch.randn(3 * GROUP, 32, generator=generator)
    hidden = torch.randn(3 * GROUP, 6, POLICY_DIM, generator=generator)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (3 * GROUP,), generator=generator)[:, None]
    rewards = torch.randn(3 * GROUP, generator=generator)
    labels = torch.randn(3 * GROUP, generator=generator)
    labels[GROUP:2 * GROUP] = math.nan  # group 1 unlabelled
    labels[2 * GROUP] = math.nan  # group 2 partly labelled: no labelled pair either
    labels[:GROUP] = torch.tensor([0.1, 2.0, -1.0, 0.5])  # group 0: winner 1, loser 2
    return rte, hidden, mask, rewards, labels


def test_anchored_loss_and_gradients_match_a_float64_reference(reward_model):
    model = make(reward_model)
    rte, hidden, mask, rewards, labels = batch(seed=3)
    reference = copy.deepcopy(model)
    reference.fusion.double(), reference.head.double()
    reference.fusion.impl = "naive"
    step = 4
    w = r2m.omega(step, 10, 0.6)
    h64 = torch.where(mask[..., None], hidden.double(), 0.0)
    fused = w * rte.double() + (1 - w) * reference.fusion(rte.double(), h64, mask)
    scores = reference.head(fused).squeeze(-1).view(3, GROUP)
    winner, loser, valid = losses.select_pairs(rewards.double().view(3, GROUP))
    grebt = losses.grebt_loss(scores, winner, loser, 0.3, valid)
    anchor = losses.bt_loss(scores[0, 1], scores[0, 2])  # the only labelled pair: labels 2.0 over -1.0
    (grebt + 0.7 * anchor).backward()

    fusion_before = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    body_before = {k: v.clone() for k, v in model.reward_model.state_dict().items()}
    stats = model.update(rte, hidden, mask, rewards, GROUP, step, labels=labels)
    assert stats["groups_labelled"] == 1.0 and stats["groups_used"] == 3.0
    assert stats["anchor_bt"] == pytest.approx(anchor.item(), rel=1e-5)
    assert stats["loss"] == pytest.approx((grebt + 0.7 * anchor).item(), rel=1e-5)
    trained = {id(p) for p in model.trainable_parameters()}
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters(), strict=False):
        if id(param) in trained:
            torch.testing.assert_close(param.grad.double(), ref.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert any(not torch.equal(v, fusion_before[k]) for k, v in model.fusion.state_dict().items())
    for key, value in model.reward_model.state_dict().items():  # only fusion and head train
        assert torch.equal(value, body_before[key]), key


def pairwise_bt(scores, labels):
    """Mean over every pair i, j with labels[i] > labels[j] of -log sigmoid(scores[i] - scores[j]), by loops."""
    terms = [-torch.nn.functional.logsigmoid(scores[i] - scores[j])
             for i in range(len(labels)) for j in range(len(labels)) if labels[i] > labels[j]]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("label_term", ["fused", "trained"])
@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("label_pairs", ["extremes", "all"])
def test_label_options_match_a_float64_reference(reward_model, label_term, replace, label_pairs):
    model = make(reward_model, label_term=label_term, labels_replace_pseudo=replace, label_pairs=label_pairs,
                 update_steps=2)
    rte, hidden, mask, rewards, labels = batch(seed=13)
    reference = copy.deepcopy(model)
    reference.fusion.double(), reference.head.double()
    reference.fusion.impl = "naive"
    reference.optimizer = torch.optim.Adam(reference.trainable_parameters(), lr=1e-2)
    step = 6
    w = r2m.omega(step, 10, 0.6)
    h64 = torch.where(mask[..., None], hidden.double(), 0.0)
    winner, loser, valid = losses.select_pairs(rewards.double().view(3, GROUP))
    if replace:
        valid[0] = False  # group 0 has the labelled pair: its pseudo-label pair goes
    for _ in range(2):
        reference.optimizer.zero_grad()
        attended = reference.fusion(rte.double(), h64, mask)
        scores = reference.head(w * rte.double() + (1 - w) * attended).squeeze(-1).view(3, GROUP)
        labelled = scores if label_term == "fused" else reference.head(attended).squeeze(-1).view(3, GROUP)
        if label_pairs == "extremes":
            anchor = losses.bt_loss(labelled[0, 1], labelled[0, 2])  # labels 2.0 over -1.0
        else:
            anchor = pairwise_bt(labelled[0], labels[:GROUP].tolist())
        loss = losses.grebt_loss(scores, winner, loser, 0.3, valid) + 0.7 * anchor
        loss.backward()
        reference.optimizer.step()

    stats = model.update(rte, hidden, mask, rewards, GROUP, step, labels=labels)
    assert stats["anchor_bt"] == pytest.approx(anchor.item(), rel=1e-4)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-4)
    for param, ref in zip(model.trainable_parameters(), reference.trainable_parameters(), strict=True):
        torch.testing.assert_close(param.detach().double(), ref.detach(), atol=1e-5, rtol=1e-4)


def test_the_label_term_changes_the_update_only_where_labels_are_given(reward_model):
    rte, hidden, mask, rewards, labels = batch(seed=15)
    weights = {}
    for term in ("fused", "trained"):
        for given in (None, labels):
            torch.manual_seed(0)
            model = make(copy.deepcopy(reward_model), label_term=term, labels_replace_pseudo=True)
            model.update(rte, hidden, mask, rewards, GROUP, 3, labels=given)
            weights[term, given is None] = torch.cat([p.detach().flatten() for p in model.trainable_parameters()])
    torch.testing.assert_close(weights["fused", True], weights["trained", True], rtol=0, atol=0)
    assert not torch.allclose(weights["fused", False], weights["trained", False])


def test_without_labels_anchored_is_the_full_method(reward_model):
    rte, hidden, mask, rewards, _ = batch(seed=5)
    stats = {}
    for mode in ("anchored", "r2m"):
        torch.manual_seed(0)
        model = make(copy.deepcopy(reward_model), mode=mode)
        stats[mode] = model.update(rte, hidden, mask, rewards, GROUP, 2)
        stats[mode + "_weights"] = [p.detach().clone() for p in model.trainable_parameters()]
    assert stats["anchored"]["groups_labelled"] == 0 and stats["anchored"]["anchor_bt"] == 0
    for a, b in zip(stats["anchored_weights"], stats["r2m_weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_head_only_with_labels_is_the_control_and_trains_only_the_head(reward_model):
    model = make(reward_model, mode="head_only")
    rte, _, _, rewards, labels = batch(seed=7)
    fusion_before = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    stats = model.update(rte, None, None, rewards, GROUP, 2, labels=labels)
    assert stats["groups_labelled"] == 1.0 and stats["anchor_bt"] > 0
    assert all(torch.equal(v, fusion_before[k]) for k, v in model.fusion.state_dict().items())


def test_labels_are_refused_where_the_mode_does_not_use_them_and_checked(reward_model):
    rte, hidden, mask, rewards, labels = batch(seed=9)
    with pytest.raises(ValueError, match=r"labels are used in modes \('anchored', 'head_only'\)"):
        make(copy.deepcopy(reward_model), mode="r2m").update(rte, hidden, mask, rewards, GROUP, 2, labels=labels)
    with pytest.raises(ValueError, match=r"labels must have shape \[batch=12\]"):
        make(copy.deepcopy(reward_model)).update(rte, hidden, mask, rewards, GROUP, 2, labels=labels[:5])


def test_random_fusion_init_makes_the_untrained_r2m_differ_from_its_rm(reward_model):
    rte, hidden, mask, _, _ = batch(seed=11)
    zero = r2m.wrap(copy.deepcopy(reward_model), POLICY_DIM, r2m.R2MConfig(total_steps=10, attn_dim=16, seed=0))
    random = r2m.wrap(copy.deepcopy(reward_model), POLICY_DIM,
                      r2m.R2MConfig(total_steps=10, attn_dim=16, seed=0, fusion_init="random"))
    assert torch.count_nonzero(zero.fusion.o_proj.weight) == 0 and torch.count_nonzero(random.fusion.o_proj.weight) > 0
    vanilla = zero.vanilla_reward_from_rte(rte)
    w = r2m.omega(8, 10, 0.6)
    offset = (1 - w) * zero.head(torch.zeros(32)).detach()  # head(Ĥ = 0): its bias, if it has one
    torch.testing.assert_close(zero.reward_from_rte(rte, hidden, mask, 8), w * vanilla + offset)
    assert not torch.allclose(random.reward_from_rte(rte, hidden, mask, 8), zero.reward_from_rte(rte, hidden, mask, 8))


def test_labelled_bt_loss_over_all_pairs_matches_loops_and_skips_unlabelled_groups():
    generator = torch.Generator().manual_seed(21)
    rewards = torch.randn(4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.tensor([[0.3, 1.0, 1.0, -2.0, 0.0], [1.0] * 5, [0.5, math.nan, 0.1, 0.2, 0.3],
                           [5.0, 4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    loss, valid = losses.labelled_bt_loss(rewards, labels, "all")
    assert valid.tolist() == [True, False, False, True]  # all tied; partly unlabelled
    for g in (0, 3):
        torch.testing.assert_close(loss[g], pairwise_bt(rewards[g], labels[g].tolist()))
    assert torch.isfinite(loss).all()
    loss[valid].sum().backward()
    assert torch.isfinite(rewards.grad).all() and rewards.grad[1].abs().sum() == 0
    extremes, valid = losses.labelled_bt_loss(rewards.detach(), labels, "extremes")
    torch.testing.assert_close(extremes[3], -torch.nn.functional.logsigmoid(rewards[3, 0] - rewards[3, 4]).detach())
    with pytest.raises(ValueError, match="pairs must be 'extremes' or 'all', got 'some'"):
        losses.labelled_bt_loss(rewards, labels, "some")
    with pytest.raises(ValueError, match=r"labels must have the shape of rewards \(4, 5\)"):
        losses.labelled_bt_loss(rewards, labels[:, :3], "all")


def test_label_replay_adds_earlier_labelled_groups_as_a_float64_reference_does(reward_model):
    model = make(reward_model, label_replay=4)
    reference = copy.deepcopy(model)
    reference.fusion.double(), reference.head.double()
    reference.fusion.impl = "naive"
    reference.optimizer = torch.optim.Adam(reference.trainable_parameters(), lr=1e-2)
    kept = []  # (rte, hidden, mask, labels) of the labelled group 0 of each earlier batch
    for update, (seed, step) in enumerate(((17, 3), (19, 4), (23, 5))):
        rte, hidden, mask, rewards, labels = batch(seed)
        w = r2m.omega(step, 10, 0.6)

        def scores(rte, hidden, mask, w=w):
            h64 = torch.where(mask[..., None], hidden.double(), 0.0)
            return reference.head(w * rte.double() + (1 - w) * reference.fusion(rte.double(), h64, mask)).squeeze(-1)

        reference.optimizer.zero_grad()
        fused = scores(rte, hidden, mask).view(3, GROUP)
        winner, loser, valid = losses.select_pairs(rewards.double().view(3, GROUP))
        terms = [losses.bt_loss(fused[0, 1], fused[0, 2])]  # this batch's labelled group: labels 2.0 over -1.0
        terms += [losses.bt_loss(*scores(*old[:3])[[1, 2]]) for old in kept]  # the same pair in earlier batches
        anchor = torch.stack(terms).mean()
        loss = losses.grebt_loss(fused, winner, loser, 0.3, valid) + 0.7 * anchor
        loss.backward()
        reference.optimizer.step()
        kept.append((rte[:GROUP], hidden[:GROUP], mask[:GROUP], labels[:GROUP]))

        stats = model.update(rte, hidden, mask, rewards, GROUP, step, labels=labels)
        assert stats["groups_replayed"] == update and stats["groups_labelled"] == 1
        assert stats["anchor_bt"] == pytest.approx(anchor.item(), rel=1e-4)
        for param, ref in zip(model.trainable_parameters(), reference.trainable_parameters(), strict=True):
            torch.testing.assert_close(param.detach().double(), ref.detach(), atol=1e-5, rtol=1e-4)
    assert len(model.replayed_groups) == 3


def test_label_replay_keeps_at_most_its_size_and_runs_without_policy_states(reward_model):
    model = make(reward_model, mode="head_only", label_replay=2)
    for update, seed in enumerate((29, 31, 37, 41)):
        rte, _, _, rewards, labels = batch(seed)
        stats = model.update(rte, None, None, rewards, GROUP, 2, labels=labels)
        assert stats["groups_replayed"] == min(update, 2) and math.isfinite(stats["anchor_bt"])
    assert len(model.replayed_groups) == 2 and model.replayed_groups[0].states is None
    no_replay = make(copy.deepcopy(reward_model), mode="head_only")
    assert no_replay.update(rte, None, None, rewards, GROUP, 2, labels=labels)["groups_replayed"] == 0


def test_label_replay_refuses_a_context_and_is_checked(reward_model):
    model = make(reward_model, label_replay=2)
    rte, _, _, rewards, labels = batch(43)

    def context(u):
        raise AssertionError("the update refuses label_replay with a context before it attends")

    with pytest.raises(ValueError, match="label_replay keeps the labelled groups' policy states: pass them as tensors"):
        model.update(rte, None, None, rewards, GROUP, 2, context=context, labels=labels)
    with pytest.raises(ValueError, match=r"R2MConfig.label_replay must be an int >= 0, got -1"):
        r2m.R2MConfig(label_replay=-1)
