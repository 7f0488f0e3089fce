"""What `make test` installs: in CI every integration's trainer must import, so that no test of it is skipped for
a missing package (a contributor without verl or OpenRLHF gets skips instead)."""

from __future__ import annotations

import importlib
import os

import pytest

INTEGRATION_MODULES = ("ray", "deepspeed", "triton", "verl", "verl.trainer.main_ppo", "r2m.integrations.verl.worker",
                       "r2m.integrations.verl.trainer", "r2m.integrations.verl.main_ppo")


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI (`bash .ci/run`: make test) installs every integration")
@pytest.mark.parametrize("module", INTEGRATION_MODULES)
def test_ci_installs_every_integration(module):
    importlib.import_module(module)
