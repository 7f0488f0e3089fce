"""R2M: Real-Time Aligned Reward Models for online RLHF (Huang et al., ICML 2026, arXiv 2601.22664)."""

from r2m import losses
from r2m.config import MODES, R2MConfig
from r2m.fusion import SequenceToTokenAttention
from r2m.reward_model import R2MRewardModel, wrap
from r2m.schedule import omega

__all__ = ["MODES", "R2MConfig", "R2MRewardModel", "SequenceToTokenAttention", "losses", "omega", "wrap"]
__version__ = "0.1.0"
