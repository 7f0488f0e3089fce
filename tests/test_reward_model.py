"""R2MRewardModel on real (tiny) transformers reward models."""

import copy
import dataclasses
import warnings

import pytest
import torch

import r2m
from r2m import losses
from r2m.benchmarks import tiny_models as tiny

POLICY_DIM = 24


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture
def reward_model(tokenizer):
    torch.manual_seed(0)
    return tiny.build_reward_model(tokenizer, "llama", hidden_size=32)


def make(reward_model, **overrides):
    cfg = r2m.R2MConfig(**{"total_steps": 10, "lr": 1e-2, "attn_dim": 16, "num_heads": 2, "seed": 0, **overrides})
    return r2m.wrap(reward_model, POLICY_DIM, cfg)


def batch(n=8, seq=6, rm_dim=32, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    rte = torch.randn(n, rm_dim, generator=generator)
    hidden = torch.randn(n, seq, POLICY_DIM, generator=generator)
    lengths = torch.randint(1, seq + 1, (n,), generator=generator)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    rewards = torch.randn(n, generator=generator)
    return rte, hidden, mask, rewards


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_head_of_rte_equals_reward_model_logits(tokenizer, family, side):
    torch.manual_seed(1)
    rm = tiny.build_reward_model(tokenizer, family)
    tokenizer.padding_side = side
    enc = tokenizer(["w1 w2 w3 w4 w5", "w6 w7", "w8"], return_tensors="pt", padding=True)
    wrapped = r2m.wrap(rm, POLICY_DIM, r2m.R2MConfig(total_steps=4))
    rte = wrapped.rte(enc.input_ids, enc.attention_mask)
    expected = rm(**enc).logits.squeeze(-1)
    torch.testing.assert_close(wrapped.head(rte).squeeze(-1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wrapped.vanilla_reward_from_rte(rte), expected, atol=1e-6, rtol=1e-5)
    assert wrapped.rm_dim == rm.config.hidden_size


def test_untrained_r2m_orders_responses_as_the_reward_model(reward_model):
    model = make(reward_model, omega_min=0.6)
    rte, hidden, mask, _ = batch(16, seed=3)
    vanilla = model.vanilla_reward_from_rte(rte)
    for step in range(model.total_steps + 1):
        rewards = model.reward_from_rte(rte, hidden, mask, step)
        assert torch.equal(rewards.argsort(), vanilla.argsort()), step


def test_update_changes_only_fusion_and_head(reward_model):
    model = make(reward_model)
    body_before = snapshot(model.reward_model)
    fusion_before, head_before = snapshot(model.fusion), snapshot(model.head)
    rte, hidden, mask, rewards = batch()
    for step in range(3):
        stats = model.update(rte, hidden, mask, rewards, group_size=4, step=step)
    assert stats["groups_used"] == 2 and stats["groups_skipped"] == 0
    body_after = model.reward_model.state_dict()
    assert all(torch.equal(body_before[k], body_after[k]) for k in body_before)
    assert all(not p.requires_grad for p in model.reward_model.parameters())
    changed = {k for k, v in model.fusion.state_dict().items() if not torch.equal(v, fusion_before[k])}
    assert changed == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    assert not torch.equal(model.head.weight, head_before["weight"])


def test_update_gradient_matches_float64_reference(reward_model):
    model = make(reward_model, max_grad_norm=None)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.2)
    rte, hidden, mask, rewards = batch(seed=5)
    reference = copy.deepcopy(model)
    reference.fusion.double(), reference.head.double()  # rm.double() casts only the wrapped reward model
    step, group_size = 4, 4
    w = r2m.omega(step, 10, 0.6)
    h64 = torch.where(mask[..., None], hidden.double(), 0.0)
    fusion64 = reference.fusion
    fusion64.impl = "naive"
    fused = w * rte.double() + (1 - w) * fusion64(rte.double(), h64, mask)
    scores = reference.head(fused).squeeze(-1).view(2, group_size)
    winner, loser, valid = losses.select_pairs(rewards.double().view(2, group_size))
    expected_loss = losses.grebt_loss(scores, winner, loser, 0.3, valid)
    expected_loss.backward()

    stats = model.update(rte, hidden, mask, rewards, group_size, step)
    assert stats["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert stats["omega"] == pytest.approx(w)
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters(), strict=False):
        if param.grad is not None:
            torch.testing.assert_close(param.grad.double(), ref.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_modes(reward_model):
    rte, hidden, mask, rewards = batch(seed=7)
    results = {}
    for mode in r2m.MODES:
        torch.manual_seed(0)
        model = make(copy.deepcopy(reward_model), mode=mode)
        torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.5)
        fusion_before, head_before = snapshot(model.fusion), snapshot(model.head)
        reward = model.reward_from_rte(rte, hidden, mask, step=5)
        stats = model.update(rte, hidden, mask, rewards, group_size=4, step=5)
        fusion_same = all(torch.equal(v, fusion_before[k]) for k, v in model.fusion.state_dict().items())
        head_same = torch.equal(model.head.weight, head_before["weight"])
        results[mode] = (reward, stats, fusion_same, head_same, model)
    vanilla = results["vanilla"][4].vanilla_reward_from_rte(rte)
    torch.testing.assert_close(results["vanilla"][0], vanilla)
    assert results["vanilla"][2:4] == (True, True) and results["frozen"][2:4] == (True, True)
    assert not torch.allclose(results["frozen"][0], vanilla)
    torch.testing.assert_close(results["frozen"][0], results["r2m"][0])
    torch.testing.assert_close(results["head_only"][0], vanilla)  # the head before its first update is the RM's
    assert results["head_only"][2:4] == (True, False)
    for mode in ("r2m", "noise", "no_bt", "no_gre"):
        assert results[mode][2:4] == (False, False), mode
    assert not torch.allclose(results["noise"][0], results["r2m"][0])
    no_bt, no_gre = results["no_bt"][1], results["no_gre"][1]
    assert no_bt["loss"] == pytest.approx(no_bt["gre"]) and no_gre["loss"] == pytest.approx(no_gre["bt"])


def test_noise_mode_only_sees_mean_and_variance(reward_model):
    rte, hidden, mask, _ = batch(seed=9)
    mask[:] = True
    flat = hidden.flatten(1)
    permuted = flat[:, torch.randperm(flat.shape[1])].view_as(hidden)
    out = []
    for h in (hidden, permuted):
        torch.manual_seed(0)
        model = make(copy.deepcopy(reward_model), mode="noise", seed=123)
        torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.5)
        out.append(model.reward_from_rte(rte, h, mask, step=5))
    torch.testing.assert_close(out[0], out[1])


