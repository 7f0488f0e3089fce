"""R2M checkpoints (r2m.checkpoint): config and run state in separate files, a format number and the r2m version,
unknown config fields dropped with a warning, newer formats refused, checkpoints without a format number loaded."""

import copy
import json

import pytest
import torch

import r2m
from r2m import checkpoint
from r2m.benchmarks import tiny_models as tiny

POLICY_DIM = 12


@pytest.fixture(scope="module")
def reward_model():
    return tiny.build_reward_model(tiny.build_tokenizer(), "llama", hidden_size=32)


@pytest.fixture()
def trained(reward_model, tmp_path):
    """A model after two updates (kappa < 1, Adam state) saved to tmp_path / "ckpt"."""
    config = r2m.R2MConfig(total_steps=7, lr=1e-2, attn_dim=16, seed=3, fused_scale="base_spread")
    model = r2m.wrap(copy.deepcopy(reward_model), POLICY_DIM, config)
    torch.nn.init.normal_(model.fusion.o_proj.weight, std=20.0)
    generator = torch.Generator().manual_seed(0)
    rte, hidden = torch.randn(8, 32, generator=generator), torch.randn(8, 5, POLICY_DIM, generator=generator)
    mask = torch.ones(8, 5, dtype=torch.bool)
    for step in range(2):
        model.update(rte, hidden, mask, torch.randn(8, generator=generator), 4, step)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.trainable_parameters(), b.trainable_parameters(), strict=True))


def test_config_and_run_state_are_separate_files(trained):
    model, path = trained
    config = json.loads((path / "r2m_config.json").read_text())
    state = json.loads((path / "r2m_state.json").read_text())
    assert config["format"] == checkpoint.FORMAT and config["r2m_version"] == r2m.__version__
    assert config["config"] == model.config.to_dict() and config["kind"] == "R2MRewardModel"
    assert (config["rm_dim"], config["policy_dim"]) == (32, POLICY_DIM)
    assert not set(checkpoint.RUN_STATE_FIELDS) & set(config)
    assert state["total_steps"] == 7 and state["noise_seed"] == model.noise_seed
    assert state["fused_scale_factor"] == model.fused_scale_factor < 1
    assert state["param_groups"] == json.loads(json.dumps(model.optimizer.state_dict()["param_groups"]))


def test_unknown_config_fields_are_warned_about_and_dropped(trained, reward_model):
    model, path = trained
    meta = json.loads((path / "r2m_config.json").read_text())
    meta["config"]["future_knob"] = 1
    meta["r2m_version"] = "9.0.0"
    (path / "r2m_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"written by r2m 9\.0\.0\) has config fields .* \['future_knob'\]"):
        loaded = r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model), path)
    assert loaded.config == model.config and same_weights(model, loaded)


def test_a_newer_format_is_refused_naming_the_version_that_wrote_it(trained, reward_model):
    _, path = trained
    meta = json.loads((path / "r2m_config.json").read_text())
    meta.update(format=checkpoint.FORMAT + 1, r2m_version="9.0.0")
    (path / "r2m_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"format {checkpoint.FORMAT + 1}, written by r2m 9\.0\.0; .* upgrade r2m"):
        r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model), path)


def test_a_checkpoint_without_a_format_number_loads(trained, reward_model):
    """Format 1 (r2m 0.1.0 before versioned checkpoints): the run state inside r2m_config.json, no state file."""
    model, path = trained
    meta = json.loads((path / "r2m_config.json").read_text())
    meta.update(json.loads((path / "r2m_state.json").read_text()))
    del meta["format"], meta["r2m_version"]
    (path / "r2m_config.json").write_text(json.dumps(meta))
    (path / "r2m_state.json").unlink()
    loaded = r2m.R2MRewardModel.from_pretrained(copy.deepcopy(reward_model), path)
    assert same_weights(model, loaded) and loaded.config == model.config
    assert (loaded.total_steps, loaded.noise_seed, loaded.fused_scale_factor) == \
        (model.total_steps, model.noise_seed, model.fused_scale_factor)
    assert loaded.optimizer.param_groups[0]["lr"] == model.optimizer.param_groups[0]["lr"]
    for a, b in zip(model.optimizer.state.values(), loaded.optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
