"""The lab's statistics against reference values computed without scipy (tables and hand formulas)."""

import math
import statistics

import numpy as np
import pytest

from r2m.benchmarks.lab import (
    Variant,
    gold_at_kl,
    mean_interval,
    monitor_lead,
    monitor_summary,
    monitor_table,
    paired_difference,
    t_quantile,
)
from r2m.benchmarks.lab_grpo import bin_steps

# two-sided 95% critical values of Student's t (any statistics table)
T_975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=2e-6)


def test_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="0.5 <= p < 1"):
        t_quantile(0.2, 3)


def test_mean_interval_by_hand():
    values = [0.1, 0.3, 0.2, 0.6, 0.4]
    mean, sd = 0.32, math.sqrt(sum((v - 0.32) ** 2 for v in values) / 4)
    half = T_975[4] * sd / math.sqrt(5)
    result = mean_interval(values)
    assert result == pytest.approx({"n": 5, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half})
    assert mean_interval([0.7]) == {"n": 1, "mean": 0.7, "sd": None, "low": None, "high": None}


def test_paired_difference_pairs_by_seed():
    variant = {0: 1.0, 1: 1.6, 2: 3.55, 3: 9.0}
    baseline = {0: 0.5, 1: 1.0, 2: 3.0}  # seed 3 has no partner
    diffs = [0.5, 0.6, 0.55]
    result = paired_difference(variant, baseline)
    half = T_975[2] * statistics.stdev(diffs) / math.sqrt(3)
    assert result["n"] == 3 and result["mean"] == pytest.approx(statistics.fmean(diffs))
    assert result["low"] == pytest.approx(statistics.fmean(diffs) - half)
    assert result["excludes_zero"] is True
    # a large spread between seeds that both runs share cancels in the pairing: a steady gain shows
    spread = {s: 10.0 * s for s in range(5)}
    steady = paired_difference({s: v + 0.1 + 0.01 * (s % 2) for s, v in spread.items()}, spread)
    assert steady["excludes_zero"] is True and mean_interval(list(spread.values()))["sd"] > 5
    noisy = paired_difference({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert noisy["excludes_zero"] is False


def test_gold_at_matched_kl_on_a_straight_line():
    curve = [{"gold": 1.0 - kl, "kl": kl} for kl in (0.5, 1.0, 2.0)]
    at, mean = gold_at_kl(curve, 1.5)
    assert at == pytest.approx(1.0 - 1.5)
    # the curve starts at (0, first gold) = (0, 0.5): flat to kl 0.5, then the line
    assert mean == pytest.approx((0.5 * 0.5 + (0.5 + (1 - 1.5)) / 2 * 1.0) / 1.5)
    # KL that falls back is replaced by its running maximum
    at_back, _ = gold_at_kl([{"gold": 0.4, "kl": 1.0}, {"gold": 0.2, "kl": 0.5}, {"gold": 0.0, "kl": 2.0}], 1.5)
    assert at_back == pytest.approx(0.1)
    with pytest.raises(ValueError, match="budget"):
        gold_at_kl(curve, 3.0)


def test_bin_steps_averages_windows():
    rows = [{"step": s, "gold": float(s), "kl": None if s < 3 else 1.0} for s in range(1, 8)]
    binned = bin_steps(rows, 3)
    assert [r["step"] for r in binned] == [2, 4, 7]
    assert [r["gold"] for r in binned] == [1.5, 3.5, 6.0]
    assert [r["kl"] for r in binned] == [None, 1.0, 1.0]
    assert len(bin_steps(rows, 30)) == 7


def test_variant_parsing():
    assert Variant.parse("r2m:r2m_lr=1e-5:fusion_init=random") == Variant(
        "r2m:r2m_lr=1e-5:fusion_init=random", "r2m", (("r2m_lr", 1e-5), ("fusion_init", "random")))
    assert Variant.parse("no_bt:pretrain=false:update_steps=2").overrides == (("pretrain", False),
                                                                              ("update_steps", 2))
    with pytest.raises(ValueError, match="unknown mode"):
        Variant.parse("best")
    with pytest.raises(ValueError, match="is not field=value"):
        Variant.parse("r2m:steps=3")


def step_curve(similarity_at, gold_at, steps=range(10, 210, 10)):
    return [{"step": s, "state_similarity": similarity_at(s), "gold": gold_at(s), "kl": 0.1} for s in steps]


def test_monitor_lead_on_steps_known_by_construction():
    # similarity jumps at step 40, gold drops at step 80: the monitor leads by 40 steps
    curve = step_curve(lambda s: 0.2 if s < 40 else 0.8, lambda s: 1.0 if s < 80 else 0.5)
    found = monitor_lead(curve)
    assert (found["t_sim"], found["t_gold"], found["lead"]) == (40, 80, 40)
    assert found["gold_fell"] and found["sim_rose"] and found["has_similarity"]
    sims, golds = [r["state_similarity"] for r in curve], [r["gold"] for r in curve]
    assert found["corr"] == pytest.approx(float(np.corrcoef(sims, golds)[0, 1]))


def test_monitor_lead_on_ramps_uses_half_way_points():
    # gold rises to its peak 1.0 at step 100 and falls linearly to 0.5 at 200: half its fall (0.75) at step 150;
    # similarity ramps 0.25 -> 0.75 over steps 10..90: half its rise (0.5) at step 50
    gold = lambda s: s / 100 if s <= 100 else 1.0 - 0.5 * (s - 100) / 100  # noqa: E731
    similarity = lambda s: 0.25 + 0.5 * min(s - 10, 80) / 80  # noqa: E731
    found = monitor_lead(step_curve(similarity, gold))
    assert (found["t_sim"], found["t_gold"], found["lead"]) == (50, 150, 100)
    # the monitor moving after gold gives a negative lead
    late = monitor_lead(step_curve(lambda s: 0.25 if s < 180 else 0.75, gold))
    assert (late["t_sim"], late["t_gold"], late["lead"]) == (180, 150, -30)


def test_monitor_lead_counts_no_fall_and_no_rise_as_such():
    rising_gold = monitor_lead(step_curve(lambda s: 0.2 if s < 40 else 0.8, lambda s: s / 200))
    assert not rising_gold["gold_fell"] and rising_gold["t_gold"] is None and rising_gold["lead"] is None
    assert rising_gold["sim_rose"] and rising_gold["t_sim"] == 40
    # a dip within noise of the peak is no fall; a wiggle in similarity is no rise
    flat = monitor_lead(step_curve(lambda s: 0.5 + 0.001 * (s % 20 == 0), lambda s: 1.0 - 0.01 * (s > 100)))
    assert not flat["gold_fell"] and not flat["sim_rose"] and flat["lead"] is None
    unlogged = monitor_lead(step_curve(lambda s: None, lambda s: 1.0 if s < 80 else 0.5))
    assert unlogged["gold_fell"] and not unlogged["has_similarity"] and unlogged["corr"] is None
    constant = monitor_lead(step_curve(lambda s: 0.3, lambda s: 1.0 if s < 80 else 0.5))
    assert constant["corr"] is None and not constant["sim_rose"]


def test_monitor_summary_over_seeds():
    gold = lambda s: 1.0 if s < 80 else 0.5  # noqa: E731
    by_seed = {0: {"curve": step_curve(lambda s: 0.2 if s < 40 else 0.8, gold)},    # lead 40
               1: {"curve": step_curve(lambda s: 0.2 if s < 60 else 0.8, gold)},    # lead 20
               2: {"curve": step_curve(lambda s: 0.2 if s < 100 else 0.8, gold)},   # lead -20
               3: {"curve": step_curve(lambda s: 0.2 if s < 40 else 0.8, lambda s: 1.0)}}  # no fall
    summary = monitor_summary(by_seed)
    assert {k: summary[k] for k in ("runs", "with_similarity", "gold_fell", "sim_rose", "both", "monitor_first")} == {
        "runs": 4, "with_similarity": 4, "gold_fell": 3, "sim_rose": 4, "both": 3, "monitor_first": 2}
    assert summary["lead_steps"] == pytest.approx(mean_interval([40, 20, -20]))
    assert summary["corr_sim_gold"]["n"] == 3  # seed 3's gold is constant: no correlation
    assert summary["per_seed"][2]["lead"] == -20
    text = monitor_table([{"variant": "vanilla", "monitor": summary}, {"variant": "r2m"}])
    assert "Does state_similarity rise before gold falls?" in text
    assert "| vanilla | 4 | 4 | 3 | 4 | 3 | 2 |" in text and "| r2m |" not in text
    assert monitor_table([{"variant": "r2m"}]) == ""
