"""R2M checkpoints: what `R2MModule.save_pretrained` writes and `from_pretrained` / `load_state` read.

A directory holds four files: ``r2m_config.json`` (what the reward is: format number, the r2m version that wrote
it, kind, dimensions and `R2MConfig`), ``r2m_state.json`` (where its run is: total_steps, the noise seed, kappa of
``fused_scale="base_spread"`` and the optimizer's parameter groups), ``r2m_model.safetensors`` (fusion and head)
and ``r2m_optimizer.safetensors`` (Adam's state). Nothing is unpickled. Checkpoints written before format numbers
(format 1: the run state inside ``r2m_config.json``) still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from r2m.config import R2MConfig
from r2m.version import __version__

if TYPE_CHECKING:
    from r2m.base import R2MModule

CONFIG_NAME = "r2m_config.json"
STATE_NAME = "r2m_state.json"
WEIGHTS_NAME = "r2m_model.safetensors"
OPTIMIZER_NAME = "r2m_optimizer.safetensors"
# 1: no number, run state inside CONFIG_NAME (r2m 0.1.0 before checkpoints were versioned); 2: run state in STATE_NAME.
FORMAT = 2
# Config fields that change the shape or meaning of saved weights: a checkpoint must agree on them.
STRUCTURAL_FIELDS = ("attn_dim", "num_heads", "mode")
# Config fields a resumed run may change: it trains on with this config's value, with a warning.
TRAINING_FIELDS = ("omega_min", "alpha", "lr", "update_steps", "max_grad_norm", "anchor_weight", "fused_scale",
                   "label_term", "label_pairs", "labels_replace_pseudo",
                   "label_replay")
RUN_STATE_FIELDS = ("total_steps", "noise_seed", "fused_scale_factor", "param_groups")


def save(module: R2MModule, save_directory: str | os.PathLike) -> None:
    """Write ``module``'s fusion, head, optimizer state, config and run state to ``save_directory``."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"fusion.{k}": v for k, v in module.fusion.state_dict().items()}
    weights.update({f"head.{k}": v for k, v in module.head.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(directory / WEIGHTS_NAME))
    optim = module.optimizer.state_dict()
    tensors = {f"state.{index}.{key}": torch.as_tensor(value).cpu()
               for index, state in optim["state"].items() for key, value in state.items()}
    save_file(tensors, str(directory / OPTIMIZER_NAME))
    config = {"format": FORMAT, "r2m_version": __version__, "kind": type(module).__name__,
              "config": module.config.to_dict(), **_structure(module)}
    state = {"total_steps": module.total_steps, "noise_seed": module.noise_seed,
             "fused_scale_factor": module.fused_scale_factor, "param_groups": optim["param_groups"]}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    (directory / STATE_NAME).write_text(json.dumps(state, indent=2))


def read_config(save_directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's description (``r2m_config.json``); a checkpoint of a newer format is refused."""
    path = Path(save_directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no R2M checkpoint at {save_directory}: {CONFIG_NAME} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format", 1) > FORMAT:
        raise ValueError(f"the R2M checkpoint in {save_directory} has format {meta['format']}, written by r2m "
                         f"{meta.get('r2m_version', '(unknown)')}; this r2m ({__version__}) reads formats up to "
                         f"{FORMAT}: upgrade r2m to load it")
    return meta


def config_from(meta: dict[str, Any], source: str | os.PathLike) -> R2MConfig:
    """The checkpoint's `R2MConfig`; fields this r2m does not know (a newer release's) are warned about and
    dropped."""
    known = {f.name for f in dataclasses.fields(R2MConfig)}
    saved = meta["config"]
    unknown = sorted(set(saved) - known)
    if unknown:
        warnings.warn(f"the R2M checkpoint in {source} (written by r2m {meta.get('r2m_version', '(unknown)')}) has "
                      f"config fields this r2m ({__version__}) does not know: {unknown}; they are ignored",
                      stacklevel=3)
    return R2MConfig(**{k: v for k, v in saved.items() if k in known})


def load(module: R2MModule, save_directory: str | os.PathLike) -> None:
    """Restore fusion, head, optimizer and run state into ``module`` in place, after checking that the checkpoint
    was made for the same kind of reward, dimensions and structural config. A changed ``TRAINING_FIELDS`` value is
    kept (the optimizer takes this config's ``lr``) and warned about."""
    directory = Path(save_directory)
    meta = read_config(directory)
    expected = {"kind": type(module).__name__, **_structure(module)}
    mismatched = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    mismatched.update({f"config.{k}": (meta["config"].get(k), getattr(module.config, k))
                       for k in STRUCTURAL_FIELDS if meta["config"].get(k) != getattr(module.config, k)})
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs this model {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the R2M checkpoint in {directory} does not match this reward model/config ({details})")
    for field in TRAINING_FIELDS:
        old, new = meta["config"].get(field), getattr(module.config, field)
        if field in meta["config"] and old != new:
            warnings.warn(f"R2M checkpoint {directory} was trained with {field}={old!r}; resuming with this "
                          f"config's {field}={new!r}", stacklevel=3)
    weights = load_file(str(directory / WEIGHTS_NAME))
    device = module.head.weight.device
    module.fusion.load_state_dict({k[7:]: v.to(device) for k, v in weights.items() if k.startswith("fusion.")})
    module.head.load_state_dict({k[5:]: v.to(device) for k, v in weights.items() if k.startswith("head.")})
    state = _run_state(meta, directory)
    module.total_steps = state.get("total_steps", module.total_steps)
    module.noise_seed = state.get("noise_seed", module.noise_seed)
    module.fused_scale_factor = float(state.get("fused_scale_factor", 1.0))
    optimizer_file = directory / OPTIMIZER_NAME
    if optimizer_file.exists():
        tensors = load_file(str(optimizer_file))
        tensors.pop("noise_generator", None)  # written by format 1 before noise was drawn per sample
        adam: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            adam.setdefault(int(index), {})[name] = value
        module.optimizer.load_state_dict({"state": adam, "param_groups": state["param_groups"]})
        for group in module.optimizer.param_groups:
            group["lr"] = module.config.lr


def pretrained_arguments(positional: list[Any], config: R2MConfig | None,
                         save_directory: object) -> tuple[nn.Module, str | os.PathLike, R2MConfig | None]:
    """(reward_model, path, config) of a `from_pretrained` call from its positional arguments; the forms of earlier
    releases (path first, config by position, ``save_directory=``) warn with a DeprecationWarning."""
    given = list(positional)
    if save_directory is not None:
        _deprecated("save_directory= is now path=")
        given.append(save_directory)
    if len(given) == 3 and config is None and (given[2] is None or isinstance(given[2], R2MConfig)):
        _deprecated("pass config by keyword: from_pretrained(reward_model, path, config=config)")
        config = given.pop()
    if len(given) == 2 and isinstance(given[0], (str, os.PathLike)) and isinstance(given[1], nn.Module):
        _deprecated("the reward model comes first: from_pretrained(reward_model, path)")
        given.reverse()
    if len(given) != 2 or not isinstance(given[0], nn.Module) or not isinstance(given[1], (str, os.PathLike)):
        raise TypeError(f"from_pretrained takes the reward model (an nn.Module) and the directory save_pretrained "
                        f"wrote (a str or os.PathLike): from_pretrained(reward_model, path); got "
                        f"{[type(a).__name__ for a in given]}")
    return given[0], given[1], config


def _deprecated(what: str) -> None:
    warnings.warn(f"R2M from_pretrained: {what} (the old form stops working in the next release)",
                  DeprecationWarning, stacklevel=4)


def _structure(module: R2MModule) -> dict[str, Any]:
    return {"rm_dim": module.rm_dim, "policy_dim": module.policy_dim, "attn_dim": module.fusion.attn_dim,
            "head_bias": module.head.bias is not None}


def _run_state(meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    if meta.get("format", 1) == 1:
        return {k: meta[k] for k in RUN_STATE_FIELDS if k in meta}
    return json.loads((directory / STATE_NAME).read_text())


__all__ = ["CONFIG_NAME", "FORMAT", "OPTIMIZER_NAME", "STATE_NAME", "WEIGHTS_NAME", "config_from", "load",
           "pretrained_arguments", "read_config", "save"]
