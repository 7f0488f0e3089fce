"""Two verl FSDP2 actor ranks (a real RayWorkerGroup, use_gpu=False, CPU test platform) with R2M: prints JSON
measurements that tests/test_verl_ray.py checks against independent references.

The batch is ordered so that every ``uid`` group has responses on both ranks (as verl's ``_balance_batch`` leaves
them). Usage: python verl_ray_check.py OUT_DIR
"""

from __future__ import annotations

import copy
import json
import os
import sys

import verl_tiny as vt

vt.use_cpu_platform()

import ray  # noqa: E402
import torch  # noqa: E402
import verl  # noqa: E402, F401
from transformers import AutoModelForSequenceClassification  # noqa: E402
from verl.single_controller.base.decorator import Dispatch, register  # noqa: E402
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup  # noqa: E402

from r2m import R2MConfig, wrap  # noqa: E402
from r2m.integrations.verl.worker import R2MActorRolloutRefWorker, sample_keys  # noqa: E402
from r2m.packed import PackedStates  # noqa: E402

R2M = {"attn_dim": 16, "fusion_init": "random", "lr": 1e-2}
GROUP, PROMPTS = 4, 4


class ProbeWorker(R2MActorRolloutRefWorker):
    """The worker under test, plus a read-out of what each rank holds."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def held(self) -> dict:
        keys = sorted(self.store.keys())
        states = self.store.lookup(keys) if keys else None
        return {"keys": keys, "states": [states.sample(i).clone() for i in range(len(keys))] if keys else [],
                "refreshed": [self.store.is_refreshed(k) for k in keys], "rte": {k: v for k, v in self._rte.items()}}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def poison(self, key: tuple) -> None:
        """Set the kept states of sample ``key`` to NaN, on the rank that holds it."""
        for rollout in self.store.pending:
            for row in rollout.keys.get(key, []):
                rollout.states.sample(row).fill_(float("nan"))


def main(out_dir: str) -> dict:
    policy_path, reward_path = vt.save_models(out_dir)
    config = vt.verl_config(policy_path, ["++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
                                          "actor_rollout_ref.actor.optim.lr=1e-2"])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        **vt.CPU_PLATFORM_ENV, "PYTHONPATH": os.environ["PYTHONPATH"], "TOKENIZERS_PARALLELISM": "false"}})
    try:
        pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
        group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(
            cls=ray.remote(ProbeWorker), config=config.actor_rollout_ref, role="actor"), device_name="cpu")
        return run(group, policy_path, reward_path)
    finally:
        ray.shutdown()


def run(group: RayWorkerGroup, policy_path: str, reward_path: str) -> dict:
    group.init_model()
    group.r2m_init(R2M, reward_path, 10)
    by_group = vt.rollouts(PROMPTS, GROUP)
    # response k of every group, then k + 1, ...: the first half (rank 0) holds responses 0-1, rank 1 the rest
    samples = [by_group[p * GROUP + k] for k in range(GROUP) for p in range(PROMPTS)]
    keys = sample_keys(vt.batch(samples))
    result = {"samples": len(samples)}

    group.compute_log_prob(vt.batch(samples, calculate_entropy=True, compute_loss=False, temperature=1.0))
    held = group.held()
    reference = dict(zip(keys, vt.hf_states(policy_path, keys), strict=True))
    result["per_rank"] = [len(h["keys"]) for h in held]
    result["held_once"] = sorted(k for h in held for k in h["keys"]) == sorted(keys)
    result["rank_of_half"] = [set(h["keys"]) == set(keys[r * 8:(r + 1) * 8]) for r, h in enumerate(held)]
    result["capture_err"] = max(float((s - reference[k]).abs().max()) for h in held
                                for k, s in zip(h["keys"], h["states"], strict=True))

    output = group.r2m_score(vt.batch(samples, r2m_step=2))
    rewards = output["r2m_rewards"]
    held = group.held()
    rte = {k: v for h in held for k, v in h["rte"].items()}
    weights = group.r2m_weights()
    core = wrap(AutoModelForSequenceClassification.from_pretrained(reward_path, dtype=torch.float32), 32,
                R2MConfig(**R2M))
    core.total_steps = 10
    load(core, weights[0])
    packed = PackedStates.from_samples([reference[k] for k in keys], list(keys))
    expected = core.reward_from_rte(torch.stack([rte[k] for k in keys]), packed.hidden, None, 2,
                                    cu_seqlens=packed.cu_seqlens)
    result["score_err"] = float((rewards - expected).abs().max())
    result["start_identical"] = all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])

    trained = vt.training_fields(samples)
    group.update_actor(vt.batch(trained, global_batch_size=len(samples), mini_batch_size=len(samples) // 2,
                                **vt.UPDATE_META))
    held = group.held()
    result["refreshed_all"] = all(all(h["refreshed"]) for h in held)
    refreshed = {k: s for h in held for k, s in zip(h["keys"], h["states"], strict=True)}
    result["refresh_moved"] = max(float((refreshed[k] - reference[k]).abs().max()) for k in keys)

    metrics = group.r2m_update(vt.batch(trained, r2m_step=2, r2m_group_size=GROUP))
    after = group.r2m_weights()
    # the core's single-process update on the same samples, group-major, from the same start
    order = [p + PROMPTS * k for p in range(PROMPTS) for k in range(GROUP)]
    states = PackedStates.from_samples([refreshed[keys[i]] for i in order], [keys[i] for i in order])
    scores = torch.stack([trained[i]["rm_scores"].sum() for i in order])
    single = copy.deepcopy(core)
    single.update(torch.stack([rte[keys[i]] for i in order]), states.hidden, None, scores, GROUP, 2,
                  cu_seqlens=states.cu_seqlens)
    reference_after = named(single)
    result["update_err"] = max(float((after[r][n] - reference_after[n]).abs().max()) for r in range(2)
                               for n in reference_after)
    result["ranks_identical"] = all(torch.equal(after[0][n], after[1][n]) for n in after[0])
    result["update_moved"] = max(float((after[0][n] - weights[0][n]).abs().max()) for n in after[0])
    result["metrics"] = metrics["metrics"]

    # a NaN state on one rank: its group is skipped on both ranks, the rest still trains, weights stay finite and equal
    group.compute_log_prob(vt.batch(samples, calculate_entropy=True, compute_loss=False, temperature=1.0))
    group.r2m_score(vt.batch(samples, r2m_step=3))
    group.poison(keys[-1])  # the last sample of the batch: rank 1
    skipped = group.r2m_update(vt.batch(trained, r2m_step=3, r2m_group_size=GROUP))["metrics"]
    final = group.r2m_weights()
    result["nan_metrics"] = skipped
    result["nan_ranks_identical"] = all(torch.equal(final[0][n], final[1][n]) for n in final[0])
    result["nan_weights_finite"] = all(bool(torch.isfinite(v).all()) for v in final[0].values())
    result["nan_update_moved"] = max(float((final[0][n] - after[0][n]).abs().max()) for n in final[0])
    return result


def named(rm: torch.nn.Module) -> dict[str, torch.Tensor]:
    weights = {f"fusion.{k}": v for k, v in rm.fusion.state_dict().items()}
    weights.update({f"head.{k}": v for k, v in rm.head.state_dict().items()})
    return weights


def load(rm: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    rm.fusion.load_state_dict({k[7:]: v for k, v in weights.items() if k.startswith("fusion.")})
    rm.head.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1]), default=str))
