"""R2M on verl's real FSDP2 actor worker (one rank, CPU test platform): states from compute_log_prob equal a plain
Hugging Face forward in verl's packed and padded layouts, scoring equals the core's reward_from_rte, update_actor's
training passes refresh every sample, the R2M update equals the core's, and no NaN reaches rm_scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")

SCRIPTS = Path(__file__).parent / "scripts"


def run_check(script: str, *args: str, port: int) -> dict:
    env = {**os.environ, "VERL_TEST_PORT": str(port), "PYTHONPATH": str(SCRIPTS)}
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=540)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize(("layout", "port"), [("packed", 29571), ("padded", 29572)])
def test_worker_captures_scores_refreshes_and_updates(tmp_path: Path, layout: str, port: int) -> None:
    result = run_check("verl_worker_check.py", str(tmp_path), layout, port=port)
    assert result["capture_err"] <= 1e-5
    assert result["stored_keys"] == result["samples"]
    assert result["log_prob_passes"] > 1  # micro-batches of 2: the pass ran in chunks, each kept
    assert result["score_err"] <= 1e-5
    assert result["reward_spread"] > 0
    assert result["refreshed_all"]
    assert result["refresh_err"] == 0.0
    assert result["refresh_moved"] > 1e-4  # the last training pass ran with updated weights: states did change
    assert result["update_err"] <= 1e-6
    assert result["update_moved"] > 1e-4
    assert result["metrics"]["r2m/groups_used"] == 3
    assert result["metrics"]["r2m/refreshed_share"] == 1.0
    assert result["store_after_update"] == 0
    assert result["nan_state_gets_vanilla"] and result["nan_state_others_finite"]
    assert result["poisoned_rewards_finite"]
    assert result["poisoned_counted"][0] == 1.0 and sum(result["poisoned_counted"]) == 1.0
