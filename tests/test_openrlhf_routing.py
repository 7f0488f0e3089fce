"""The OpenRLHF integration's routing pieces in one process (no Ray, no OpenRLHF needed): the policy states on the
core's RolloutStore, the attention next to them and its backward, both routings against the core in every mode,
non-finite states, and the capture hooks."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import r2m
from r2m.benchmarks.tiny_models import build_policy, build_reward_model, build_tokenizer
from r2m.buffer import RolloutStore
from r2m.fusion import attend_torch, pack
from r2m.integrations.openrlhf.policy_side import (
    PolicyFeedbackCapture,
    PolicyStateStore,
    fingerprints,
    rows_from_output,
)
from r2m.integrations.openrlhf.reward_side import LocalEndpoint, PolicyFeedback, R2MRewardSide

POLICY_DIM, RM_DIM, GROUP, STEP = 16, 12, 4, 3
ADAM_EPS = 1e-5  # see tests/test_openrlhf_ray.py: keeps the post-Adam weight comparison well conditioned


def _states(lengths: list[int], heads: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randn(length, POLICY_DIM, generator=generator) for length in lengths]
    return rows, torch.randn(len(lengths), heads, POLICY_DIM, generator=generator) * 0.3


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(row.shape[0] for row in rows))
    hidden = torch.zeros(len(rows), width, POLICY_DIM)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        hidden[i, :len(row)], mask[i, :len(row)] = row, True
    return hidden, mask


def test_attend_and_its_backward_match_autograd():
    rows, u = _states([5, 1, 0, 7])
    keys = [f"k{i}" for i in range(len(rows))]
    store = PolicyStateStore(impl="torch")
    store.put(keys, rows)
    c, lse, ok, token = store.attend(keys, u, keep_for_backward=True)
    hidden, mask = _padded(rows)
    u_ref = u.clone().requires_grad_(True)
    c_ref = attend_torch(hidden, mask, u_ref)
    torch.testing.assert_close(c, c_ref.detach(), rtol=1e-6, atol=1e-6)
    scores = torch.einsum("bsd,bhd->bhs", hidden, u).masked_fill(~mask[:, None, :], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    assert ok.all() and torch.equal(c[2], torch.zeros_like(c[2])) and torch.isneginf(lse[2]).all()
    dc = torch.randn_like(c)
    du = store.attend_backward(token, dc)
    c_ref.backward(dc)
    torch.testing.assert_close(du, u_ref.grad, rtol=1e-5, atol=1e-5 * float(u_ref.grad.abs().max()))
    assert torch.isfinite(du).all() and torch.equal(du[2], torch.zeros_like(du[2]))
    with pytest.raises(KeyError, match="no pending attention"):
        store.attend_backward(token, dc)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_impl_matches_torch_impl():
    rows, u = _states([6, 3, 9])
    keys = [f"k{i}" for i in range(len(rows))]
    results = {}
    for impl in ("torch", "triton"):
        store = PolicyStateStore(impl=impl)
        store.put(keys, rows)
        c, lse, _, token = store.attend(keys, u, keep_for_backward=True)
        results[impl] = (c, lse, store.attend_backward(token, torch.ones_like(c)))
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_non_finite_states_are_zeroed_and_flagged():
    rows, u = _states([4, 4])
    rows[1][2, 3] = float("nan")
    store = PolicyStateStore()
    store.put(["a", "b"], rows)
    c, _, ok, _ = store.attend(["a", "b"], u)
    assert ok.tolist() == [True, False] and torch.isfinite(c).all()


def test_store_sits_on_the_rollout_store_refreshing_in_place():
    rows, u = _states([3, 5, 2])
    store = PolicyStateStore()
    store.put(["a", "b", "c"], rows)
    assert isinstance(store.rollouts, RolloutStore) and len(store.rollouts.pending) == 1
    before = store.rollouts.stored_bytes
    trained = [row + 1 for row in rows]
    store.put(["c", "a", "z"], [trained[2], trained[0], torch.ones(4, POLICY_DIM)], trained=True)
    assert store.rollouts.stored_bytes == before + 4 * POLICY_DIM * 4, "known keys refreshed in place, z added"
    assert store.held() == {"a": True, "b": False, "c": True, "z": True}
    hidden, cu_seqlens = store.states(["c", "z", "b", "a"])
    torch.testing.assert_close(hidden, torch.cat([trained[2], torch.ones(4, POLICY_DIM), rows[1], trained[0]]))
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 6, 11, 14]
    store.put(["a"], [rows[0]])  # a later experience forward on the same tokens: its states are the newest
    assert store.held()["a"] is False and torch.equal(store.states(["a"])[0], rows[0])
    with pytest.raises(KeyError, match="no policy states for 1 of 2 samples"):
        store.states(["a", "nope"])
    c, _, _, token = store.attend(["a", "b"], u[:2], keep_for_backward=True)
    store.clear()
    assert store.held() == {} and store.rollouts.stored_bytes == 0
    with pytest.raises(KeyError, match="no pending attention"):
        store.attend_backward(token, torch.ones_like(c))


def test_offloaded_store_keeps_states_on_cpu_and_naive_means_torch():
    rows, u = _states([3, 4])
    store = PolicyStateStore(offload=True, impl="naive")
    store.put(["a", "b"], rows)
    assert store.impl == "torch" and store.states(["a", "b"])[0].device.type == "cpu"
    torch.testing.assert_close(store.attend(["a", "b"], u)[0], attend_torch(*_padded(rows), u))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return (tokenizer, build_policy(tokenizer, "llama", hidden_size=POLICY_DIM).eval(),
            build_reward_model(tokenizer, "gpt2", hidden_size=RM_DIM).eval())


def _batch(tokenizer, count: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 11, (count,), generator=generator)
    sequences = torch.full((count, int(lengths.max())), tokenizer.pad_token_id)
    mask = torch.zeros_like(sequences)
    for i, length in enumerate(lengths.tolist()):
        sequences[i, :length] = torch.randint(4, 60, (length,), generator=generator)
        mask[i, :length] = 1
    return sequences, mask


def _eps(rm: r2m.R2MRewardModel) -> r2m.R2MRewardModel:
    for group in rm.optimizer.param_groups:
        group["eps"] = ADAM_EPS
    return rm


@pytest.mark.parametrize("mode", ["r2m", "frozen", "vanilla", "head_only", "no_bt", "no_gre", "noise"])
def test_both_routings_give_the_core_rewards_and_update(models, mode):
    tokenizer, policy, reward_model = models
    sequences, mask = _batch(tokenizer)
    with torch.no_grad():
        hidden = policy.model(sequences, attention_mask=mask).last_hidden_state
    rows = rows_from_output(hidden, mask)
    rows[5] = rows[5].clone()
    rows[5][1, 0] = float("inf")
    keys = fingerprints(sequences, mask)
    store = PolicyStateStore()
    store.put(keys, rows)
    padded, valid = _padded(rows)

    config = r2m.R2MConfig(mode=mode, total_steps=10, lr=1e-3, update_steps=2, seed=7)
    torch.manual_seed(1)
    core = _eps(r2m.wrap(copy.deepcopy(reward_model), POLICY_DIM, config))
    nn.init.normal_(core.fusion.o_proj.weight, std=0.5)
    rte = core.rte(sequences, mask)
    annotation = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5, -0.2, 0.1, 0.9])
    routings = ["full"] if mode == "noise" else ["full", "compact"]
    sides = {routing: R2MRewardSide(_eps(copy.deepcopy(core)), routing) for routing in routings}

    if mode == "noise":  # the noise is drawn in the layout the core gets: give it the packed layout "full" ships
        packed, cu_seqlens = store.states(keys)
        states, states_mask, layout = packed, None, {"cu_seqlens": cu_seqlens}
    else:
        states, states_mask, layout = padded, valid, {}
    expected = core.reward_from_rte(rte, states, states_mask, STEP, **layout)
    core_stats = core.update(rte, states, states_mask, annotation, GROUP, STEP, **layout)
    for routing, side in sides.items():
        endpoint = LocalEndpoint(store)
        feedback = PolicyFeedback(keys, [(endpoint, [0, 3, 5, 6]), (endpoint, [1, 2, 4, 7])])
        rewards = side.rewards(rte, feedback, STEP)
        stats = side.update(rte, feedback, annotation, GROUP, STEP)
        torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6, msg=routing)
        assert torch.isfinite(rewards).all()
        for name in ("loss", "bt", "gre", "omega", "groups_used", "groups_skipped"):
            assert stats[name] == pytest.approx(core_stats[name], abs=1e-6), (routing, name)
        for (name, p), (_, q) in zip(side.rm.named_parameters(), core.named_parameters(), strict=True):
            where = f"{routing} {name}"
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5 * float(q.grad.abs().max()) + 1e-12,
                                           msg=lambda m, where=where: f"gradient of {where}: {m}")
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}")
    if config.uses_fusion:
        assert expected[5] == core.vanilla_reward_from_rte(rte)[5], "a non-finite state gives the vanilla reward"
        assert core_stats["groups_skipped"] == float(config.trains), "and its group is skipped in the update"


def test_noise_mode_needs_full_routing(models):
    _, _, reward_model = models
    rm = r2m.wrap(copy.deepcopy(reward_model), POLICY_DIM, r2m.R2MConfig(mode="noise", total_steps=4))
    with pytest.raises(ValueError, match="routing 'full'"):
        R2MRewardSide(rm, "compact")
    with pytest.raises(ValueError, match="routing must be one of"):
        R2MRewardSide(rm, "sideways")


def test_feedback_parts_must_cover_the_batch_once():
    store = LocalEndpoint(PolicyStateStore())
    with pytest.raises(ValueError, match="exactly once"):
        PolicyFeedback(["a", "b", "c"], [(store, [0, 1]), (store, [1])])


class _ActorLike(nn.Module):
    """The calling convention of OpenRLHF's ``Actor`` (sequences, action_mask, attention_mask, ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False, **kwargs):
        return self.model(sequences, attention_mask=attention_mask).logits


