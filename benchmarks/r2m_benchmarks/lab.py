"""`r2m bench lab`: reward over-optimisation in a world with a known gold reward (see `r2m.benchmarks.lab_world`).

Per seed the lab builds the world (its proxy reward model), the initial policy (SFT-pretrained on data
responses, cached under ``--cache-dir``; ``--random-init`` for the untrained one) and checks the paper's premise on
it (`r2m.benchmarks.lab_world.premise_check`). Then every variant trains the same initial policy with TRL's
GRPOTrainer against the proxy wrapped by R2M in the variant's mode, on the same prompts, so that runs pair by seed.

A variant is an R2M mode with optional `LabRunConfig` overrides: ``r2m``, ``r2m:r2m_lr=1e-5``,
``frozen:fusion_init=random``. Per variant the table gives gold reward at the end (mean of the last 1/``bins`` of
the steps) and at the peak (highest window), each with a 95% t-interval over seeds; gold at matched KL: at KL = K*
(K* the smallest largest-KL of all runs) and its mean over KL in [0, K*] (the area under the gold-vs-KL curve over
K*); the paired difference to ``vanilla`` per seed with its 95% t-interval (``exceeds_spread``: the interval
excludes 0); the collapse rate (share of seeds whose policy puts the spurious word in most responses at the end);
the reward scale (the trained reward's within-group spread over the proxy's); and R2M's relative update size per
step. Writes ``lab.json`` (all curves), ``lab.md`` and ``lab.png``. ``--quick`` is what `r2m demo` runs.
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

from r2m.benchmarks.lab_grpo import LabRunConfig, initial_policy, train_variant
from r2m.benchmarks.lab_world import LabConfig, LabWorld, PretrainConfig, premise_check
from r2m.benchmarks.options import add_quick, resolve_defaults
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results
from r2m.config import MODES
from r2m.reward_model import R2MRewardModel

VARIANTS = ("vanilla", "r2m", "r2m:fused_scale=base_spread", "r2m:r2m_lr=1e-3",
            "r2m:r2m_lr=1e-3:fused_scale=base_spread", "anchored:label_groups=2", "head_only:label_groups=2",
            "anchored:anchor_pairs=64", "head_only:anchor_pairs=64")
QUICK = {"seeds": 1, "steps": 150, "variants": "vanilla,r2m"}
DEFAULTS = {"seeds": 10, "steps": 300, "variants": ",".join(VARIANTS)}
COLLAPSE_SHARE = 0.5  # a run has collapsed when more than this share of its final responses has the spurious word
PAIRED_METRICS = ("gold_end", "gold_peak", "gold_at_kl", "gold_auc_kl")
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

    @classmethod
    def parse(cls, spec: str) -> Variant:
        mode, *assignments = spec.strip().split(":")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} in variant {spec!r}; choose from {MODES}")
        fields = {f.name for f in dataclasses.fields(LabRunConfig)} - {"seed", "steps", "sft"}
        overrides = []
        for assignment in assignments:
            name, sep, value = assignment.partition("=")
            if not sep or name not in fields:
                raise ValueError(f"variant {spec!r}: {assignment!r} is not field=value with a field of "
                                 f"{sorted(fields)}")
            overrides.append((name, _value(value)))
        return cls(spec.strip(), mode, tuple(overrides))

    def run_config(self, base: LabRunConfig) -> LabRunConfig:
        return dataclasses.replace(base, **dict(self.overrides))


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
    r2m: R2MRewardModel
    initial_policy: Path


def run_once(variant: Variant, run: LabRunConfig, world: LabWorld, proxy: torch.nn.Module, cache_dir: Path,
             work_dir: Path) -> LabResult:
    """Train the seed's initial policy against the proxy wrapped in ``variant``; returns the run record, the trained
    policy, the trained R2M reward and the initial policy's directory."""
    run = variant.run_config(run)
    policy_dir = initial_policy(world, run, cache_dir)
    record, trainer, reward = train_variant(variant.mode, run, world, proxy, policy_dir,
                                            work_dir / f"{variant.label.replace(':', '_')}-{run.seed}", variant.label)
    return LabResult(record, trainer.model.eval(), reward.r2m_model, policy_dir)


