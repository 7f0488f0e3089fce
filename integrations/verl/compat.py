"""What verl 0.9.1 assumes of its neighbours that the versions r2m is tested with no longer offer.

verl's model patching imports TRL's ``AutoModelForCausalLMWithValueHead`` whenever TRL is installed; TRL 1.x removed
it (and ``trl.experimental.ppo``), so building any FSDP actor fails with ImportError. verl only patches that class's
``state_dict``: with a TRL that lacks it there is nothing to patch, so verl is told TRL is absent there.

transformers >= 5.25 "kernelizes" every model ``from_pretrained`` loads (Hugging Face's ``kernels``), and refuses a
model on the meta device: verl builds the actor on meta on every rank but 0 (rank 0's weights are then broadcast by
FSDP), so a 2-rank actor fails to build. The actor processes load without hub kernels unless ``USE_HUB_KERNELS`` is
set.
"""

from __future__ import annotations

import importlib.util
import os


def _trl_has_value_head() -> bool:
    if importlib.util.find_spec("trl") is None:
        return False
    import trl

    if hasattr(trl, "AutoModelForCausalLMWithValueHead"):
        return True
    try:
        from trl.experimental.ppo import AutoModelForCausalLMWithValueHead  # noqa: F401
    except ImportError:
        return False
    return True


def apply() -> None:
    """Make verl's model patching skip TRL's value-head class where TRL no longer has it, and load models without
    hub kernels unless ``USE_HUB_KERNELS`` says otherwise (idempotent)."""
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    from verl.models.transformers import monkey_patch

    monkey_patch.is_trl_available = _trl_has_value_head
