"""R2M on a 2-rank verl RayWorkerGroup of real FSDP2 actor workers (CPU test platform, use_gpu=False), with every
GRPO group's responses split over both ranks: states stay on the rank that ran compute_log_prob and equal a plain
Hugging Face forward, rewards equal the core's reward_from_rte, update_actor refreshes every sample, and the update
equals the core's single-process update on the group-major batch, leaving identical weights on both ranks; a NaN
state skips its group on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_verl_worker import run_check

pytest.importorskip("verl")


@pytest.mark.distributed
def test_two_ranks_scattered_groups(tmp_path: Path) -> None:
    result = run_check("verl_ray_check.py", str(tmp_path), port=0)
    assert result["per_rank"] == [8, 8]
    assert result["held_once"] and all(result["rank_of_half"])
    assert result["capture_err"] <= 1e-5
    assert result["score_err"] <= 1e-5
    assert result["start_identical"]
    assert result["refreshed_all"]
    assert result["refresh_moved"] > 1e-4
    assert result["update_err"] <= 1e-5
    assert result["ranks_identical"]
    assert result["update_moved"] > 1e-4
    assert result["metrics"]["r2m/groups_used"] == 4
    # a NaN state held by one rank: that group is skipped everywhere, the others train, nothing turns NaN
    assert result["nan_metrics"]["r2m/groups_skipped"] == 1 and result["nan_metrics"]["r2m/groups_used"] == 3
    assert result["nan_ranks_identical"] and result["nan_weights_finite"]
    assert result["nan_update_moved"] > 0
