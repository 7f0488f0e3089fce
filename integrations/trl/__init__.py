"""TRL integration: `R2MReward`, the R2M reward function and callback for GRPOTrainer and RLOOTrainer."""

from r2m.integrations.trl.reward import R2MReward, capture_plan

__all__ = ["R2MReward", "capture_plan"]