def check_premise(world: LabWorld, proxy: torch.nn.Module, run: LabRunConfig, cache_dir: Path,
                  pairs: int) -> dict[str, dict]:
    """`premise_check` on unbiased held-out gold pairs for the pretrained and the random-init policy of the seed,
    with each policy's mean gold reward on sampled responses."""
    test_pairs = world.preference_pairs(pairs, seed=60_000 + run.seed, bias=0.5)
    prompts = world.prompts(256, seed=90_000 + run.seed)
    result = {}
    for name, pretrain in (("pretrained", True), ("random_init", False)):
        path = initial_policy(world, dataclasses.replace(run, pretrain=pretrain), cache_dir)
        policy = AutoModelForCausalLM.from_pretrained(path).eval()
        responses = world.sample(policy, prompts, run.temperature, seed=run.seed)
        result[name] = {"sampled_gold": statistics.fmean(world.gold_reward(p, r)
                                                         for p, r in zip(prompts, responses, strict=True)),
                        **premise_check(world, policy, proxy, test_pairs, run.seed)}
    return result


def summarise(runs: dict[str, dict[int, dict]], baseline: str = "vanilla") -> tuple[list[dict], float | None]:
    """Per variant the metrics above (each a `mean_interval` over seeds) and the paired differences to
    ``baseline``; returns the rows and the matched-KL budget K*."""
    reached = [max((row["kl"] for row in r["curve"] if row["kl"] is not None), default=0.0)
               for by_seed in runs.values() for r in by_seed.values()]
    budget = min(reached) if reached and min(reached) > 0 else None
    per_seed: dict[str, dict[str, dict[int, float]]] = {}
    rows = []
    for label, by_seed in runs.items():
        metrics: dict[str, dict[int, float]] = {}
        for seed, run in by_seed.items():
            for key, value in run_metrics(run["curve"], budget).items():
                metrics.setdefault(key, {})[seed] = value
        per_seed[label] = metrics
        row = {"variant": label, "seeds": len(by_seed),
               "collapse_rate": statistics.fmean(v > COLLAPSE_SHARE for v in metrics["spurious_end"].values()),
               "extra_policy_forwards": sum(r["extra_policy_forwards"] for r in by_seed.values()),
               "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in by_seed.values()),
               "monitor": monitor_summary(by_seed)}
        row.update({key: mean_interval([v for v in values.values() if v is not None])
                    for key, values in metrics.items() if any(v is not None for v in values.values())})
        rows.append(row)
    if baseline in per_seed:
        for row in rows:
            if row["variant"] != baseline:
                row["vs_" + baseline] = {key: paired_difference(per_seed[row["variant"]][key], per_seed[baseline][key])
                                         for key in PAIRED_METRICS if key in per_seed[baseline]
                                         and key in per_seed[row["variant"]]}
    return rows, budget


def run_metrics(curve: list[dict], budget: float | None) -> dict[str, float | None]:
    """One run's summary numbers from its binned curve."""
    end = curve[-1]
    metrics = {"gold_end": end["gold"], "gold_peak": max(r["gold"] for r in curve),
               **{f"{key}_end": end[key] for key in ("proxy", "trained", "kl", "spurious", "spread_trained",
                                                     "spread_proxy", "onpolicy_acc_trained", "onpolicy_acc_proxy",
                                                     "state_similarity")},
               "spread_ratio_max": max((r["spread_trained"] / r["spread_proxy"] for r in curve if r["spread_proxy"]),
                                       default=None),
               **{key: _mean_of(curve, key) for key in ("update_head", "update_fusion", "label_ms")}}
    if budget is not None:
        metrics["gold_at_kl"], metrics["gold_auc_kl"] = gold_at_kl(curve, budget)
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


