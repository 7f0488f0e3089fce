"""`r2m bench ceiling`: how well could a reward trained on unlimited gold labels rank the policy's own samples?

The positive control of a label-fed R2M update (modes ``anchored`` and ``head_only``) in the lab world. Per seed, for
the initial (SFT-pretrained) policy and for the policy after a vanilla GRPO run against the proxy: K samples for each
of ``--prompts`` fresh prompts, labelled by the gold reward; every within-group pair of different gold is a labelled
pair. A linear Bradley-Terry probe (`lab_world.probe_accuracy`) is fitted on the pairs of half of the groups and
tested on the other half, on three feature sets:

- ``probe_rm``: the proxy RM's reward-token state, what ``head_only`` reads (its head is such a probe): the ceiling
  of the RM's head with every label it could want;
- ``probe_policy``: the policy's last-layer states mean-pooled over the response;
- ``probe_rm_policy``: both side by side, a linear stand-in for what the fusion could add to the head.

Each against ``proxy``, the proxy RM's own ordering of the same test pairs (ties count half), and 1.0, gold's. A
probe that cannot beat the proxy says that labels fed through that feature set cannot make the reward rank better.

Beside the probes, R2M's own update on the same labelled groups, with no policy moving under it: ``update_<mode>``
trains an R2M reward over the proxy (`LABEL_UPDATE`, modes ``head_only`` and ``anchored``) on the training groups,
8 groups per update, all of them labelled, for ``--update-epochs`` passes, and ranks the test groups with it (w(t) at
the end of the schedule). Where a probe beats the proxy and the update does not, the update's optimisation is what
stops it, not the features or a moving policy.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import r2m
from r2m.benchmarks.accuracy import policy_states as sample_states
from r2m.benchmarks.lab import WORLD, Variant, add_run_options, format_interval, mean_interval, run_once, world_and_run
from r2m.benchmarks.lab_world import LabWorld, policy_states, probe_accuracy, reward_token_states
from r2m.benchmarks.options import add_quick, resolve_defaults
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results

# The update the lab's report chose (`results/lab-label-replay-seeds10-19`), labels on every group of a batch.
LABEL_UPDATE = {"lr": 1e-3, "label_replay": 256, "label_pairs": "all", "anchor_weight": 10.0, "update_steps": 4}
UPDATE_MODES = ("head_only", "anchored")
UPDATE_GROUPS = 8
QUICK = {"seeds": 1, "steps": 30, "prompts": 32}
DEFAULTS = {"seeds": 10, "steps": 150, "prompts": 256}
FEATURES = ("proxy", "probe_rm", "probe_policy", "probe_rm_policy", *(f"update_{m}" for m in UPDATE_MODES))
POLICIES = ("initial", "after_vanilla")


def labelled_pairs(gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every within-group pair of different gold in ``gold`` [G, K]: (better, worse) flat sample indices and the
    pair's group."""
    group, better, worse = torch.nonzero(gold[:, :, None] > gold[:, None, :], as_tuple=True)
    size = gold.shape[1]
    return group * size + better, group * size + worse, group


