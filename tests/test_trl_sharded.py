"""GRPO + R2M with a sharded policy on CPU: FSDP2 and DeepSpeed ZeRO-3 on two real processes (torchrun, gloo).

Each sharded run is compared with unsharded runs of the same global batch: generation is made reproducible across
process counts (tests/scripts/trl_sharded.py: Gumbel-max noise keyed on each sample's row in the global batch), so
the completions must be identical and the R2M rewards equal within float tolerance. The exact reference is DDP on
two processes (same local batches, same minibatches); one process with the whole batch is an exact reference too
where TRL gives it the same minibatches (not with steps_per_generation > gradient_accumulation_steps, where each
rank trains on its own slice of the generation batch). Every comparison includes batches scored with the fusion
live (trained o_proj, w(t) < 1), so the rewards depend on the policy's hidden states.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "trl_sharded.py"
TIMEOUT = 300  # a hang fails the test (subprocess.TimeoutExpired)
TOLERANCE = 1e-5  # rewards and weights; observed differences are ~1e-8 (rewards) and ~1e-7 (weights)
SCHEDULES = {  # schedule: (optimizer steps, capture plan, R2M updates, one process is an exact reference)
    "defaults": (4, "generation", 4, True),
    "spg": (6, "forward", 3, False),
    "iters2": (6, "forward", 3, True),
}
SHARDED_TYPE = {"fsdp2": "FSDP", "zero3": "DEEPSPEED"}

def launch(out: Path, nproc: int, *script_args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    python_path = os.pathsep.join(p for p in (str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(SCRIPT), str(out), *script_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def run(out: Path, nproc: int, *script_args: str) -> list[dict]:
    result = launch(out, nproc, *script_args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summaries = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert [s["world_size"] for s in summaries] == [nproc] * nproc  # accelerate's CPU launcher can run just one
    return summaries


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Unsharded runs, shared by the tests of this module: reference(nproc, schedule, *flags) -> run directory."""
    done: dict[tuple, Path] = {}

    def get(nproc: int, schedule: str, *flags: str) -> Path:
        key = (nproc, schedule, *flags)
        if key not in done:
            out = tmp_path_factory.mktemp(f"ref{nproc}-{schedule}")
            run(out, nproc, "none", schedule, *flags)
            done[key] = out
        return done[key]

    return get


def rollouts(out: Path) -> dict[tuple[int, int], tuple]:
    """(reward call, global row) -> (prompt, completion ids, reward), over all ranks of a run."""
    table = {}
    for path in sorted(out.glob("rank*.json")):
        for call, record in enumerate(json.loads(path.read_text())["records"]):
            for row, prompt, completion, reward in zip(record["rows"], record["prompts"], record["completion_ids"],
                                                       record["rewards"], strict=True):
                table[(call, row)] = (prompt, tuple(completion), reward)
    return table


def assert_same_rollouts(out: Path, ref: Path) -> None:
    ours, theirs = rollouts(out), rollouts(ref)
    assert ours.keys() == theirs.keys()
    for key, (prompt, completion, reward) in ours.items():
        assert (prompt, completion) == theirs[key][:2], f"call {key[0]}, row {key[1]}: another rollout"
        assert reward is not None and torch.isfinite(torch.tensor(reward)), key
        assert reward == pytest.approx(theirs[key][2], abs=TOLERANCE), key


def assert_weights_close(out: Path, ref: Path) -> None:
    """The full final policy and the R2M fusion + head: equal on both ranks (R2M: bit-identical) and close to the
    reference's."""
    r2m = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    assert r2m[0].keys() == r2m[1].keys()
    for key in r2m[0]:
        assert torch.equal(r2m[0][key], r2m[1][key]), key
    policies = [load_file(str(out / f"policy{r}.safetensors")) for r in range(2)]
    for ours, theirs in ((r2m[0], load_file(str(ref / "rank0.safetensors"))),
                         (policies[0], load_file(str(ref / "policy0.safetensors"))),
                         (policies[1], load_file(str(ref / "policy0.safetensors")))):
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=TOLERANCE, rtol=1e-4, msg=key)


