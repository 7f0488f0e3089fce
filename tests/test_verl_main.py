"""The verl entry point ``python -m r2m.integrations.verl.main_ppo``: verl's ppo_trainer config plus an r2m block
(every R2MConfig field and reward_model_path) in trainer mode r2m_sync; settings that keep R2M from the policy's
states are refused, each naming its setting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("verl")

from hydra import compose, initialize
from omegaconf import OmegaConf

from r2m.config import R2MConfig
from r2m.integrations.verl import main_ppo
from r2m.integrations.verl.settings import check_settings, r2m_config

VALID = ["r2m.reward_model_path=/models/rm"]


def composed(*overrides: str):
    with initialize(config_path=None, version_base=None):
        return compose(config_name=main_ppo.CONFIG_NAME, overrides=list(overrides))


def test_cli_composes_verl_config_with_r2m_block(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "r2m.integrations.verl.main_ppo", "--cfg", "job",
                           "r2m.omega_min=0.7", "r2m.mode=frozen", "actor_rollout_ref.rollout.n=8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load(proc.stdout[proc.stdout.index("actor_rollout_ref:"):])
    assert config["r2m"]["omega_min"] == 0.7 and config["r2m"]["mode"] == "frozen"
    assert set(config["r2m"]) == {f.name for f in dataclasses.fields(R2MConfig)} | {"reward_model_path"}
    assert config["trainer"]["v1"]["trainer_mode"] == "r2m_sync"
    assert config["actor_rollout_ref"]["rollout"]["n"] == 8
    assert "algorithm" in config and "data" in config  # verl's own keys, all there


def test_r2m_block_becomes_r2m_config() -> None:
    config = composed(*VALID, "r2m.omega_min=0.7", "r2m.total_steps=50", "r2m.fused_scale=base_spread")
    check_settings(config)
    assert r2m_config(config) == R2MConfig(omega_min=0.7, total_steps=50, fused_scale="base_spread")


@pytest.mark.parametrize(("overrides", "named"), [
    (["++algorithm.rollout_correction.bypass_mode=true"], "algorithm.rollout_correction.bypass_mode"),
    (["actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
     "actor_rollout_ref.actor.ulysses_sequence_parallel_size"),
    (["++algorithm.filter_groups.enable=true"], "algorithm.filter_groups.enable"),
    (["trainer.v1.trainer_mode=colocate_async"], "trainer.v1.trainer_mode=colocate_async"),
    (["trainer.v1.trainer_mode=separate_async"], "trainer.v1.trainer_mode=separate_async"),
    (["trainer.use_v1=false"], "trainer.use_v1=False"),
    (["r2m.reward_model_path=null"], "r2m.reward_model_path"),
    (["r2m.omega_min=1.5"], "omega_min"),
    (["r2m.mode=noise", "trainer.n_gpus_per_node=2"], "r2m.mode=noise"),
])
def test_refused_settings_name_themselves(overrides: list[str], named: str) -> None:
    config = composed(*VALID, *overrides)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        check_settings(config)


def test_unknown_r2m_key_is_refused() -> None:
    config = composed(*VALID)
    OmegaConf.set_struct(config, False)
    config.r2m.omega = 0.5
    with pytest.raises(ValueError, match=r"unknown r2m settings \['omega'\]"):
        r2m_config(config)


def test_cli_refuses_before_ray_starts(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "r2m.integrations.verl.main_ppo", *VALID,
                           "++algorithm.filter_groups.enable=true"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "algorithm.filter_groups.enable=True" in proc.stderr
    assert "ray init kwargs" not in proc.stdout


def test_ray_processes_get_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "my_plugin")
    config = composed(*VALID, "+ray_kwargs.ray_init.runtime_env.env_vars.USER_VAR=1")
    main_ppo.with_plugin(config)
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars.VERL_USE_EXTERNAL_MODULES == "my_plugin,r2m.integrations.verl.trainer"
    assert env_vars.USER_VAR == 1
    assert os.environ["VERL_USE_EXTERNAL_MODULES"] == "my_plugin,r2m.integrations.verl.trainer"
