"""`r2m bench lab`: reward over-optimisation in a world with a known gold reward (see `r2m.benchmarks.lab_world`).

Per seed the lab builds the world (its proxy reward model), the initial policy (SFT-pretrained on data
responses, cached under ``--cache-dir``; ``--random-init`` for the untrained one) and checks the paper's premise on
it (`r2m.benchmarks.lab_world.premise_check`). Then every variant trains the same initial policy with TRL's
GRPOTrainer against the proxy wrapped by R2M in the variant's mode, on the same prompts, so that runs pair by seed.

A variant is an R2M mode with optional `LabRunConfig` overrides (``r2m``, ``r2m:r2m_lr=1e-5``,
``frozen:fusion_init=random``; ``r2m:r2m_lr=1e-4|1e-3|1e-2`` expands to one variant per value: a sweep) or a
control (`CONTROLS`): ``oracle`` (the policy trained on the gold reward: the positive control), ``mix=<lambda>``
(trained on ``(1 - lambda) z(proxy) + lambda z(gold)``) and ``unbiased`` (vanilla over a proxy RM trained on pairs
without the spurious correlation). The question the lab answers is whether a variant made the reward better, so
per variant it reports, each as a mean with its 95% t-interval over seeds and as the paired difference to
``vanilla`` per seed (``exceeds_spread``: that interval excludes 0):

- the on-policy ranking gap: how much better than the proxy the trained reward ranks the policy's own samples by
  gold (share of within-group pairs ordered as gold orders them, trained minus proxy, mean over the run);
- gold at matched KL: at KL = K* (K* the smallest largest-KL of the non-control runs: controls do not set it) and
  its mean over KL in [0, K*]; and gold at the fixed KL values ``--kl-points``, paired over the seeds where both runs
  reach the value;
- gold at the end (mean of the last 1/``bins`` of the steps), always beside KL at the end: gold_end alone rewards
  anything that slows the policy;
- with ``oracle`` among the variants, each variant's share of the vanilla-to-oracle gap (paired means);
- the collapse rate (share of seeds whose policy puts the spurious word in most responses at the end), the reward
  scale (the trained reward's within-group spread over the proxy's) and R2M's relative update size per update
  (``r2m/update_size`` where the reward logs it, else the head's change measured by the lab).

Seeds run from ``--first-seed`` (choose settings on seeds 0-9, report them on 10-19). Writes ``lab.json`` (all
curves), ``lab.md``, ``lab.png`` and, with variants that differ in ``label_groups``, ``label_budget.png``.
``--quick`` is what `r2m demo` runs. The world's flags default to `WORLD`, the world the lab reports in (the
earlier world: ``--rm-bias 0.65 --rm-repeat-share 0 --sft-spurious-share 0``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from r2m.benchmarks.lab_grpo import CONTROLS, LabRunConfig, initial_policy, train_variant
from r2m.benchmarks.lab_world import LabConfig, LabWorld, PretrainConfig, premise_check
from r2m.benchmarks.options import add_quick, resolve_defaults
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results
from r2m.config import MODES
from r2m.reward_model import R2MRewardModel

VARIANTS = ("vanilla", "oracle", "r2m", "r2m:r2m_lr=1e-2", "anchored:r2m_lr=1e-2:label_groups=2",
            "head_only:r2m_lr=1e-2:label_groups=2")
# The world the lab reports in (issue 22, chosen on vanilla and the controls alone: `results/lab-world-probe`): the
# proxy's training pairs favour the spurious word 80% of the time and 30% of its responses repeat words, and 30% of the
# policy's SFT responses carry the spurious word, so that vanilla's exploit is the one the proxy's bias causes.
WORLD = {"rm_bias": 0.8, "rm_repeat_share": 0.3, "sft_spurious_share": 0.3}
# `r2m demo`: one seed, 150 steps, no premise check (within 3 minutes on 2 cores): vanilla, the oracle and the variant
# chosen on the selection seeds 0-9 (`results/lab-label-design-seeds0-9`, round 4: anchored with gold labels on every
# group, replayed), its gain at matched KL confirmed on seeds 10-19 (`results/lab-label-replay-seeds10-19`).
DEMO_VARIANT = ("anchored:r2m_lr=1e-3:label_groups=8:label_replay=256:label_pairs=all:anchor_weight=10:"
                "update_steps=4")
QUICK = {"seeds": 1, "steps": 150, "variants": f"vanilla,oracle,{DEMO_VARIANT}", "premise_pairs": 0}
DEFAULTS = {"seeds": 10, "steps": 150, "variants": ",".join(VARIANTS), "premise_pairs": 2000}
COLLAPSE_SHARE = 0.5  # a run has collapsed when more than this share of its final responses has the spurious word
PAIRED_METRICS = ("rank_gap", "gold_at_kl", "gold_auc_kl", "gold_end", "kl_end", "gold_peak")
GAP_METRICS = ("rank_gap", "gold_at_kl", "gold_end")  # shown as shares of the vanilla-to-oracle gap
KL_POINTS = (0.1, 0.2, 0.3, 0.4, 0.5)
GOLD_MIN_FALL = 0.02  # a run's gold has fallen when its last window is this far below its peak
SIMILARITY_MIN_RISE = 0.01  # its state similarity has risen when its maximum is this far above its start


# ---- statistics -----------------------------------------------------------------------------------------------

def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p >= 0.5) of Student's t with ``df`` degrees of freedom: bisection on its CDF, the
    density integrated by Simpson's rule."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        odd = sum(density((2 * i - 1) * h) for i in range(1, n // 2 + 1))
        even = sum(density(2 * i * h) for i in range(1, n // 2))
        return 0.5 + h / 3 * (density(0.0) + density(x) + 4 * odd + 2 * even)

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float], level: float = 0.95) -> dict[str, float | None]:
    """Mean, sample sd and the two-sided t-interval of the mean (None bounds with fewer than 2 values)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None}
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def paired_difference(values: dict[int, float], baseline: dict[int, float],
                      level: float = 0.95) -> dict[str, float | bool | None]:
    """Per-seed differences ``values - baseline`` over the seeds both have: their mean with its t-interval, and
    whether the interval excludes 0 (None with fewer than 2 pairs)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        raise ValueError("paired_difference: no seed in common")
    result = mean_interval([values[s] - baseline[s] for s in seeds], level)
    result["excludes_zero"] = None if result["low"] is None else bool(result["low"] > 0 or result["high"] < 0)
    return result


def gold_at_kl(curve: list[dict], budget: float) -> tuple[float, float]:
    """Gold at KL = ``budget`` and the mean gold over KL in [0, budget] (area under gold vs KL over budget). KL is
    made non-decreasing (running maximum) and the curve starts at (0, the first window's gold); linear between
    points."""
    xs, ys = [0.0], [curve[0]["gold"]]
    for row in curve:
        xs.append(max(xs[-1], row["kl"]))
        ys.append(row["gold"])
    if budget <= 0 or budget > xs[-1]:
        raise ValueError(f"gold_at_kl: budget {budget} must be in (0, {xs[-1]}] (the curve's largest KL)")
    area = 0.0
    for i in range(1, len(xs)):
        (x0, y0), (x1, y1) = (xs[i - 1], ys[i - 1]), (xs[i], ys[i])
        if x1 <= x0:
            continue
        if x1 >= budget:
            at = y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
            return at, (area + 0.5 * (y0 + at) * (budget - x0)) / budget
        area += 0.5 * (y0 + y1) * (x1 - x0)
    raise AssertionError("unreachable: budget <= the largest KL")


# ---- the lab ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """An R2M mode and the `LabRunConfig` fields it overrides; ``label`` is how the results name it."""

    label: str
    mode: str
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def is_control(self) -> bool:
        return self.mode in CONTROLS

    @classmethod
    def parse(cls, spec: str) -> Variant:
        mode, *assignments = spec.strip().split(":")
        overrides = []
        if mode.startswith("mix="):
            mode, assignments = "mix", [mode, *assignments]
        if mode not in MODES and mode not in CONTROLS:
            raise ValueError(f"unknown mode {mode!r} in variant {spec!r}; choose an R2M mode of {MODES} or a "
                             f"control of {CONTROLS} (mix as mix=<lambda>)")
        if mode == "mix" and not any(a.startswith("mix=") for a in assignments):
            raise ValueError(f"variant {spec!r}: the mix control needs its gold weight, mix=<lambda>")
        fields = {f.name for f in dataclasses.fields(LabRunConfig)} - {"seed", "steps", "sft"}
        for assignment in assignments:
            name, sep, value = assignment.partition("=")
            if not sep or name not in fields:
                raise ValueError(f"variant {spec!r}: {assignment!r} is not field=value with a field of "
                                 f"{sorted(fields)}")
            overrides.append((name, _value(value)))
        if mode != "mix" and any(name == "mix" for name, _ in overrides):
            raise ValueError(f"variant {spec!r}: mix= belongs to the mix control only")
        return cls(spec.strip(), mode, tuple(overrides))

    def run_config(self, base: LabRunConfig) -> LabRunConfig:
        return dataclasses.replace(base, **dict(self.overrides))


def parse_variants(text: str) -> list[Variant]:
    """Comma-separated variant specs; a value ``a|b|c`` in one spec expands it into one variant per value (a sweep,
    e.g. ``r2m:r2m_lr=1e-4|1e-3``). Labels must be unique."""
    specs = []
    for spec in (v.strip() for v in text.split(",") if v.strip()):
        expanded = [""]
        for i, part in enumerate(spec.split(":")):
            name, sep, values = part.partition("=")
            options = [f"{name}{sep}{v}" for v in values.split("|")] if sep else [part]
            expanded = [f"{e}{':' if i else ''}{o}" for e in expanded for o in options]
        specs += expanded
    variants = [Variant.parse(spec) for spec in specs]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a variant is given twice in {labels}")
    return variants


def _value(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class LabResult:
    record: dict
    policy: torch.nn.Module
    r2m: R2MRewardModel | None
    initial_policy: Path


def run_once(variant: Variant, run: LabRunConfig, world: LabWorld, proxy: torch.nn.Module, cache_dir: Path,
             work_dir: Path, unbiased_rm: torch.nn.Module | None = None) -> LabResult:
    """Train the seed's initial policy against the proxy wrapped in ``variant`` (control ``unbiased``: against
    ``unbiased_rm``); returns the run record, the trained policy, the trained R2M reward (None for controls
    ``oracle`` and ``mix``) and the initial policy's directory."""
    run = variant.run_config(run)
    policy_dir = initial_policy(world, run, cache_dir, progress=True)
    work = work_dir / f"{variant.label.replace(':', '_').replace('=', '-')}-{run.seed}"
    record, trainer, reward = train_variant(variant.mode, run, world, proxy, policy_dir, work, variant.label,
                                            reward_model=unbiased_rm if variant.mode == "unbiased" else None)
    return LabResult(record, trainer.model.eval(), None if reward is None else reward.r2m_model, policy_dir)


