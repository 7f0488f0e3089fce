"""R2M hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MODES = ("r2m", "vanilla", "frozen", "noise", "head_only", "no_bt", "no_gre")
IMPLS = ("auto", "naive", "torch", "triton")


@dataclass
class R2MConfig:
    """Hyper-parameters of an R2M reward (defaults follow the paper, SPEC section 2.6).

    Modes (SPEC 2.7): ``r2m`` full method; ``vanilla`` frozen RM, no fusion; ``frozen`` fusion used for scoring,
    never updated; ``noise`` policy feedback replaced by Gaussian noise of the same mean and variance;
    ``head_only`` GREBT on the RM's own reward-token embedding, only the head is updated; ``no_bt`` alpha = 1;
    ``no_gre`` alpha = 0.
    """

    omega_min: float = 0.6
    alpha: float = 0.3
    lr: float = 1e-6
    attn_dim: int = 2048
    num_heads: int = 1
    total_steps: int | None = None
    mode: str = "r2m"
    update_steps: int = 1
    max_grad_norm: float | None = 1.0
    hidden_offload: bool = False
    seed: int | None = None
    impl: str = "auto"

    def __post_init__(self) -> None:
        _check_unit_interval("omega_min", self.omega_min)
        _check_unit_interval("alpha", self.alpha)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"R2MConfig.lr must be a finite number > 0, got {self.lr!r}")
        _check_positive_int("attn_dim", self.attn_dim)
        _check_positive_int("num_heads", self.num_heads)
        _check_positive_int("update_steps", self.update_steps)
        if self.attn_dim % self.num_heads:
            raise ValueError(
                f"R2MConfig.attn_dim ({self.attn_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.total_steps is not None:
            _check_positive_int("total_steps", self.total_steps)
        if self.mode not in MODES:
            raise ValueError(f"R2MConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"R2MConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if self.max_grad_norm is not None and not (
            isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0
        ):
            raise ValueError(f"R2MConfig.max_grad_norm must be None or a number > 0, got {self.max_grad_norm!r}")
        if not isinstance(self.hidden_offload, bool):
            raise ValueError(f"R2MConfig.hidden_offload must be a bool, got {self.hidden_offload!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"R2MConfig.seed must be None or an int, got {self.seed!r}")

    @property
    def effective_alpha(self) -> float:
        """The GRE weight the update uses: 1 for ``no_bt``, 0 for ``no_gre``, ``alpha`` otherwise."""
        return {"no_bt": 1.0, "no_gre": 0.0}.get(self.mode, float(self.alpha))

    @property
    def uses_fusion(self) -> bool:
        """Whether rewards mix in the policy-feedback attention."""
        return self.mode not in ("vanilla", "head_only")

    @property
    def trains(self) -> bool:
        """Whether `update` changes any weight."""
        return self.mode not in ("vanilla", "frozen")

    def resolved_attn_dim(self, rm_dim: int, policy_dim: int) -> int:
        """``attn_dim`` capped at the larger model width (a tiny model gets no wider attention than itself),
        rounded down to a multiple of ``num_heads``."""
        capped = min(self.attn_dim, max(rm_dim, policy_dim))
        return max(self.num_heads, capped - capped % self.num_heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"R2MConfig.{name} must be a number in [0, 1], got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"R2MConfig.{name} must be an int >= 1, got {value!r}")
