"""verl's trainer mode r2m_sync driven for a few steps on CPU: 2 real FSDP2 actor ranks (RayWorkerGroup), verl's real
TransferQueue, replay buffer, dataloader, advantage and checkpoint code; only generation is replaced, by canned
rollouts written into the TransferQueue by verl's own agent-loop code. Prints JSON measurements for
tests/test_verl_trainer.py.

Usage: python verl_trainer_check.py OUT_DIR STEPS [RESUME_STEP]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import verl_tiny as vt

vt.use_cpu_platform()

import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import transfer_queue as tq  # noqa: E402
import verl  # noqa: E402, F401
from hydra import compose, initialize  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tensordict import NonTensorData, NonTensorStack  # noqa: E402
from verl.experimental.agent_loop import AgentLoopOutput  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, get_trajectory_info  # noqa: E402
from verl.single_controller.ray import RayResourcePool, ResourcePoolManager  # noqa: E402
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ  # noqa: E402
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry  # noqa: E402

from r2m.integrations.verl import main_ppo  # noqa: E402
from r2m.integrations.verl.trainer import R2MPPOTrainer  # noqa: E402

GROUP, PROMPTS_PER_STEP = 4, 2
# No rollout server is ever launched (the trainer runs without hybrid replicas): the name only has to resolve.
RolloutReplicaRegistry.register("canned", lambda: RolloutReplica)
VERL_AGENT_LOOP = AgentLoopWorkerTQ.__ray_actor_class__


class CannedAgentLoop:
    """Generation replaced: each prompt's responses are a fixed function of its token ids; verl's own agent-loop code
    (``_run_prompt``, ``_agent_loop_postprocess``) tags them and writes them into the TransferQueue."""

    _run_prompt = VERL_AGENT_LOOP._run_prompt
    _agent_loop_postprocess = VERL_AGENT_LOOP._agent_loop_postprocess
    _compute_score = VERL_AGENT_LOOP._compute_score
    _compute_teacher_logprobs = VERL_AGENT_LOOP._compute_teacher_logprobs
    _compute_multi_modal_inputs = VERL_AGENT_LOOP._compute_multi_modal_inputs
    _compute_position_ids = VERL_AGENT_LOOP._compute_position_ids

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.processor, self.reward_loop_worker_handles, self.distillation_enabled = None, None, False

    def generate_sequences(self, batch) -> None:
        asyncio.run(self._generate(batch))

    async def _generate(self, batch) -> None:
        validate = bool(batch["validate"]) if "validate" in batch else False
        trajectories = await get_trajectory_info(batch["global_steps"], batch["index"], validate)
        prompts = []
        for i in range(len(batch)):
            prompt = {}
            for key, value in batch.items():
                if key == "validate":
                    continue
                if isinstance(value, torch.Tensor):
                    prompt[key] = value[i]
                elif isinstance(value, NonTensorStack):
                    prompt[key] = value[i].data
                elif isinstance(value, NonTensorData):
                    prompt[key] = value.data
            prompts.append(prompt)
        await asyncio.gather(*[self._run_prompt(p, {}, trajectory=t) for p, t in zip(prompts, trajectories,
                                                                                       strict=True)])

    async def _run_agent_loop(self, sampling_params: dict, trajectory: dict, trace: bool = False, **kwargs) -> None:
        text = " ".join(message["content"] for message in kwargs["raw_prompt"])
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        session = kwargs["session_id"]
        length = 2 + (sum(prompt_ids) + session) % 4
        response_ids = [4 + (prompt_ids[j % len(prompt_ids)] * 7 + 3 * session + j) % vt.VOCAB_WORDS
                        for j in range(length)]
        steps = int(kwargs["global_steps"])
        output = AgentLoopOutput(prompt_ids=prompt_ids, response_ids=response_ids, response_mask=[1] * length,
                                 reward_score=float(sum(response_ids) % 5) / 4.0, num_turns=2,
                                 metrics=AgentLoopMetrics(),
                                 extra_fields={"min_global_steps": steps, "max_global_steps": steps})
        await self._agent_loop_postprocess(output, validate=trajectory["validate"], **kwargs)


class CPUResourcePoolManager(ResourcePoolManager):
    """verl's resource pools without accelerators (one process per rank, no GPU check)."""

    def create_resource_pool(self) -> None:
        for name, process_on_nodes in self.resource_pool_spec.items():
            self.resource_pool_dict[name] = RayResourcePool(process_on_nodes=process_on_nodes, use_gpu=False,
                                                            max_colocate_count=1, name_prefix=name)


