"""`r2m bench lab`: reward over-optimisation in a world with a known gold reward (see `r2m.lab`).

A tiny policy is trained with TRL's GRPOTrainer against the proxy reward model, wrapped by R2M in each variant
(`vanilla`, `r2m`, `frozen`, `noise`, `head_only`), over several seeds. Per logged step it records the proxy
reward (the unmodified proxy RM on the policy's completions), the gold reward and the KL to the initial policy;
it writes the curves (JSON), a summary table (markdown) and a plot (PNG).
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
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results
from r2m.config import MODES
from r2m.integrations.trl.demo import DemoConfig, train_variant
from r2m.lab import LabConfig, LabWorld
from r2m.reward_model import R2MRewardModel

VARIANTS = ("vanilla", "r2m", "frozen", "noise", "head_only")


@dataclass
class LabResult:
    curve: list[dict]
    policy: torch.nn.Module
    r2m: R2MRewardModel
    initial_policy: Path


def run_once(variant: str, run: DemoConfig, world: LabWorld, proxy: torch.nn.Module, work_dir: Path) -> LabResult:
    """Train one policy against the (wrapped) proxy; returns its curves, the trained policy and the R2M reward."""
    policy_dir = work_dir / f"policy-{run.seed}"
    if not policy_dir.exists():
        torch.manual_seed(run.seed)
        tiny.build_policy(world.tokenizer, "llama", hidden_size=run.policy_hidden_size).save_pretrained(policy_dir)
        world.tokenizer.save_pretrained(policy_dir)
    curves, trainer, reward = train_variant(variant, run, world, proxy, policy_dir, work_dir / f"{variant}-{run.seed}")
    return LabResult(curves["curve"], trainer.model.eval(), reward.r2m, policy_dir)


def summarise(curves: dict[str, dict[int, list[dict]]]) -> list[dict]:
    """Per variant: gold at the end and at its peak (mean and spread over seeds), proxy and KL at the end."""
    rows = []
    for variant, by_seed in curves.items():
        end = [c[-1]["gold"] for c in by_seed.values()]
        peak = [max(r["gold"] for r in c) for c in by_seed.values()]
        rows.append({"variant": variant, "seeds": len(by_seed),
                     "gold_end": statistics.fmean(end), "gold_end_sd": _sd(end),
                     "gold_peak": statistics.fmean(peak), "gold_peak_sd": _sd(peak),
                     "proxy_end": statistics.fmean(c[-1]["proxy"] for c in by_seed.values()),
                     "kl_end": statistics.fmean(c[-1]["kl"] for c in by_seed.values())})
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


def plot(curves: dict[str, dict[int, list[dict]]], path: Path) -> None:
    fig, (by_step, by_kl) = subplots(1, 2, figsize=(11, 4))
    for variant, by_seed in curves.items():
        steps = [r["step"] for r in next(iter(by_seed.values()))]
        gold = [statistics.fmean(c[i]["gold"] for c in by_seed.values()) for i in range(len(steps))]
        kl = [statistics.fmean(c[i]["kl"] for c in by_seed.values()) for i in range(len(steps))]
        by_step.plot(steps, gold, label=variant)
        by_kl.plot(kl, gold, marker=".", label=variant)
    by_step.set(xlabel="policy step", ylabel="gold reward", title="Gold reward during GRPO")
    by_kl.set(xlabel="KL to the initial policy", ylabel="gold reward", title="Over-optimisation curve")
    by_step.legend()
    save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r2m bench lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/lab", help="output directory")
    p.add_argument("--quick", action="store_true", help="1 seed, vanilla and r2m only, 120 steps")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {MODES}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--r2m-lr", type=float, default=1e-3, help="R2M update learning rate (tiny models need more "
                   "than the paper's 1e-6)")
    p.add_argument("--omega-min", type=float, default=0.6)
    p.add_argument("--spurious-word", default="w0")
    p.add_argument("--spurious-penalty", type=float, default=1.0)
    p.add_argument("--rm-pairs", type=int, default=512, help="gold-labelled pairs the proxy RM is trained on")
    p.add_argument("--rm-bias", type=float, default=0.8,
                   help="how often the better response of a training pair carries the spurious word")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    variants = ["vanilla", "r2m"] if args.quick else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in MODES]
    if unknown:
        raise SystemExit(f"r2m bench lab: --variants has unknown modes {unknown}; choose from {MODES}")
    seeds = 1 if args.quick else args.seeds
    steps = 120 if args.quick else args.steps
    curves: dict[str, dict[int, list[dict]]] = {v: {} for v in variants}
    accuracy: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=seeds * len(variants), desc="lab runs") as progress:
        for seed in range(seeds):
            lab = LabConfig(seed=seed, spurious_word=args.spurious_word, spurious_penalty=args.spurious_penalty,
                            rm_pairs=args.rm_pairs, rm_bias=args.rm_bias)
            world = LabWorld(lab)
            proxy = world.train_proxy()
            accuracy[seed] = world.accuracy(proxy, world.preference_pairs(400, seed=50_000 + seed, bias=0.5))
            for variant in variants:
                progress.set_postfix(variant=variant, seed=seed)
                run = DemoConfig(steps=steps, seed=seed, r2m_lr=args.r2m_lr, omega_min=args.omega_min)
                curves[variant][seed] = run_once(variant, run, world, proxy, Path(tmp)).curve
                progress.update()
    rows = summarise(curves)
    columns = ["variant", "seeds", "gold_end", "gold_end_sd", "gold_peak", "gold_peak_sd", "proxy_end", "kl_end",
               "gold_end_vs_vanilla", "exceeds_spread"]
    table = markdown_table(rows, columns)
    out = write_results(args.out, "lab", {"args": vars(args), "summary": rows, "curves": curves,
                                          "proxy_unbiased_accuracy": accuracy}, table)
    plot(curves, out / "lab.png")
    print(table)
    print(f"wrote {out / 'lab.json'}, {out / 'lab.md'}, {out / 'lab.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