def test_non_finite_hidden_falls_back_and_skips_group(reward_model):
    model = make(reward_model)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.5)
    rte, hidden, mask, rewards = batch(seed=11)
    hidden[5, 0, 3] = float("nan")
    hidden[6, 0, 0] = float("inf")
    reward = model.reward_from_rte(rte, hidden, mask, step=2)
    assert torch.isfinite(reward).all()
    vanilla = model.vanilla_reward_from_rte(rte)
    torch.testing.assert_close(reward[5:7], vanilla[5:7])
    assert not torch.allclose(reward[:4], vanilla[:4])
    stats = model.update(rte, hidden, mask, rewards, group_size=4, step=2)
    assert stats["groups_used"] == 1 and stats["groups_skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())


def test_non_finite_annotation_reward_skips_group(reward_model):
    model = make(reward_model)
    rte, hidden, mask, rewards = batch(seed=13)
    rewards[1] = float("nan")
    stats = model.update(rte, hidden, mask, rewards, group_size=4, step=0)
    assert (stats["groups_used"], stats["groups_skipped"]) == (1, 1)
    rewards[4] = float("inf")
    head_before = snapshot(model.head)
    stats = model.update(rte, hidden, mask, rewards, group_size=4, step=0)
    assert (stats["groups_used"], stats["groups_skipped"]) == (0, 2)
    assert torch.equal(model.head.weight, head_before["weight"])


def test_all_equal_rewards_and_empty_completions_stay_finite(reward_model):
    model = make(reward_model)
    rte, hidden, mask, _ = batch(seed=17)
    mask[0] = False
    rewards = torch.ones(8)
    stats = model.update(rte, hidden, mask, rewards, group_size=4, step=1)
    assert stats["groups_used"] == 2 and stats["bt"] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert torch.isfinite(model.reward_from_rte(rte, hidden, mask, step=1)).all()


def test_packed_hidden_gives_same_reward(reward_model):
    model = make(reward_model)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.5)
    rte, hidden, mask, _ = batch(seed=19)
    packed, cu_seqlens = r2m.fusion.pack(hidden, mask)
    torch.testing.assert_close(model.reward_from_rte(rte, packed, None, 3, cu_seqlens=cu_seqlens),
                               model.reward_from_rte(rte, hidden, mask, 3))