def assert_sharded(summaries: list[dict], backend: str) -> None:
    for summary in summaries:
        assert summary["distributed_type"] == SHARDED_TYPE[backend]
        assert summary["sharded"] == summary["parameters"]  # every policy parameter is a shard (DTensor / ds_id)
        if backend == "fsdp2":
            assert summary["fsdp_version"] == 2 and summary["wrapped"].startswith("FSDP")
        else:
            assert summary["wrapped"] == "DeepSpeedEngine"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sharded_grpo_gives_the_unsharded_rewards_and_weights(tmp_path, reference, backend, schedule):
    steps, plan, updates, one_process_exact = SCHEDULES[schedule]
    summaries = run(tmp_path / "r2m", 2, backend, schedule)
    vanilla = run(tmp_path / "vanilla", 2, backend, schedule, "--vanilla")
    assert_sharded(summaries, backend)
    assert_sharded(vanilla, backend)
    for summary, plain in zip(summaries, vanilla, strict=True):
        assert summary["plan"] == plan
        assert summary["checks"] == list(range(1, steps + 1))  # R2M weights identical after every step
        assert summary["updates"] == updates
        assert summary["refreshed"] == summary["logged_refreshed"] == [1.0] * updates
        assert summary["groups_used"] == [summary["groups_used"][0]] * updates  # every group, on every rank
        assert summary["extra_forwards"] == 0 and summary["capture"]["extra"] == 0
        assert summary["policy_forwards"] == plain["policy_forwards"]  # R2M adds no policy forward
        assert any(record["fusion_live"] for record in summary["records"])
    assert_same_rollouts(tmp_path / "r2m", reference(2, schedule))
    assert_weights_close(tmp_path / "r2m", reference(2, schedule))
    if one_process_exact:
        assert_same_rollouts(tmp_path / "r2m", reference(1, schedule))
        assert_weights_close(tmp_path / "r2m", reference(1, schedule))


def fallback_forward_case(tmp_path, reference, backend, which):
    summaries = run(tmp_path, 2, backend, "defaults", f"--{which}")
    assert_sharded(summaries, backend)
    extra_forwards = [s["extra_forwards"] for s in summaries]
    # agreed across ranks: a sharded policy's forward is a collective
    assert extra_forwards == ([4, 4] if which == "extra" else [1, 1])
    assert summaries[0]["policy_forwards"] == summaries[1]["policy_forwards"] == 4 + extra_forwards[0]
    if which == "extra-rank0":
        assert summaries[0]["capture"]["extra"] == 4 and summaries[1]["capture"]["extra"] == 0
    for summary in summaries:
        assert summary["refreshed"] == [1.0] * 4
    assert_same_rollouts(tmp_path, reference(1, "defaults"))
    assert_weights_close(tmp_path, reference(1, "defaults"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("which", ["extra", "extra-rank0"])
def test_fallback_forward_under_fsdp2(tmp_path, reference, which):
    """R2M's own policy forward (every batch, as with vLLM; or on one rank only) under FSDP2."""
    fallback_forward_case(tmp_path, reference, "fsdp2", which)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("which", ["extra", "extra-rank0"])
def test_fallback_forward_under_zero3(tmp_path, reference, which):
    """Under ZeRO-3 R2M's own forward runs the transformer body only (see `HiddenStateCapture.forward`)."""
    fallback_forward_case(tmp_path, reference, "zero3", which)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_reward_model_given_as_a_path_after_the_trainer_arguments(tmp_path, reference, backend):
    summaries = run(tmp_path, 2, backend, "defaults", "--rm-path")
    assert_sharded(summaries, backend)
    assert_same_rollouts(tmp_path, reference(1, "defaults"))
    assert_weights_close(tmp_path, reference(1, "defaults"))


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_ignores_fsdp_on_cpu_without_the_scripts_patch(tmp_path):
    """Why trl_sharded.py patches accelerate: with use_cpu=True (MULTI_CPU), accelerate 1.15 drops the FSDP plugin
    and runs plain DDP without a word. When this fails, accelerate shards on CPU itself and the patch can go."""
    summaries = run(tmp_path, 2, "fsdp2", "defaults", "--no-patch", "--steps", "1")
    for summary in summaries:
        assert summary["distributed_type"] == "MULTI_CPU"
        assert summary["wrapped"] == "DistributedDataParallel"
        assert summary["sharded"] == []
