"""R2M in OpenRLHF on real Ray (CPU): our reward actor and policy actor, built from tiny transformers checkpoints
and loaded by OpenRLHF's own model classes, exchange policy feedback in both routings; rewards and updates equal
the core computed in one process. The experience maker feeds the reward from the right policy actor and the round's
update reads the states of the last training pass."""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("openrlhf") is None:
    pytest.skip("OpenRLHF integration tests need `ray` and `openrlhf` (pip install --no-deps openrlhf==0.11.2, "
                "\"ray[default]==2.55.0\")", allow_module_level=True)

import ray

import r2m
from r2m.benchmarks.tiny_models import build_policy, build_reward_model, build_tokenizer

STUBS = Path(__file__).parent / "openrlhf_stubs"
POLICY_DIM, RM_DIM = 32, 24
GROUP, STEP, TOTAL = 4, 5, 10
# Adam's first step is g / (|g| + eps): with the default eps (1e-8) a gradient element near 1e-8 turns a 1e-7
# relative difference of fp32 sums into a visible weight difference. Gradients are compared directly; the weights
# after the step are compared with eps raised on every side so that comparison is well conditioned.
ADAM_EPS = 1e-5
pytestmark = pytest.mark.distributed


def _bf16_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Weights rounded to bfloat16 (OpenRLHF loads in bf16; we cast back to fp32, so both sides agree exactly)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    return model


def _setup_policy(self, path: str) -> None:
    """Inside a policy actor: OpenRLHF's Actor on CPU in fp32, R2M capture on (what init_model_from_pretrained
    does after DeepSpeed)."""
    from openrlhf.models import Actor

    self.strategy = SimpleNamespace(ring_attn_group=None, is_rank_0=lambda: False)
    self.actor = Actor(path, attn_implementation="sdpa", param_dtype="bf16").float()
    self.r2m_attach(offload=False, impl="torch")


def _setup_reward(self, path: str, config: r2m.R2MConfig, routing: str, state: str) -> None:
    """Inside a reward actor: OpenRLHF's reward model on CPU in fp32, wrapped with the R2M state at ``state``."""
    from openrlhf.models import get_llm_for_sequence_regression

    self.strategy = SimpleNamespace(ring_attn_group=None, is_rank_0=lambda: False)
    self.model = get_llm_for_sequence_regression(path, "reward", param_dtype="bf16",
                                                 attn_implementation="sdpa").float().eval()
    self.r2m_setup(config, POLICY_DIM, routing, state)
    for group in self.r2m.rm.optimizer.param_groups:
        group["eps"] = ADAM_EPS


def _grads(self) -> dict[str, torch.Tensor]:
    """Inside a reward actor: the gradients of the last R2M update step."""
    return {name: p.grad.clone() for name, p in self.r2m.rm.named_parameters() if p.grad is not None}


def _train_pass(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Inside a policy actor: change the weights, then one training forward (grad on) as ActorPPOTrainer runs it."""
    with torch.no_grad():
        self.actor.model.model.norm.weight.mul_(1.3)
    action_mask = torch.ones(sequences.shape[0], sequences.shape[1] - 1, dtype=torch.bool)
    self.actor.train()
    with torch.enable_grad():
        self.actor(sequences, action_mask, attention_mask=attention_mask, return_output=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Tiny checkpoints, the in-process core reference, a Ray cluster and 2 policy + 2 reward actors."""
    sys.path.insert(0, str(STUBS))
    from r2m.integrations.openrlhf import R2MPolicyModelActor, R2MRewardModelActor

    root = tmp_path_factory.mktemp("openrlhf")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    policy = _bf16_exact(build_policy(tokenizer, "llama", hidden_size=POLICY_DIM)).eval()
    reward_model = _bf16_exact(build_reward_model(tokenizer, "qwen2", hidden_size=RM_DIM)).eval()
    policy.save_pretrained(root / "policy")
    reward_model.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "policy")
    config = r2m.R2MConfig(total_steps=TOTAL, lr=1e-3, update_steps=2)
    core = r2m.wrap(reward_model, POLICY_DIM, config)
    torch.nn.init.normal_(core.fusion.o_proj.weight, std=0.5)
    core.save_pretrained(root / "r2m_init")

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(STUBS),
                                                                                   os.environ.get("PYTHONPATH")])),
                                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    policies = [R2MPolicyModelActor.options(num_cpus=0, num_gpus=0).remote(1, 0, None, None) for _ in range(2)]
    rewards = {routing: R2MRewardModelActor.options(num_cpus=0, num_gpus=0).remote(1, 0, None, None)
               for routing in ("full", "compact")}
    state = SimpleNamespace(root=root, tokenizer=tokenizer, policy=policy, core=core, config=config,
                            policies=policies, rewards=rewards)
    state.reset = lambda: ray.get(
        [actor.__ray_call__.remote(_setup_policy, str(root / "policy")) for actor in policies]
        + [actor.__ray_call__.remote(_setup_reward, str(root / "reward"), config, routing, str(root / "r2m_init"))
           for routing, actor in rewards.items()])
    try:
        yield state
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        sys.path.remove(str(STUBS))
        for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "flash_attn", "r2m_test_standin")]:
            del sys.modules[name]


