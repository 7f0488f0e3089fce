"""The OpenRLHF ``--r2m_*`` flags: generated from `R2MConfig`'s field metadata (plus the OpenRLHF-only flags), with
OpenRLHF's own semantics, and parsed back into an equal config. No OpenRLHF or Ray needed."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from r2m.config import R2MConfig
from r2m.integrations.openrlhf.options import OpenRLHFFlags, R2MOptions, add_r2m_arguments, options_class

# Every flag the entry point had before the flags were generated: none may disappear.
FLAGS_BEFORE = {"--r2m_enable", "--r2m_mode", "--r2m_routing", "--r2m_omega_min", "--r2m_alpha", "--r2m_lr",
                "--r2m_attn_dim", "--r2m_num_heads", "--r2m_total_steps", "--r2m_update_steps", "--r2m_max_grad_norm",
                "--r2m_hidden_offload", "--r2m_seed", "--r2m_impl", "--r2m_policy_hidden_size", "--r2m_load_path"}


@dataclass
class ExtendedConfig(R2MConfig):
    """R2MConfig with a field added later: it must reach the flags without editing the integration."""

    warmup_rounds: int = field(default=3, metadata={"help": "Rounds without an update."})
    strict: bool = field(default=True, metadata={"help": "Refuse odd batches."})


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_one_flag_per_config_field_with_its_help_and_the_openrlhf_ones():
    actions = _options(add_r2m_arguments(argparse.ArgumentParser()))
    for config_field in [*dataclasses.fields(R2MConfig), *dataclasses.fields(OpenRLHFFlags)]:
        action = actions[f"--r2m_{config_field.name}"]
        assert action.help.startswith(config_field.metadata["help"]) and action.default == config_field.default
    assert FLAGS_BEFORE <= set(actions)
    assert actions["--r2m_mode"].choices == R2MConfig.__dataclass_fields__["mode"].metadata["choices"]
    assert actions["--r2m_routing"].choices == ("full", "compact")
    assert "<= 0" in actions["--r2m_max_grad_norm"].help and "training rounds" in actions["--r2m_total_steps"].help
    assert {f.name for f in dataclasses.fields(R2MOptions)} == {
        f.name for f in [*dataclasses.fields(R2MConfig), *dataclasses.fields(OpenRLHFFlags)]}


def test_parsing_round_trips_to_an_equal_config():
    parser = add_r2m_arguments(argparse.ArgumentParser())
    expected = R2MConfig(omega_min=0.7, alpha=0.5, lr=2e-6, attn_dim=64, num_heads=4, total_steps=9, mode="no_gre",
                         update_steps=2, max_grad_norm=0.5, hidden_offload=True, seed=11, impl="torch")
    argv = ["--r2m_enable", "--r2m_routing", "full", "--r2m_load_path", "ckpt"]
    for name, value in dataclasses.asdict(expected).items():
        if isinstance(value, bool):
            argv += [f"--r2m_{name}"] if value else []
        else:
            argv += [f"--r2m_{name}", str(value)]
    options = R2MOptions.from_args(parser.parse_args(argv))
    assert options.config() == expected
    assert (options.enable, options.routing, options.load_path, options.policy_hidden_size) == (
        True, "full", "ckpt", None)
    defaults = R2MOptions.from_args(parser.parse_args([]))
    assert defaults == R2MOptions() and defaults.config() == R2MConfig() and not defaults.enable


def test_openrlhf_semantics_switch_flags_and_clip_off():
    parser = add_r2m_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).r2m_hidden_offload is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--r2m_hidden_offload", "true"])  # a switch takes no value
    for value in ("0", "-1", "None"):
        assert R2MOptions.from_args(parser.parse_args(["--r2m_max_grad_norm", value])).config().max_grad_norm is None
    config = R2MOptions.from_args(parser.parse_args(["--r2m_total_steps", "None", "--r2m_seed", "None"])).config()
    assert (config.total_steps, config.seed) == (None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--r2m_lr", "None"])  # lr takes no None
    with pytest.raises(ValueError, match="--r2m_routing must be one of"):
        R2MOptions(routing="sideways").config()
    with pytest.raises(ValueError, match="alpha must be a number in"):
        R2MOptions.from_args(parser.parse_args(["--r2m_alpha", "2"])).config()


def test_a_new_config_field_reaches_the_flags_without_edits():
    parser = add_r2m_arguments(argparse.ArgumentParser(), ExtendedConfig)
    assert _options(parser)["--r2m_warmup_rounds"].help == "Rounds without an update."
    parsed = parser.parse_args(["--r2m_warmup_rounds", "5", "--r2m_lr", "1e-3", "--no-r2m_strict"])
    options = options_class(ExtendedConfig).from_args(parsed)
    assert options.config() == ExtendedConfig(warmup_rounds=5, lr=1e-3, strict=False)
    assert options_class(ExtendedConfig).from_args(parser.parse_args([])).config() == ExtendedConfig()