def test_bf16_hidden_and_bf16_reward_model(tokenizer):
    rm = tiny.build_reward_model(tokenizer, "qwen2").to(torch.bfloat16)
    model = r2m.wrap(rm, POLICY_DIM, r2m.R2MConfig(total_steps=4))
    assert model.head.weight.dtype == torch.float32 and model.fusion.q_proj.weight.dtype == torch.float32
    enc = tokenizer(["w1 w2", "w3 w4 w5"], return_tensors="pt", padding=True)
    rte = model.rte(enc.input_ids, enc.attention_mask)
    hidden = torch.randn(2, 3, POLICY_DIM, dtype=torch.bfloat16)
    reward = model.reward_from_rte(rte, hidden, torch.ones(2, 3, dtype=torch.bool), 1)
    assert reward.dtype == torch.float32 and torch.isfinite(reward).all()


def test_save_and_load_round_trip_is_bit_identical(reward_model, tmp_path):
    model = make(reward_model)
    rte, hidden, mask, rewards = batch(seed=23)
    for step in range(2):
        model.update(rte, hidden, mask, rewards, 4, step)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"r2m_config.json", "r2m_state.json", "r2m_model.safetensors",
                                                    "r2m_optimizer.safetensors"}
    loaded = r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model), tmp_path)
    for a, b in zip(model.trainable_parameters(), loaded.trainable_parameters(), strict=False):
        assert torch.equal(a, b)
    for step in (2, 3):
        model.update(rte, hidden, mask, rewards, 4, step)
        loaded.update(rte, hidden, mask, rewards, 4, step)
    for a, b in zip(model.trainable_parameters(), loaded.trainable_parameters(), strict=False):
        assert torch.equal(a, b)
    assert loaded.config == model.config and loaded.total_steps == 10


def test_mismatched_checkpoint_is_refused(reward_model, tokenizer, tmp_path):
    make(reward_model).save_pretrained(tmp_path)
    wider = tiny.build_reward_model(tokenizer, "llama", hidden_size=48)
    with pytest.raises(ValueError, match="rm_dim: checkpoint 32 vs this model 48"):
        r2m.R2MRewardModel.from_pretrained(wider, tmp_path)
    other = make(copy.deepcopy(reward_model), num_heads=4)
    with pytest.raises(ValueError, match=r"config\.num_heads: checkpoint 2 vs this model 4"):
        other.load_state(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"r2m_config\.json is missing"):
        other.load_state(tmp_path / "nowhere")


@pytest.mark.parametrize("call, error, message", [
    (lambda m, b: m.update(b[0], b[1][..., :20], b[2], b[3], 4, 0), ValueError, "policy_dim=24"),
    (lambda m, b: m.update(*b, group_size=1, step=0), ValueError, "group_size must be an int >= 2"),
    (lambda m, b: m.update(*b, group_size=3, step=0), ValueError, "not a whole number of groups"),
    (lambda m, b: m.update(b[0], b[1], b[2], b[3][:5], 4, 0), ValueError, r"rewards must have shape \[batch=8\]"),
    (lambda m, b: m.reward_from_rte(b[0][:, :30], b[1], b[2], 0), ValueError, "rm_dim=32"),
    (lambda m, b: m.reward_from_rte(b[0], b[1].long(), b[2], 0), TypeError, "floating-point"),
    (lambda m, b: m.reward_from_rte(b[0], b[1], b[2][:, :3], 0), ValueError, "mask must have shape"),
    (lambda m, b: m.reward_from_rte(b[0], None, b[2], 0), ValueError, "hidden .* is required"),
    (lambda m, b: m.rte(torch.zeros(2, 0, dtype=torch.long)), ValueError, "input_ids is empty"),
    (lambda m, b: m.rte(torch.randn(2, 3)), ValueError, "input_ids must be an integer tensor"),
])
def test_bad_input_messages(reward_model, call, error, message):
    with pytest.raises(error, match=message):
        call(make(reward_model), batch())


