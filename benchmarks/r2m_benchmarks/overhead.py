"""`r2m bench overhead`: what R2M costs per training step in TRL, against the plain reward model.

For GRPOTrainer and RLOOTrainer, runs the same training (same seeds, same models) with the reward model passed
to TRL directly (`vanilla`) and wrapped by `R2MReward` (`r2m`), in rounds of A/B pairs of fresh processes: on a
CPU machine with two cores or more the pair runs side by side, one torch thread each, so that both see the same
machine load (a shared machine's speed drifts by tens of percent within minutes); on GPU, or with `--sequential`,
one after the other. Step times are also reported as process CPU time on CPU. Reports the median step
time after warm-up, the R2M update time, the host time spent capturing policy states, the time of the trainer's
reward computation (and, from these three timed sections, an upper bound of the step-time ratio: the stitching
done inside the reward call is counted twice), the share of batches whose hidden states needed an extra policy
forward, the policy forwards counted per step, peak memory (CUDA max allocated on GPU, the process's peak RSS on
CPU; median over rounds), the bytes of hidden states R2M holds per batch (measured) and whether the extra peak
of allocated tensor memory stays within 1.1 x (those bytes + R2M's trained state: weights, gradients and Adam
moments of the fusion and head). Allocated memory is CUDA's max allocated on GPU; on CPU, where RSS moves by tens
of MB between identical runs, one more vanilla/R2M pair per trainer runs under the torch profiler, which sees
every CPU tensor allocation and free, and its peak of bytes alive is exact and repeatable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from r2m.benchmarks.options import add_quick, resolve_defaults
from r2m.benchmarks.report import markdown_table, save_figure, subplots, write_results

PRESETS = {
    # random-init models: policy 4 layers hidden 256, RM hidden 256, 64 + 64 tokens, 8 prompts x 4 generations
    "cpu-small": {"policy_hidden": 256, "policy_layers": 4, "rm_hidden": 256, "rm_layers": 4, "prompt_tokens": 64,
                  "completion_tokens": 64, "prompts": 8, "generations": 4, "vocab_words": 1000, "architecture": {}},
    # a smoke test of the benchmark itself
    "tiny": {"policy_hidden": 32, "policy_layers": 2, "rm_hidden": 32, "rm_layers": 2, "prompt_tokens": 8,
             "completion_tokens": 8, "prompts": 2, "generations": 2, "vocab_words": 50, "architecture": {}},
    # about 0.5B parameters each (a Qwen2.5-0.5B-like shape with a 32k vocabulary), 512 + 512 tokens
    "gpu": {"policy_hidden": 1024, "policy_layers": 24, "rm_hidden": 1024, "rm_layers": 24, "prompt_tokens": 512,
            "completion_tokens": 512, "prompts": 8, "generations": 4, "vocab_words": 32000,
            "architecture": {"num_heads": 16, "num_kv_heads": 4, "intermediate_size": 4864, "max_positions": 2048}},
}
TRAINERS = ("grpo", "rloo")
VARIANTS = ("vanilla", "r2m")
QUICK = {"trainers": "grpo", "steps": 4, "rounds": 1}
DEFAULTS = {"trainers": "grpo,rloo", "steps": 8, "rounds": 3}
# What R2M trains costs its weights, their gradients and Adam's two moments.
TRAINED_STATE_COPIES = 4
MEMORY_TARGET = 1.1


def build_models(preset: str, seed: int, with_policy: bool = True) -> tuple:
    """(tokenizer, policy or None, reward model) of a preset, random-init from configs."""
    from r2m.benchmarks import tiny_models

    p = PRESETS[preset]
    tokenizer = tiny_models.build_tokenizer(p["vocab_words"])
    torch.manual_seed(seed)
    policy = (tiny_models.build_policy(tokenizer, "llama", p["policy_hidden"], p["policy_layers"], **p["architecture"])
              if with_policy else None)
    torch.manual_seed(seed + 1)
    reward_model = tiny_models.build_reward_model(tokenizer, "llama", p["rm_hidden"], p["rm_layers"],
                                                  **p["architecture"])
    return tokenizer, policy, reward_model


@dataclass
class ChildRun:
    trainer: str
    variant: str
    preset: str
    steps: int
    warmup: int
    seed: int
    work_dir: str
    count_allocations: bool = False


def child(run: ChildRun) -> dict:
    """One training run in this process; returns its measurements."""
    if not run.count_allocations:
        return _train(run)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = _train(run)
    result["peak_allocated_bytes"] = _peak_allocated(profiler)
    return result


def _peak_allocated(profiler: torch.profiler.profile) -> int:
    """The most bytes of CPU tensors alive at once while profiling, from the allocator's events."""
    changes = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate(nbytes for _, nbytes in changes), default=0)


