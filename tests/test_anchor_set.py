"""A fixed anchor set of preference pairs (`r2m.AnchorBatch`) in the update of modes ``anchored`` and ``head_only``:
GREBT plus anchor_weight x the Bradley-Terry loss of the pairs' R2M rewards."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from test_anchored import GROUP, POLICY_DIM, make

import r2m
from r2m import losses
from r2m.benchmarks import tiny_models as tiny

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import gloo

RM_DIM, PAIRS = 32, 3


def build_rm():
    torch.manual_seed(0)
    return tiny.build_reward_model(tiny.build_tokenizer(), "llama", hidden_size=RM_DIM)


@pytest.fixture
def reward_model():
    return build_rm()


def batch(seed, samples=3 * GROUP):
    generator = torch.Generator().manual_seed(seed)
    rte = torch.randn(samples, RM_DIM, generator=generator)
    hidden = torch.randn(samples, 6, POLICY_DIM, generator=generator)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (samples,), generator=generator)[:, None]
    rewards = torch.randn(samples, generator=generator)
    return rte, hidden, mask, rewards


def anchor_set(seed, pairs=PAIRS, states=True):
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected = (torch.randn(pairs, RM_DIM, generator=generator) for _ in range(2))
    if not states:
        return r2m.AnchorBatch(chosen, rejected)
    lengths = torch.randint(1, 6, (2 * pairs,), generator=generator)
    hidden = torch.randn(int(lengths.sum()), POLICY_DIM, generator=generator)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return r2m.AnchorBatch(chosen, rejected, hidden, cu_seqlens)


def padded(anchor):
    """The anchor set's 2P packed states as padded [2P, S, D] + mask (for the reference)."""
    lengths = anchor.cu_seqlens.diff()
    hidden = torch.zeros(len(lengths), int(lengths.max()), POLICY_DIM, dtype=torch.float64)
    for i, (start, length) in enumerate(zip(anchor.cu_seqlens[:-1].tolist(), lengths.tolist(), strict=True)):
        hidden[i, :length] = anchor.hidden[start:start + length].double()
    return hidden, torch.arange(hidden.shape[1])[None, :] < lengths[:, None]


def reference_rewards(reference, rte, hidden, mask, w):
    """Float64 R2M rewards w head(H) + (1 - w) head(fusion(H, h)) with the naive attention (head(H) in head_only)."""
    if reference.config.mode == "head_only":
        return reference.head(rte.double()).squeeze(-1)
    h64 = torch.where(mask[..., None], hidden.double(), 0.0)
    return reference.head(w * rte.double() + (1 - w) * reference.fusion(rte.double(), h64, mask)).squeeze(-1)


def float64_reference(model):
    reference = copy.deepcopy(model)
    reference.fusion.double(), reference.head.double()
    reference.fusion.impl = "naive"
    return reference


def assert_grads_match(model, reference):
    trained = {id(p) for p in model.trainable_parameters()}
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if id(param) in trained:
            torch.testing.assert_close(param.grad.double(), ref.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", ["anchored", "head_only"])
def test_anchor_set_loss_and_gradients_match_a_float64_reference(reward_model, mode):
    model = make(reward_model, mode=mode)
    rte, hidden, mask, rewards = batch(seed=3)
    anchor = anchor_set(seed=4, states=mode == "anchored")
    anchor.rejected_rte[2, 0] = math.nan  # pair 2 is unusable: left out of the term
    reference = float64_reference(model)
    step = 4
    w = r2m.omega(step, 10, 0.6)
    scores = reference_rewards(reference, rte, hidden, mask, w).view(3, GROUP)
    winner, loser, valid = losses.select_pairs(rewards.double().view(3, GROUP))
    grebt = losses.grebt_loss(scores, winner, loser, 0.3, valid)
    if mode == "anchored":
        anchor_hidden, anchor_mask = padded(anchor)
        set_rewards = reference_rewards(reference, anchor.rte.nan_to_num(), anchor_hidden, anchor_mask, w)
    else:
        set_rewards = reference.head(anchor.rte.nan_to_num().double()).squeeze(-1)
    set_bt = losses.bt_loss(set_rewards[:2], set_rewards[PAIRS:PAIRS + 2]).mean()  # pairs 0 and 1
    (grebt + 0.7 * set_bt).backward()

    fusion_before = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    body_before = {k: v.clone() for k, v in model.reward_model.state_dict().items()}
    stats = model.update(rte, hidden if mode == "anchored" else None, mask if mode == "anchored" else None,
                         rewards, GROUP, step, anchor=anchor)
    assert stats["anchor_set_bt"] == pytest.approx(set_bt.item(), rel=1e-5)
    assert stats["loss"] == pytest.approx((grebt + 0.7 * set_bt).item(), rel=1e-5)
    assert stats["groups_used"] == 3.0 and stats["anchor_bt"] == 0.0
    assert_grads_match(model, reference)
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    fusion_changed = any(not torch.equal(v, fusion_before[k]) for k, v in model.fusion.state_dict().items())
    assert fusion_changed == (mode == "anchored")  # head_only: the RM's head alone learns from the anchor set
    for key, value in model.reward_model.state_dict().items():  # only fusion and head train
        assert torch.equal(value, body_before[key]), key


def test_the_anchor_term_changes_the_update_and_weight_zero_removes_it(reward_model):
    rte, hidden, mask, rewards = batch(seed=5)
    anchor = anchor_set(seed=6)
    weights = {}
    for name, weight, given in (("plain", 0.7, None), ("zero", 0.0, anchor), ("anchored", 0.7, anchor)):
        torch.manual_seed(0)
        model = make(copy.deepcopy(reward_model), anchor_weight=weight)
        model.update(rte, hidden, mask, rewards, GROUP, 2, anchor=given)
        weights[name] = [p.detach().clone() for p in model.trainable_parameters()]
    for a, b in zip(weights["plain"], weights["zero"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(weights["plain"], weights["anchored"], strict=True))


def test_labels_and_anchor_set_together_and_anchor_alone_without_usable_groups(reward_model):
    model = make(reward_model)
    rte, hidden, mask, rewards = batch(seed=7)
    labels = torch.full((3 * GROUP,), math.nan)
    labels[:GROUP] = torch.tensor([0.1, 2.0, -1.0, 0.5])
    stats = model.update(rte, hidden, mask, rewards, GROUP, 2, labels=labels, anchor=anchor_set(seed=8))
    assert stats["groups_labelled"] == 1.0 and stats["anchor_bt"] > 0 and stats["anchor_set_bt"] > 0
    before = [p.detach().clone() for p in model.trainable_parameters()]
    stats = model.update(rte, hidden, mask, torch.full_like(rewards, math.nan), GROUP, 3, anchor=anchor_set(seed=8))
    assert stats["groups_used"] == 0 and stats["anchor_set_bt"] > 0
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters(), strict=True))