def _batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    sequences = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(sequences)
    for i, length in enumerate(lengths):
        sequences[i, :length] = torch.randint(4, 60, (length,), generator=generator)
        mask[i, :length] = 1
    return sequences, mask


def _reference(world, sequences: torch.Tensor, mask: torch.Tensor, policy: torch.nn.Module | None = None):
    """Core in one process: RTEs from the HF reward model, policy states (valid tokens but the last) padded."""
    policy = world.policy if policy is None else policy
    with torch.no_grad():
        hidden = policy.model(sequences, attention_mask=mask).last_hidden_state
    lengths = mask.sum(dim=1) - 1
    states = torch.zeros(len(lengths), int(lengths.max()), POLICY_DIM)
    valid = torch.arange(states.shape[1])[None, :] < lengths[:, None]
    for i, length in enumerate(lengths.tolist()):
        states[i, :length] = hidden[i, :length]
    return world.core.rte(sequences, mask), states, valid


def _core_copy(world) -> r2m.R2MRewardModel:
    core = r2m.wrap(world.core.reward_model, POLICY_DIM, world.config)
    core.load_state(world.root / "r2m_init")
    for group in core.optimizer.param_groups:
        group["eps"] = ADAM_EPS
    return core


def _perturbed_policy(world) -> torch.nn.Module:
    policy = build_policy(world.tokenizer, "llama", hidden_size=POLICY_DIM)
    policy.load_state_dict(world.policy.state_dict())
    with torch.no_grad():
        policy.model.norm.weight.mul_(1.3)
    return policy.eval()


def _assert_same_update(actor, core: r2m.R2MRewardModel, initial: r2m.R2MRewardModel) -> None:
    grads = ray.get(actor.__ray_call__.remote(_grads))
    expected_grads = {name: p.grad for name, p in core.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys() and len(grads) == 5
    for name, value in expected_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=0, atol=1e-5 * float(value.abs().max()),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    actor_state = ray.get(actor.r2m_state_dict.remote())
    expected = {k: v for k, v in core.state_dict().items() if k.startswith(("fusion.", "head."))}
    assert actor_state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actor_state[name], value, rtol=0, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert not torch.equal(value, initial.state_dict()[name]), f"{name} did not change in the update"


def test_routings_give_the_core_rewards_and_update(world) -> None:
    from r2m.integrations.openrlhf import fingerprints

    world.reset()
    policy = world.policies[0]
    sequences, mask = _batch([9, 7, 12, 5, 10, 11, 6, 8], seed=1)
    action_mask = torch.ones(sequences.shape[0], sequences.shape[1] - 1, dtype=torch.bool)
    ready = policy.forward.remote(sequences, action_mask, mask)
    feedback = {"policy": policy, "ready": ready, "step": STEP, "total_steps": TOTAL}
    rewards = {routing: ray.get(actor.forward.remote(sequences, mask, None, False, feedback))
               for routing, actor in world.rewards.items()}

    core = _core_copy(world)
    rte, states, valid = _reference(world, sequences, mask)
    expected = core.reward_from_rte(rte, states, valid, STEP)
    vanilla = core.vanilla_reward_from_rte(rte)
    assert not torch.allclose(expected, vanilla, atol=1e-3), "the fusion must move the rewards in this test"
    for routing, value in rewards.items():
        torch.testing.assert_close(value, expected, rtol=0, atol=2e-6, msg=routing)

    ray.get(policy.__ray_call__.remote(_train_pass, sequences, mask))
    annotation = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5, -0.2, 0.1, 0.9])
    keys = fingerprints(sequences, mask)
    parts = [(policy, [0, 2, 4, 6]), (policy, [1, 3, 5, 7])]
    stats = {routing: ray.get(actor.r2m_update.remote(keys, annotation, GROUP, STEP, TOTAL, parts))
             for routing, actor in world.rewards.items()}

    _, refreshed, valid = _reference(world, sequences, mask, _perturbed_policy(world))
    core_stats = core.update(rte, refreshed, valid, annotation, GROUP, STEP)
    initial = _core_copy(world)
    for routing, actor in world.rewards.items():
        assert stats[routing]["groups_used"] == 2.0
        for name in ("loss", "bt", "gre", "omega"):
            assert stats[routing][name] == pytest.approx(core_stats[name], abs=1e-6), (routing, name)
        _assert_same_update(actor, core, initial)

    traffic = {routing: ray.get(actor.r2m_traffic.remote()) for routing, actor in world.rewards.items()}
    states_bytes = int((mask.sum(dim=1) - 1).sum()) * POLICY_DIM * 4
    full = traffic["full"]["bytes_received"]
    assert 2 * states_bytes <= full < 2 * states_bytes + 2048, "full routing ships the states (score + update)"
    compact = traffic["compact"]
    vector_bytes = len(keys) * POLICY_DIM * 4
    assert compact["bytes_received"] < 2 * states_bytes
    assert compact["bytes_sent"] >= 4 * vector_bytes, "u twice (score + update) and u, dc per update step"


