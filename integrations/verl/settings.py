"""The ``r2m`` block of a verl config, and the verl settings R2M cannot run with.

The block holds every `R2MConfig` field (its defaults, from the dataclass's metadata via `r2m.config.config_flags`)
and ``reward_model_path``: ``python -m r2m.integrations.verl.main_ppo ... r2m.omega_min=0.7
r2m.reward_model_path=/path/to/rm``.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from r2m.config import R2MConfig, config_flags

TRAINER_MODE = "r2m_sync"
EXTRA_KEYS = ("reward_model_path",)


def r2m_block() -> dict[str, Any]:
    """The ``r2m`` config block with its defaults."""
    return {flag.name: flag.default for flag in config_flags(R2MConfig)} | dict.fromkeys(EXTRA_KEYS)


def r2m_config(config: DictConfig) -> R2MConfig:
    """The `R2MConfig` of a verl config's ``r2m`` block (unknown keys are refused by name)."""
    block = OmegaConf.to_container(config.r2m, resolve=True)
    fields = {flag.name for flag in config_flags(R2MConfig)}
    unknown = sorted(set(block) - fields - set(EXTRA_KEYS))
    if unknown:
        raise ValueError(f"unknown r2m settings {unknown}: the r2m block takes the R2MConfig fields {sorted(fields)} "
                         f"and {list(EXTRA_KEYS)}")
    return R2MConfig(**{k: v for k, v in block.items() if k in fields})


def check_settings(config: DictConfig) -> None:
    """Refuse, naming the setting, what keeps R2M from the policy's states or from whole groups at update time."""
    select = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    if "r2m" not in config or not select("r2m.reward_model_path"):
        raise ValueError("r2m.reward_model_path is not set: R2M needs the reward model (a local Hugging Face "
                         "*ForSequenceClassification checkpoint) to wrap")
    mode = select("trainer.v1.trainer_mode")
    if not select("trainer.use_v1", True) or mode != TRAINER_MODE:
        raise ValueError(f"trainer.v1.trainer_mode={mode} (trainer.use_v1={select('trainer.use_v1')}): R2M runs in "
                         f"the v1 trainer mode {TRAINER_MODE!r} only; the async modes score rollouts before the "
                         f"policy's log-prob pass and update on batches whose states are gone")
    if select("algorithm.rollout_correction.bypass_mode", False):
        raise ValueError("algorithm.rollout_correction.bypass_mode=True: bypass mode takes old log-probs from the "
                         "rollout and runs no actor forward before the update, so R2M has no policy states to score "
                         "with")
    for key in ("actor_rollout_ref.actor.ulysses_sequence_parallel_size",
                "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size"):
        if (select(key, 1) or 1) > 1:
            raise ValueError(f"{key}={select(key)}: Ulysses sequence parallelism splits each sequence's states over "
                             f"ranks; R2M needs them whole on one rank (use 1)")
    if select("algorithm.filter_groups.enable", False):
        raise ValueError("algorithm.filter_groups.enable=True: group filtering keeps or drops groups by their reward "
                         "at sampling time, before R2M can score them (R2M rewards exist only after the policy's "
                         "log-prob pass)")
    if r2m_config(config).mode == "noise" and select("trainer.n_gpus_per_node", 1) * select("trainer.nnodes", 1) > 1:
        raise ValueError("r2m.mode=noise with more than one actor rank (trainer.n_gpus_per_node x trainer.nnodes > 1): "
                         "the noise is matched to each sample's own states, which verl spreads over ranks within a "
                         "group; run the noise ablation on one rank")