def tables(rows: list[dict], premise: dict[int, dict], budget: float | None) -> str:
    """The markdown report: results per variant, paired differences to vanilla, the state-similarity monitor's
    lead over gold's fall (`monitor_table`) and the premise check."""
    main = [{"variant": r["variant"], "seeds": r["seeds"],
             **{key: format_interval(r.get(key)) for key in ("gold_end", "gold_peak", "gold_at_kl", "gold_auc_kl",
                                                            "kl_end")},
             "collapse_rate": r["collapse_rate"], "spurious_end": format_interval(r["spurious_end"]),
             "proxy_end": format_interval(r["proxy_end"]), "trained_end": format_interval(r["trained_end"]),
             "spread_trained/proxy_end": f"{r['spread_trained_end']['mean']:.3g} / {r['spread_proxy_end']['mean']:.3g}",
             "update_head": format_interval(r.get("update_head"), 2)} for r in rows]
    text = markdown_table(main, list(main[0]))
    paired = [{"variant": r["variant"], **{f"d_{key}": format_interval(diff.get(key)) for key in PAIRED_METRICS},
               "exceeds_spread": diff["gold_end"]["excludes_zero"]}
              for r in rows if (diff := r.get("vs_vanilla"))]
    if paired:
        text += ("\nPaired difference to vanilla per seed, mean [95% t-interval]; exceeds_spread: the d_gold_end "
                 "interval excludes 0\n\n" + markdown_table(paired, list(paired[0])))
    text += monitor_table(rows)
    text += f"\nMatched-KL budget K* = {'none (no KL logged)' if budget is None else f'{budget:.4g}'}\n"
    if premise:
        seeds = sorted(premise)
        keys = ("sampled_gold", "same_class_cos_centred", "cross_class_cos_centred", "same_class_cos",
                "cross_class_cos", "probe_policy_states", "probe_rm_states", "proxy_rm")
        found = [{"policy": name, **{key: format_interval(mean_interval([premise[s][name][key] for s in seeds]))
                                     for key in keys}} for name in ("pretrained", "random_init")]
        text += ("\nPremise check (paper Sec. 3) on unbiased held-out gold pairs, mean [95% t-interval] over "
                 f"{len(seeds)} seed(s)\n\n" + markdown_table(found, ["policy", *keys]))
    return text


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    panels = (("gold", "gold reward (the truth)"), (None, "gold reward vs KL"),
              ("spread_ratio", "trained / proxy within-group spread"),
              ("onpolicy_acc_trained", "on-policy accuracy of the trained reward"),
              ("spurious", "share of responses with the spurious word"), ("update_head", "R2M head update size"))
    fig, axes = subplots(2, 3, figsize=(16, 8.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for index, (label, by_seed) in enumerate(runs.items()):
            style = {"label": label, "color": f"C{index % 10}", "linestyle": "-" if index < 10 else "--"}
            curves = [r["curve"] for r in by_seed.values()]
            steps = [r["step"] for r in curves[0]]
            if key is None:
                kl = [statistics.fmean(c[i]["kl"] or 0.0 for c in curves) for i in range(len(steps))]
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
        if key in ("spread_ratio", "update_head"):
            ax.set_yscale("log")
    seeds = len(next(iter(runs.values())))
    axes.flat[0].set_title(f"gold reward (the truth): mean and 95% interval over {seeds} seed(s)")
    axes.flat[0].legend(fontsize=8)
    save_figure(fig, path)


def _point(row: dict, key: str) -> float | None:
    if key == "spread_ratio":
        return row["spread_trained"] / row["spread_proxy"] if row["spread_proxy"] else None
    value = row.get(key)
    return value if value is None or value > 0 or key != "update_head" else None


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
    p.add_argument("--cache-dir", default="out/lab-cache", help="where initial policies are kept")
    p.add_argument("--spurious-word", default="w0")
    p.add_argument("--spurious-penalty", type=float, default=1.0)
    world = LabConfig()
    p.add_argument("--rm-pairs", type=int, default=world.rm_pairs,
                   help="gold-labelled pairs the proxy RM is trained on")
    p.add_argument("--rm-bias", type=float, default=world.rm_bias,
                   help="how often the better response of a training pair carries the spurious word")


def world_and_run(options: argparse.Namespace, seed: int) -> tuple[LabWorld, LabRunConfig]:
    world = LabWorld(LabConfig(seed=seed, spurious_word=options.spurious_word,
                               spurious_penalty=options.spurious_penalty, rm_pairs=options.rm_pairs,
                               rm_bias=options.rm_bias))
    run = LabRunConfig(steps=options.steps, seed=seed, groups=options.groups, generations=options.generations,
                       temperature=options.temperature, policy_lr=options.policy_lr, beta=options.beta,
                       pretrain=not options.random_init, r2m_lr=options.r2m_lr, alpha=options.alpha,
                       sft=PretrainConfig(examples=options.sft_examples, epochs=options.sft_epochs,
                                         best_of=options.sft_best_of),
                       update_steps=options.update_steps, omega_min=options.omega_min,
                       num_iterations=options.num_iterations)
    return world, run


def parser(prog: str = "r2m bench lab", out: str = "benchmarks/results/lab") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    add_quick(p, QUICK)
    p.add_argument("--variants", help=f"comma-separated mode[:field=value...] (default {DEFAULTS['variants']})")
    p.add_argument("--seeds", type=int, help=f"default {DEFAULTS['seeds']}")
    p.add_argument("--premise-pairs", type=int, default=2000, help="unbiased gold pairs of the premise check")
    add_run_options(p)
    return p


def main(argv: list[str] | None = None, prog: str = "r2m bench lab", out: str = "benchmarks/results/lab",
         quick: bool = False) -> int:
    options = parser(prog, out).parse_args(argv)
    options.quick = options.quick or quick
    resolve_defaults(options, QUICK, DEFAULTS)
    try:
        variants = [Variant.parse(v) for v in options.variants.split(",") if v.strip()]
    except ValueError as error:
        raise SystemExit(f"{prog}: --variants: {error}") from None
    for name in ("seeds", "steps"):
        if getattr(options, name) < 1:
            raise SystemExit(f"{prog}: --{name} must be >= 1, got {getattr(options, name)}")
    runs: dict[str, dict[int, dict]] = {v.label: {} for v in variants}
    premise: dict[int, dict] = {}
    cache = Path(options.cache_dir)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=options.seeds * len(variants), desc="lab runs") as progress:
        for seed in range(options.seeds):
            world, run = world_and_run(options, seed)
            proxy = world.train_proxy()
            premise[seed] = check_premise(world, proxy, run, cache, options.premise_pairs)
            for variant in variants:
                progress.set_postfix(variant=variant.label, seed=seed)
                runs[variant.label][seed] = run_once(variant, run, world, proxy, cache, Path(tmp)).record
                progress.update()
    rows, budget = summarise(runs)
    text = tables(rows, premise, budget)
    result = write_results(options.out, "lab", {"args": vars(options), "wall_seconds": time.perf_counter() - start,
                                                "summary": rows, "kl_budget": budget, "premise": premise,
                                                "runs": runs}, text)
    plot(runs, result / "lab.png")
    print(text)
    print(f"wrote {result / 'lab.json'}, {result / 'lab.md'}, {result / 'lab.png'}")
    return 0


def demo(argv: list[str] | None = None) -> int:
    """`r2m demo`: the lab's quick mode (vanilla RM vs R2M), written to ``out/demo``."""
    return main(argv, prog="r2m demo", out="out/demo", quick=True)


if __name__ == "__main__":
    raise SystemExit(main())
