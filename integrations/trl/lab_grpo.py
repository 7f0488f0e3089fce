"""GRPO in the lab world of `r2m.lab`: the training that `r2m bench lab`, `r2m bench accuracy` and `r2m demo` run.

A tiny policy is trained with TRL's GRPOTrainer against the lab's proxy reward model, wrapped by `R2MReward` in
one of its modes; the gold reward is logged beside it (reward weight 0: it never trains the policy).
Everything is built offline from configs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from r2m.config import R2MConfig
from r2m.integrations.trl.reward import R2MReward
from r2m.lab import LabWorld


@dataclass
class LabRunConfig:
    """One GRPO run in the lab world: the policy's training and R2M's knobs."""

    steps: int = 120
    seed: int = 0
    prompts_per_step: int = 4
    generations: int = 4
    policy_hidden_size: int = 64
    policy_lr: float = 2e-3
    beta: float = 0.02
    r2m_lr: float = 1e-3
    omega_min: float = 0.6


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


def train_variant(variant: str, cfg: LabRunConfig, world: LabWorld, proxy: torch.nn.Module, policy_dir: Path,
                  work_dir: Path) -> tuple[dict, GRPOTrainer, R2MReward]:
    """One GRPO run of the policy saved in ``policy_dir`` against ``proxy`` wrapped in R2M mode ``variant``.

    Returns the run (``curve``: per logged step the gold reward, the proxy's own score, the reward the policy was
    trained on, KL to the initial policy and w(t); ``seconds_per_step``; ``extra_policy_forwards``), the trainer
    and the R2M reward."""
    reward = R2MReward(proxy, world.tokenizer, name="proxy", config=R2MConfig(
        mode=variant, lr=cfg.r2m_lr, omega_min=cfg.omega_min, total_steps=cfg.steps, seed=cfg.seed))
    prompts = [f"{p} " for p in world.prompts(cfg.steps * cfg.prompts_per_step, seed=10_000 + cfg.seed)]
    args = GRPOConfig(
        output_dir=str(work_dir / variant), use_cpu=True, bf16=False, report_to="none", seed=cfg.seed,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.generations, num_generations=cfg.generations,
        max_completion_length=world.config.response_words, learning_rate=cfg.policy_lr,
        lr_scheduler_type="constant", max_steps=cfg.steps, logging_steps=max(1, cfg.steps // 30), beta=cfg.beta,
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
