"""GRPO in the lab world of `r2m.benchmarks.lab_world`: the training that `r2m bench lab`, `r2m bench accuracy`
and `r2m demo` run.

A tiny policy, SFT-pretrained on data responses (`initial_policy`, cached on disk) or left at its random init,
is trained with TRL's GRPOTrainer against the lab's proxy reward model wrapped by `R2MReward` in one of its modes.
Per step the run records, from the rewards the trainer sees, the gold reward beside the proxy's and the trained
reward, their within-group spreads, how each ranks the policy's own samples by gold (on-policy accuracy, and the
ranking gap: the trained reward's minus the proxy's), how often the policy emits the spurious word, and the relative
size of each R2M update (``r2m/update_size`` from the trainer's logs where `R2MReward` logs it, and the head's and the
fusion's change measured from their weights by a callback). Everything is built offline.

Besides the R2M modes, three controls train the same policy on the same prompts (`CONTROLS`): ``oracle``, the policy
trained on the gold reward itself (the positive control: what a perfect reward gains); ``mix``, on
``(1 - mix) z(proxy) + mix z(gold)`` (z: standardised over the generation batch; a reward better than the proxy by a
known amount); ``unbiased``, vanilla over a proxy RM trained the same way on pairs without the spurious correlation
(the better static RM). Their "trained reward" is what the policy was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from r2m.benchmarks import tiny_models
from r2m.benchmarks.lab_world import LabWorld, PretrainConfig, ranking_agreement
from r2m.checks import check_int
from r2m.config import R2MConfig
from r2m.integrations.trl.reward import R2MReward

CONTROLS = ("oracle", "mix", "unbiased")


@dataclass
class LabRunConfig:
    """One GRPO run in the lab world. Defaults follow the paper's regime where the lab can (its Sec. 5 set-up): K = 8
    responses per prompt, Omega 0.6, alpha 0.3, T = the run's steps, temperature 0.7, KL beta 0.05 (RLOO's).

    ``groups``: prompts per policy update (and per R2M update). ``pretrain``: start from the policy SFT-pretrained
    as ``sft`` says (the paper's premise) instead of the random init. ``total_steps``: T of w(t), None for
    ``steps``. ``fusion_init`` (`R2MConfig.fusion_init`): ``zero``, an untrained R2M scores exactly as the proxy;
    ``random``, as the paper's untrained R2M, so that ``frozen`` (R2M w/o Train) differs from ``vanilla``.
    ``label_groups``: in modes ``anchored`` and ``head_only``, the groups per batch whose responses the gold reward
    labels for the update (0: none). ``anchor_pairs``: in those modes, the size of a fixed anchor set of
    gold-labelled preference pairs from the world without the spurious correlation (0: none), the policy's states of
    which are refreshed every ``anchor_every`` R2M updates. ``fused_scale``, ``label_term``,
    ``label_pairs``, ``label_replay``, ``labels_replace_pseudo``: those of `R2MConfig`.
    ``num_iterations``: policy epochs per generation batch (the paper's 2; ``steps`` counts policy steps, R2M
    updates once per generation batch).
    ``mix``: the gold reward's weight in control ``mix``.
    ``bins``: windows of steps the recorded curve is averaged over.
    """

    steps: int = 300
    seed: int = 0
    groups: int = 8
    generations: int = 8
    temperature: float = 0.7
    policy_hidden_size: int = 64
    policy_lr: float = 5e-4
    beta: float = 0.05
    pretrain: bool = True
    sft: PretrainConfig = field(default_factory=PretrainConfig)
    r2m_lr: float = 1e-4
    alpha: float = 0.3
    update_steps: int = 1
    omega_min: float = 0.6
    total_steps: int | None = None
    fusion_init: str = "zero"
    fused_scale: str = "none"
    num_iterations: int = 2
    label_groups: int = 0
    anchor_weight: float = 1.0
    label_term: str = "fused"
    label_pairs: str = "extremes"
    label_replay: int = 0
    labels_replace_pseudo: bool = False
    anchor_pairs: int = 0
    anchor_every: int = 1
    mix: float = 0.3
    bins: int = 30

    def __post_init__(self) -> None:
        for name in ("label_groups", "anchor_pairs"):
            check_int(f"LabRunConfig.{name}", getattr(self, name), minimum=0)
        for name in ("anchor_every", "steps", "groups", "update_steps", "bins", "policy_hidden_size", "num_iterations"):
            check_int(f"LabRunConfig.{name}", getattr(self, name))
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"LabRunConfig.mix must be in [0, 1], got {self.mix!r}")
        check_int("LabRunConfig.generations", self.generations, minimum=2, hint=" (R2M pairs within a group)")

    def r2m_config(self, mode: str) -> R2MConfig:
        return R2MConfig(mode=mode, lr=self.r2m_lr, alpha=self.alpha, update_steps=self.update_steps,
                         omega_min=self.omega_min, total_steps=self.total_steps or self.steps, seed=self.seed,
                         fusion_init=self.fusion_init, anchor_weight=self.anchor_weight,
                         fused_scale=self.fused_scale, label_term=self.label_term,
                         label_pairs=self.label_pairs, label_replay=self.label_replay,
                         labels_replace_pseudo=self.labels_replace_pseudo)


def initial_policy(world: LabWorld, run: LabRunConfig, cache_dir: Path, progress: bool = False) -> Path:
    """The saved initial policy of ``run``: a random-init tiny Llama (seeded by ``run.seed``), SFT-pretrained on
    data responses (`LabWorld.pretrain` with ``run.sft``) when ``run.pretrain``. Built once per world, size,
    seed and pretraining config (the world's ``rm_*`` fields shape only the proxy: not part of the key), then read
    from ``cache_dir``; ``progress``: show the pretraining's progress."""
    world_key = {k: v for k, v in dataclasses.asdict(world.config).items() if not k.startswith("rm_")}
    key = {"world": world_key, "hidden_size": run.policy_hidden_size, "seed": run.seed,
           "pretrain": dataclasses.asdict(run.sft) if run.pretrain else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"policy-{'sft' if run.pretrain else 'init'}-{digest}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(run.seed)
    policy = tiny_models.build_policy(world.tokenizer, "llama", hidden_size=run.policy_hidden_size)
    losses = (world.pretrain(policy, run.sft, run.seed, f"policy SFT, seed {run.seed}" if progress else None)
              if run.pretrain else [])
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    policy.save_pretrained(partial)
    world.tokenizer.save_pretrained(partial)
    (partial / "lab_policy.json").write_text(json.dumps({**key, "sft_loss_per_epoch": losses}, indent=2))
    partial.rename(path)
    return path


def gold_reward(world: LabWorld):
    """The world's gold reward as a TRL reward function (the labeller of modes ``anchored`` and ``head_only``)."""
    def gold(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        return [world.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    return gold


def control_reward(control: str, world: LabWorld, proxy: torch.nn.Module, mix: float):
    """The reward function of control ``oracle`` (the gold reward) or ``mix`` (``(1 - mix) z(proxy) + mix z(gold)``,
    z standardised over the call's batch)."""
    def oracle(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        return [world.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    def mixed(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        proxy_scores = world.score(proxy, prompts, completions).double()
        gold = torch.tensor(oracle(prompts, completions), dtype=torch.float64)
        z = [(x - x.mean()) / x.std(correction=0).clamp_min(1e-8) for x in (proxy_scores, gold)]
        return ((1 - mix) * z[0] + mix * z[1]).tolist()

    if control not in ("oracle", "mix"):
        raise ValueError(f"control_reward: {control!r} is not 'oracle' or 'mix'")
    reward = oracle if control == "oracle" else mixed
    reward.__name__ = control
    return reward


class Recorder:
    """The trainer's reward function: calls the reward the policy is trained on (an `R2MReward` or a control's) and
    records, per step, what the policy was trained on beside the proxy RM's own scores and the gold reward (which
    trains no policy but the oracle's)."""

    def __init__(self, reward, world: LabWorld, proxy: torch.nn.Module, group_size: int, label_groups: int = 0):
        self.reward, self.world, self.proxy, self.group_size = reward, world, proxy, group_size
        self.label_groups = label_groups
        self.__name__ = reward.__name__
        self.rows: dict[int, dict[str, float]] = {}

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        rewards = self.reward(prompts=prompts, completions=completions, **kwargs)
        trained = torch.tensor([math.nan if r is None else r for r in rewards], dtype=torch.float64)
        proxy = self.world.score(self.proxy, prompts, completions).double()
        gold = torch.tensor([self.world.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)],
                            dtype=torch.float64)
        grouped = [x.view(-1, self.group_size) for x in (trained, proxy, gold)]
        step = kwargs["trainer_state"].global_step + 1  # the policy step this batch trains
        accuracy = {name: ranking_agreement(x, grouped[2])
                    for name, x in zip(("trained", "proxy"), grouped[:2], strict=True)}
        self.rows[step] = {
            "gold": float(gold.mean()), "proxy": float(proxy.mean()), "trained": float(trained.nanmean()),
            **{f"spread_{name}": float(x.std(1, correction=0).nanmean())
               for name, x in zip(("trained", "proxy", "gold"), grouped, strict=True)},
            "spurious": self.world.spurious_share(completions),
            "repeat": repeat_share(completions),
            "onpolicy_acc_trained": accuracy["trained"], "onpolicy_acc_proxy": accuracy["proxy"],
            "rank_gap": accuracy["trained"] - accuracy["proxy"]}
        if self.label_groups:
            self.rows[step].update(labelled_pair_bt(grouped[1], grouped[0], grouped[2], self.label_groups))
        return rewards


def labelled_pair_bt(proxy: torch.Tensor, trained: torch.Tensor, gold: torch.Tensor,
                     label_groups: int) -> dict[str, float]:
    """The labelled pairs of a batch as R2M's ``anchored`` update forms them (in each of the first ``label_groups``
    groups [G, K], its highest- and lowest-gold sample; a group of equal gold has none) and their Bradley-Terry loss
    -log sigmoid(s_w - s_l) under the frozen proxy alone (``label_bt_proxy``) and under the reward the policy was
    trained on (``label_bt_trained``, scored before this batch's update). The update's own ``anchor_bt`` is the loss
    of the fused reward w(t) proxy + (1 - w(t)) trained, so the two show which part moves it."""
    rows = torch.arange(min(label_groups, gold.shape[0]))
    best, worst = gold[rows].argmax(1), gold[rows].argmin(1)
    keep = gold[rows, best] > gold[rows, worst]
    if not bool(keep.any()):
        return {}
    rows, best, worst = rows[keep], best[keep], worst[keep]
    return {f"label_bt_{name}": float(torch.nn.functional.softplus(-(x[rows, best] - x[rows, worst])).mean())
            for name, x in (("proxy", proxy), ("trained", trained))}


def repeat_share(responses: list[str]) -> float:
    """Mean share of a response's words that repeat an earlier word of it (0: all distinct)."""
    shares = [1 - len(set(words)) / len(words) for words in (r.split() for r in responses) if words]
    return statistics.fmean(shares) if shares else 0.0


class UpdateSize(TrainerCallback):
    """The relative change ||after - before|| / ||before|| of the R2M head and fusion weights over each policy step
    (0 where no R2M update ran, and in the modes that train nothing), from the weights alone: it reads nothing the
    reward keeps about its updates. The lab keeps the steps whose logs hold an R2M update (``r2m/loss``)."""

    def __init__(self, reward: R2MReward):
        self.reward = reward
        self.rows: dict[int, dict[str, float]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def _weights(self) -> dict[str, torch.Tensor]:
        r2m = self.reward.r2m_model
        return {name: torch.cat([p.detach().flatten().double() for p in module.parameters()]).clone()
                for name, module in (("head", r2m.head), ("fusion", r2m.fusion))}

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = self._weights()

    def on_step_end(self, args, state, control, **kwargs):
        after = self._weights()
        self.rows[state.global_step] = {
            f"update_{name}": float((after[name] - before).norm() / before.norm().clamp_min(1e-12))
            for name, before in self._before.items()}


class Progress(TrainerCallback):
    """A progress bar showing the latest gold and proxy rewards (instead of printing every log)."""

    def __init__(self, label: str, recorder: Recorder):
        self.label, self.recorder, self.bar = label, recorder, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.label, dynamic_ncols=True, leave=False)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        row = self.recorder.rows.get(state.global_step)
        if row:
            self.bar.set_postfix(gold=f"{row['gold']:.3f}", proxy=f"{row['proxy']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def train_variant(mode: str, cfg: LabRunConfig, world: LabWorld, proxy: torch.nn.Module, policy_dir: Path,
                  work_dir: Path, label: str | None = None,
                  reward_model: torch.nn.Module | None = None) -> tuple[dict, GRPOTrainer, R2MReward | None]:
    """One GRPO run of the policy saved in ``policy_dir`` against ``proxy`` wrapped in R2M mode ``mode``, or a control
    of `CONTROLS` (``unbiased``: vanilla over ``reward_model``, the RM trained without the spurious correlation;
    ``proxy`` stays the reference the ranking gap is taken against).

    Returns the run record (``curve``: per bin of steps the means of the recorded metrics, KL to the initial
    policy, w(t), the R2M loss and ``r2m/state_similarity``; ``seconds_per_step``; ``extra_policy_forwards``;
    ``anchor_forwards``), the trainer and the R2M reward (None for controls ``oracle`` and ``mix``)."""
    label = label or mode
    if mode == "unbiased" and reward_model is None:
        raise ValueError("control 'unbiased' needs reward_model=, the RM trained on unbiased pairs")
    callbacks: list[TrainerCallback] = []
    reward: R2MReward | None = None
    update_size: UpdateSize | None = None
    if mode in ("oracle", "mix"):
        recorder = Recorder(control_reward(mode, world, proxy, cfg.mix), world, proxy, cfg.generations)
    else:
        labels = {"labeller": gold_reward(world), "label_groups": cfg.label_groups} if cfg.label_groups else {}
        if cfg.anchor_pairs:  # gold-labelled pairs without the proxy's spurious correlation, apart from the prompts
            pairs = world.preference_pairs(cfg.anchor_pairs, seed=90_000 + cfg.seed, bias=0.5)
            labels.update(anchor_pairs=[(f"{p} ", c, r) for p, c, r in pairs], anchor_every=cfg.anchor_every)
        r2m_mode = "vanilla" if mode == "unbiased" else mode
        reward = R2MReward(proxy if reward_model is None else reward_model, world.tokenizer, name="proxy",
                           config=cfg.r2m_config(r2m_mode), monitor=True, **labels)
        recorder = Recorder(reward, world, proxy, cfg.generations, cfg.label_groups)
        update_size = UpdateSize(reward)
        callbacks += [reward, update_size]
    callbacks.append(Progress(f"GRPO, {label}, seed {cfg.seed}", recorder))
    prompts = [f"{p} " for p in world.prompts(cfg.steps * cfg.groups, seed=10_000 + cfg.seed)]
    args = GRPOConfig(
        output_dir=str(work_dir / label), use_cpu=True, bf16=False, report_to="none", seed=cfg.seed,
        per_device_train_batch_size=cfg.groups * cfg.generations, num_generations=cfg.generations,
        max_completion_length=world.config.response_words, learning_rate=cfg.policy_lr,
        lr_scheduler_type="constant", max_steps=cfg.steps, logging_steps=1, beta=cfg.beta,
        num_iterations=cfg.num_iterations,
        temperature=cfg.temperature, save_strategy="no")
    trainer = GRPOTrainer(model=str(policy_dir), reward_funcs=[recorder], callbacks=callbacks, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=world.tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "step" in h]
    scored = {h["step"]: {"kl": h.get("kl"), "omega": h.get("r2m/omega"), "label_ms": h.get("r2m/label_ms"),
                          "state_similarity": h.get("r2m/state_similarity")}
              for h in logs if "kl" in h or "r2m/omega" in h}
    updated = {h["step"]: {"r2m_loss": h.get("r2m/loss"), "anchor_bt": h.get("r2m/anchor_bt"),
                           "anchor_set_bt": h.get("r2m/anchor_set_bt"), "fused_scale": h.get("r2m/fused_scale"),
                           "update_size": h.get("r2m/update_size"),
                           **(update_size.rows.get(h["step"], {}) if update_size is not None else {})}
               for h in logs if "r2m/loss" in h}
    # a batch generated at step s is scored then and updates R2M after the policy's last pass over it, at s + lag
    lag = cfg.num_iterations - 1
    steps = [{"step": s, **row, **scored.get(s, {}), **updated.get(s + lag, {})}
             for s, row in sorted(recorder.rows.items())]
    run = {"curve": bin_steps(steps, cfg.bins), "seconds_per_step": seconds / cfg.steps,
           "extra_policy_forwards": 0 if reward is None else reward.extra_forwards,
           "anchor_forwards": 0 if reward is None else reward.anchor_forwards,
           "update_size_from": None if reward is None else (
               "r2m/update_size" if any("r2m/update_size" in h for h in logs) else "weights (lab callback)")}
    return run, trainer, reward


def bin_steps(rows: list[dict], bins: int) -> list[dict]:
    """Consecutive per-step rows averaged into at most ``bins`` windows of equal size (the last window takes the
    remainder); ``step`` is each window's last step. A metric missing from a whole window is None."""
    size = max(1, len(rows) // bins)
    windows = [rows[i: i + size] for i in range(0, size * (len(rows) // size), size)]
    if len(rows) % size:
        windows[-1] = windows[-1] + rows[size * (len(rows) // size):]
    binned = []
    for window in windows:
        keys = dict.fromkeys(k for row in window for k in row)
        row = {}
        for key in keys:
            values = [r[key] for r in window if r.get(key) is not None and not math.isnan(r[key])]
            row[key] = statistics.fmean(values) if values else None
        row["step"] = window[-1]["step"]
        binned.append(row)
    return binned
