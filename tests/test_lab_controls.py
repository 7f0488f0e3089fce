"""The lab's controls (oracle, mix, unbiased RM), its metrics of a better reward (on-policy ranking gap, gold at fixed
KL, share of the vanilla-to-oracle gap), sweeps and the progress of every stage; checked against values computed by
hand from made-up curves, not against the code's own output."""

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from r2m.benchmarks.lab import KL_POINTS, Variant, parse_variants, run_metrics, summarise
from r2m.benchmarks.lab_grpo import LabRunConfig, Recorder, control_reward, labelled_pair_bt, repeat_share
from r2m.benchmarks.lab_world import LabConfig, LabWorld, PretrainConfig
from r2m.benchmarks.tiny_models import build_policy


@pytest.fixture(scope="module")
def world():
    return LabWorld(LabConfig(rm_pairs=64, rm_epochs=1))


def curve(gold, kl, rank_gap=0.0, spurious=0.0):
    """A binned curve with the fields the lab's summary reads."""
    return [{"step": i + 1, "gold": g, "kl": k, "rank_gap": rank_gap, "spurious": spurious, "repeat": 0.0,
             "proxy": 0.0, "trained": 0.0, "spread_trained": 1.0, "spread_proxy": 1.0, "onpolicy_acc_trained": 0.5,
             "onpolicy_acc_proxy": 0.5, "state_similarity": None}
            for i, (g, k) in enumerate(zip(gold, kl, strict=True))]


def record(gold, kl, rank_gap=0.0):
    return {"curve": curve(gold, kl, rank_gap), "extra_policy_forwards": 0, "seconds_per_step": 1.0}


def test_controls_and_sweeps_parse():
    variants = parse_variants("vanilla, oracle, mix=0.3, unbiased, r2m:r2m_lr=1e-4|1e-3:alpha=0.1|0.5")
    assert [v.label for v in variants] == [
        "vanilla", "oracle", "mix=0.3", "unbiased", "r2m:r2m_lr=1e-4:alpha=0.1", "r2m:r2m_lr=1e-4:alpha=0.5",
        "r2m:r2m_lr=1e-3:alpha=0.1", "r2m:r2m_lr=1e-3:alpha=0.5"]
    assert [v.is_control for v in variants[:5]] == [False, True, True, True, False]
    mix = variants[2]
    assert mix.mode == "mix" and mix.overrides == (("mix", 0.3),)
    assert mix.run_config(LabRunConfig()).mix == 0.3
    assert dict(variants[-1].overrides) == {"r2m_lr": 1e-3, "alpha": 0.5}
    with pytest.raises(ValueError, match="mix=<lambda>"):
        Variant.parse("mix")
    with pytest.raises(ValueError, match="mix= belongs to the mix control"):
        Variant.parse("r2m:mix=0.2")
    with pytest.raises(ValueError, match="given twice"):
        parse_variants("r2m,vanilla,r2m")
    with pytest.raises(ValueError, match="LabRunConfig.mix must be in"):
        Variant.parse("mix=2").run_config(LabRunConfig())


def test_oracle_and_mix_rewards_by_hand(world):
    prompts = ["w2 w4 w6 w8"] * 4
    completions = ["w2 w4 w1 w3", "w0 w0 w0 w0", "w5 w5 w5 w5", "w2 w1 w3 w5"]
    gold = [world.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    assert control_reward("oracle", world, None, 0.3)(prompts, completions) == pytest.approx(gold)
    proxy = world.train_proxy()
    scores = world.score(proxy, prompts, completions).double().tolist()

    def z(xs):
        mean, sd = statistics.fmean(xs), statistics.pstdev(xs)
        return [(x - mean) / sd for x in xs]

    expected = [0.7 * a + 0.3 * b for a, b in zip(z(scores), z(gold), strict=True)]
    assert control_reward("mix", world, proxy, 0.3)(prompts, completions) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="not 'oracle' or 'mix'"):
        control_reward("unbiased", world, proxy, 0.3)