def ordered_share(scores: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> float:
    """Share of the pairs ``scores`` order as labelled, a tie counting half."""
    gap = scores[better] - scores[worse]
    return float(((gap > 0).double() + 0.5 * (gap == 0).double()).mean())


def ceiling(world: LabWorld, proxy: torch.nn.Module, policy: torch.nn.Module, groups: int, size: int,
            temperature: float, seed: int, epochs: int = 5) -> dict[str, float]:
    """The probes' and the proxy's accuracy on held-out on-policy pairs of ``policy`` (see the module docstring)."""
    prompts = [p for p in world.prompts(groups, seed=50_000 + seed) for _ in range(size)]
    responses = world.sample(policy, prompts, temperature, seed=seed)
    gold = torch.tensor([world.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]).view(groups, size)
    better, worse, group = labelled_pairs(gold)
    train = torch.nonzero(group < groups // 2).squeeze(1)
    test = torch.nonzero(group >= groups // 2).squeeze(1)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"no within-group pair of different gold in one half of the {groups} groups: raise --prompts")
    rm = reward_token_states(proxy, world, prompts, responses)
    states = policy_states(policy, world, prompts, responses)
    both = torch.cat([rm, states], dim=1)
    result = {"pairs_train": len(train), "pairs_test": len(test),
              "proxy": ordered_share(world.score(proxy, prompts, responses), better[test], worse[test])}
    for name, features in (("probe_rm", rm), ("probe_policy", states), ("probe_rm_policy", both)):
        result[name] = probe_accuracy(features[better], features[worse], train, test)
    for mode in UPDATE_MODES:
        scores = update_scores(world, proxy, policy, prompts, responses, gold, mode, epochs, seed)
        result[f"update_{mode}"] = ordered_share(scores, better[test], worse[test])
    return result


def update_scores(world: LabWorld, proxy: torch.nn.Module, policy: torch.nn.Module, prompts: list[str],
                  responses: list[str], gold: torch.Tensor, mode: str, epochs: int, seed: int) -> torch.Tensor:
    """Scores [G * K] of every sample by an R2M reward over a copy of ``proxy`` (``LABEL_UPDATE``, mode ``mode``)
    trained on the first half of the groups, all labelled by ``gold`` [G, K], ``UPDATE_GROUPS`` groups per update."""
    groups, size = gold.shape
    batches = [range(g, min(g + UPDATE_GROUPS, groups // 2)) for g in range(0, groups // 2, UPDATE_GROUPS)]
    total = epochs * len(batches)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = r2m.wrap(copy.deepcopy(proxy), policy.config.hidden_size,
                         r2m.R2MConfig(mode=mode, total_steps=total, seed=seed, **LABEL_UPDATE))
    enc = world._encode([world.reward_text(p, r) for p, r in zip(prompts, responses, strict=True)])
    with torch.no_grad():
        rte = model.rte(enc["input_ids"], enc["attention_mask"])
    hidden, mask = sample_states(policy, world, prompts, responses)
    step = 0
    for _ in range(epochs):
        for batch in batches:
            rows = torch.arange(batch.start * size, batch.stop * size)
            rewards = model.reward_from_rte(rte[rows], hidden[rows], mask[rows], step)
            model.update(rte[rows], hidden[rows], mask[rows], rewards, size, step, labels=gold[list(batch)].flatten())
            step += 1
    return model.reward_from_rte(rte, hidden, mask, total)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r2m bench ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/ceiling", help="output directory")
    add_quick(p, QUICK)
    p.add_argument("--seeds", type=int, help=f"default {DEFAULTS['seeds']}")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--update-epochs", type=int, default=5,
                   help="passes of R2M's update over the training groups (5: about a lab run's 75 updates)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as `r2m bench lab`)")
    p.add_argument("--prompts", type=int, help=f"prompts sampled K times per policy (default {DEFAULTS['prompts']})")
    add_run_options(p)
    p.set_defaults(**WORLD)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    resolve_defaults(args, QUICK, DEFAULTS)
    for name, minimum in (("seeds", 1), ("steps", 1), ("prompts", 2), ("first_seed", 0), ("threads", 1),
                          ("update_epochs", 1)):
        if getattr(args, name) < minimum:
            raise SystemExit(f"r2m bench ceiling: --{name.replace('_', '-')} must be >= {minimum}, got "
                             f"{getattr(args, name)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = _measure(args)
    finally:
        torch.set_num_threads(threads)
    summary = [{"policy": name, "seeds": args.seeds,
                **{k: mean_interval([r[k] for r in rows if r["policy"] == name]) for k in FEATURES},
                **{f"{k}_minus_proxy": mean_interval([r[k] - r["proxy"] for r in rows if r["policy"] == name])
                   for k in FEATURES[1:]}}
               for name in POLICIES]
    columns = [*FEATURES, *(f"{k}_minus_proxy" for k in FEATURES[1:])]
    table = markdown_table([{**s, **{k: format_interval(s[k]) for k in columns}} for s in summary],
                           ["policy", "seeds", *columns])
    table += ("\nAccuracy on held-out within-group pairs of the policy's own samples (different gold); probes fitted "
              f"on the pairs of {args.prompts // 2} other groups per policy and seed; mean [95% t-interval] over seeds "
              "(minus_proxy: paired per seed). Gold orders every pair: 1.0.\n")
    out = write_results(args.out, "ceiling", {"args": vars(args), "summary": summary, "per_seed": rows}, table)
    _plot(summary, out / "ceiling.png")
    print(table)
    print(f"wrote {out / 'ceiling.json'}, {out / 'ceiling.md'}, {out / 'ceiling.png'}")
    return 0


def _measure(args: argparse.Namespace) -> list[dict]:
    """Per seed and policy (initial, after a vanilla run), the `ceiling` row."""
    rows = []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(seeds), desc="ceiling seeds") as progress:
        for seed in seeds:
            world, run = world_and_run(args, seed)
            proxy = world.train_proxy(progress=f"proxy RM, seed {seed}")
            result = run_once(Variant.parse("vanilla"), run, world, proxy, Path(args.cache_dir), Path(tmp))
            initial = AutoModelForCausalLM.from_pretrained(result.initial_policy).eval()
            for name, policy in (("initial", initial), ("after_vanilla", result.policy)):
                rows.append({"seed": seed, "policy": name,
                             **ceiling(world, proxy, policy, args.prompts, run.generations, run.temperature, seed,
                                     args.update_epochs)})
            progress.update()
    return rows


def _plot(summary: list[dict], path: Path) -> None:
    fig, ax = subplots(figsize=(6, 3.5))
    width = 0.8 / len(FEATURES)
    for i, key in enumerate(FEATURES):
        means = [s[key]["mean"] for s in summary]
        bounds = [(s[key]["low"], s[key]["high"]) if s[key]["low"] is not None else (m, m)
                  for m, s in zip(means, summary, strict=True)]
        errors = [[m - low for m, (low, _) in zip(means, bounds, strict=True)],
                  [high - m for m, (_, high) in zip(means, bounds, strict=True)]]
        ax.bar([x + i * width for x in range(len(summary))], means, width, yerr=errors, label=key)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(summary))], [s["policy"] for s in summary])
    ax.set(ylim=(0.4, 1.0), ylabel="held-out pairs ordered as gold", title="On-policy ranking: proxy vs probe ceilings")
    ax.legend(fontsize=8)
    save_figure(fig, path)
