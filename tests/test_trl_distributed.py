"""Two real processes (torchrun, gloo): groups straddle the ranks, and the R2M weights stay bit-identical."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "trl_distributed.py"


def run_two_ranks(out, *script_args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(SCRIPT), str(out), *script_args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_grpo_keeps_r2m_identical_on_both_ranks(tmp_path):
    summaries = run_two_ranks(tmp_path)
    for summary in summaries:
        assert summary["world_size"] == 2
        assert summary["per_device"] % summary["group"] != 0  # a group is split between the two ranks
        assert summary["checks"] == summary["updates"] == 3
        assert summary["groups_used"] == [3.0, 3.0, 3.0]  # every group of the global batch, on every rank
        assert summary["extra_forwards"] == 0
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


@pytest.mark.slow
@pytest.mark.distributed
def test_a_fallback_forward_needed_on_one_rank_runs_on_every_rank(tmp_path):
    summaries = run_two_ranks(tmp_path, "miss-on-rank0")
    assert [s["world_size"] for s in summaries] == [2, 2]
    # rank 0 re-runs its 6 samples in one forward; rank 1, which lost nothing, runs one forward with it
    assert summaries[0]["extra_forwards"] == summaries[1]["extra_forwards"] == 1
    assert summaries[0]["policy_forwards"] == summaries[1]["policy_forwards"]
    assert summaries[0]["capture"]["extra"] > 0 and summaries[1]["capture"]["extra"] == 0
