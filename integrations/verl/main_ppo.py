"""verl's PPO/GRPO entry point with R2M: ``python -m r2m.integrations.verl.main_ppo <verl keys> r2m.<field>=...``.

The config is verl's ``ppo_trainer`` (every key, same defaults) plus an ``r2m`` block (every `R2MConfig` field and
``r2m.reward_model_path``), with ``trainer.v1.trainer_mode=r2m_sync``. Settings R2M cannot run with are refused before
Ray starts; the run is then verl's own (``verl.trainer.main_ppo.run_ppo``), with this package loaded in every Ray
process through ``VERL_USE_EXTERNAL_MODULES`` so the trainer mode is found there.
"""

from __future__ import annotations

import os

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from r2m.integrations.verl.settings import TRAINER_MODE, check_settings, r2m_block

CONFIG_NAME = "r2m_ppo_trainer"
PLUGIN = "r2m.integrations.verl.trainer"

ConfigStore.instance().store(name=CONFIG_NAME, node={
    "defaults": ["ppo_trainer", "_self_"],
    "hydra": {"searchpath": ["pkg://verl.trainer.config"]},
    "trainer": {"v1": {"trainer_mode": TRAINER_MODE}},
    "r2m": r2m_block(),
})


def with_plugin(config: DictConfig) -> None:
    """Add this package to ``VERL_USE_EXTERNAL_MODULES`` of the Ray processes verl starts (and of this one)."""
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if PLUGIN not in modules:
        modules.append(PLUGIN)
    os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
    with open_dict(config):
        runtime_env = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env", default=None)
        if runtime_env is None:
            config.ray_kwargs.ray_init.runtime_env = {}
        env_vars = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars", default=None) or {}
        config.ray_kwargs.ray_init.runtime_env.env_vars = {**env_vars,
                                                           "VERL_USE_EXTERNAL_MODULES": ",".join(modules)}


@hydra.main(config_path=None, config_name=CONFIG_NAME, version_base=None)
def main(config: DictConfig) -> None:
    """Check the settings, then run verl's PPO trainer in mode ``r2m_sync``."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    check_settings(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    with_plugin(config)
    import r2m.integrations.verl.trainer  # noqa: F401  (registers the trainer mode here too)

    run_ppo(config, task_runner_class=TaskRunnerV1)


if __name__ == "__main__":
    main()