def test_unknown_total_steps(reward_model):
    model = r2m.wrap(reward_model, POLICY_DIM, r2m.R2MConfig())
    rte, hidden, mask, _ = batch()
    with pytest.raises(ValueError, match="total_steps is unknown"):
        model.reward_from_rte(rte, hidden, mask, 0)


def test_wrap_refuses_what_is_not_a_sequence_classifier(tokenizer):
    with pytest.raises(ValueError, match="no linear scoring head"):
        r2m.wrap(tiny.build_policy(tokenizer), POLICY_DIM)
    two_labels = tiny.build_reward_model(tokenizer)
    two_labels.score = torch.nn.Linear(32, 2)
    with pytest.raises(ValueError, match="num_labels=1"):
        r2m.wrap(two_labels, POLICY_DIM)
    with pytest.raises(ValueError, match="policy_hidden_size must be an int"):
        r2m.wrap(tiny.build_reward_model(tokenizer), 0)
    with pytest.raises(TypeError, match=r"config must be an r2m\.R2MConfig"):
        r2m.wrap(tiny.build_reward_model(tokenizer), POLICY_DIM, {"alpha": 0.3})


def test_context_attend_gives_the_same_rewards_and_update(reward_model):
    """A PolicyContext (attend(u) -> c where the states live) is exactly the hidden-state path."""
    rte, hidden, mask, rewards = batch(seed=29)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(make(copy.deepcopy(reward_model)))
        torch.nn.init.normal_(models[-1].fusion.o_proj.weight, std=0.3)
    by_hidden, by_context = models
    hidden[2, 0, 0] = float("nan")
    ok = torch.isfinite(hidden).all(-1).logical_or(~mask).all(1)
    clean = torch.where(mask[..., None] & torch.isfinite(hidden), hidden, 0.0)

    def attend(u):
        return r2m.fusion.attend_torch(clean, mask, u), ok

    torch.testing.assert_close(by_context.reward_from_rte(rte, None, None, 3, context=attend),
                               by_hidden.reward_from_rte(rte, hidden, mask, 3))
    stats = [m.update(rte, hidden, mask, rewards, 4, 3) if m is by_hidden
             else m.update(rte, None, None, rewards, 4, 3, context=attend) for m in models]
    assert stats[0]["groups_skipped"] == stats[1]["groups_skipped"] == 1
    for a, b in zip(by_hidden.trainable_parameters(), by_context.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b)
    noise = make(copy.deepcopy(reward_model), mode="noise")
    with pytest.raises(ValueError, match="mode 'noise' draws noise"):
        noise.reward_from_rte(rte, None, None, 3, context=attend)


def test_from_pretrained_takes_the_old_argument_orders_with_a_deprecation_warning(reward_model, tmp_path):
    model = make(reward_model)
    rte, hidden, mask, rewards = batch(seed=31)
    model.update(rte, hidden, mask, rewards, 4, 0)
    model.save_pretrained(tmp_path)
    current = [lambda m: r2m.R2MRewardModel.from_pretrained(m, tmp_path),
               lambda m: r2m.R2MRewardModel.from_pretrained(m, str(tmp_path), config=None),
               lambda m: r2m.R2MRewardModel.from_pretrained(reward_model=m, path=tmp_path)]
    old = [lambda m: r2m.R2MRewardModel.from_pretrained(str(tmp_path), m),
           lambda m: r2m.R2MRewardModel.from_pretrained(save_directory=tmp_path, reward_model=m),
           lambda m: r2m.R2MRewardModel.from_pretrained(tmp_path, m, None),
           lambda m: r2m.R2MRewardModel.from_pretrained(m, tmp_path, model.config)]
    for deprecated, calls in ((False, current), (True, old)):
        for call in calls:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                loaded = call(copy.deepcopy(reward_model))
            assert any(w.category is DeprecationWarning for w in record) == deprecated
            assert all(torch.equal(a, b) for a, b in zip(model.trainable_parameters(),
                                                         loaded.trainable_parameters(), strict=True))
    for args in ((str(tmp_path), str(tmp_path)), (reward_model, reward_model), (reward_model, 3)):
        with pytest.raises(TypeError, match=r"from_pretrained takes the reward model \(an nn.Module\) and the "
                                            r"directory save_pretrained wrote .* got "):
            r2m.R2MRewardModel.from_pretrained(*args)