def _openrlhf_args(argv: list[str]) -> SimpleNamespace:
    """OpenRLHF's own parser (plus ours) with its defaults, as `train_ppo_ray` builds it."""
    from openrlhf.utils.config import hierarchize

    from r2m.integrations.openrlhf import add_r2m_arguments

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def capture(parser, args=None, namespace=None):
        argparse.ArgumentParser.parse_args = original
        add_r2m_arguments(parser)
        raise Parsed(original(parser, argv))

    argparse.ArgumentParser.parse_args = capture
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    except Parsed as parsed:
        return hierarchize(parsed.args[0])
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("OpenRLHF's CLI did not parse its arguments")


def _rollout(sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int) -> list:
    """Rollout samples as OpenRLHF's SamplesGenerator makes them from vLLM outputs (one per response)."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    samples = []
    for row, row_mask in zip(sequences, mask, strict=True):
        length = int(row_mask.sum())
        action_mask = torch.zeros(length - 1, dtype=torch.long)
        action_mask[prompt_length - 1:] = 1
        samples.append(Experience(
            sequences=row[:length][None], attention_mask=torch.ones(1, length, dtype=torch.long),
            action_mask=action_mask[None], prompts=["p"], labels=[""], images=[None], mm_train_inputs=[None],
            response_length=torch.tensor([length - prompt_length]), truncated=torch.tensor([False]),
            total_length=torch.tensor([float(length)]), info={"response_clip_ratio": torch.tensor([False])}))
    return samples


def _group(handles: list):
    from openrlhf.trainer.ray.launcher import RayActorGroup

    group = object.__new__(RayActorGroup)
    group._actor_handlers, group.duplicate_actors = handles, 1
    return group


@pytest.mark.parametrize("routing", ["compact", "full"])
def test_experience_maker_feeds_policy_states_and_updates_after_training(world, routing: str) -> None:
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    from r2m.integrations.openrlhf import R2MExperienceMaker

    world.reset()
    args = _openrlhf_args(["--rollout.n_samples_per_prompt", str(GROUP), "--rollout.micro_batch_size", "2",
                           "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
                           "--r2m_enable", "--r2m_routing", routing])
    maker = R2MExperienceMaker(_group(world.policies), None, _group([world.rewards[routing]]), None,
                               FixedKLController(0.0), SimpleNamespace(args=args), world.tokenizer,
                               total_steps=TOTAL)
    maker.r2m_step = STEP
    sequences, mask = _batch([9, 7, 12, 6, 10, 11, 6, 8], seed=2)
    experiences = maker.make_experience_batch(_rollout(sequences, mask, prompt_length=4))

    core = _core_copy(world)
    rte, states, valid = _reference(world, sequences, mask)
    expected = core.reward_from_rte(rte, states, valid, STEP)
    assert not torch.allclose(expected, core.vanilla_reward_from_rte(rte), atol=1e-3), "feedback must matter here"
    got = torch.zeros(len(expected))
    for experience in experiences:
        got[experience.index] = experience.rewards
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)

    # Training on the other actor than the one that made each sample's experience (as with dynamic batching),
    # re-batched: the update must read these refreshed states, not the stale ones.
    ray.get([world.policies[1].__ray_call__.remote(_train_pass, sequences[:4], mask[:4]),
             world.policies[0].__ray_call__.remote(_train_pass, sequences[4:], mask[4:])])
    stats = maker.r2m_update(STEP)
    _, refreshed, valid = _reference(world, sequences, mask, _perturbed_policy(world))
    core_stats = core.update(rte, refreshed, valid, got, GROUP, STEP)
    assert stats["r2m/groups_used"] == 2.0
    assert stats["r2m/loss"] == pytest.approx(core_stats["loss"], abs=1e-6)
    _assert_same_update(world.rewards[routing], core, _core_copy(world))
    assert ray.get([actor.r2m_held.remote() for actor in world.policies]) == [{}, {}], "states dropped after update"
