"""`r2m demo`: GRPO with the vanilla reward model and with R2M on the built-in tiny task.

The task is the lab world of `r2m.lab`: prompts are sets of topic words, a known gold reward pays for covering
them with "good" words, and the proxy reward model the policy is trained against was fitted on biased preference
pairs, so it over-rewards a spurious word. Both runs start from the same tiny policy and the same proxy; the gold
reward is logged alongside (weight 0: it never trains the policy). Everything is built offline from configs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from r2m import tiny
from r2m.config import R2MConfig
from r2m.integrations.trl.reward import R2MReward
from r2m.lab import LabConfig, LabWorld

VARIANTS = ("vanilla", "r2m")


@dataclass
class DemoConfig:
    """The demo's knobs (defaults finish in under 3 minutes on 2 CPU cores)."""

    steps: int = 60
    seed: int = 0
    prompts_per_step: int = 4
    generations: int = 4
    policy_hidden_size: int = 64
    policy_lr: float = 2e-3
    beta: float = 0.02
    r2m_lr: float = 1e-3
    omega_min: float = 0.6
    rm_pairs: int = 256
    rm_epochs: int = 12


class Progress(TrainerCallback):
    """A progress bar showing the latest gold and proxy rewards (instead of printing every log)."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.label, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "rewards/gold/mean" in logs:
            self.bar.set_postfix(gold=f"{logs['rewards/gold/mean']:.3f}",
                                 proxy=f"{logs['r2m/vanilla_reward_mean']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def gold_reward(world: LabWorld):
    def gold(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        return [world.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    return gold


def run_variant(variant: str, cfg: DemoConfig, world: LabWorld, proxy: torch.nn.Module, policy_dir: Path,
                work_dir: Path) -> dict:
    """One GRPO run against the proxy (wrapped by R2M in ``variant`` mode); returns its logged curves."""
    return train_variant(variant, cfg, world, proxy, policy_dir, work_dir)[0]


def train_variant(variant: str, cfg: DemoConfig, world: LabWorld, proxy: torch.nn.Module, policy_dir: Path,
                  work_dir: Path) -> tuple[dict, GRPOTrainer, R2MReward]:
    """`run_variant`, also returning the trained trainer and the R2M reward."""
    reward = R2MReward(proxy, world.tokenizer, name="proxy", config=R2MConfig(
        mode=variant, lr=cfg.r2m_lr, omega_min=cfg.omega_min, total_steps=cfg.steps, seed=cfg.seed))
    prompts = [f"{p} " for p in world.prompts(cfg.steps * cfg.prompts_per_step, seed=10_000 + cfg.seed)]
    args = GRPOConfig(
        output_dir=str(work_dir / variant), use_cpu=True, bf16=False, report_to="none", seed=cfg.seed,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.generations, num_generations=cfg.generations,
        max_completion_length=world.config.response_words, learning_rate=cfg.policy_lr,
        lr_scheduler_type="constant", max_steps=cfg.steps, logging_steps=max(1, cfg.steps // 12), beta=cfg.beta,
        reward_weights=[1.0, 0.0], temperature=1.0, save_strategy="no")
    trainer = GRPOTrainer(model=str(policy_dir), reward_funcs=[reward, gold_reward(world)],
                          callbacks=[reward, Progress(f"GRPO, {variant} RM")], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=world.tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rows = [{"step": h["step"], "gold": h["rewards/gold/mean"], "proxy": h["r2m/vanilla_reward_mean"],
             "trained": h["rewards/proxy/mean"], "kl": h.get("kl", 0.0), "omega": h["r2m/omega"],
             "r2m_loss": h.get("r2m/loss", 0.0)}
            for h in trainer.state.log_history if "rewards/gold/mean" in h]
    run = {"curve": rows, "seconds_per_step": seconds / cfg.steps, "extra_policy_forwards": reward.extra_forwards}
    return run, trainer, reward


def summary_rows(runs: dict[str, dict]) -> list[dict]:
    rows = []
    for variant, run in runs.items():
        curve = run["curve"]
        rows.append({"variant": variant, "gold_end": curve[-1]["gold"], "gold_peak": max(r["gold"] for r in curve),
                     "proxy_end": curve[-1]["proxy"], "trained_end": curve[-1]["trained"], "kl_end": curve[-1]["kl"],
                     "s_per_step": run["seconds_per_step"], "extra_forwards": run["extra_policy_forwards"]})
    return rows


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])
                                       for c in columns) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for variant, run in runs.items():
        steps = [r["step"] for r in run["curve"]]
        for axis, key in zip(axes, ("gold", "proxy", "trained"), strict=True):
            axis.plot(steps, [r[key] for r in run["curve"]], label=variant, marker=".")
    titles = ("gold reward (the truth)", "proxy RM reward (vanilla score)", "reward the policy was trained on")
    for axis, title in zip(axes, titles, strict=True):
        axis.set(xlabel="policy step", title=title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(prog="r2m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="directory for demo.json, demo.md and demo.png")
    p.add_argument("--steps", type=int, default=defaults.steps, help="GRPO steps per run")
    p.add_argument("--seed", type=int, default=defaults.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    options = parser().parse_args(argv)
    cfg = DemoConfig(steps=options.steps, seed=options.seed)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    world = LabWorld(LabConfig(seed=cfg.seed, rm_pairs=cfg.rm_pairs, rm_epochs=cfg.rm_epochs))
    print(f"training the proxy reward model on {cfg.rm_pairs} biased preference pairs")
    proxy = world.train_proxy()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = Path(tmp) / "policy"
        torch.manual_seed(cfg.seed)
        tiny.build_policy(world.tokenizer, "llama", hidden_size=cfg.policy_hidden_size).save_pretrained(policy_dir)
        world.tokenizer.save_pretrained(policy_dir)
        for variant in VARIANTS:
            runs[variant] = run_variant(variant, cfg, world, proxy, policy_dir, Path(tmp))
    rows = summary_rows(runs)
    markdown = table(rows)
    (out / "demo.json").write_text(json.dumps({"config": asdict(cfg), "summary": rows, "runs": runs}, indent=2))
    (out / "demo.md").write_text(markdown + "\n")
    print(markdown)
    try:
        plot(runs, out / "demo.png")
    except ImportError:
        print("matplotlib is not installed (pip install 'r2m[bench]'): skipped demo.png")
        return 0
    print(f"wrote {out / 'demo.json'}, {out / 'demo.md'}, {out / 'demo.png'}")
    return 0
