"""`r2m bench accuracy`: reward-model accuracy before and after R2M training, in the lab world (paper Table 3).

On held-out gold-labelled pairs (in-distribution, i.e. with the proxy's spurious bias, and unbiased), compares
the proxy reward model, R2M before training (the initial policy's feedback) and R2M after a lab GRPO run (the
final policy's feedback, w at t = T).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import r2m
from r2m.benchmarks.lab import run_once
from r2m.benchmarks.options import add_quick, resolve_defaults
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results
from r2m.capture import find_backbone
from r2m.config import R2MConfig
from r2m.integrations.trl.lab_grpo import LabRunConfig
from r2m.lab import LabConfig, LabWorld

Pairs = list[tuple[str, str, str]]
QUICK = {"seeds": 1, "steps": 120, "pairs": 200}
DEFAULTS = {"seeds": 3, "steps": 300, "pairs": 600}


@torch.no_grad()
def policy_states(policy: torch.nn.Module, world: LabWorld, prompts: list[str], responses: list[str]):
    """The policy's last-layer states over prompt + response, on the S - 1 positions R2M is trained with."""
    enc = world.tokenizer([f"{p} {r}" for p, r in zip(prompts, responses, strict=True)], return_tensors="pt",
                          padding=True)
    hidden = find_backbone(policy)(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r2m bench accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/accuracy")
    add_quick(p, QUICK)
    p.add_argument("--seeds", type=int, help=f"default {DEFAULTS['seeds']}")
    p.add_argument("--steps", type=int, help=f"GRPO steps of the lab run (default {DEFAULTS['steps']})")
    p.add_argument("--pairs", type=int, help=f"held-out pairs per test set (default {DEFAULTS['pairs']})")
    p.add_argument("--r2m-lr", type=float, default=1e-3)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    resolve_defaults(args, QUICK, DEFAULTS)
    seeds, steps, count = args.seeds, args.steps, args.pairs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(range(seeds), desc="accuracy seeds"):
            lab = LabConfig(seed=seed)
            world = LabWorld(lab)
            proxy = world.train_proxy()
            tests = {"biased": world.preference_pairs(count, seed=70_000 + seed),
                     "unbiased": world.preference_pairs(count, seed=80_000 + seed, bias=0.5)}
            result = run_once("r2m", LabRunConfig(steps=steps, seed=seed, r2m_lr=args.r2m_lr), world, proxy, Path(tmp))
            initial = AutoModelForCausalLM.from_pretrained(result.initial_policy).eval()
            untrained = r2m.wrap(proxy, result.r2m.policy_dim, R2MConfig(total_steps=steps, seed=seed))
            for name, pairs in tests.items():
                rows.append({"seed": seed, "test_set": name, "proxy_rm": world.accuracy(proxy, pairs),
                             "r2m_before": r2m_accuracy(untrained, initial, world, pairs, steps),
                             "r2m_after": r2m_accuracy(result.r2m, result.policy, world, pairs, steps)})
    summary = []
    for name in ("biased", "unbiased"):
        subset = [r for r in rows if r["test_set"] == name]
        summary.append({"test_set": name, "seeds": len(subset),
                        **{k: statistics.fmean(r[k] for r in subset) for k in ("proxy_rm", "r2m_before", "r2m_after")}})
    table = markdown_table(summary, ["test_set", "seeds", "proxy_rm", "r2m_before", "r2m_after"])
    out = write_results(args.out, "accuracy", {"args": vars(args), "summary": summary, "per_seed": rows}, table)
    _plot(summary, out / "accuracy.png")
    print(table)
    print(f"wrote {out / 'accuracy.json'}, {out / 'accuracy.md'}, {out / 'accuracy.png'}")
    return 0


def _plot(summary: list[dict], path: Path) -> None:
    fig, ax = subplots(figsize=(6, 3.5))
    keys = ("proxy_rm", "r2m_before", "r2m_after")
    for i, key in enumerate(keys):
        ax.bar([j + (i - 1) * 0.27 for j in range(len(summary))], [s[key] for s in summary], width=0.27, label=key)
    ax.set_xticks(range(len(summary)), [s["test_set"] for s in summary])
    ax.set(ylabel="pairwise accuracy", ylim=(0, 1), title="Reward-model accuracy on held-out gold pairs")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
