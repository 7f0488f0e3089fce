"""The lab's statistics against reference values computed without scipy (tables and hand formulas)."""

import math
import statistics

import pytest

from r2m.benchmarks.lab import Variant, gold_at_kl, mean_interval, paired_difference, t_quantile
from r2m.integrations.trl.lab_grpo import bin_steps

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
