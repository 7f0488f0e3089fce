"""GRPO + R2M on real processes (run under torchrun): checks after every optimizer step that the fusion and head
are bit-identical on all ranks, and writes each rank's final R2M weights and a summary to argv[1].

With a second argument ``miss-on-rank0``, rank 0 loses the captured states of its first batch, so only it needs a
fallback forward: every rank must still run the same number of policy forwards (a collective under FSDP/ZeRO-3)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import trl_tiny
from safetensors.torch import save_file
from transformers import TrainerCallback
from trl import GRPOTrainer

import r2m
from r2m.integrations.trl import R2MReward
from r2m.packed import PackedStates

PER_DEVICE, GROUP = 6, 4  # rank 0 holds samples 0-5 of each 12-sample batch: group 1 straddles the ranks


class CheckIdentical(TrainerCallback):
    """Runs after R2MReward's own on_step_end (callback order), i.e. after its update."""

    def __init__(self, reward: R2MReward):
        self.reward, self.checks = reward, 0

    def on_step_end(self, args, state, control, **kwargs):
        flat = torch.cat([p.detach().flatten() for p in self.reward.r2m.trainable_parameters()])
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        if not all(torch.equal(parts[0], part) for part in parts):
            raise AssertionError(f"R2M weights differ across ranks after step {state.global_step}")
        self.checks += 1


def lose_first_capture_on_rank0(reward: R2MReward) -> None:
    capture = reward._source.capture
    pop = capture.pop_generation
    lost = []

    def pop_generation(completions):
        states = pop(completions)
        if dist.get_rank() == 0 and not lost:
            lost.append(len(completions))
            return PackedStates.none_found(len(completions))
        return states

    capture.pop_generation = pop_generation


def main(out: Path, mode: str) -> None:
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(lr=1e-2, attn_dim=16))
    check = CheckIdentical(reward)
    counter = trl_tiny.ForwardCounter(policy)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward, check],
                          args=trl_tiny.args("grpo", str(out / "run"), per_device_train_batch_size=PER_DEVICE,
                                             num_generations=GROUP, max_steps=3),
                          train_dataset=trl_tiny.dataset(24), processing_class=policy_tokenizer)
    if mode == "miss-on-rank0":
        lose_first_capture_on_rank0(reward)
    trainer.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    state = {f"fusion.{k}": v for k, v in reward.r2m.fusion.state_dict().items()}
    state.update({f"head.{k}": v for k, v in reward.r2m.head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
    updates = trl_tiny.updates(trainer)
    summary = {"world_size": world, "checks": check.checks, "updates": len(updates),
               "groups_used": [u["groups_used"] for u in updates], "capture": reward.capture_counts,
               "extra_forwards": reward.extra_forwards, "per_device": PER_DEVICE, "group": GROUP,
               "policy_forwards": counter.count, "refreshed": [u["refreshed"] for u in updates]}
    (out / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
