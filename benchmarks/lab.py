"""`r2m bench lab`: reward over-optimisation in a world with a known gold reward (see `r2m.lab`).

A tiny policy is trained with TRL's GRPOTrainer against the proxy reward model, wrapped by R2M in each variant
(`vanilla`, `r2m`, `frozen`, `noise`, `head_only`), over several seeds. Per logged step it records the proxy
reward (the unmodified proxy RM on the policy's completions), the gold reward and the KL to the initial policy;
it writes the curves (JSON), a summary table (markdown) and a plot (PNG). `--quick` (one seed, `vanilla` and
`r2m`, 120 steps) is what `r2m demo` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from r2m import tiny
from r2m.benchmarks.options import add_quick, resolve_defaults
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results
from r2m.config import MODES
from r2m.integrations.trl.lab_grpo import LabRunConfig, train_variant
from r2m.lab import LabConfig, LabWorld
from r2m.reward_model import R2MRewardModel

VARIANTS = ("vanilla", "r2m", "frozen", "noise", "head_only")


QUICK = {"seeds": 1, "steps": 120, "variants": "vanilla,r2m"}
DEFAULTS = {"seeds": 3, "steps": 300, "variants": ",".join(VARIANTS)}


@dataclass
class LabResult:
    record: dict
    policy: torch.nn.Module
    r2m: R2MRewardModel
    initial_policy: Path


def run_once(variant: str, run: LabRunConfig, world: LabWorld, proxy: torch.nn.Module, work_dir: Path) -> LabResult:
    """Train one policy against the (wrapped) proxy; returns its run record (curve, extra policy forwards), the
    trained policy and the R2M reward."""
    policy_dir = work_dir / f"policy-{run.seed}"
    if not policy_dir.exists():
        torch.manual_seed(run.seed)
        tiny.build_policy(world.tokenizer, "llama", hidden_size=run.policy_hidden_size).save_pretrained(policy_dir)
        world.tokenizer.save_pretrained(policy_dir)
    record, trainer, reward = train_variant(variant, run, world, proxy, policy_dir, work_dir / f"{variant}-{run.seed}")
    return LabResult(record, trainer.model.eval(), reward.r2m, policy_dir)


def summarise(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """Per variant: gold at the end and at its peak (mean and spread over seeds), proxy, trained-on reward and KL
    at the end, and the policy forwards R2M added."""
    rows = []
    for variant, by_seed in runs.items():
        curves = [r["curve"] for r in by_seed.values()]
        end = [c[-1]["gold"] for c in curves]
        peak = [max(r["gold"] for r in c) for c in curves]
        rows.append({"variant": variant, "seeds": len(by_seed),
                     "gold_end": statistics.fmean(end), "gold_end_sd": _sd(end),
                     "gold_peak": statistics.fmean(peak), "gold_peak_sd": _sd(peak),
                     "proxy_end": statistics.fmean(c[-1]["proxy"] for c in curves),
                     "trained_end": statistics.fmean(c[-1]["trained"] for c in curves),
                     "kl_end": statistics.fmean(c[-1]["kl"] for c in curves),
                     "extra_policy_forwards": sum(r["extra_policy_forwards"] for r in by_seed.values())})
    base = next((r for r in rows if r["variant"] == "vanilla"), None)
    for row in rows:
        if base is not None and row is not base:
            gap = row["gold_end"] - base["gold_end"]
            row["gold_end_vs_vanilla"] = gap
            # with one seed there is no spread to compare against
            row["exceeds_spread"] = (abs(gap) > row["gold_end_sd"] + base["gold_end_sd"]) if row["seeds"] > 1 else None
    return rows


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    fig, (by_step, proxy_by_step, by_kl) = subplots(1, 3, figsize=(15, 4))
    for variant, by_seed in runs.items():
        curves = [r["curve"] for r in by_seed.values()]
        steps = [r["step"] for r in curves[0]]
        mean = {key: [statistics.fmean(c[i][key] for c in curves) for i in range(len(steps))]
                for key in ("gold", "proxy", "kl")}
        by_step.plot(steps, mean["gold"], label=variant)
        proxy_by_step.plot(steps, mean["proxy"], label=variant)
        by_kl.plot(mean["kl"], mean["gold"], marker=".", label=variant)
    seeds = len(next(iter(runs.values())))
    by_step.set(xlabel="policy step", ylabel="gold reward", title=f"Gold reward (the truth), mean of {seeds} seed(s)")
    proxy_by_step.set(xlabel="policy step", ylabel="proxy RM score", title="Proxy reward model's own score")
    by_kl.set(xlabel="KL to the initial policy", ylabel="gold reward", title="Over-optimisation curve")
    by_step.legend()
    save_figure(fig, path)


def parser(prog: str = "r2m bench lab", out: str = "benchmarks/results/lab") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    add_quick(p, QUICK)
    p.add_argument("--variants", help=f"comma-separated, from {MODES} (default {DEFAULTS['variants']})")
    p.add_argument("--seeds", type=int, help=f"default {DEFAULTS['seeds']}")
    p.add_argument("--steps", type=int, help=f"GRPO steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--r2m-lr", type=float, default=1e-3, help="R2M update learning rate (tiny models need more "
                   "than the paper's 1e-6)")
    p.add_argument("--omega-min", type=float, default=0.6)
    p.add_argument("--spurious-word", default="w0")
    p.add_argument("--spurious-penalty", type=float, default=1.0)
    p.add_argument("--rm-pairs", type=int, default=512, help="gold-labelled pairs the proxy RM is trained on")
    p.add_argument("--rm-bias", type=float, default=0.8,
                   help="how often the better response of a training pair carries the spurious word")
    return p


def main(argv: list[str] | None = None, prog: str = "r2m bench lab", out: str = "benchmarks/results/lab",
         quick: bool = False) -> int:
    options = parser(prog, out).parse_args(argv)
    options.quick = options.quick or quick
    resolve_defaults(options, QUICK, DEFAULTS)
    variants = [v.strip() for v in options.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in MODES]
    if unknown:
        raise SystemExit(f"{prog}: --variants has unknown modes {unknown}; choose from {MODES}")
    for name in ("seeds", "steps"):
        if getattr(options, name) < 1:
            raise SystemExit(f"{prog}: --{name} must be >= 1, got {getattr(options, name)}")
    runs: dict[str, dict[int, dict]] = {v: {} for v in variants}
    accuracy: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=options.seeds * len(variants), desc="lab runs") as progress:
        for seed in range(options.seeds):
            lab = LabConfig(seed=seed, spurious_word=options.spurious_word, spurious_penalty=options.spurious_penalty,
                            rm_pairs=options.rm_pairs, rm_bias=options.rm_bias)
            world = LabWorld(lab)
            proxy = world.train_proxy()
            accuracy[seed] = world.accuracy(proxy, world.preference_pairs(400, seed=50_000 + seed, bias=0.5))
            for variant in variants:
                progress.set_postfix(variant=variant, seed=seed)
                run = LabRunConfig(steps=options.steps, seed=seed, r2m_lr=options.r2m_lr,
                                   omega_min=options.omega_min)
                runs[variant][seed] = run_once(variant, run, world, proxy, Path(tmp)).record
                progress.update()
    rows = summarise(runs)
    columns = ["variant", "seeds", "gold_end", "gold_end_sd", "gold_peak", "gold_peak_sd", "proxy_end", "trained_end",
               "kl_end", "extra_policy_forwards", "gold_end_vs_vanilla", "exceeds_spread"]
    table = markdown_table(rows, columns)
    result = write_results(options.out, "lab", {"args": vars(options), "summary": rows, "runs": runs,
                                                "proxy_unbiased_accuracy": accuracy}, table)
    plot(runs, result / "lab.png")
    print(table)
    print(f"wrote {result / 'lab.json'}, {result / 'lab.md'}, {result / 'lab.png'}")
    return 0


def demo(argv: list[str] | None = None) -> int:
    """`r2m demo`: the lab's quick mode (vanilla RM vs R2M, one seed), written to ``out/demo``."""
    return main(argv, prog="r2m demo", out="out/demo", quick=True)


if __name__ == "__main__":
    raise SystemExit(main())
