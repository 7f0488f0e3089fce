"""GRPO + R2M with a sharded policy (FSDP2 or DeepSpeed ZeRO-3) on CPU, or unsharded (one process, or DDP on
several) as the reference; run it under ``python -m torch.distributed.run``.

    trl_sharded.py OUT BACKEND SCHEDULE [options]

BACKEND: ``none`` (no sharding), ``fsdp2`` or ``zero3``. SCHEDULE: ``defaults`` (states captured from generation),
``spg`` (steps_per_generation 2 > gradient_accumulation_steps 1: states from the trainer's log-prob forward) or
``iters2`` (num_iterations 2). Options:

- ``--global-batch N``: samples per optimizer step over all processes (split evenly);
- ``--vanilla``: no R2M (a plain rule reward): the policy forwards of a vanilla run;
- ``--extra``: force R2M's fallback forward for every batch (its plan is switched to ``extra`` after init, as with
  vLLM); ``--extra-rank0``: only rank 0 needs one (its first batch's captured states are dropped);
- ``--rm-path``: give R2MReward the reward model as a local path (with its tokenizer object), loaded after the
  trainer arguments exist;
- ``--no-patch``: leave accelerate as it is (on CPU it then ignores the FSDP arguments: see
  `patch_accelerate_for_cpu_fsdp`); ``--no-agree``: let each rank decide alone whether to run a fallback forward
  (what R2M must not do; shows how a sharded policy fails then); ``--lr``: the policy's learning rate.

Generation is made reproducible across process counts: sampling is replaced by Gumbel-max sampling whose noise
depends only on the seed, the generation call, the decoding step and the sample's row in the GLOBAL generation
batch (rank * local rows + row: accelerate hands rank r the r-th slice), so one process with the whole batch and two
processes with half of it each draw the same completions whenever their policies give the same logits. Every
reward call is recorded (global rows, prompts, completion ids, R2M rewards, whether the fusion was live), the R2M
weights are checked bit-identical across ranks after every optimizer step (a mismatch fails the run), and each
rank writes ``rankR.json``, its final R2M weights ``rankR.safetensors`` and its full final policy
``policyR.safetensors`` to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SCHEDULES = {"defaults": ({}, 4), "spg": ({"steps_per_generation": 2, "gradient_accumulation_steps": 1}, 6),
             "iters2": ({"num_iterations": 2}, 6)}  # (GRPOConfig overrides, max_steps)


def patch_accelerate_for_cpu_fsdp() -> None:
    """accelerate 1.15 turns FSDP on only for accelerator device types (``AcceleratorState.__init__``: the FSDP
    branch is under ``distributed_type in [MULTI_GPU, MULTI_XPU, ...]``); on CPU (MULTI_CPU) it drops the plugin
    and silently runs DDP. FSDP2 itself runs on CPU with gloo, so let an FSDP plugin switch a MULTI_CPU state to
    FSDP the way accelerate does on GPUs (including the copy into PartialState's shared state)."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    init = AcceleratorState.__init__
    if getattr(init, "r2m_cpu_fsdp", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__.r2m_cpu_fsdp = True
    AcceleratorState.__init__ = __init__


class GlobalRowSampler:
    """Logits processor: each row's next token by Gumbel-max, noise keyed on (seed, call, global row, step)."""

    def __init__(self, seed: int):
        self.seed, self.call, self.step = seed, 0, 0

    def start(self) -> None:
        self.call, self.step = self.call + 1, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, self.step = input_ids.shape[0], self.step + 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        noise = []
        for row in range(rows):
            key = hash((self.seed, self.call, rank * rows + row, self.step)) % (2 ** 62)  # ints: not salted
            uniform = torch.rand(scores.shape[1], generator=torch.Generator().manual_seed(key), dtype=torch.float64)
            noise.append(-torch.log(-torch.log(uniform.clamp_(1e-12, 1 - 1e-12))))
        choice = (torch.log_softmax(scores.double(), dim=-1) + torch.stack(noise).to(scores.device)).argmax(dim=-1)
        forced = torch.full_like(scores, -float("inf"))
        forced[torch.arange(rows), choice] = 0.0
        return forced


def reproducible_generation(policy: torch.nn.Module, sampler: GlobalRowSampler) -> None:
    """TRL calls ``unwrapped_model.generate(**inputs, generation_config=...)``; under FSDP2 (in-place
    ``fully_shard``) and ZeRO-3 (``accelerator.unwrap_model``) that is this very object, so an instance attribute
    reaches it. Greedy decoding over the forced logits takes our sample."""
    from transformers import LogitsProcessorList

    generate = policy.generate

    def generate_with_global_rows(*args, generation_config=None, **kwargs):
        sampler.start()
        config = generation_config.__class__.from_dict(generation_config.to_dict())
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        return generate(*args, generation_config=config, logits_processor=LogitsProcessorList([sampler]), **kwargs)

    policy.generate = generate_with_global_rows


def deepspeed_config() -> dict:
    """ZeRO-3 with no persistent parameters: every tiny parameter is partitioned and gathered on use, as a real
    model's are (the default threshold, 1e5 elements, would keep all of these gathered)."""
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full, on CPU: a collective gather of each shard under FSDP2 (DTensor) and ZeRO-3."""
    full = {}
    for name, param in model.named_parameters():
        if hasattr(param, "full_tensor"):
            param = param.full_tensor()
        elif hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                param = param.detach().clone()
        full[name] = param.detach().float().cpu().clone()
    return full


def flat_r2m(reward) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in reward.r2m.trainable_parameters()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("backend", choices=["none", "fsdp2", "zero3"])
    parser.add_argument("schedule", choices=sorted(SCHEDULES))
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    for flag in ("--vanilla", "--extra", "--extra-rank0", "--rm-path", "--no-patch", "--no-agree"):
        parser.add_argument(flag, action="store_true")
    opts = parser.parse_args()
    started = time.perf_counter()
    if opts.backend == "fsdp2" and not opts.no_patch:
        patch_accelerate_for_cpu_fsdp()

    import trl_tiny
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    import r2m
    from r2m.integrations.trl import R2MReward
    from r2m.packed import PackedStates

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if opts.global_batch % world:
        raise SystemExit(f"--global-batch {opts.global_batch} does not split over {world} processes")
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    rm_dir = opts.out / f"rm{os.environ.get('RANK', '0')}"
    if opts.rm_path:
        reward_model.save_pretrained(rm_dir)
    sampler = GlobalRowSampler(seed=0)
    reproducible_generation(policy, sampler)
    counter = trl_tiny.ForwardCounter(policy)

    schedule, steps = SCHEDULES[opts.schedule]
    overrides = dict(per_device_train_batch_size=opts.global_batch // world, num_generations=4,
                     max_steps=opts.steps or steps, learning_rate=opts.lr, **schedule)
    if opts.backend == "fsdp2":
        overrides.update(fsdp="full_shard", fsdp_config={"version": 2, "reshard_after_forward": True,
                                                          "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    elif opts.backend == "zero3":
        overrides.update(deepspeed=deepspeed_config())
    args = trl_tiny.args("grpo", str(opts.out / "run"), **overrides)

    records: list[dict] = []
    reward = None
    if opts.vanilla:
        def length_reward(completions, **kwargs):
            return [float(len(c)) for c in completions]

        reward_funcs, callbacks = [length_reward], []
    else:  # after the arguments, as users write it (under ZeRO-3, from_pretrained then runs in zero.Init)
        reward = R2MReward(str(rm_dir) if opts.rm_path else reward_model, reward_tokenizer,
                           config=r2m.R2MConfig(lr=1e-2, attn_dim=16))

        class Recorded:
            """The R2M reward function, recording what it returned."""

            __name__ = reward.__name__

            def __call__(self, prompts, completions, completion_ids, **kwargs):
                step = kwargs["trainer_state"].global_step
                live = bool(reward.r2m.fusion.o_proj.weight.abs().sum() > 0) and reward.r2m.omega_at(step) < 1
                rewards = reward(prompts, completions, completion_ids, **kwargs)
                rank = dist.get_rank() if dist.is_initialized() else 0
                records.append({"rows": [rank * len(prompts) + i for i in range(len(prompts))],
                                "prompts": list(prompts), "completion_ids": [list(c) for c in completion_ids],
                                "rewards": rewards, "step": step, "fusion_live": live})
                return rewards

        reward_funcs, callbacks = [Recorded()], [reward]

    checks: list[int] = []

    class CheckIdentical(TrainerCallback):
        """After R2MReward's own on_step_end (callback order), i.e. after its update."""

        def on_step_end(self, args, state, control, **kwargs):
            if reward is None:
                return
            flat = flat_r2m(reward)
            if dist.is_initialized():
                parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, flat)
                if not all(torch.equal(parts[0], part) for part in parts):
                    raise AssertionError(f"R2M weights differ across ranks after step {state.global_step}")
            checks.append(state.global_step)

    trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, callbacks=[*callbacks, CheckIdentical()],
                          args=args, train_dataset=trl_tiny.dataset(48), processing_class=policy_tokenizer)
    launched = dist.get_world_size() if dist.is_initialized() else 1
    if launched != world:  # `accelerate launch --cpu --num_processes 2` runs one process
        raise SystemExit(f"WORLD_SIZE={world} but torch.distributed runs {launched} processes")
    if reward is not None and opts.extra:
        reward._source.plan = "extra"
    if reward is not None and opts.extra_rank0:
        capture, lost = reward._source.capture, []
        name = "pop_generation" if reward._source.plan == "generation" else "pop_forwards"
        pop = getattr(capture, name)

        def lose_first_on_rank0(completions):
            states = pop(completions)
            if dist.get_rank() == 0 and not lost:
                lost.append(len(completions))
                return PackedStates.none_found(len(completions))
            return states

        setattr(capture, name, lose_first_on_rank0)
    if opts.no_agree:
        import r2m.integrations.trl.policy_states as policy_states

        policy_states.agree = lambda value, device=None: value

    trainer.train()

    rank = dist.get_rank() if dist.is_initialized() else 0
    full = full_parameters(policy)
    summary = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
        "wrapped": type(trainer.model_wrapped).__name__,
        "sharded": [name for name, p in policy.named_parameters()
                    if type(p).__name__ == "DTensor" or hasattr(p, "ds_id")],
        "parameters": [name for name, _ in policy.named_parameters()],
        "policy_forwards": counter.count, "checks": checks, "records": records, "generate_calls": sampler.call,
        "seconds": time.perf_counter() - started,
        "logged_refreshed": [log["r2m/refreshed"] for log in trainer.state.log_history if "r2m/refreshed" in log],
    }
    if reward is not None:
        summary.update({
            "plan": reward.capture_plan, "capture": reward.capture_counts, "extra_forwards": reward.extra_forwards,
            "updates": len(trl_tiny.updates(trainer)), "refreshed": [u["refreshed"] for u in trl_tiny.updates(trainer)],
            "groups_used": [u.get("groups_used") for u in trl_tiny.updates(trainer)],
        })
        state = {f"fusion.{k}": v for k, v in reward.r2m.fusion.state_dict().items()}
        state.update({f"head.{k}": v for k, v in reward.r2m.head.state_dict().items()})
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(opts.out / f"rank{rank}.safetensors"))
    save_file(full, str(opts.out / f"policy{rank}.safetensors"))
    (opts.out / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