def check_premise(world: LabWorld, proxy: torch.nn.Module, run: LabRunConfig, cache_dir: Path,
                  pairs: int) -> dict[str, dict]:
    """`premise_check` on unbiased held-out gold pairs for the pretrained and the random-init policy of the seed,
    with each policy's mean gold reward on sampled responses."""
    test_pairs = world.preference_pairs(pairs, seed=60_000 + run.seed, bias=0.5)
    prompts = world.prompts(256, seed=90_000 + run.seed)
    result = {}
    for name, pretrain in (("pretrained", True), ("random_init", False)):
        path = initial_policy(world, dataclasses.replace(run, pretrain=pretrain), cache_dir, progress=True)
        policy = AutoModelForCausalLM.from_pretrained(path).eval()
        responses = world.sample(policy, prompts, run.temperature, seed=run.seed)
        result[name] = {"sampled_gold": statistics.fmean(world.gold_reward(p, r)
                                                         for p, r in zip(prompts, responses, strict=True)),
                        **premise_check(world, policy, proxy, test_pairs, run.seed)}
    return result


def summarise(runs: dict[str, dict[int, dict]], baseline: str = "vanilla", controls: dict[str, str] | None = None,
              kl_points: tuple[float, ...] = KL_POINTS) -> tuple[list[dict], float | None]:
    """Per variant the metrics above (each a `mean_interval` over seeds), the paired differences to ``baseline`` and,
    with an ``oracle`` control among ``controls`` (label -> control), each variant's share of the vanilla-to-oracle
    gap (only for metrics the oracle has on every seed: it may never reach K*); returns the rows and the matched-KL
    budget K* (set by the variants that are not controls)."""
    controls = controls or {}
    reached = [_max_kl(r["curve"]) for label, by_seed in runs.items() if label not in controls
               for r in by_seed.values()]
    budget = min(reached) if reached and min(reached) > 0 else None
    per_seed: dict[str, dict[str, dict[int, float | None]]] = {}
    rows = []
    for label, by_seed in runs.items():
        metrics: dict[str, dict[int, float | None]] = {}
        for seed, run in by_seed.items():
            for key, value in run_metrics(run["curve"], budget, kl_points).items():
                metrics.setdefault(key, {})[seed] = value
        per_seed[label] = metrics
        row = {"variant": label, "control": controls.get(label), "seeds": len(by_seed),
               "collapse_rate": statistics.fmean(v > COLLAPSE_SHARE for v in metrics["spurious_end"].values()),
               "extra_policy_forwards": sum(r["extra_policy_forwards"] for r in by_seed.values()),
               "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in by_seed.values()),
               "monitor": monitor_summary(by_seed)}
        row.update({key: mean_interval([v for v in values.values() if v is not None])
                    for key, values in metrics.items() if any(v is not None for v in values.values())})
        rows.append(row)
    paired_keys = (*PAIRED_METRICS, *(_kl_key(x) for x in kl_points))
    if baseline in per_seed:
        for row in rows:
            if row["variant"] == baseline:
                continue
            diffs = {}
            for key in paired_keys:
                mine, base = (_known(per_seed[label].get(key, {})) for label in (row["variant"], baseline))
                if set(mine) & set(base):
                    diffs[key] = paired_difference(mine, base)
            row["vs_" + baseline] = diffs
    oracle = next((label for label, control in controls.items() if control == "oracle" and label in per_seed), None)
    if oracle is not None and baseline in per_seed:
        gap = next(r for r in rows if r["variant"] == oracle)["vs_" + baseline]
        seeds = len(runs[oracle])  # a share only where the oracle pairs with vanilla on every seed
        for row in rows:
            diffs = {} if row["variant"] == baseline else row["vs_" + baseline]
            row["oracle_gap_share"] = {
                key: (0.0 if row["variant"] == baseline else diffs[key]["mean"] / gap[key]["mean"])
                for key in (*GAP_METRICS, *(_kl_key(x) for x in kl_points))
                if key in gap and gap[key]["mean"] != 0 and gap[key]["n"] == seeds
                and (row["variant"] == baseline or key in diffs)}
    return rows, budget


