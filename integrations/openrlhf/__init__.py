"""R2M in OpenRLHF's Ray pipeline (PPO, REINFORCE++, GRPO, RLOO estimators).

Run ``python -m r2m.integrations.openrlhf.train_ppo_ray <OpenRLHF flags> --r2m_enable [--r2m_* flags]``. The
OpenRLHF-dependent classes load on first use, so the pure pieces (`PolicyStateStore`, `R2MRewardSide`, ...)
import without OpenRLHF.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "R2MRewardModelActor": "actors", "R2MPolicyModelActor": "actors", "R2MRewardModelActorBase": "actors",
    "R2MPolicyModelActorBase": "actors", "R2MExperienceMaker": "experience_maker", "R2MPPOTrainer": "trainer",
    "R2MPPOTrainerBase": "trainer", "PolicyStateStore": "policy_side", "PolicyFeedbackCapture": "policy_side",
    "fingerprints": "policy_side", "R2MRewardSide": "reward_side", "PolicyFeedback": "reward_side",
    "LocalEndpoint": "reward_side", "Traffic": "reward_side", "R2MOptions": "options",
    "add_r2m_arguments": "options",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