def test_capture_keys_states_by_tokens_and_marks_training_passes(models):
    tokenizer, policy, _ = models
    sequences, mask = _batch(tokenizer, count=4, seed=3)
    actor = _ActorLike(copy.deepcopy(policy))
    store = PolicyStateStore()
    capture = PolicyFeedbackCapture(actor, store)
    with torch.no_grad():
        actor(sequences, None, mask)
        expected = rows_from_output(policy.model(sequences, attention_mask=mask).last_hidden_state, mask)
    keys = fingerprints(sequences, mask)
    assert store.held() == dict.fromkeys(keys, False)
    packed, cu_seqlens = store.states(keys)
    torch.testing.assert_close(packed, torch.cat(expected))
    assert cu_seqlens.tolist() == [0, *torch.cumsum(mask.sum(1) - 1, 0).tolist()]

    order = [2, 0]
    width = int(mask[order].sum(1).max())
    actor.train()
    actor(sequences[order, :width], None, attention_mask=mask[order, :width])
    assert store.held() == {key: i in order for i, key in enumerate(keys)}, "re-padded rows keep their keys"
    capture.remove()
    actor(sequences, None, mask)
    assert sum(store.held().values()) == 2


def test_rows_from_packed_output_equal_padded():
    hidden = torch.randn(3, 6, POLICY_DIM)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    packed, _ = pack(hidden, mask.bool())
    for a, b in zip(rows_from_output(packed[None], mask), rows_from_output(hidden, mask), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ring attention"):
        rows_from_output(torch.randn(1, 5, POLICY_DIM), mask)


def test_traffic_benchmark_compact_is_independent_of_sequence_length():
    from r2m.benchmarks.openrlhf_traffic import measure

    short, long = (measure(seq_len=seq_len, policy_dim=64, heads=2, batch=4, group_size=2, rm_dim=8)
                   for seq_len in (17, 65))
    by_routing = {(rows[0]["seq_len"], row["routing"]): row for rows in (short, long) for row in rows}
    for phase, vectors in (("score", 2), ("update", 4)):
        key = f"{phase}_payload_bytes_per_sample"
        assert by_routing[(65, "full")][key] >= 64 * 64 * 2 > by_routing[(17, "full")][key] >= 16 * 64 * 2
        assert by_routing[(17, "compact")][key] == by_routing[(65, "compact")][key]
        assert vectors * 2 * 64 * 4 <= by_routing[(65, "compact")][key] < vectors * 2 * 64 * 4 + 200