def test_bad_anchor_sets_are_refused_with_clear_errors(reward_model):
    rte, hidden, mask, rewards = batch(seed=9)
    anchor = anchor_set(seed=10)
    with pytest.raises(ValueError, match=r"anchor \(a fixed anchor set\) is used in modes \('anchored', 'head_only'\)"):
        make(copy.deepcopy(reward_model), mode="r2m").update(rte, hidden, mask, rewards, GROUP, 2, anchor=anchor)
    model = make(copy.deepcopy(reward_model))
    with pytest.raises(ValueError, match="the anchor needs hidden and cu_seqlens"):
        model.update(rte, hidden, mask, rewards, GROUP, 2, anchor=anchor_set(seed=10, states=False))
    with pytest.raises(TypeError, match="anchor must be an r2m.AnchorBatch"):
        model.update(rte, hidden, mask, rewards, GROUP, 2, anchor=(anchor.chosen_rte, anchor.rejected_rte))
    with pytest.raises(ValueError, match=r"rm_dim=32"):
        model.update(rte, hidden, mask, rewards, GROUP, 2,
                     anchor=r2m.AnchorBatch(torch.zeros(2, 5), torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="must have the same shape"):
        r2m.AnchorBatch(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least one pair"):
        r2m.AnchorBatch(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="chosen_rte must be a floating-point tensor"):
        r2m.AnchorBatch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"AnchorBatch.cu_seqlens must be an integer tensor of shape \[batch \+ 1 = 5"):
        r2m.AnchorBatch(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(6, 3), torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="AnchorBatch.cu_seqlens must start at 0, .* end at total_tokens=6"):
        r2m.AnchorBatch(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(6, 3), torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="both hidden and cu_seqlens"):
        r2m.AnchorBatch(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"chosen_base must be None or a tensor \[pairs=2\]"):
        r2m.AnchorBatch(torch.zeros(2, 4), torch.zeros(2, 4), chosen_base=torch.zeros(3), rejected_base=torch.zeros(2))


# ---- distributed: every rank holds the same anchor set, the summed gradient counts it once ----------------------

STEPS = 2


def run_updates(model, rte, hidden, mask, rewards, anchor):
    return [model.update(rte, hidden, mask, rewards, GROUP, step, anchor=anchor) for step in range(STEPS)]


def build_model():
    return make(build_rm(), anchor_weight=3.0)  # a heavy anchor term: counting it twice would show


def state_of(model):
    return {**{f"fusion.{k}": v for k, v in model.fusion.state_dict().items()},
            **{f"head.{k}": v for k, v in model.head.state_dict().items()}}


def worker(rank, world, out_dir):
    model = build_model()
    samples = 2 * GROUP
    part = slice(rank * samples // world, (rank + 1) * samples // world)
    stats = run_updates(model, *(t[part] for t in batch(seed=11, samples=samples)), anchor_set(seed=12))
    torch.save({"state": state_of(model), "stats": stats}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_two_process_update_with_an_anchor_set_equals_single_process(tmp_path):
    gloo.spawn(worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = build_model()
    single_stats = run_updates(single, *batch(seed=11, samples=2 * GROUP), anchor_set(seed=12))
    for name, value in state_of(single).items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0]["state"][name], value, atol=1e-6, rtol=0, msg=name)
    for rank in ranks:
        for got, want in zip(rank["stats"], single_stats, strict=True):
            assert got["anchor_set_bt"] == pytest.approx(want["anchor_set_bt"], abs=1e-6) and want["anchor_set_bt"] > 0
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