def test_resume_trains_with_the_new_lr_and_warns_of_changed_fields(reward_model, tmp_path):
    model = make(reward_model)
    rte, hidden, mask, rewards = batch(seed=37)
    model.update(rte, hidden, mask, rewards, 4, 0)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model), tmp_path)
    changed = dataclasses.replace(model.config, lr=3e-3, omega_min=0.7, alpha=0.5)
    with pytest.warns(UserWarning) as record:
        loaded = r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model), tmp_path, config=changed)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 3
    for field, old, new in (("alpha", 0.3, 0.5), ("lr", 0.01, 0.003), ("omega_min", 0.6, 0.7)):
        assert any(f"trained with {field}={old!r}; resuming with this config's {field}={new!r}" in m
                   for m in messages), field
    group, saved_group = loaded.optimizer.param_groups[0], model.optimizer.param_groups[0]
    assert group["lr"] == 3e-3
    settings = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k not in ("lr", "params")}
                for g in (group, saved_group)]
    assert settings[0] == settings[1]
    # reference: the original run, continued with the new hyper-parameters set by hand
    reference = copy.deepcopy(model)
    reference.config = changed
    for g in reference.optimizer.param_groups:
        g["lr"] = 3e-3
    for m in (loaded, reference):
        m.update(rte, hidden, mask, rewards, 4, 1)
    for a, b in zip(reference.trainable_parameters(), loaded.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_unseeded_wrap_leaves_the_global_rng_alone(reward_model):
    draws = []
    for seed in (None, 7):
        torch.manual_seed(0)
        make(reward_model, seed=seed)
        draws.append(torch.rand(16))
        assert torch.initial_seed() == 0
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    assert make(reward_model, seed=None).noise_seed != make(reward_model, seed=None).noise_seed


@pytest.mark.parametrize("cast, dtype", [
    (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.half(), torch.float16),
    (lambda m: m.to("cpu", torch.float64), torch.float64),
])
def test_dtype_casts_reach_only_the_reward_model(reward_model, tokenizer, cast, dtype):
    model = make(reward_model)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.3)
    rte, hidden, mask, rewards = batch(seed=41)
    model.update(rte, hidden, mask, rewards, 4, 0)
    assert cast(model) is model
    assert {p.dtype for p in model.reward_model.parameters()} == {dtype}
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    assert {v.dtype for s in model.optimizer.state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert model.optimizer.param_groups[0]["params"][0] is model.trainable_parameters()[0]
    enc = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    encoded = model.rte(enc.input_ids, enc.attention_mask)
    assert encoded.dtype == dtype
    reward = model.reward_from_rte(encoded, hidden[:2].to(dtype), mask[:2], 1)
    assert reward.dtype == torch.float32 and torch.isfinite(reward).all()
    stats = model.update(rte, hidden, mask, rewards, 4, 1)
    assert stats["groups_used"] == 2 and all(torch.isfinite(p).all() for p in model.trainable_parameters())
    model.float()
    assert {p.dtype for p in model.reward_model.parameters()} == {torch.float32}


def noise_rewards(model, calls=3, seed=43):
    rte, hidden, mask, _ = batch(seed=seed)
    return [model.reward_from_rte(rte, hidden, mask, step=2) for _ in range(calls)]


def test_noise_is_fixed_per_sample_and_resumes(reward_model, tmp_path):
    models = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        models.append(make(copy.deepcopy(reward_model), mode="noise", seed=seed))
        torch.nn.init.normal_(models[-1].fusion.o_proj.weight, std=0.5)
    first, second, other = noise_rewards(models[0]), noise_rewards(models[1]), noise_rewards(models[2])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)  # a sample sees the same noise at every call
    assert not torch.allclose(first[0], other[0])  # another seed, other noise
    rte, hidden, mask, _ = batch(seed=43)
    packed, cu_seqlens = r2m.fusion.pack(hidden, mask)
    torch.testing.assert_close(models[0].reward_from_rte(rte, packed, None, 2, cu_seqlens=cu_seqlens), first[0])
    shuffled = torch.randperm(rte.shape[0])  # keyed by the sample, not by its place in the batch
    torch.testing.assert_close(models[0].reward_from_rte(rte[shuffled], hidden[shuffled], mask[shuffled], 2),
                               first[0][shuffled])
    models[0].save_pretrained(tmp_path)
    loaded = r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model), tmp_path, config=r2m.R2MConfig(
        **{**models[0].config.to_dict(), "seed": None}))
    for a, b in zip(noise_rewards(models[0]), noise_rewards(loaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_noise_draws_on_the_device_of_the_states(reward_model, monkeypatch):
    model = make(reward_model, mode="noise", seed=5).to(torch.bfloat16)
    devices = []
    draw = model._sample_noise

    def spy(rte, shape, device):
        devices.append(device)
        return draw(rte, shape, device)

    monkeypatch.setattr(model, "_sample_noise", spy)
    rte, hidden, mask, _ = batch(seed=47)
    assert torch.isfinite(model.reward_from_rte(rte, hidden, mask, step=2)).all()
    assert devices == [hidden.device] * rte.shape[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_move_keeps_noise_and_training_working(reward_model, tokenizer, tmp_path):
    model = make(reward_model, mode="noise", seed=5)
    rte, hidden, mask, rewards = batch(seed=53)
    model.update(rte, hidden, mask, rewards, 4, 0)
    model.to("cuda", torch.bfloat16)
    assert model.head.weight.is_cuda and model.head.weight.dtype == torch.float32
    assert all(v.is_cuda for s in model.optimizer.state.values() for k, v in s.items() if k != "step")
    enc = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    assert model.rte(enc.input_ids, enc.attention_mask).is_cuda
    reward = model.reward_from_rte(rte.cuda(), hidden.cuda(), mask.cuda(), 1)
    assert reward.is_cuda and torch.isfinite(reward).all()
    model.update(rte.cuda(), hidden.cuda(), mask.cuda(), rewards.cuda(), 4, 1)
    model.save_pretrained(tmp_path)
    loaded = r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model).cuda(), tmp_path)
    torch.testing.assert_close(model.reward_from_rte(rte.cuda(), hidden.cuda(), mask.cuda(), 1),
                               loaded.reward_from_rte(rte.cuda(), hidden.cuda(), mask.cuda(), 1))


def test_update_counts_degenerate_groups(reward_model):
    model = make(reward_model)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=0.3)
    rte, hidden, mask, rewards = batch(n=12, seed=59)
    rte[0:4], hidden[0:4], mask[0:4] = rte[0], hidden[0], mask[0]  # identical responses: exactly tied rewards
    rte[4:8] = rte[4] * (1 + 1e-7 * torch.randn(4, 1)) * 1e3  # tied up to float32 resolution, at reward scale ~1e3
    rte[8:12] = rte[8] * (1 + 1e-2 * torch.randn(4, 1)) * 1e3  # a spread the GRE term must keep
    hidden[4:12], mask[4:12] = hidden[4], mask[4]
    stats = model.update(rte, hidden, mask, rewards, group_size=4, step=3)
    assert (stats["groups_used"], stats["groups_skipped"], stats["groups_degenerate"]) == (3, 0, 2)
    frozen = make(reward_model, mode="frozen").update(rte, hidden, mask, rewards, group_size=4, step=3)
    assert frozen["groups_degenerate"] == 0


