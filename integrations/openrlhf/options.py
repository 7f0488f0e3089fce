"""The ``--r2m_*`` command-line flags and what they configure."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from r2m.config import ConfigFlag, R2MConfig, config_flags
from r2m.integrations.openrlhf.reward_side import ROUTINGS

GROUP = "R2M (real-time aligned reward model)"


@dataclass
class OpenRLHFFlags:
    """The ``--r2m_*`` flags only the OpenRLHF integration has (the others come from `R2MConfig`'s fields)."""

    enable: bool = field(default=False, metadata={
        "help": "Score with R2M: the reward model fused with the policy's last-layer hidden states, updated with "
                "GREBT after every training round."})
    routing: str = field(default="compact", metadata={
        "help": "full: policy hidden states travel to the reward actor (S*D_p numbers per sample); compact: the "
                "attention runs next to the policy, only u, c (and dc, du) travel (2*H*D_p per sample, independent "
                "of the sequence length).", "choices": ROUTINGS})
    policy_hidden_size: int | None = field(default=None, metadata={
        "help": "The policy's hidden size (default: read from --actor.model_name_or_path's config)."})
    load_path: str | None = field(default=None, metadata={
        "help": "Resume fusion, head and optimizer state from an R2M checkpoint directory."})


FLAG_NOTES = {"total_steps": "Here T counts training rounds; None: prompts / rollout batch size * episodes.",
              "max_grad_norm": "On this command line a value <= 0 means no clipping."}


def r2m_flags(config_class: type = R2MConfig) -> list[ConfigFlag]:
    """Every ``--r2m_*`` flag of the OpenRLHF entry point: `OpenRLHFFlags`, then one per ``config_class`` field."""
    return config_flags(OpenRLHFFlags) + config_flags(config_class, FLAG_NOTES)


def add_r2m_arguments(parser: argparse.ArgumentParser, config_class: type = R2MConfig) -> argparse.ArgumentParser:
    """Add the ``--r2m_*`` flags (an argument group) to ``parser``; a bool flag is a switch."""
    group = parser.add_argument_group(GROUP)
    for flag in r2m_flags(config_class):
        option = f"--r2m_{flag.name}"
        if flag.scalar_type is bool:
            switch = argparse.BooleanOptionalAction if flag.default else "store_true"
            group.add_argument(option, action=switch, default=flag.default, help=flag.help)
        else:
            group.add_argument(option, type=flag.parse, default=flag.default, choices=flag.choices,
                               help=flag.help)
    return parser


def options_class(config_class: type = R2MConfig) -> type:
    """The dataclass of the ``--r2m_*`` values (`R2MOptions` for `R2MConfig`): `from_args` reads them from
    OpenRLHF's args, `config()` builds the validated ``config_class``."""
    config_names = [f.name for f in dataclasses.fields(config_class)]

    def from_args(cls: type, args: Any) -> Any:
        """Read ``args.r2m_<field>`` for every field (defaults where absent)."""
        return cls(**{f.name: getattr(args, f"r2m_{f.name}") for f in dataclasses.fields(cls)
                      if hasattr(args, f"r2m_{f.name}")})

    def config(self: Any) -> R2MConfig:
        """The config these options describe (validated); ``max_grad_norm <= 0`` means no clipping."""
        if self.routing not in ROUTINGS:
            raise ValueError(f"--r2m_routing must be one of {ROUTINGS}, got {self.routing!r}")
        values = {name: getattr(self, name) for name in config_names}
        if values["max_grad_norm"] is not None and values["max_grad_norm"] <= 0:
            values["max_grad_norm"] = None
        return config_class(**values)

    fields = [(flag.name, flag.hint, field(default=flag.default)) for flag in r2m_flags(config_class)]
    return dataclasses.make_dataclass("R2MOptions", fields, namespace={
        "__module__": __name__, "__doc__": "The ``--r2m_*`` values, read from OpenRLHF's (hierarchized) args.",
        "from_args": classmethod(from_args), "config": config})


R2MOptions = options_class()


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