def _kl_key(value: float) -> str:
    return f"gold@kl={value:g}"


def _known(values: dict[int, float | None]) -> dict[int, float]:
    return {seed: v for seed, v in values.items() if v is not None and not math.isnan(v)}


def _max_kl(curve: list[dict]) -> float:
    return max((row["kl"] for row in curve if row.get("kl") is not None), default=0.0)


def run_metrics(curve: list[dict], budget: float | None,
                kl_points: tuple[float, ...] = KL_POINTS) -> dict[str, float | None]:
    """One run's summary numbers from its binned curve (gold at a KL value the run never reaches: None)."""
    end = curve[-1]
    update = "update_size" if any(r.get("update_size") is not None for r in curve) else "update_head"
    metrics = {"gold_end": end["gold"], "gold_peak": max(r["gold"] for r in curve),
               **{f"{key}_end": end.get(key) for key in ("proxy", "trained", "kl", "spurious", "repeat",
                                                         "spread_trained", "spread_proxy", "onpolicy_acc_trained",
                                                         "onpolicy_acc_proxy", "state_similarity")},
               "spread_ratio_max": max((r["spread_trained"] / r["spread_proxy"] for r in curve if r["spread_proxy"]),
                                       default=None),
               "rank_gap": _mean_of(curve, "rank_gap"), "update_size": _mean_of(curve, update),
               **{key: _mean_of(curve, key) for key in ("update_head", "update_fusion", "label_ms", "anchor_bt")}}
    for key in ("anchor_bt", "label_bt_proxy", "label_bt_trained"):
        labelled = [r[key] for r in curve if r.get(key) is not None]
        if labelled:  # the BT loss on the labelled pairs in the first and the last window that has labels
            metrics[f"{key}_start"], metrics[f"{key}_end"] = labelled[0], labelled[-1]
    kl_curve = [r for r in curve if r.get("kl") is not None]
    top = _max_kl(kl_curve)
    if budget is not None and kl_curve and top >= budget:
        metrics["gold_at_kl"], metrics["gold_auc_kl"] = gold_at_kl(kl_curve, budget)
    for value in kl_points:
        metrics[_kl_key(value)] = gold_at_kl(kl_curve, value)[0] if kl_curve and 0 < value <= top else None
    return metrics