def test_update_size_is_the_relative_change_of_fusion_and_head(reward_model):
    def weights(m):
        return torch.cat([p.detach().double().flatten() for p in [*m.fusion.parameters(), *m.head.parameters()]])

    model = make(reward_model)
    before = weights(model)
    stats = model.update(*batch(seed=41), 4, 0)
    expected = float((weights(model) - before).norm() / before.norm())
    assert expected > 0 and stats["update_size"] == pytest.approx(expected, rel=1e-9)
    frozen = make(copy.deepcopy(reward_model), mode="frozen")
    assert frozen.update(*batch(seed=41), 4, 0)["update_size"] == 0.0


def test_packed_states_path_equals_the_padded_arguments(reward_model):
    """score / update_states on PackedStates are what reward_from_rte / update give for padded hidden + mask."""
    rte, hidden, mask, rewards = batch(seed=43)
    padded, packed = make(copy.deepcopy(reward_model)), make(copy.deepcopy(reward_model))
    packed.load_state_dict(padded.state_dict())
    states = r2m.packed.PackedStates.from_padded(hidden, mask)
    torch.testing.assert_close(packed.score(rte, states, 3), padded.reward_from_rte(rte, hidden, mask, 3))
    assert packed.update_states(rte, states, rewards, 4, 3)["loss"] == padded.update(rte, hidden, mask, rewards, 4,
                                                                                     3)["loss"]
    for a, b in zip(padded.trainable_parameters(), packed.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b)