def _train(run: ChildRun) -> dict:
    import resource

    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from r2m.config import R2MConfig
    from r2m.integrations.trl import R2MReward

    p = PRESETS[run.preset]
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # two intra-op threads on two shared cores make wall times swing several-fold
    work = Path(run.work_dir)
    policy_dir = work / "policy"
    tokenizer, _, reward_model = build_models(run.preset, run.seed, with_policy=False)
    words = [f"w{i}" for i in range(p["vocab_words"])]
    generator = torch.Generator().manual_seed(run.seed)
    prompts = [" ".join(words[i] for i in torch.randint(len(words), (p["prompt_tokens"],), generator=generator)) + " "
               for _ in range(p["prompts"] * (run.steps + 1))]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward = None
    if run.variant == "r2m":
        reward = R2MReward(reward_model.to(device), tokenizer, config=R2MConfig(total_steps=run.steps, seed=run.seed))
        reward_funcs, callbacks, processing = [reward], [reward], None
    else:
        reward_funcs, callbacks, processing = [reward_model], [], [tokenizer]

    timings: list[float] = []
    cpu_times: list[float] = []
    held = [0]

    class HeldStates(TrainerCallback):
        """Reads the hidden states R2M holds at the end of a step, before its update releases them."""

        def on_step_end(self, args, state, control, **kwargs):
            held[0] = max(held[0], reward.stored_hidden_bytes)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - self.start)
            cpu_times.append(time.process_time() - self.cpu_start)

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if run.trainer == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_cls(output_dir=str(work / f"{run.trainer}-{run.variant}"), use_cpu=device == "cpu",
                      report_to="none", seed=run.seed, per_device_train_batch_size=p["prompts"] * p["generations"],
                      num_generations=p["generations"], max_completion_length=p["completion_tokens"],
                      max_steps=run.steps, logging_steps=1, save_strategy="no", disable_tqdm=True, beta=0.0,
                      bf16=device == "cuda")
    probes = [HeldStates()] if reward is not None else []
    trainer = trainer_cls(model=str(policy_dir), reward_funcs=reward_funcs, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          reward_processing_classes=processing, callbacks=[*probes, *callbacks, StepTimer()])
    trainer.remove_callback(PrinterCallback)
    forwards = [0]
    trainer.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    reward_times: list[float] = []
    score = trainer._calculate_rewards  # TRL 1.16: all reward functions of one generation batch

    def timed_score(*args, **kwargs):
        start = time.perf_counter()
        out = score(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        reward_times.append(time.perf_counter() - start)
        return out

    trainer._calculate_rewards = timed_score
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "r2m/omega" in h][run.warmup:]
    update_ms = [h["r2m/update_ms"] for h in logs if "r2m/update_ms" in h]
    capture_ms = [h["r2m/capture_ms"] for h in logs if "r2m/capture_ms" in h]
    extra = [h["r2m/extra_forward_share"] for h in logs if "r2m/extra_forward_share" in h]
    trained = sum(t.nbytes for t in reward.r2m.trainable_parameters()) if reward is not None else 0
    if torch.cuda.is_available():
        peak = allocated = torch.cuda.max_memory_allocated()
    else:
        peak, allocated = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, None  # Linux reports KiB
    return {"trainer": run.trainer, "variant": run.variant, "step_times": timings[run.warmup:],
            "step_cpu_times": cpu_times[run.warmup:],
            "update_ms": statistics.median(update_ms) if update_ms else 0.0,
            "capture_ms": statistics.median(capture_ms) if capture_ms else 0.0,
            "reward_ms": 1000 * statistics.median(reward_times[run.warmup:]),
            "extra_forward_share": statistics.fmean(extra) if extra else 0.0,
            "policy_forwards_per_step": forwards[0] / run.steps, "peak_memory_bytes": peak,
            "peak_allocated_bytes": allocated,
            "stored_hidden_bytes": held[0], "trained_state_bytes": TRAINED_STATE_COPIES * trained}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r2m bench overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--trainers", help=f"comma-separated, from {TRAINERS} (default {DEFAULTS['trainers']})")
    p.add_argument("--steps", type=int,
                   help=f"steps per run, the first --warmup not timed (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, help=f"A/B rounds per trainer (default {DEFAULTS['rounds']})")
    add_quick(p, QUICK)
    p.add_argument("--sequential", action="store_true",
                   help="on CPU, run each A/B pair one after the other instead of side by side (one core each)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/overhead-<preset>)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        print("R2M_RESULT " + json.dumps(child(ChildRun(**json.loads(args.child)))))
        return 0
    resolve_defaults(args, QUICK, DEFAULTS)
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not trainers or any(t not in TRAINERS for t in trainers):
        raise SystemExit(f"r2m bench overhead: --trainers must name some of {TRAINERS}, got {args.trainers!r}")
    steps, rounds, warmup = args.steps, args.rounds, args.warmup
    if rounds < 1 or not 0 <= warmup < steps:
        raise SystemExit(f"r2m bench overhead: needs --rounds >= 1 and 0 <= --warmup < --steps, got --rounds "
                         f"{rounds}, --warmup {warmup}, --steps {steps}")
    on_cpu = not torch.cuda.is_available()
    concurrent = on_cpu and not args.sequential and (os.cpu_count() or 1) >= 2
    results: dict[tuple[str, str], list[dict]] = {}
    allocated: dict[tuple[str, str], int] = {}
    pairs = len(trainers) * (rounds + (1 if on_cpu else 0))  # on CPU, one more pair counts allocations
    with tempfile.TemporaryDirectory() as work, tqdm(total=pairs, desc="overhead A/B pairs") as bar:
        _save_policy(args.preset, 0, Path(work) / "policy")
        for trainer in trainers:
            for _ in range(rounds):
                bar.set_postfix(trainer=trainer)
                runs = [ChildRun(trainer, variant, args.preset, steps, warmup, 0, work) for variant in VARIANTS]
                for run, result in zip(runs, _run_pair(runs, concurrent), strict=True):
                    results.setdefault((trainer, run.variant), []).append(result)
                bar.update()
            if on_cpu:
                bar.set_postfix(trainer=trainer, counting="allocations")
                runs = [ChildRun(trainer, variant, args.preset, steps, warmup, 0, work, count_allocations=True)
                        for variant in VARIANTS]
                for run, result in zip(runs, _run_pair(runs, concurrent), strict=True):
                    allocated[(trainer, run.variant)] = result["peak_allocated_bytes"]
                bar.update()
    rows = []
    for trainer in trainers:
        base, r2m = (_merge(results[(trainer, v)]) for v in VARIANTS)
        budget = MEMORY_TARGET * (r2m["stored"] + r2m["trained"])
        base_allocated, r2m_allocated = (allocated.get((trainer, v), merged["allocated"])
                                         for v, merged in (("vanilla", base), ("r2m", r2m)))
        extra_peak = r2m_allocated - base_allocated
        # the two runs of a round share the machine's conditions: their ratio is the least exposed to its drift
        paired = [statistics.median(a["step_times"]) / statistics.median(b["step_times"])
                  for b, a in zip(results[(trainer, "vanilla")], results[(trainer, "r2m")], strict=True)]
        rows.append({"trainer": trainer, "vanilla_step_s": base["step_s"], "r2m_step_s": r2m["step_s"],
                     "step_time_ratio": r2m["step_s"] / base["step_s"],
                     "round_ratio_min": min(paired), "round_ratio_max": max(paired),
                     "step_cpu_time_ratio": r2m["step_cpu_s"] / base["step_cpu_s"], "r2m_update_ms": r2m["update_ms"],
                     "r2m_capture_ms": r2m["capture_ms"], "vanilla_reward_ms": base["reward_ms"],
                     "r2m_reward_ms": r2m["reward_ms"], "timed_sections_ratio": 1 + (
                         r2m["reward_ms"] - base["reward_ms"] + r2m["update_ms"] + r2m["capture_ms"])
                     / (1000 * base["step_s"]),
                     "extra_forward_share": r2m["extra_forward_share"],
                     "extra_policy_forwards_per_step": r2m["forwards"] - base["forwards"],
                     "vanilla_peak_mb": base["peak"] / 2**20, "r2m_peak_mb": r2m["peak"] / 2**20,
                     "vanilla_allocated_peak_mb": base_allocated / 2**20,
                     "r2m_allocated_peak_mb": r2m_allocated / 2**20, "extra_peak_mb": extra_peak / 2**20,
                     "stored_hidden_mb": r2m["stored"] / 2**20, "trained_state_mb": r2m["trained"] / 2**20,
                     "memory_budget_mb": budget / 2**20, "within_memory_target": extra_peak <= budget})
    columns = list(rows[0])
    table = markdown_table(rows, columns)
    out = write_results(args.out or f"benchmarks/results/overhead-{args.preset}", "overhead",
                        {"args": vars(args), "preset": PRESETS[args.preset], "pairs_side_by_side": concurrent,
                         "summary": rows,
                         "runs": {f"{t}-{v}": r for (t, v), r in results.items()},
                         "allocation_count_runs": {f"{t}-{v}": b for (t, v), b in allocated.items()}}, table)
    _plot(rows, out / "overhead.png")
    print(table)
    print(f"wrote {out / 'overhead.json'}, {out / 'overhead.md'}, {out / 'overhead.png'}")
    return 0


def _save_policy(preset: str, seed: int, path: Path) -> None:
    tokenizer, policy, _ = build_models(preset, seed)
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _run_pair(runs: list[ChildRun], concurrent: bool) -> list[dict]:
    """The runs' results: one after the other, or all at once (one core each: they see the same machine load)."""
    if not concurrent:
        return [_spawn(run) for run in runs]
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(_spawn, runs))


def _spawn(run: ChildRun) -> dict:
    command = [sys.executable, "-m", "r2m.benchmarks.overhead", "--child", json.dumps(asdict(run))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("R2M_RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"overhead run {run} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def _merge(runs: list[dict]) -> dict:
    return {"step_s": statistics.median(t for r in runs for t in r["step_times"]),
            "step_cpu_s": statistics.median(t for r in runs for t in r["step_cpu_times"]),
            "update_ms": statistics.median(r["update_ms"] for r in runs),
            "capture_ms": statistics.median(r["capture_ms"] for r in runs),
            "reward_ms": statistics.median(r["reward_ms"] for r in runs),
            "extra_forward_share": statistics.fmean(r["extra_forward_share"] for r in runs),
            "forwards": statistics.fmean(r["policy_forwards_per_step"] for r in runs),
            "peak": statistics.median(r["peak_memory_bytes"] for r in runs),
            "allocated": None if runs[0]["peak_allocated_bytes"] is None
            else statistics.median(r["peak_allocated_bytes"] for r in runs),
            "stored": max(r["stored_hidden_bytes"] for r in runs),
            "trained": max(r["trained_state_bytes"] for r in runs)}


def _plot(rows: list[dict], path: Path) -> None:
    fig, (time_ax, memory_ax) = subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(rows))
    names = [r["trainer"].upper() for r in rows]
    time_ax.bar([i - 0.2 for i in x], [r["vanilla_step_s"] for r in rows], width=0.4, label="vanilla RM")
    time_ax.bar([i + 0.2 for i in x], [r["r2m_step_s"] for r in rows], width=0.4, label="R2M")
    for i, r in enumerate(rows):
        time_ax.annotate(f"x{r['step_time_ratio']:.3f}\nrounds {r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}\n"
                         f"timed sections x{r['timed_sections_ratio']:.3f}", (i + 0.2, r["r2m_step_s"]),
                         ha="center", va="bottom", fontsize=8)
    time_ax.set_xticks(list(x), names)
    time_ax.margins(y=0.25)
    time_ax.set(ylabel="median step time (s)", title="time per training step")
    time_ax.legend(loc="lower center")
    memory_ax.bar([i - 0.2 for i in x], [r["extra_peak_mb"] for r in rows], width=0.4, color="tab:red",
                  label="measured extra peak")
    memory_ax.bar([i + 0.2 for i in x], [r["stored_hidden_mb"] for r in rows], width=0.4, color="tab:gray",
                  label="stored hidden states")
    memory_ax.bar([i + 0.2 for i in x], [r["trained_state_mb"] for r in rows], width=0.4, color="silver",
                  bottom=[r["stored_hidden_mb"] for r in rows], label="trained state")
    memory_ax.hlines([r["memory_budget_mb"] for r in rows], [i - 0.45 for i in x], [i + 0.45 for i in x],
                     colors="black", linestyles="dashed", label="target: 1.1 x (stored + trained)")
    memory_ax.set_xticks(list(x), names)
    memory_ax.set_ylim(top=1.6 * max(max(r["memory_budget_mb"], r["extra_peak_mb"]) for r in rows))
    memory_ax.set(ylabel="MB (allocated tensors)", title="R2M's extra peak memory")
    memory_ax.legend(loc="upper center", ncol=2, fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
