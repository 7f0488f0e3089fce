"""R2M: Real-Time Aligned Reward Models for online RLHF (Huang et al., ICML 2026, arXiv 2601.22664)."""

from r2m import losses
from r2m.anchors import AnchorBatch
from r2m.base import R2MModule
from r2m.config import MODES, R2MConfig
from r2m.fusion import SequenceToTokenAttention
from r2m.judge_model import R2MJudgeModel
from r2m.reward_model import R2MRewardModel
from r2m.schedule import omega
from r2m.version import __version__
from r2m.wrap import wrap

__all__ = ["MODES", "AnchorBatch", "R2MConfig", "R2MJudgeModel", "R2MModule", "R2MRewardModel",
           "SequenceToTokenAttention", "__version__", "losses", "omega", "wrap"]
