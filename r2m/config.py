"""R2M hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from r2m.checks import check_int

MODES = ("r2m", "vanilla", "frozen", "noise", "head_only", "no_bt", "no_gre", "anchored")
IMPLS = ("auto", "naive", "torch", "triton")
FUSION_INITS = ("zero", "random")
FUSED_SCALES = ("none", "base_spread")
LABEL_TERMS = ("fused", "trained")
LABEL_PAIRS = ("extremes", "all")
# Modes whose update takes preference labels on the policy's own samples: the anchored method, and its control (the
# RM's head trained on the same labels with no policy feedback).
LABELLED_MODES = ("anchored", "head_only")


@dataclass
class R2MConfig:
    """Hyper-parameters of an R2M reward (defaults follow the paper's setup, Huang et al. 2026, arXiv 2601.22664).

    Modes (the paper's baselines and ablations): ``r2m`` full method; ``vanilla`` frozen RM, no fusion; ``frozen``
    fusion used for scoring, never updated; ``noise`` policy feedback replaced by Gaussian noise of the same mean and
    variance; ``head_only`` GREBT on the RM's own reward-token embedding, only the head is updated; ``no_bt`` alpha = 1;
    ``no_gre`` alpha = 0. Beyond the paper: ``anchored`` adds to GREBT a Bradley-Terry term, weighted by
    ``anchor_weight``, on preference labels of the policy's own samples (a labeller's: a stronger judge, a gold
    function, people), so the update learns from real preferences and not only from the rewards the policy was trained
    on; ``head_only`` given the same labels is its control.
    """

    omega_min: float = field(default=0.6, metadata={
        "help": "Floor Omega of the weight w(t) = max(0.5 cos(pi t / T) + 0.5, Omega) of the reward model's own "
                "embedding (paper: 0.6 for Llama3-8B, 0.7 for Qwen2.5-3B)."})
    alpha: float = field(default=0.3, metadata={
        "help": "Weight of the group reward entropy loss in GREBT = (1 - alpha) BT + alpha GRE (paper: 0.3)."})
    lr: float = field(default=1e-6, metadata={
        "help": "Adam learning rate of the R2M update of the cross-attention and scoring head (paper: 1e-6)."})
    attn_dim: int = field(default=2048, metadata={
        "help": "Width d of the sequence-to-token cross-attention (paper: 2048; capped at the larger model width)."})
    num_heads: int = field(default=1, metadata={
        "help": "Cross-attention heads (paper: 1); attn_dim must be divisible by it."})
    total_steps: int | None = field(default=None, metadata={
        "help": "T of the schedule w(t), in policy steps (None: taken from the trainer)."})
    mode: str = field(default="r2m", metadata={
        "help": "The full method (r2m) or one of the paper's baselines/ablations.", "choices": MODES})
    update_steps: int = field(default=1, metadata={
        "help": "Optimiser steps of the R2M update per batch of rollouts."})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "Gradient-norm clip of the R2M update (None: no clipping)."})
    hidden_offload: bool = field(default=False, metadata={
        "help": "Keep the captured policy hidden states in CPU memory until the update."})
    seed: int | None = field(default=None, metadata={
        "help": "Seed of the noise mode's generator (None: drawn at random)."})
    impl: str = field(default="auto", metadata={
        "help": "Attention implementation: naive (projects keys and values), torch (absorbed, any device), "
                "triton (fused kernel) or auto (triton on CUDA, torch otherwise).", "choices": IMPLS})
    anchor_weight: float = field(default=1.0, metadata={
        "help": "Weight of the Bradley-Terry term on labelled pairs of the policy's own samples, added to GREBT in "
                "modes anchored and head_only when labels are given."})
    label_term: str = field(default="fused", metadata={
        "help": "Which reward the Bradley-Terry term on labelled pairs (labels and the anchor set, modes anchored and "
                "head_only) is taken on: fused (w(t) r_base + (1 - w(t)) head(Ĥ), the reward the policy is trained "
                "on) or trained (head(Ĥ) alone, without the base reward's share w(t) r_base).", "choices": LABEL_TERMS})
    label_pairs: str = field(default="extremes", metadata={
        "help": "Which pairs of a fully labelled group the Bradley-Terry term on labels takes: extremes (its highest- "
                "against its lowest-labelled sample) or all (every pair whose labels differ, averaged per group).",
        "choices": LABEL_PAIRS})
    label_replay: int = field(default=0, metadata={
        "help": "Labelled groups kept from earlier updates (modes anchored and head_only, with labels): each update's "
                "Bradley-Terry term on labels is taken over this batch's labelled groups and up to this many earlier "
                "ones (their reward-token embeddings, policy states and labels as they were when labelled), so that "
                "labels accumulate instead of each being seen once. 0: none. Holds the policy states of those groups "
                "in memory; one process only, with the policy states given as tensors (not a context); not saved "
                "with a checkpoint."})
    labels_replace_pseudo: bool = field(default=False, metadata={
        "help": "In a group with a labelled pair, drop GREBT's pseudo-label pair (its highest- and lowest-rewarded "
                "sample under the reward the policy was trained on), so that the label is not fought by the "
                "ranking it corrects; the group keeps its GRE term."})
    fusion_init: str = field(default="zero", metadata={
        "help": "Initial attention output projection: zero (an untrained R2M scores exactly like the RM) or random "
                "(default nn.Linear init, as the paper's untrained R2M, which differs from its RM).",
        "choices": FUSION_INITS})
    fused_scale: str = field(default="none", metadata={
        "help": "How the trained term head(Ĥ) enters the reward: none (paper Eq. 4, w head(H) + (1 - w) head(Ĥ)) or "
                "base_spread (beyond the paper: the trained term is multiplied by kappa = min(1, s_base / s_trained), "
                "s the mean within-group spread of either term over the groups of the latest update, so it never "
                "spreads a group wider than the base reward does and Omega bounds its share of the ranking).",
        "choices": FUSED_SCALES})

    def __post_init__(self) -> None:
        _check_unit_interval("omega_min", self.omega_min)
        _check_unit_interval("alpha", self.alpha)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"R2MConfig.lr must be a finite number > 0, got {self.lr!r}")
        check_int("R2MConfig.attn_dim", self.attn_dim)
        check_int("R2MConfig.num_heads", self.num_heads)
        check_int("R2MConfig.update_steps", self.update_steps)
        if self.attn_dim % self.num_heads:
            raise ValueError(
                f"R2MConfig.attn_dim ({self.attn_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.total_steps is not None:
            check_int("R2MConfig.total_steps", self.total_steps)
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
        if isinstance(self.anchor_weight, bool) or not isinstance(self.anchor_weight, (int, float)) or \
                not math.isfinite(self.anchor_weight) or self.anchor_weight < 0:
            raise ValueError(f"R2MConfig.anchor_weight must be a finite number >= 0, got {self.anchor_weight!r}")
        if self.label_term not in LABEL_TERMS:
            raise ValueError(f"R2MConfig.label_term must be one of {LABEL_TERMS}, got {self.label_term!r}")
        if self.label_pairs not in LABEL_PAIRS:
            raise ValueError(f"R2MConfig.label_pairs must be one of {LABEL_PAIRS}, got {self.label_pairs!r}")
        check_int("R2MConfig.label_replay", self.label_replay, minimum=0)
        if not isinstance(self.labels_replace_pseudo, bool):
            raise ValueError(f"R2MConfig.labels_replace_pseudo must be a bool, got {self.labels_replace_pseudo!r}")
        if self.fusion_init not in FUSION_INITS:
            raise ValueError(f"R2MConfig.fusion_init must be one of {FUSION_INITS}, got {self.fusion_init!r}")
        if self.fused_scale not in FUSED_SCALES:
            raise ValueError(f"R2MConfig.fused_scale must be one of {FUSED_SCALES}, got {self.fused_scale!r}")

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


@dataclass(frozen=True)
class ConfigFlag:
    """One field of a config dataclass as a command-line flag: what every ``--r2m_<field>`` flag is built from."""

    name: str
    hint: Any
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def optional(self) -> bool:
        """Whether the field takes None (``X | None``)."""
        return (isinstance(self.hint, types.UnionType) or typing.get_origin(self.hint) is typing.Union) and \
            type(None) in typing.get_args(self.hint)

    def parse(self, text: str) -> Any:
        """A command-line value: ``None`` for an optional field, else the text converted to its type."""
        if self.optional and text in ("None", "none", "null"):
            return None
        return self.scalar_type(text)

    @property
    def scalar_type(self) -> type:
        """The value type, ``Optional`` stripped (``int | None`` -> ``int``)."""
        if not (isinstance(self.hint, types.UnionType) or typing.get_origin(self.hint) is typing.Union):
            return self.hint
        inner = [arg for arg in typing.get_args(self.hint) if arg is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"config field {self.name}: a flag takes one type (or that type | None), got {self.hint}")
        return inner[0]


def config_flags(config_class: type = R2MConfig, notes: Mapping[str, str] | None = None) -> list[ConfigFlag]:
    """The fields of ``config_class`` (a dataclass, `R2MConfig` or one extending it) in order, each with its
    resolved type, default and help (field metadata ``help``, and ``choices`` where given). ``notes`` (sentences) add
    an integration's remarks to a field's help."""
    hints = typing.get_type_hints(config_class)
    flags = []
    for f in dataclasses.fields(config_class):
        if "help" not in f.metadata:
            raise TypeError(f"{config_class.__name__}.{f.name} has no help text: declare it with "
                            f"field(..., metadata={{'help': ...}})")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{config_class.__name__}.{f.name} has no default: every config field needs one")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        note = (notes or {}).get(f.name)
        help_text = f.metadata["help"] if note is None else f"{f.metadata['help']} {note}"
        choices = f.metadata.get("choices")
        flags.append(ConfigFlag(f.name, hints[f.name], default, help_text, None if choices is None else tuple(choices)))
    return flags


def flag_message(message: str, prefix: str = "--r2m_") -> str:
    """A config error worded for a command line: ``R2MConfig.<field>`` becomes the flag ``<prefix><field>``."""
    return re.sub(r"\bR2MConfig\.(\w+)", lambda match: f"{prefix}{match.group(1)}", message)


def _check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"R2MConfig.{name} must be a number in [0, 1], got {value!r}")