class CannedR2MTrainer(R2MPPOTrainer):
    """The r2m_sync trainer with the generation side cut off (no rollout replicas, so no weight sync to them);
    records what each step left in the TransferQueue and in the metrics."""

    _enable_hybrid_replicas = False

    def __init__(self, config):
        super().__init__(config)
        self.records: list[dict] = []

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        manager = self.resource_pool_manager
        self.resource_pool_manager = CPUResourcePoolManager(manager.resource_pool_spec, manager.mapping)

    def on_init_end(self) -> None:
        return None  # weight sync to rollout replicas: there are none

    def on_step_end(self) -> None:
        return None

    def on_sample_end(self) -> None:
        return None

    def _compute_old_log_prob(self, batch, metrics):
        before = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["rm_scores"])
        batch = super()._compute_old_log_prob(batch, metrics)
        after = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                select_fields=["rm_scores", "r2m_rewards", "uid"])
        self.records.append({"step": self.global_steps,
                             "rule": [float(r[-1]) for r in before["rm_scores"].unbind()],
                             "scores": [r.tolist() for r in after["rm_scores"].unbind()],
                             "r2m": after["r2m_rewards"].tolist(), "uids": list(after["uid"])})
        return batch

    def _update_actor(self, batch, metrics):
        batch = super()._update_actor(batch, metrics)
        weights = self.actor_rollout_wg.r2m_weights()
        self.records[-1].update(metrics={k: float(v) for k, v in metrics.items() if k.startswith("r2m/")},
                                weights=[{k: v.tolist() for k, v in w.items()} for w in weights])
        return batch


def dataset(path: Path, count: int) -> str:
    rows = [{"prompt": [{"role": "user", "content": " ".join(f"w{(5 * i + 3 * j) % vt.VOCAB_WORDS}"
                                                                for j in range(3 + i % 3))}],
             "data_source": "canned", "reward_model": {"ground_truth": ""}, "extra_info": {"index": i}}
            for i in range(count)]
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def main(out_dir: str, steps: int, resume_step: int | None) -> dict:
    out = Path(out_dir)
    policy_path, reward_path = (str(out / "policy"), str(out / "reward")) if (out / "policy").exists() else \
        vt.save_models(out, chat_template=True)
    data = dataset(out / "train.parquet", 8)
    overrides = [*vt.CPU_OVERRIDES, f"actor_rollout_ref.model.path={policy_path}",
                 f"r2m.reward_model_path={reward_path}", "r2m.attn_dim=16", "r2m.fusion_init=random", "r2m.lr=1e-2",
                 f"data.train_files={data}", f"data.val_files={data}", f"data.train_batch_size={PROMPTS_PER_STEP}",
                 "data.dataloader_num_workers=0", "data.max_prompt_length=16", "data.max_response_length=8",
                 f"actor_rollout_ref.rollout.n={GROUP}", "trainer.n_gpus_per_node=2", "trainer.nnodes=1",
                 f"trainer.total_training_steps={steps}", "trainer.save_freq=1", "trainer.test_freq=-1",
                 "trainer.val_before_train=false", "trainer.logger=[console]",
                 f"trainer.default_local_dir={out / 'checkpoints'}", "reward.num_workers=1",
                 "transfer_queue.backend.SimpleStorage.num_data_storage_units=1", "actor_rollout_ref.rollout.nnodes=1",
                 "actor_rollout_ref.rollout.name=canned", "actor_rollout_ref.rollout.calculate_log_probs=false",
                 "++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
                 "actor_rollout_ref.actor.optim.lr=1e-3"]
    if resume_step is not None:
        overrides += ["trainer.resume_mode=resume_path",
                      f"trainer.resume_from_path={out / 'checkpoints' / f'global_step_{resume_step}'}"]
    else:
        overrides += ["trainer.resume_mode=disable"]
    with initialize(config_path=None, version_base=None):
        config = compose(config_name=main_ppo.CONFIG_NAME, overrides=overrides)
    ray.init(num_cpus=6, include_dashboard=False, runtime_env={"env_vars": {
        **vt.CPU_PLATFORM_ENV, "PYTHONPATH": os.environ["PYTHONPATH"], "TOKENIZERS_PARALLELISM": "false"}})
    config.transfer_queue.enable = True
    tq.init(config.transfer_queue)
    try:
        trainer = CannedR2MTrainer(config)
        trainer.init()
        result = {"resumed_at": trainer.global_steps}
        if resume_step is not None:
            restored = out / "restored"
            trainer.actor_rollout_wg.r2m_save(str(restored))
            result["restored_equal"] = same_state(restored / "r2m", out / "checkpoints" /
                                                  f"global_step_{resume_step}" / "actor" / "r2m")
        trainer.fit(CannedAgentLoop(config, trainer.tokenizer))
        result["records"] = trainer.records
        result["saved"] = sorted(p.parent.parent.name for p in (out / "checkpoints").glob("global_step_*/actor/r2m"))
        return result
    finally:
        tq.close()
        ray.shutdown()


def same_state(a: Path, b: Path) -> bool:
    """Whether two R2M checkpoints hold bit-identical weights and optimizer state."""
    for name in ("r2m_model.safetensors", "r2m_optimizer.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


if __name__ == "__main__":
    resume = int(sys.argv[3]) if len(sys.argv) > 3 else None
    print("RESULT " + json.dumps(main(sys.argv[1], int(sys.argv[2]), resume)))
