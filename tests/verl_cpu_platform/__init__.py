"""Test double of verl's accelerator registry: a "cpu" platform and the FSDP engines registered for device "cpu".

verl 0.9.1 has no CPU platform (it falls back to "nvidia") and registers its FSDP engines for cuda/npu only. The
tests load this module in every process (the driver and Ray actors alike) through ``VERL_USE_EXTERNAL_MODULES`` with
``VERL_PLATFORM=cpu``, so verl's real engine, workers and TransferQueue run on CPU with tiny models. Only what
verl calls on this path is implemented; it is not a CPU backend for users.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _no_memory(*args: object, **kwargs: object) -> int:
    return 0


# torch.cpu lacks the memory statistics and seeding calls verl makes on its device module.
DEVICE_MODULE = types.SimpleNamespace(
    **{name: getattr(torch.cpu, name) for name in ("synchronize", "device_count", "is_available")},
    current_device=lambda: "cpu",
    set_device=lambda index: None, empty_cache=lambda: None, manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed, max_memory_allocated=_no_memory, max_memory_reserved=_no_memory,
    memory_allocated=_no_memory, memory_reserved=_no_memory, reset_peak_memory_stats=lambda *a, **k: None,
    mem_get_info=lambda *a, **k: (0, 0), get_device_name=lambda *a, **k: "CPU", get_rng_state=torch.get_rng_state,
    set_rng_state=torch.set_rng_state,
)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl's platform interface on the host CPU (gloo collectives, no accelerator resources in Ray)."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module = DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False  # never auto-detected: selected with VERL_PLATFORM=cpu

    def current_device(self) -> str:
        return "cpu"  # verl moves modules with .to(device=current_device()): an index would mean an accelerator

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "VERL_CPU_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> None:
        return None


# The engine modules resolve the platform when imported: only now that "cpu" is registered.
from verl.workers.engine import EngineRegistry  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402

EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(FSDPEngineWithLMHead)

# verl builds the backend string "cpu:gloo,<device>:<backend>", which is "cpu:gloo,cpu:gloo" here: torch refuses the
# repeated device, so the process group is initialised with plain gloo.
_init_process_group = dist.init_process_group


def _init_gloo(*args: object, backend: str | None = None, **kwargs: object) -> None:
    if backend == "cpu:gloo,cpu:gloo":
        backend = "gloo"
    _init_process_group(*args, backend=backend, **kwargs)


dist.init_process_group = _init_gloo
