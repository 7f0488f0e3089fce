"""``python -m r2m.integrations.openrlhf.train_ppo_ray``: OpenRLHF's ``train_ppo_ray`` with R2M.

Runs OpenRLHF's own command-line module (its flags, checks and ``train``), with the ``--r2m_*`` flags added to its
parser. With ``--r2m_enable`` the R2M reward-model actor, policy actor and trainer replace OpenRLHF's for the run
(module attributes swapped in this process; OpenRLHF's files are not touched).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"
PROG = "python -m r2m.integrations.openrlhf.train_ppo_ray"


@contextmanager
def r2m_flags_on_parser() -> Iterator[None]:
    """While active, the first ``ArgumentParser.parse_args`` call (OpenRLHF's) also knows the ``--r2m_*`` flags and
    checks the combination (OpenRLHF's flags use dotted names: the namespace is hierarchized here to check it)."""
    from openrlhf.utils.config import hierarchize

    from r2m.config import flag_message
    from r2m.integrations.openrlhf.options import add_r2m_arguments, check_openrlhf_args

    original = argparse.ArgumentParser.parse_args

    def parse_args(parser: argparse.ArgumentParser, args=None, namespace=None) -> argparse.Namespace:
        argparse.ArgumentParser.parse_args = original
        add_r2m_arguments(parser)
        parsed = original(parser, args, namespace)
        try:
            check_openrlhf_args(hierarchize(parsed))
        except ValueError as error:
            parser.error(flag_message(str(error)))
        return parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


@contextmanager
def r2m_installed() -> Iterator[None]:
    """Swap R2M's actor and trainer classes in where OpenRLHF's launcher looks them up."""
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import launcher, ppo_actor

    from r2m.integrations.openrlhf.actors import R2MPolicyModelActor, R2MRewardModelActor
    from r2m.integrations.openrlhf.trainer import R2MPPOTrainer

    swaps = [(launcher, "RewardModelActor", R2MRewardModelActor), (ppo_actor, "PolicyModelActor", R2MPolicyModelActor),
             (ppo_trainer, "PPOTrainer", R2MPPOTrainer)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, replacement in swaps:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def main(argv: list[str] | None = None) -> None:
    """Run OpenRLHF's PPO/GRPO/RLOO/REINFORCE++ training, with R2M when ``--r2m_enable`` is given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    enable = argparse.ArgumentParser(add_help=False)
    enable.add_argument("--r2m_enable", action="store_true")
    enabled = enable.parse_known_args(argv)[0].r2m_enable
    saved_argv = sys.argv
    sys.argv = [PROG, *argv]
    try:
        with r2m_flags_on_parser(), r2m_installed() if enabled else nullcontext():
            runpy.run_module(OPENRLHF_CLI, run_name="__main__")
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()
