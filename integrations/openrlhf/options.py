"""The ``--r2m_*`` command-line flags and what they configure."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from r2m.config import IMPLS, MODES, R2MConfig
from r2m.integrations.openrlhf.reward_side import ROUTINGS

DEFAULTS = R2MConfig()


def add_r2m_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--r2m_*`` flags (an argument group) to ``parser``."""
    group = parser.add_argument_group("R2M (real-time aligned reward model)")
    group.add_argument("--r2m_enable", action="store_true", default=False,
                       help="Score with R2M: the reward model fused with the policy's last-layer hidden states, "
                            "updated with GREBT after every training round")
    group.add_argument("--r2m_mode", type=str, default=DEFAULTS.mode, choices=MODES,
                       help="r2m (the full method) or a baseline/ablation of the paper")
    group.add_argument("--r2m_routing", type=str, default="compact", choices=ROUTINGS,
                       help="full: policy hidden states travel to the reward actor (S*D_p numbers per sample); "
                            "compact: the attention runs next to the policy, only u, c (and dc, du) travel "
                            "(2*H*D_p per sample, independent of the sequence length)")
    group.add_argument("--r2m_omega_min", type=float, default=DEFAULTS.omega_min,
                       help="Floor of the weight w(t) of the reward model's own embedding (paper: 0.6 or 0.7)")
    group.add_argument("--r2m_alpha", type=float, default=DEFAULTS.alpha, help="GRE weight of the GREBT loss")
    group.add_argument("--r2m_lr", type=float, default=DEFAULTS.lr, help="Adam learning rate of fusion + head")
    group.add_argument("--r2m_attn_dim", type=int, default=DEFAULTS.attn_dim, help="Cross-attention width d")
    group.add_argument("--r2m_num_heads", type=int, default=DEFAULTS.num_heads, help="Cross-attention heads H")
    group.add_argument("--r2m_total_steps", type=int, default=None,
                       help="T of w(t) in training rounds (default: prompts / rollout batch size * episodes)")
    group.add_argument("--r2m_update_steps", type=int, default=DEFAULTS.update_steps,
                       help="Optimizer steps of the R2M update per training round")
    group.add_argument("--r2m_max_grad_norm", type=float, default=DEFAULTS.max_grad_norm,
                       help="Gradient clipping of the R2M update (<= 0: none)")
    group.add_argument("--r2m_hidden_offload", action="store_true", default=False,
                       help="Keep the captured policy hidden states in CPU memory")
    group.add_argument("--r2m_seed", type=int, default=None, help="Seed of the noise mode's generator")
    group.add_argument("--r2m_impl", type=str, default=DEFAULTS.impl, choices=IMPLS,
                       help="Attention implementation (auto: Triton kernel on GPU, PyTorch on CPU)")
    group.add_argument("--r2m_policy_hidden_size", type=int, default=None,
                       help="The policy's hidden size (default: read from --actor.model_name_or_path's config)")
    group.add_argument("--r2m_load_path", type=str, default=None,
                       help="Resume fusion, head and optimizer state from an R2M checkpoint directory")
    return parser


@dataclass
class R2MOptions:
    """The ``--r2m_*`` values, read from OpenRLHF's (hierarchized) args."""

    enable: bool = False
    mode: str = DEFAULTS.mode
    routing: str = "compact"
    omega_min: float = DEFAULTS.omega_min
    alpha: float = DEFAULTS.alpha
    lr: float = DEFAULTS.lr
    attn_dim: int = DEFAULTS.attn_dim
    num_heads: int = DEFAULTS.num_heads
    total_steps: int | None = None
    update_steps: int = DEFAULTS.update_steps
    max_grad_norm: float | None = DEFAULTS.max_grad_norm
    hidden_offload: bool = False
    seed: int | None = None
    impl: str = DEFAULTS.impl
    policy_hidden_size: int | None = None
    load_path: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> R2MOptions:
        """Read ``args.r2m_<field>`` for every field (defaults where absent)."""
        values = {name: getattr(args, f"r2m_{name}") for name in cls.__dataclass_fields__
                  if hasattr(args, f"r2m_{name}")}
        return cls(**values)

    def config(self) -> R2MConfig:
        """The `R2MConfig` these options describe (validated)."""
        if self.routing not in ROUTINGS:
            raise ValueError(f"--r2m_routing must be one of {ROUTINGS}, got {self.routing!r}")
        max_norm = None if self.max_grad_norm is None or self.max_grad_norm <= 0 else self.max_grad_norm
        return R2MConfig(omega_min=self.omega_min, alpha=self.alpha, lr=self.lr, attn_dim=self.attn_dim,
                         num_heads=self.num_heads, total_steps=self.total_steps, mode=self.mode,
                         update_steps=self.update_steps, max_grad_norm=max_norm, hidden_offload=self.hidden_offload,
                         seed=self.seed, impl=self.impl)


def check_openrlhf_args(args: Any) -> None:
    """Refuse OpenRLHF settings R2M cannot run with (``args``: OpenRLHF's hierarchized namespace)."""
    options = R2MOptions.from_args(args)
    if not options.enable:
        return
    options.config()
    if getattr(args.reward, "remote_url", None) or getattr(args.train, "agent_func_path", None):
        raise ValueError("--r2m_enable needs a reward model actor (--reward.model_name_or_path): a remote reward "
                         "(--reward.remote_url / agent) gets no policy hidden states. For a generative judge without "
                         "fusion use r2m/integrations/openrlhf/reward_func.py as --reward.remote_url")
    if not args.reward.model_name_or_path:
        raise ValueError("--r2m_enable needs --reward.model_name_or_path (a scalar reward model)")
    if args.train.async_enable:
        raise ValueError("--r2m_enable does not support --train.async_enable: the R2M update must run between the "
                         "training round and the next experience batch")
    if args.ds.ring_attn_size > 1:
        raise ValueError("--r2m_enable does not support --ds.ring_attn_size > 1 (ring attention shards each "
                         "sequence's hidden states across ranks)")
    if args.rollout.n_samples_per_prompt < 2:
        raise ValueError("--r2m_enable needs --rollout.n_samples_per_prompt >= 2: the update ranks responses "
                         "within each prompt's group")


def default_total_steps(num_prompts: int, rollout_batch_size: int, num_episodes: int) -> int:
    """Training rounds of a run: ceil(prompts / rollout batch size) per episode."""
    return max(1, math.ceil(num_prompts / rollout_batch_size) * num_episodes)
