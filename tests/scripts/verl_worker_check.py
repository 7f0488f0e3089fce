"""One verl FSDP2 actor worker (world size 1, CPU test platform) with R2M: prints JSON measurements that
tests/test_verl_worker.py checks against independent references.

Usage: python verl_worker_check.py OUT_DIR LAYOUT  (LAYOUT: packed = use_remove_padding, padded)
"""

from __future__ import annotations

import copy
import json
import os
import sys

import verl_tiny as vt

vt.use_cpu_platform()
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=os.environ.get("VERL_TEST_PORT", "29571"))

import torch  # noqa: E402
import verl  # noqa: E402, F401
from transformers import AutoModelForSequenceClassification  # noqa: E402

from r2m import R2MConfig, wrap  # noqa: E402
from r2m.hf_models import find_body  # noqa: E402
from r2m.integrations.verl.worker import R2MActorRolloutRefWorker, sample_keys  # noqa: E402
from r2m.packed import PackedStates  # noqa: E402

R2M = {"attn_dim": 16, "fusion_init": "random", "lr": 1e-2}
GROUP = 4


def main(out_dir: str, layout: str) -> dict:
    policy_path, reward_path = vt.save_models(out_dir)
    config = vt.verl_config(policy_path, [f"actor_rollout_ref.model.use_remove_padding={layout == 'packed'}",
                                          "++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
                                          "actor_rollout_ref.actor.optim.lr=1e-2"])
    worker = R2MActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    worker.init_model()
    worker.r2m_init(R2M, reward_path, 10)
    samples = vt.rollouts(3, GROUP)
    keys = sample_keys(vt.batch(samples))
    result = {"samples": len(samples)}

    # 1. annotation: the states compute_log_prob's forward left in the store, against a plain HF forward
    worker.compute_log_prob(vt.batch(samples, calculate_entropy=True, compute_loss=False, temperature=1.0))
    stored = worker.store.lookup(keys)
    reference = vt.hf_states(policy_path, keys)
    result["capture_err"] = max(float((stored.sample(i) - ref).abs().max()) for i, ref in enumerate(reference))
    result["stored_keys"] = len(worker.store.keys())
    result["log_prob_passes"] = len(worker.store.pending)

    # 2. scoring: the worker's rewards against the core's reward_from_rte on the HF states
    rewards = worker.r2m_score(vt.batch(samples, r2m_step=1))["r2m_rewards"]
    texts = worker.policy_tokenizer.batch_decode([list(k) for k in keys], skip_special_tokens=True)
    encoded = worker.reward_tokenizer(text=texts, return_tensors="pt", padding=True, add_special_tokens=False)
    rte = worker.r2m.rte(encoded["input_ids"], encoded["attention_mask"]).float()
    packed = PackedStates.from_samples(reference, list(keys))
    expected = worker.r2m.reward_from_rte(rte, packed.hidden, None, 1, cu_seqlens=packed.cu_seqlens)
    result["score_err"] = float((rewards - expected).abs().max())
    result["reward_spread"] = float(rewards.std())

    # 3. refresh: the training passes of update_actor (2 epochs), seen by an independent hook on the body
    seen: dict[tuple, torch.Tensor] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if torch.is_grad_enabled():
            from r2m.integrations.verl.capture import split_forward

            rows, row_keys = split_forward(output[0].detach(), kwargs["input_ids"], kwargs.get("attention_mask"),
                                           kwargs.get("position_ids"))
            seen.update(zip(row_keys, [r.clone() for r in rows], strict=True))

    handle = find_body(worker.actor.engine.module).register_forward_hook(record, with_kwargs=True)
    trained = vt.training_fields(samples)
    worker.update_actor(vt.batch(trained, global_batch_size=len(samples), mini_batch_size=len(samples) // 2,
                                 **vt.UPDATE_META))
    handle.remove()
    refreshed = worker.store.lookup(keys)
    result["refreshed_all"] = all(worker.store.is_refreshed(k) for k in keys)
    result["refresh_err"] = max(float((refreshed.sample(i) - seen[k]).abs().max()) for i, k in enumerate(keys))
    result["refresh_moved"] = max(float((refreshed.sample(i) - ref).abs().max()) for i, ref in enumerate(reference))

    # 4. update: the worker's R2M update against the core's single-process update from the same start
    before = worker.r2m_weights()
    rte_kept = torch.stack([worker._rte[k] for k in keys])
    states = copy.deepcopy(refreshed)
    metrics = worker.r2m_update(vt.batch(trained, r2m_step=1, r2m_group_size=GROUP))["metrics"]
    after = worker.r2m_weights()
    core = wrap(AutoModelForSequenceClassification.from_pretrained(reward_path, dtype=torch.float32), 32,
                R2MConfig(**R2M))
    core.total_steps = 10
    core.fusion.load_state_dict({k[7:]: v for k, v in before.items() if k.startswith("fusion.")})
    core.head.load_state_dict({k[5:]: v for k, v in before.items() if k.startswith("head.")})
    scores = torch.stack([s["rm_scores"].sum() for s in trained])
    core.update(rte_kept, states.hidden, None, scores, GROUP, 1, cu_seqlens=states.cu_seqlens)
    reference_after = {f"fusion.{k}": v for k, v in core.fusion.state_dict().items()}
    reference_after.update({f"head.{k}": v for k, v in core.head.state_dict().items()})
    result["update_err"] = max(float((after[k] - reference_after[k]).abs().max()) for k in after)
    result["update_moved"] = max(float((after[k] - before[k]).abs().max()) for k in after)
    result["metrics"] = metrics
    result["store_after_update"] = len(worker.store.pending)

    # 5. non-finite inputs: a sample with a NaN state gets the reward model's own reward; where that is not finite
    # either (a poisoned head), the worker hands out 0 and counts it: no NaN reaches verl's rm_scores
    worker.compute_log_prob(vt.batch(samples, calculate_entropy=True, compute_loss=False, temperature=1.0))
    rollout = next(r for r in worker.store.pending if keys[0] in r.keys)
    rollout.states.sample(rollout.keys[keys[0]][0]).fill_(float("nan"))
    clean = worker.r2m_score(vt.batch(samples, r2m_step=1))
    vanilla = worker.r2m.vanilla_reward_from_rte(torch.stack([worker._rte[k] for k in keys]))
    result["nan_state_gets_vanilla"] = abs(float(clean["r2m_rewards"][0]) - float(vanilla[0])) <= 1e-6
    result["nan_state_others_finite"] = bool(torch.isfinite(clean["r2m_rewards"]).all())
    with torch.no_grad():
        worker.r2m.original_head.weight.fill_(float("nan"))
    poisoned = worker.r2m_score(vt.batch(samples, r2m_step=1))
    result["poisoned_rewards_finite"] = bool(torch.isfinite(poisoned["r2m_rewards"]).all())
    result["poisoned_counted"] = poisoned["r2m_nonfinite"].tolist()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])))