def _mean_of(curve: list[dict], key: str) -> float | None:
    values = [r[key] for r in curve if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def monitor_lead(curve: list[dict], min_fall: float = GOLD_MIN_FALL,
                 min_rise: float = SIMILARITY_MIN_RISE) -> dict[str, float | bool | None]:
    """Does ``state_similarity`` rise before gold falls, in one run's binned curve?

    ``t_gold``: the first window from gold's peak on where gold has lost half its fall from the peak to the last
    window (``gold_fell``: that fall is at least ``min_fall``); ``t_sim``: the first window where the similarity has
    covered half its rise from the first window to its maximum (``sim_rose``: that rise is at least ``min_rise``);
    ``lead`` = t_gold - t_sim in steps (positive: the monitor moved first), only when both happened; ``corr``: the
    Pearson correlation of similarity and gold over the windows holding both (None with under 3 or a constant one).
    """
    gold = [(r["step"], r["gold"]) for r in curve if r.get("gold") is not None]
    similarity = [(r["step"], r["state_similarity"]) for r in curve if r.get("state_similarity") is not None]
    t_gold = t_sim = None
    if gold:
        peak_at = max(range(len(gold)), key=lambda i: gold[i][1])
        peak, fall = gold[peak_at][1], gold[peak_at][1] - gold[-1][1]
        if fall >= min_fall:
            t_gold = next(step for step, value in gold[peak_at:] if value <= peak - fall / 2)
    if similarity:
        first, rise = similarity[0][1], max(v for _, v in similarity) - similarity[0][1]
        if rise >= min_rise:
            t_sim = next(step for step, value in similarity if value >= first + rise / 2)
    both = [(r["state_similarity"], r["gold"]) for r in curve
            if r.get("state_similarity") is not None and r.get("gold") is not None]
    return {"has_similarity": bool(similarity), "gold_fell": t_gold is not None, "sim_rose": t_sim is not None,
            "t_gold": t_gold, "t_sim": t_sim, "lead": None if t_gold is None or t_sim is None else t_gold - t_sim,
            "corr": _pearson([x for x, _ in both], [y for _, y in both])}


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # a constant series
        return None


def monitor_summary(by_seed: dict[int, dict]) -> dict:
    """`monitor_lead` of each seed's run, counted (runs with a similarity logged, with gold falling, with the
    similarity rising, with both, with the monitor first) and its lead and correlation as `mean_interval`s."""
    found = {seed: monitor_lead(run["curve"]) for seed, run in by_seed.items()}
    leads = [f["lead"] for f in found.values() if f["lead"] is not None]
    corrs = [f["corr"] for f in found.values() if f["corr"] is not None]
    return {"runs": len(found), "with_similarity": sum(f["has_similarity"] for f in found.values()),
            "gold_fell": sum(f["gold_fell"] for f in found.values()),
            "sim_rose": sum(f["sim_rose"] for f in found.values()), "both": len(leads),
            "monitor_first": sum(lead > 0 for lead in leads),
            "lead_steps": mean_interval(leads) if leads else None,
            "corr_sim_gold": mean_interval(corrs) if corrs else None, "per_seed": found}


def monitor_table(rows: list[dict]) -> str:
    """Markdown: per variant, whether the state-similarity monitor rises before gold falls (`monitor_lead`)."""
    table = [{"variant": r["variant"], **{key: m[key] for key in ("runs", "with_similarity", "gold_fell", "sim_rose",
                                                                   "both", "monitor_first")},
              "lead_steps": format_interval(m["lead_steps"]), "corr(sim, gold)": format_interval(m["corr_sim_gold"])}
             for r in rows if (m := r.get("monitor"))]
    if not table:
        return ""
    return ("\nDoes state_similarity rise before gold falls? Per run: t_gold, the window where gold has lost half "
            f"its fall from its peak to its end (gold_fell: a fall >= {GOLD_MIN_FALL}); t_sim, the window where the "
            "similarity has covered half its rise from its first window to its maximum (sim_rose: a rise >= "
            f"{SIMILARITY_MIN_RISE}); lead_steps = t_gold - t_sim over the runs with both (monitor_first: lead > 0), "
            "and the Pearson correlation of similarity and gold over the windows; mean [95% t-interval] over "
            "seeds\n\n" + markdown_table(table, list(table[0])))


def format_interval(stat: dict | None, digits: int = 3) -> str:
    """'mean [low, high]' (or the mean alone without an interval)."""
    if not stat:
        return ""
    if stat.get("low") is None:
        return f"{stat['mean']:.{digits}g}"
    return f"{stat['mean']:.{digits}g} [{stat['low']:.{digits}g}, {stat['high']:.{digits}g}]"


def tables(rows: list[dict], premise: dict[int, dict], budget: float | None,
           kl_points: tuple[float, ...] = KL_POINTS) -> str:
    """The markdown report: results per variant, paired differences to vanilla, shares of the vanilla-to-oracle
    gap, gold at fixed KL values, the state-similarity monitor's lead over gold's fall (`monitor_table`) and the
    premise check."""
    main = [{"variant": r["variant"], "seeds": r["seeds"],
             **{key: format_interval(r.get(key)) for key in ("rank_gap", "gold_at_kl", "gold_auc_kl", "gold_end",
                                                            "kl_end", "gold_peak")},
             "collapse_rate": r["collapse_rate"], "spurious_end": format_interval(r["spurious_end"]),
             "repeat_end": format_interval(r.get("repeat_end")),
             "proxy_end": format_interval(r["proxy_end"]), "trained_end": format_interval(r["trained_end"]),
             "spread_trained/proxy_end": f"{r['spread_trained_end']['mean']:.3g} / {r['spread_proxy_end']['mean']:.3g}",
             "update_size": format_interval(r.get("update_size"), 2)} for r in rows]
    text = markdown_table(main, list(main[0]))
    text += ("\nrank_gap: on-policy ranking of the policy's own samples by gold, trained reward minus proxy (share of "
             "within-group pairs ordered as gold orders them; run mean); gold_at_kl: gold at the matched KL K* (below) "
             "and gold_auc_kl its mean over KL in [0, K*]; gold_end always beside kl_end; repeat_end: the share of a "
             "response's words that repeat an earlier one; update_size: relative change of the R2M weights per "
             "update\n")
    paired = [{"variant": r["variant"],
               **{f"d_{key}": format_interval(diff.get(key)) for key in PAIRED_METRICS},
               "rank_gap_exceeds_spread": diff.get("rank_gap", {}).get("excludes_zero"),
               "gold_at_kl_exceeds_spread": diff.get("gold_at_kl", {}).get("excludes_zero"),
               "gold_end_exceeds_spread": diff.get("gold_end", {}).get("excludes_zero")}
              for r in rows if (diff := r.get("vs_vanilla")) is not None]
    if paired:
        text += ("\nPaired difference to vanilla per seed, mean [95% t-interval]; *_exceeds_spread: that interval "
                 "excludes 0\n\n" + markdown_table(paired, list(paired[0])))
    shares = [{"variant": r["variant"], **{f"share_{key}": f"{v:.2f}" for key, v in r["oracle_gap_share"].items()}}
              for r in rows if r.get("oracle_gap_share")]
    if shares:
        columns = ["variant", *dict.fromkeys(k for row in shares for k in row if k != "variant")]
        text += ("\nShare of the vanilla-to-oracle gap, (variant - vanilla) / (oracle - vanilla) of the paired means "
                 "(1: as good as training on the gold reward; 0: no better than vanilla)\n\n"
                 + markdown_table(shares, columns))
    fixed = [{"variant": r["variant"],
              **{f"d_gold@kl={x:g}": _with_n(diff.get(_kl_key(x))) for x in kl_points}}
             for r in rows if (diff := r.get("vs_vanilla")) is not None]
    if fixed:
        text += ("\nGold at fixed KL values, paired difference to vanilla over the seeds where both runs reach the "
                 "value (n: such seeds), mean [95% t-interval]\n\n" + markdown_table(fixed, list(fixed[0])))
    labels = [{"variant": r["variant"],
               **{f"{key}_{end}": format_interval(r.get(f"{key}_{end}")) for key in ("anchor_bt", "label_bt_proxy",
                                                                                    "label_bt_trained")
                  for end in ("start", "end")}}
              for r in rows if r.get("label_bt_proxy_start")]  # the runs with on-policy labels
    if labels:
        text += ("\nBradley-Terry loss on the labelled pairs (each labelled group's highest- against its lowest-gold "
                 "sample) in the first and the last window: anchor_bt, of the fused reward the update trains "
                 "(w(t) proxy + (1 - w(t)) trained); label_bt_proxy, of the frozen proxy alone; label_bt_trained, of "
                 "the reward the policy was trained on, at scoring time\n\n" + markdown_table(labels, list(labels[0])))
    text += monitor_table(rows)
    text += (f"\nMatched-KL budget K* = {'none (no KL logged)' if budget is None else f'{budget:.4g}'} (the smallest "
             "largest KL of the runs that are not controls)\n")
    if premise:
        seeds = sorted(premise)
        keys = ("sampled_gold", "same_class_cos_centred", "cross_class_cos_centred", "same_class_cos",
                "cross_class_cos", "probe_policy_states", "probe_rm_states", "proxy_rm")
        found = [{"policy": name, **{key: format_interval(mean_interval([premise[s][name][key] for s in seeds]))
                                     for key in keys}} for name in ("pretrained", "random_init")]
        text += ("\nPremise check (paper Sec. 3) on unbiased held-out gold pairs, mean [95% t-interval] over "
                 f"{len(seeds)} seed(s)\n\n" + markdown_table(found, ["policy", *keys]))
    return text


def _with_n(stat: dict | None) -> str:
    return "" if not stat else f"{format_interval(stat)} (n={stat['n']})"


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    panels = (("gold", "gold reward (the truth)"), (None, "gold reward vs KL"),
              ("rank_gap", "on-policy ranking gap: trained - proxy"),
              ("spread_ratio", "trained / proxy within-group spread"),
              ("spurious", "share of responses with the spurious word"),
              ("repeat", "share of repeated words in a response"), ("kl", "KL to the initial policy"),
              ("update_size", "R2M update size (relative)"))
    fig, axes = subplots(2, 4, figsize=(21, 8.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for index, (label, by_seed) in enumerate(runs.items()):
            style = {"label": label, "color": f"C{index % 10}", "linestyle": "-" if index < 10 else "--"}
            curves = [r["curve"] for r in by_seed.values()]
            steps = [r["step"] for r in curves[0]]
            if key is None:
                kl = [statistics.fmean(c[i].get("kl") or 0.0 for c in curves) for i in range(len(steps))]
                ax.plot(kl, [statistics.fmean(c[i]["gold"] for c in curves) for i in range(len(steps))],
                        marker=".", **style)
                continue
            values = [[_point(c[i], key) for c in curves] for i in range(len(steps))]
            if any(v is None for column in values for v in column):
                continue
            stats = [mean_interval(column) for column in values]
            ax.plot(steps, [s["mean"] for s in stats], **style)
            if stats[0]["low"] is not None and key == "gold":
                ax.fill_between(steps, [s["low"] for s in stats], [s["high"] for s in stats], alpha=0.15,
                                color=style["color"])
        ax.set(title=title, xlabel="KL to the initial policy" if key is None else "policy step")
        if key in ("spread_ratio", "update_size"):
            ax.set_yscale("log")
    seeds = len(next(iter(runs.values())))
    axes.flat[0].set_title(f"gold reward (the truth): mean and 95% interval over {seeds} seed(s)")
    axes.flat[0].legend(fontsize=8)
    save_figure(fig, path)


def _point(row: dict, key: str) -> float | None:
    if key == "spread_ratio":
        return row["spread_trained"] / row["spread_proxy"] if row["spread_proxy"] else None
    if key == "update_size":
        value = row.get("update_size", row.get("update_head"))
        return value if value is not None and value > 0 else None
    return row.get(key)


def plot_label_budget(rows: list[dict], variants: list[Variant], path: Path) -> bool:
    """Metric vs labelled groups per batch, one line per R2M mode (and other overrides), vanilla and the oracle as
    horizontal lines: the ranking gap and gold at K* (paired to vanilla). Only when some variants differ in
    ``label_groups`` alone; returns whether it drew."""
    by_label = {r["variant"]: r for r in rows}
    lines: dict[str, list[tuple[int, dict]]] = {}
    for v in variants:
        overrides = dict(v.overrides)
        if v.is_control or "label_groups" not in overrides:
            continue
        rest = ":".join([v.mode, *(f"{k}={x}" for k, x in v.overrides if k != "label_groups")])
        lines.setdefault(rest, []).append((overrides["label_groups"], by_label[v.label]))
    lines = {name: sorted(points, key=lambda p: p[0]) for name, points in lines.items() if len(points) > 1}
    if not lines:
        return False
    fig, axes = subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, title) in zip(axes, (("rank_gap", "on-policy ranking gap (trained - proxy)"),
                                       ("d_gold_at_kl", "gold at matched KL K*, paired to vanilla")), strict=True):
        for index, (name, points) in enumerate(lines.items()):
            stats = [_budget_stat(row, key) for _, row in points]
            xs = [x for (x, _), st in zip(points, stats, strict=True) if st]
            stats = [st for st in stats if st]
            ax.errorbar(xs, [st["mean"] for st in stats], marker="o", color=f"C{index}", label=name, capsize=3,
                        yerr=[[st["mean"] - (st["low"] if st["low"] is not None else st["mean"]) for st in stats],
                              [(st["high"] if st["high"] is not None else st["mean"]) - st["mean"] for st in stats]])
        for name, style in (("vanilla", "k--"), ("oracle", "g:")):
            if name in by_label and (st := _budget_stat(by_label[name], key)):
                ax.axhline(st["mean"], color=style[0], linestyle=style[1:], label=name)
        ax.set(title=title, xlabel="labelled groups per batch")
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _budget_stat(row: dict, key: str) -> dict | None:
    if key == "d_gold_at_kl":
        if row["variant"] == "vanilla":
            return {"mean": 0.0, "low": None, "high": None}
        return row.get("vs_vanilla", {}).get("gold_at_kl")
    return row.get(key)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The `LabConfig` and `LabRunConfig` knobs `r2m bench lab` and `r2m bench accuracy` share."""
    run = LabRunConfig()
    p.add_argument("--steps", type=int, help="GRPO steps per run (and T of w(t))")
    p.add_argument("--generations", type=int, default=run.generations, help="K, responses per prompt")
    p.add_argument("--groups", type=int, default=run.groups, help="prompts per policy and R2M update")
    p.add_argument("--r2m-lr", type=float, default=run.r2m_lr, help="R2M update learning rate")
    p.add_argument("--alpha", type=float, default=run.alpha, help="GREBT's GRE weight")
    p.add_argument("--update-steps", type=int, default=run.update_steps, help="R2M optimiser steps per update")
    p.add_argument("--omega-min", type=float, default=run.omega_min, help="Omega, the floor of w(t)")
    p.add_argument("--num-iterations", type=int, default=run.num_iterations,
                   help="policy epochs per generation batch (the paper's 2)")
    p.add_argument("--beta", type=float, default=run.beta, help="KL coefficient of the policy update")
    p.add_argument("--policy-lr", type=float, default=run.policy_lr)
    p.add_argument("--temperature", type=float, default=run.temperature)
    p.add_argument("--random-init", action="store_true", help="start from the random-init policy instead of the "
                   "SFT-pretrained one")
    p.add_argument("--sft-examples", type=int, default=run.sft.examples, help="prompts of the pretraining stage")
    p.add_argument("--sft-epochs", type=int, default=run.sft.epochs, help="epochs of the pretraining stage")
    p.add_argument("--sft-best-of", type=int, default=run.sft.best_of,
                   help="each pretraining response is the best by gold of this many data responses (1: plain data)")
    p.add_argument("--sft-spurious-share", type=float, default=run.sft.spurious_share,
                   help="share of the pretraining responses that carry the spurious word once (0: none, so the policy "
                        "starts unable to find the exploit the proxy's bias pays for)")
    p.add_argument("--cache-dir", default="out/lab-cache", help="where initial policies are kept")
    p.add_argument("--spurious-word", default="w0")
    p.add_argument("--spurious-penalty", type=float, default=1.0)
    world = LabConfig()
    p.add_argument("--rm-pairs", type=int, default=world.rm_pairs,
                   help="gold-labelled pairs the proxy RM is trained on")
    p.add_argument("--rm-bias", type=float, default=world.rm_bias,
                   help="how often the better response of a training pair carries the spurious word")
    p.add_argument("--rm-epochs", type=int, default=world.rm_epochs, help="epochs of the proxy RM's training")
    p.add_argument("--rm-repeat-share", type=float, default=world.rm_repeat_share,
                   help="share of the proxy RM's training responses that repeat one or two words throughout")


def world_and_run(options: argparse.Namespace, seed: int) -> tuple[LabWorld, LabRunConfig]:
    world = LabWorld(LabConfig(seed=seed, spurious_word=options.spurious_word,
                               spurious_penalty=options.spurious_penalty, rm_pairs=options.rm_pairs,
                               rm_bias=options.rm_bias, rm_repeat_share=options.rm_repeat_share,
                               rm_epochs=options.rm_epochs))
    run = LabRunConfig(steps=options.steps, seed=seed, groups=options.groups, generations=options.generations,
                       temperature=options.temperature, policy_lr=options.policy_lr, beta=options.beta,
                       pretrain=not options.random_init, r2m_lr=options.r2m_lr, alpha=options.alpha,
                       sft=PretrainConfig(examples=options.sft_examples, epochs=options.sft_epochs,
                                         best_of=options.sft_best_of, spurious_share=options.sft_spurious_share),
                       update_steps=options.update_steps, omega_min=options.omega_min,
                       num_iterations=options.num_iterations)
    return world, run


def parser(prog: str = "r2m bench lab", out: str = "benchmarks/results/lab") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    add_quick(p, QUICK)
    p.add_argument("--variants", help=f"comma-separated mode[:field=value...] (default {DEFAULTS['variants']})")
    p.add_argument("--seeds", type=int, help=f"default {DEFAULTS['seeds']}")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (choose settings on 0-9, report them on 10-19)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two threads per process trained the "
                        "proxy RM 50x slower under load than one)")
    p.add_argument("--kl-points", default=",".join(f"{x:g}" for x in KL_POINTS),
                   help="comma-separated KL values at which gold is compared (paired where both runs reach them)")
    p.add_argument("--premise-pairs", type=int,
                   help=f"unbiased gold pairs of the premise check (0: none; default {DEFAULTS['premise_pairs']})")
    add_run_options(p)
    p.set_defaults(**WORLD)
    return p


def main(argv: list[str] | None = None, prog: str = "r2m bench lab", out: str = "benchmarks/results/lab",
         quick: bool = False) -> int:
    options = parser(prog, out).parse_args(argv)
    options.quick = options.quick or quick
    resolve_defaults(options, QUICK, DEFAULTS)
    try:
        variants = parse_variants(options.variants)
    except ValueError as error:
        raise SystemExit(f"{prog}: --variants: {error}") from None
    try:
        kl_points = tuple(float(x) for x in options.kl_points.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"{prog}: --kl-points must be comma-separated numbers, got {options.kl_points!r}") from None
    if any(x <= 0 for x in kl_points):
        raise SystemExit(f"{prog}: --kl-points must be > 0, got {options.kl_points!r}")
    for name in ("seeds", "steps"):
        if getattr(options, name) < 1:
            raise SystemExit(f"{prog}: --{name} must be >= 1, got {getattr(options, name)}")
    if options.first_seed < 0:
        raise SystemExit(f"{prog}: --first-seed must be >= 0, got {options.first_seed}")
    if options.threads < 1:
        raise SystemExit(f"{prog}: --threads must be >= 1, got {options.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _run_lab(options, variants, kl_points)
    finally:
        torch.set_num_threads(threads)


def _run_lab(options: argparse.Namespace, variants: list[Variant], kl_points: tuple[float, ...]) -> int:
    seeds = range(options.first_seed, options.first_seed + options.seeds)
    runs: dict[str, dict[int, dict]] = {v.label: {} for v in variants}
    controls = {v.label: v.mode for v in variants if v.is_control}
    premise: dict[int, dict] = {}
    cache = Path(options.cache_dir)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(seeds) * len(variants), desc="lab runs") as progress:
        for done, seed in enumerate(seeds, 1):
            world, run = world_and_run(options, seed)
            progress.set_postfix(stage="proxy RM", seed=seed)
            proxy = world.train_proxy(progress=f"proxy RM, seed {seed}")
            unbiased = (world.train_proxy(progress=f"unbiased RM, seed {seed}", bias=0.5)
                        if "unbiased" in controls.values() else None)
            progress.set_postfix(stage="policy SFT", seed=seed)
            initial_policy(world, run, cache, progress=True)
            if options.premise_pairs:
                progress.set_postfix(stage="premise check", seed=seed)
                premise[seed] = check_premise(world, proxy, run, cache, options.premise_pairs)
            for variant in variants:
                progress.set_postfix(variant=variant.label, seed=seed)
                runs[variant.label][seed] = run_once(variant, run, world, proxy, cache, Path(tmp), unbiased).record
                progress.update()
            if done < len(seeds):  # the seeds so far, so that a long run can be read (or stopped) before it ends
                report(options, variants, kl_points, runs, premise, controls, start, partial=True)
    written = report(options, variants, kl_points, runs, premise, controls, start)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def report(options: argparse.Namespace, variants: list[Variant], kl_points: tuple[float, ...],
           runs: dict[str, dict[int, dict]], premise: dict[int, dict], controls: dict[str, str], start: float,
           partial: bool = False) -> list[Path]:
    """Summarise the seeds run so far and write ``lab.json`` (``complete`` false while seeds remain), ``lab.md``
    and the plots; returns the paths written (the table is printed once the run is complete)."""
    seeds = sorted(next(iter(runs.values())))
    rows, budget = summarise(runs, controls=controls, kl_points=kl_points)
    text = tables(rows, premise, budget, kl_points)
    if partial:
        text = f"PARTIAL: seeds {seeds} of {options.seeds} done\n\n" + text
    result = write_results(options.out, "lab", {"args": vars(options), "seeds": seeds, "complete": not partial,
                                                "wall_seconds": time.perf_counter() - start, "summary": rows,
                                                "kl_budget": budget, "controls": controls, "premise": premise,
                                                "runs": runs}, text)
    plot(runs, result / "lab.png")
    written = [result / "lab.json", result / "lab.md", result / "lab.png"]
    if plot_label_budget(rows, variants, result / "label_budget.png"):
        written.append(result / "label_budget.png")
    if not partial:
        print(text)
    return written


def demo(argv: list[str] | None = None) -> int:
    """`r2m demo`: the lab's quick mode (the vanilla RM, the oracle and `DEMO_VARIANT`), written to ``out/demo``."""
    return main(argv, prog="r2m demo", out="out/demo", quick=True)


if __name__ == "__main__":
    raise SystemExit(main())
