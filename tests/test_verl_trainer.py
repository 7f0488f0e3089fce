"""verl's trainer mode r2m_sync for 3 steps on CPU: 2 real FSDP2 actor ranks, verl's real TransferQueue, replay
buffer, dataloader, GRPO advantages and checkpoints; generation replaced by canned rollouts written by verl's own
agent-loop code. rm_scores carry rule + R2M reward at each response's last token, R2M updates once per step with
identical weights on both ranks, and a resume from step 2 restores R2M bit for bit and repeats step 3."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from test_verl_worker import run_check

pytest.importorskip("verl")


def max_diff(a: dict, b: dict) -> float:
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_r2m_sync_steps_save_and_resume(tmp_path: Path) -> None:
    run = run_check("verl_trainer_check.py", str(tmp_path), "3", port=0)
    assert run["resumed_at"] == 0
    assert run["saved"] == ["global_step_1", "global_step_2", "global_step_3"]
    records = run["records"]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert len(record["uids"]) == 8 and len(set(record["uids"])) == 2  # 2 prompts x 4 responses
        for scores, rule, r2m in zip(record["scores"], record["rule"], record["r2m"], strict=True):
            assert abs(scores[-1] - (rule + r2m)) <= 1e-6
            assert all(v == 0 for v in scores[:-1])
        assert max(record["r2m"]) > min(record["r2m"])
        metrics = record["metrics"]
        assert metrics["r2m/groups_used"] == 2 and metrics["r2m/refreshed_share"] == 1.0
        assert metrics["r2m/nonfinite_rewards"] == 0
        assert max_diff(record["weights"][0], record["weights"][1]) == 0.0  # both ranks
    for before, after in itertools.pairwise(records):
        assert max_diff(before["weights"][0], after["weights"][0]) > 1e-4  # one update per step

    resumed = run_check("verl_trainer_check.py", str(tmp_path), "3", "2", port=0)
    assert resumed["resumed_at"] == 2
    assert resumed["restored_equal"]  # weights and optimizer state bit for bit
    assert [r["step"] for r in resumed["records"]] == [3]
    assert max_diff(resumed["records"][0]["weights"][0], records[-1]["weights"][0]) <= 1e-6