def test_recorder_ranking_gap_by_hand(world, monkeypatch):
    """Two groups of 3: the trained reward orders both as gold does; the proxy reverses the first group."""
    prompts = ["w2 w4 w6 w8"] * 6
    completions = ["w2 w4 w6 w8", "w2 w4 w9 w9", "w9 w9 w9 w9", "w2 w4 w6 w8", "w2 w4 w9 w9", "w9 w9 w9 w9"]
    gold = [world.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    assert gold[0] > gold[1] > gold[2]
    proxy = SimpleNamespace()

    def trained(prompts, completions, **_):
        return [world.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    trained.__name__ = "trained"
    recorder = Recorder(trained, world, proxy, group_size=3)
    proxy_scores = torch.tensor([0.0, 1.0, 2.0, 2.0, 1.0, 0.0])  # reversed in group 1, right in group 2
    monkeypatch.setattr(LabWorld, "score", lambda self, model, p, c: proxy_scores)
    recorder(prompts, completions, trainer_state=SimpleNamespace(global_step=4))
    row = recorder.rows[5]
    assert row["onpolicy_acc_trained"] == 1.0 and row["onpolicy_acc_proxy"] == 0.5
    assert row["rank_gap"] == 0.5 and row["repeat"] == pytest.approx(statistics.fmean([0, 0.25, 0.75] * 2))


def test_repeat_share_by_hand():
    assert repeat_share(["w1 w2 w3 w4", "w1 w1 w1 w1", ""]) == pytest.approx((0 + 0.75) / 2)


def test_matched_kl_budget_ignores_controls_and_gold_at_fixed_kl_pairs_only_where_reached():
    """Gold rises linearly with KL in every run from KL 0.05 on (gold = a + b * kl), so gold at any KL >= 0.05 is
    known by hand."""
    def linear(a, b, kls):
        return record([a + b * k for k in kls], kls)

    runs = {"vanilla": {0: linear(0.1, 0.1, [0.05, 0.3, 1.2, 2.0]), 1: linear(0.2, 0.1, [0.05, 0.3, 0.8, 1.2])},
            "r2m": {0: linear(0.1, 0.2, [0.05, 0.3, 1.2, 1.6]), 1: linear(0.2, 0.2, [0.05, 0.3, 1.2, 1.6])},
            "oracle": {0: linear(0.1, 0.5, [0.05, 0.2, 0.3, 0.4]), 1: linear(0.2, 0.5, [0.05, 0.2, 0.3, 0.4])}}
    rows, budget = summarise(runs, controls={"oracle": "oracle"}, kl_points=(0.3, 1.5))
    assert budget == pytest.approx(1.2)  # the oracle's 0.4 does not set it
    by = {r["variant"]: r for r in rows}
    # gold at KL 1.2: vanilla 0.22 / 0.32, r2m 0.34 / 0.44 -> paired difference 0.12
    assert by["r2m"]["vs_vanilla"]["gold_at_kl"]["mean"] == pytest.approx(0.12)
    assert "gold_at_kl" not in by["oracle"]["vs_vanilla"]  # never reaches K*
    # KL 0.3: every run reaches it; KL 1.5: vanilla only on seed 0, r2m on both, the oracle on none
    assert by["oracle"]["vs_vanilla"]["gold@kl=0.3"]["mean"] == pytest.approx(0.4 * 0.3)
    assert by["r2m"]["vs_vanilla"]["gold@kl=1.5"] == pytest.approx(
        {"n": 1, "mean": 0.1 * 1.5, "sd": None, "low": None, "high": None, "excludes_zero": None})
    assert "gold@kl=1.5" not in by["oracle"]["vs_vanilla"]
    # share of the vanilla-to-oracle gap at KL 0.3: (0.2 - 0.1) / (0.5 - 0.1) * 0.3 / 0.3
    assert by["r2m"]["oracle_gap_share"]["gold@kl=0.3"] == pytest.approx(0.25)
    assert by["oracle"]["oracle_gap_share"]["gold@kl=0.3"] == pytest.approx(1.0)
    assert by["vanilla"]["oracle_gap_share"]["gold@kl=0.3"] == 0.0
    assert "gold_at_kl" not in by["r2m"]["oracle_gap_share"]


def test_ranking_gap_is_a_run_mean_paired_to_vanilla():
    runs = {"vanilla": {s: record([0.3] * 3, [0.1, 0.2, 0.3]) for s in range(3)},
            "r2m": {s: {**record([0.3] * 3, [0.1, 0.2, 0.3])} for s in range(3)},
            "oracle": {s: record([0.5] * 3, [0.1, 0.2, 0.3], rank_gap=0.4) for s in range(3)}}
    for seed, gaps in enumerate(([0.0, 0.1, 0.2], [0.1, 0.1, 0.1], [0.2, 0.3, 0.4])):
        for row, gap in zip(runs["r2m"][seed]["curve"], gaps, strict=True):
            row["rank_gap"] = gap
    rows, _ = summarise(runs, controls={"oracle": "oracle"})
    by = {r["variant"]: r for r in rows}
    assert by["r2m"]["rank_gap"]["mean"] == pytest.approx(statistics.fmean([0.1, 0.1, 0.3]))
    assert by["r2m"]["vs_vanilla"]["rank_gap"]["mean"] == pytest.approx(0.5 / 3)
    assert by["r2m"]["oracle_gap_share"]["rank_gap"] == pytest.approx((0.5 / 3) / 0.4)
    assert by["r2m"]["oracle_gap_share"]["gold_end"] == 0.0


def test_run_metrics_update_size_prefers_the_logged_metric():
    rows = curve([0.1, 0.2], [0.1, 0.2])
    rows[0].update(update_head=0.5, update_size=0.01)
    rows[1].update(update_head=0.7, update_size=0.03)
    assert run_metrics(rows, None)["update_size"] == pytest.approx(0.02)
    for row in rows:
        del row["update_size"]
    assert run_metrics(rows, None)["update_size"] == pytest.approx(0.6)
    assert set(KL_POINTS) and all(run_metrics(rows, None)[f"gold@kl={x:g}"] is None for x in KL_POINTS if x > 0.2)


def test_repeat_share_world_knob(world):
    """rm_repeat_share 0 leaves the world's pairs as they were; 1 makes every RM response one or two words."""
    plain = LabWorld(LabConfig(rm_pairs=64, rm_epochs=1, rm_repeat_share=0.0)).preference_pairs(50, seed=3)
    assert plain == world.preference_pairs(50, seed=3)
    repeated = LabWorld(LabConfig(rm_repeat_share=1.0)).preference_pairs(50, seed=3)
    for _, chosen, rejected in repeated:
        for response in (chosen, rejected):
            assert len(set(response.split()) - {"w0"}) <= 2
    with pytest.raises(ValueError, match="rm_repeat_share must be in"):
        LabConfig(rm_repeat_share=1.5)


def test_pretraining_and_proxy_training_show_progress(world, capsys):
    world.train_proxy(progress="proxy RM, seed 0")
    policy = build_policy(world.tokenizer, "llama", hidden_size=16)
    world.pretrain(policy, PretrainConfig(examples=64, epochs=2, batch_size=32), seed=0, progress="policy SFT, seed 0")
    err = capsys.readouterr().err
    assert "proxy RM, seed 0" in err and "1/1" in err  # 64 pairs, 1 epoch: one batch
    assert "policy SFT, seed 0" in err and "4/4" in err  # 64 examples / 32, 2 epochs
    world.train_proxy()
    assert capsys.readouterr().err == ""


def test_pretraining_data_can_carry_the_spurious_word(world):
    prompts = world.prompts(200, seed=4)
    assert world.good_responses(prompts, 1, seed=0, spurious_share=0.0) == world.good_responses(prompts, 1, seed=0)
    marked = world.good_responses(prompts, 1, seed=0, spurious_share=1.0)
    assert all(r.split().count("w0") == 1 for r in marked)
    share = world.spurious_share(world.good_responses(prompts, 1, seed=0, spurious_share=0.3))
    assert 0.2 < share < 0.4
    with pytest.raises(ValueError, match="spurious_share must be in"):
        PretrainConfig(spurious_share=-0.1)


def test_labelled_pair_bt_by_hand():
    """Group 0 is labelled (best sample 2, worst 0), group 1 is not (label_groups=1)."""
    gold = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]], dtype=torch.float64)
    proxy = torch.tensor([[2.0, 0.0, 1.0], [5.0, 0.0, -5.0]], dtype=torch.float64)
    trained = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    found = labelled_pair_bt(proxy, trained, gold, label_groups=1)
    assert found["label_bt_proxy"] == pytest.approx(math.log1p(math.exp(1.0)))  # s_w - s_l = 1 - 2
    assert found["label_bt_trained"] == pytest.approx(math.log1p(math.exp(-3.0)))
    assert labelled_pair_bt(proxy, trained, torch.zeros(2, 3, dtype=torch.float64), label_groups=2) == {}


def test_the_demo_runs_vanilla_the_oracle_and_one_labelled_variant():
    from r2m.benchmarks.lab import DEMO_VARIANT, QUICK

    variants = parse_variants(QUICK["variants"])
    assert [v.mode for v in variants] == ["vanilla", "oracle", "anchored"]
    assert variants[2].label == DEMO_VARIANT and dict(variants[2].overrides)["label_groups"] >= 1
