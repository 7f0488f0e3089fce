"""R2MConfig validation, its fields as command-line flags, and the w(t) schedule of paper Eq. 4."""

import dataclasses
import itertools
import math

import pytest
import torch

import r2m
from r2m.config import IMPLS, MODES, config_flags


def reference_omega(step, total, floor):
    value = 0.5 * torch.cos(torch.tensor(math.pi * min(step, total) / total, dtype=torch.float64)) + 0.5
    return max(float(value), floor)


def test_defaults_follow_the_paper():
    cfg = r2m.R2MConfig()
    assert (cfg.omega_min, cfg.alpha, cfg.lr, cfg.attn_dim, cfg.num_heads) == (0.6, 0.3, 1e-6, 2048, 1)
    assert cfg.total_steps is None and cfg.mode == "r2m" and cfg.update_steps == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(omega_min=1.5), "omega_min must be a number in"),
        (dict(alpha=-0.1), "alpha must be a number in"),
        (dict(lr=0), "lr must be a finite number"),
        (dict(lr=float("nan")), "lr must be a finite number"),
        (dict(attn_dim=0), "attn_dim must be an int"),
        (dict(num_heads=3), "divisible by num_heads"),
        (dict(total_steps=0), "total_steps must be an int"),
        (dict(mode="ppo"), "mode must be one of"),
        (dict(update_steps=1.5), "update_steps must be an int"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be None"),
        (dict(hidden_offload="yes"), "hidden_offload must be a bool"),
        (dict(seed="1"), "seed must be None or an int"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_every_field_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        r2m.R2MConfig(**kwargs)


def test_mode_sets_effective_alpha():
    alphas = {mode: r2m.R2MConfig(mode=mode, alpha=0.3).effective_alpha for mode in MODES}
    assert alphas["no_bt"] == 1.0 and alphas["no_gre"] == 0.0 and alphas["r2m"] == 0.3
    assert not r2m.R2MConfig(mode="vanilla").trains and not r2m.R2MConfig(mode="frozen").trains
    assert r2m.R2MConfig(mode="frozen").uses_fusion and not r2m.R2MConfig(mode="head_only").uses_fusion


def test_attn_dim_is_capped_for_small_models():
    cfg = r2m.R2MConfig(attn_dim=2048, num_heads=4)
    assert cfg.resolved_attn_dim(64, 48) == 64
    assert cfg.resolved_attn_dim(4096, 3072) == 2048
    assert cfg.resolved_attn_dim(30, 10) == 28


@pytest.mark.parametrize("total, floor", [(10, 0.6), (7, 0.7), (100, 0.0), (1, 0.6)])
def test_omega_follows_eq4(total, floor):
    for step in range(total + 3):
        assert r2m.omega(step, total, floor) == pytest.approx(reference_omega(step, total, floor), abs=1e-12)
    assert r2m.omega(0, total, floor) == 1.0
    assert r2m.omega(total, total, floor) == pytest.approx(floor)


def test_omega_is_monotone_non_increasing():
    values = [r2m.omega(t, 50, 0.6) for t in range(51)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("args, message", [((0, 0, 0.6), "total_steps must be an int >= 1"),
                                           ((-1, 5, 0.6), "step must be an int >= 0"),
                                           ((1, 5, 2.0), "omega_min must be in")])
def test_omega_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        r2m.omega(*args)


def test_fields_keep_their_order_and_positional_use():
    names = [f.name for f in dataclasses.fields(r2m.R2MConfig)]
    assert names[:12] == ["omega_min", "alpha", "lr", "attn_dim", "num_heads", "total_steps", "mode", "update_steps",
                          "max_grad_norm", "hidden_offload", "seed", "impl"]  # new fields only ever go after these
    assert r2m.R2MConfig(0.7, 0.2, 1e-5, 64, 2, 10, "frozen") == r2m.R2MConfig(
        omega_min=0.7, alpha=0.2, lr=1e-5, attn_dim=64, num_heads=2, total_steps=10, mode="frozen")


def test_every_field_has_help_text_and_becomes_a_flag():
    flags = config_flags(r2m.R2MConfig, {"seed": "Trainer note."})
    assert [f.name for f in flags] == [f.name for f in dataclasses.fields(r2m.R2MConfig)]
    assert all(f.help and f.help.endswith(".") for f in flags)
    by_name = {f.name: f for f in flags}
    assert by_name["seed"].help.endswith(". Trainer note.") and by_name["seed"].scalar_type is int
    assert by_name["max_grad_norm"].scalar_type is float and by_name["max_grad_norm"].default == 1.0
    assert by_name["mode"].choices == MODES and by_name["impl"].choices == IMPLS and by_name["lr"].choices is None


def test_a_field_without_help_or_default_is_refused():
    @dataclasses.dataclass
    class NoHelp(r2m.R2MConfig):
        extra: int = 1

    @dataclasses.dataclass
    class NoDefault:
        extra: int = dataclasses.field(metadata={"help": "x"})

    with pytest.raises(TypeError, match="NoHelp.extra has no help text"):
        config_flags(NoHelp)
    with pytest.raises(TypeError, match="NoDefault.extra has no default"):
        config_flags(NoDefault)


@pytest.mark.parametrize("field, value, message", [
    ("anchor_weight", -1.0, "anchor_weight must be a finite number >= 0"),
    ("anchor_weight", float("nan"), "anchor_weight must be a finite number >= 0"),
    ("fusion_init", "ones", "fusion_init must be one of"),
    ("mode", "anchor", "mode must be one of"),
])
def test_anchored_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        r2m.R2MConfig(**{field: value})
