"""`r2m bench accuracy`: reward-model accuracy in the lab world, off-policy (paper Table 3) and on-policy.

Off-policy: on held-out gold-labelled pairs (in-distribution, i.e. with the proxy's spurious bias, and unbiased),
the proxy reward model, R2M before training (the initial policy's feedback) and R2M after a lab GRPO run (the final
policy's feedback, w at t = T). On-policy: over the same run, how the trained reward (the one the policy is
trained on) and the proxy rank the policy's own samples by gold (the share of within-group pairs of different gold
that they order as gold does). Means over seeds with 95% t-intervals.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import r2m
from r2m.benchmarks.lab import (
    Variant,
    add_run_options,
    format_interval,
    mean_interval,
    paired_difference,
    run_once,
    world_and_run,
)
from r2m.benchmarks.lab_world import LabWorld
from r2m.benchmarks.options import add_quick, resolve_defaults
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results

Pairs = list[tuple[str, str, str]]
QUICK = {"seeds": 1, "steps": 150, "pairs": 200}
DEFAULTS = {"seeds": 5, "steps": 300, "pairs": 600}
OFF_POLICY = ("proxy_rm", "r2m_before", "r2m_after")
ON_POLICY = ("onpolicy_acc_proxy", "onpolicy_acc_trained")


@torch.no_grad()
def policy_states(policy: torch.nn.Module, world: LabWorld, prompts: list[str], responses: list[str]):
    """The policy's last-layer states over prompt + response, on the S - 1 positions R2M is trained with."""
    enc = world.tokenizer([f"{p} {r}" for p, r in zip(prompts, responses, strict=True)], return_tensors="pt",
                          padding=True)
    hidden = policy.base_model(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    mask = enc.attention_mask.bool()
    mask[torch.arange(mask.shape[0]), mask.sum(1) - 1] = False
    return hidden, mask


@torch.no_grad()
def r2m_accuracy(model: r2m.R2MRewardModel, policy: torch.nn.Module, world: LabWorld, pairs: Pairs,
                 step: int) -> float:
    prompts = [p for p, _, _ in pairs]
    scores = []
    for responses in ([c for _, c, _ in pairs], [r for _, _, r in pairs]):
        enc = world.tokenizer([world.reward_text(p, r) for p, r in zip(prompts, responses, strict=True)],
                              return_tensors="pt", padding=True)
        rte = model.rte(enc.input_ids, enc.attention_mask)
        scores.append(model.reward_from_rte(rte, *policy_states(policy, world, prompts, responses), step))
    return float((scores[0] > scores[1]).float().mean())


def on_policy_window(curves: dict[int, list[dict]], index: int) -> dict[str, dict]:
    """Both on-policy accuracies at window ``index`` over seeds, and their paired difference (trained - proxy)."""
    by_seed = {key: {seed: curve[index][key] for seed, curve in curves.items() if curve[index][key] is not None}
               for key in ON_POLICY}
    return {**{key: mean_interval(list(values.values())) for key, values in by_seed.items()},
            "trained_minus_proxy": paired_difference(by_seed["onpolicy_acc_trained"], by_seed["onpolicy_acc_proxy"])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r2m bench accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/accuracy")
    add_quick(p, QUICK)
    p.add_argument("--variant", default="r2m", help="the R2M variant trained (as in `r2m bench lab --variants`)")
    p.add_argument("--seeds", type=int, help=f"default {DEFAULTS['seeds']}")
    p.add_argument("--pairs", type=int, help=f"held-out pairs per test set (default {DEFAULTS['pairs']})")
    add_run_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    resolve_defaults(args, QUICK, DEFAULTS)
    try:
        variant = Variant.parse(args.variant)
    except ValueError as error:
        raise SystemExit(f"r2m bench accuracy: --variant: {error}") from None
    if variant.is_control:
        raise SystemExit(f"r2m bench accuracy: --variant: {variant.label!r} is a control; it trains no R2M reward")
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(range(args.seeds), desc="accuracy seeds"):
            world, run = world_and_run(args, seed)
            proxy = world.train_proxy()
            tests = {"biased": world.preference_pairs(args.pairs, seed=70_000 + seed),
                     "unbiased": world.preference_pairs(args.pairs, seed=80_000 + seed, bias=0.5)}
            result = run_once(variant, run, world, proxy, Path(args.cache_dir), Path(tmp))
            initial = AutoModelForCausalLM.from_pretrained(result.initial_policy).eval()
            with torch.random.fork_rng():
                torch.manual_seed(seed)  # as R2MReward seeds its wrap: the same random fusion_init
                untrained = r2m.wrap(proxy, result.r2m.policy_dim, variant.run_config(run).r2m_config(variant.mode))
            for name, pairs in tests.items():
                rows.append({"seed": seed, "test_set": name, "proxy_rm": world.accuracy(proxy, pairs),
                             "r2m_before": r2m_accuracy(untrained, initial, world, pairs, run.steps),
                             "r2m_after": r2m_accuracy(result.r2m, result.policy, world, pairs, run.steps)})
            curves[seed] = [{"step": r["step"], **{k: r[k] for k in ON_POLICY}} for r in result.record["curve"]]
    off_policy = [{"test_set": name, "seeds": args.seeds,
                   **{k: mean_interval([r[k] for r in rows if r["test_set"] == name]) for k in OFF_POLICY}}
                  for name in ("biased", "unbiased")]
    on_policy = [{"window": name, "step": curves[0][index]["step"], "seeds": args.seeds,
                  **on_policy_window(curves, index)} for name, index in (("first", 0), ("last", -1))]
    table = markdown_table([{**s, **{k: format_interval(s[k]) for k in OFF_POLICY}} for s in off_policy],
                           ["test_set", "seeds", *OFF_POLICY])
    table += (f"\nOn-policy: ranking of the {variant.label} run's own samples by gold (first and last window of "
              "steps; trained_minus_proxy: paired per seed)\n\n"
              + markdown_table([{**s, **{k: format_interval(s[k]) for k in (*ON_POLICY, "trained_minus_proxy")}}
                                for s in on_policy], ["window", "step", "seeds", *ON_POLICY, "trained_minus_proxy"]))
    out = write_results(args.out, "accuracy", {"args": vars(args), "summary": off_policy, "on_policy": on_policy,
                                               "per_seed": rows, "on_policy_curves": curves}, table)
    _plot(off_policy, curves, out / "accuracy.png")
    print(table)
    print(f"wrote {out / 'accuracy.json'}, {out / 'accuracy.md'}, {out / 'accuracy.png'}")
    return 0


def _plot(summary: list[dict], curves: dict[int, list[dict]], path: Path) -> None:
    fig, (bars, over_time) = subplots(1, 2, figsize=(12, 4))
    for i, key in enumerate(OFF_POLICY):
        means = [s[key]["mean"] for s in summary]
        errors = [0.0 if s[key]["low"] is None else s[key]["high"] - s[key]["mean"] for s in summary]
        bars.bar([j + (i - 1) * 0.27 for j in range(len(summary))], means, yerr=errors, width=0.27, label=key)
    bars.set_xticks(range(len(summary)), [s["test_set"] for s in summary])
    bars.set(ylabel="pairwise accuracy", ylim=(0, 1), title="Off-policy: held-out gold pairs")
    bars.legend()
    steps = [r["step"] for r in next(iter(curves.values()))]
    for key in ON_POLICY:
        stats = [mean_interval([c[i][key] for c in curves.values() if c[i][key] is not None])
                 for i in range(len(steps))]
        over_time.plot(steps, [s["mean"] for s in stats], label=key)
        if stats[0]["low"] is not None:
            over_time.fill_between(steps, [s["low"] for s in stats], [s["high"] for s in stats], alpha=0.15)
    over_time.axhline(0.5, color="grey", lw=0.8, ls=":")
    over_time.set(xlabel="policy step", ylabel="within-group pairwise accuracy",
                  title="On-policy: the policy's own samples ranked by gold")
    over_time.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
