"""Contract tests against the installed OpenRLHF (0.11.2): our subclasses override methods that exist, with
compatible signatures; the OpenRLHF internals we rely on are where we expect them; the entry point exposes
OpenRLHF's flags and ours and installs our classes; the reward_func file works through OpenRLHF's loader."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import importlib.util
import inspect
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from r2m.config import R2MConfig

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("openrlhf") is None:
    pytest.skip("OpenRLHF integration tests need `ray` and `openrlhf` (pip install --no-deps openrlhf==0.11.2, "
                "\"ray[default]==2.55.0\")", allow_module_level=True)

STUBS = Path(__file__).parent / "openrlhf_stubs"
FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"


@pytest.fixture(scope="module", autouse=True)
def openrlhf_importable():
    """OpenRLHF imports flash_attn and vllm at import time: the test-only stand-ins make that possible here."""
    sys.path.insert(0, str(STUBS))
    try:
        yield
    finally:
        sys.path.remove(str(STUBS))
        for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "flash_attn", "r2m_test_standin")]:
            del sys.modules[name]


def _compatible(ours: inspect.Signature, base: inspect.Signature) -> str | None:
    """Why a method with signature ``ours`` cannot stand in for ``base`` (None if it can)."""
    ours_params = list(ours.parameters.values())
    kinds = {p.kind for p in ours_params}
    forwards_all = inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds
    for position, param in enumerate(base.parameters.values()):
        if forwards_all:
            break
        match = ours.parameters.get(param.name)
        if match is None:
            return f"misses parameter {param.name!r}"
        if match.kind != param.kind or match.default != param.default:
            return f"changes parameter {param.name!r}: {match} vs {param}"
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) and ours_params[position] is not match:
            return f"moves parameter {param.name!r}"
    for param in ours_params:
        if param.name not in base.parameters and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) \
                and param.default is param.empty:
            return f"adds required parameter {param.name!r}"
    return None


def test_overridden_methods_exist_with_compatible_signatures():
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray.launcher import RewardModelActor
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    from r2m.integrations.openrlhf.actors import R2MPolicyModelActorBase, R2MRewardModelActorBase, actor_class
    from r2m.integrations.openrlhf.experience_maker import R2MExperienceMaker
    from r2m.integrations.openrlhf.trainer import R2MPPOTrainerBase

    pairs = [(R2MRewardModelActorBase, actor_class(RewardModelActor)),
             (R2MPolicyModelActorBase, actor_class(PolicyModelActor)),
             (R2MExperienceMaker, RemoteExperienceMaker),
             (R2MPPOTrainerBase, actor_class(PPOTrainer))]
    checked = 0
    for ours, base in pairs:
        assert issubclass(ours, base)
        for name, member in vars(ours).items():
            if not inspect.isfunction(member) or name.startswith("r2m_") or (
                    name.startswith("_") and name not in ("__init__", "_dispatch_forward")):
                continue
            assert hasattr(base, name), f"{ours.__name__}.{name} overrides nothing in {base.__name__}"
            reason = _compatible(inspect.signature(member), inspect.signature(getattr(base, name)))
            assert reason is None, f"{ours.__name__}.{name} {reason}"
            checked += 1
    assert checked >= 12


def test_openrlhf_internals_the_integration_relies_on():
    from openrlhf.models import Actor
    from openrlhf.models.model import _get_reward_model
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.trainer.ppo_utils.experience import split_experience_batch
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from transformers import LlamaModel, LlamaPreTrainedModel

    reward_forward = inspect.signature(_get_reward_model(LlamaPreTrainedModel, LlamaModel).forward).parameters
    assert {"return_output", "ring_attn_group", "pad_sequence", "packed_seq_lens"} <= set(reward_forward)
    assert list(inspect.signature(Actor.forward).parameters)[1:4] == ["sequences", "action_mask", "attention_mask"]
    group_source = inspect.getsource(RayActorGroup)
    assert "self._actor_handlers" in group_source and "self.duplicate_actors" in group_source
    maker_source = inspect.getsource(RemoteExperienceMaker.make_experience)
    reward_call = maker_source.index("self._dispatch_forward(\n                self.reward_model_group")
    assert "sequences=sequences_list" in maker_source[reward_call:reward_call + 300]
    assert "self._dispatch_forward(\n            self.actor_model_group" in maker_source
    assert "experience.index = None" in inspect.getsource(split_experience_batch), \
        "training batches lose the rollout index (why samples are keyed by their tokens)"
    step_source = inspect.getsource(BasePPOTrainer.train_step)
    assert step_source.index("make_experience_batch") < step_source.index("self.ppo_train(global_step)") < \
        step_source.index("broadcast_to_vllm")
    assert "self.experience_maker = RemoteExperienceMaker(" in inspect.getsource(BasePPOTrainer.__init__)


@pytest.mark.parametrize(("items", "actors", "duplicates"), [(8, 2, 1), (7, 2, 1), (5, 4, 2), (3, 3, 1), (9, 6, 3)])
def test_chunk_owner_mirrors_async_run_method_batch(monkeypatch, items, actors, duplicates):
    from openrlhf.trainer.ray import launcher

    from r2m.integrations.openrlhf.experience_maker import chunk_owner

    calls = []

    class Method:
        def __init__(self, index):
            self.index = index

        def remote(self, method_name, chunk, start, end):
            calls.append((self.index, chunk["item"][start:end]))

    class Handle:
        def __init__(self, index):
            self.execute_batch = Method(index)

    monkeypatch.setattr(launcher.ray, "put", lambda value: value)
    group = object.__new__(launcher.RayActorGroup)
    group._actor_handlers, group.duplicate_actors = [Handle(i) for i in range(actors)], duplicates
    group.async_run_method_batch("forward", item=list(range(items)))
    first_of_group = {item: index for index, chunk in calls for item in chunk if index % duplicates == 0}
    assert first_of_group == {item: chunk_owner(item, items, actors, duplicates) for item in range(items)}


def _cli_flags() -> set[str]:
    """Option strings OpenRLHF's train_ppo_ray adds (literal ones; f-string ones as regexes)."""
    source = Path(importlib.util.find_spec(OPENRLHF_CLI).origin).read_text()
    flags = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant):
                flags.add(re.escape(first.value))
            elif isinstance(first, ast.JoinedStr):
                flags.add("".join(re.escape(p.value) if isinstance(p, ast.Constant) else r"\w+"
                                  for p in first.values))
    return flags


def test_entry_point_help_lists_openrlhf_and_r2m_flags():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(STUBS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "r2m.integrations.openrlhf.train_ppo_ray", "--help"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = set(re.findall(r"(?<![\w-])(--[\w.]+)", result.stdout))
    openrlhf = _cli_flags()
    assert len(openrlhf) > 150
    for pattern in openrlhf:
        assert any(re.fullmatch(pattern, flag) for flag in shown), f"{pattern} missing from --help"
    from r2m.integrations.openrlhf.options import r2m_flags

    ours = {f"--r2m_{flag.name}" for flag in r2m_flags()}
    assert {f"--r2m_{f.name}" for f in dataclasses.fields(R2MConfig)} | {"--r2m_enable", "--r2m_routing"} <= ours
    assert ours <= shown
    for flag in r2m_flags():  # each with its help text (argparse wraps it)
        assert " ".join(flag.help.split()[:4]) in " ".join(result.stdout.split()), flag.name


def test_entry_point_refuses_r2m_with_a_remote_reward(monkeypatch, capsys):
    from r2m.integrations.openrlhf.train_ppo_ray import main

    with pytest.raises(SystemExit) as exited:
        main(["--actor.model_name_or_path", "policy", "--reward.remote_url", "judge.py", "--r2m_enable"])
    assert exited.value.code == 2
    assert "--r2m_enable needs a reward model actor" in capsys.readouterr().err


def test_entry_point_names_the_flag_of_a_config_value_out_of_range(capsys):
    from r2m.integrations.openrlhf.train_ppo_ray import main

    with pytest.raises(SystemExit) as exited:
        main(["--actor.model_name_or_path", "policy", "--reward.model_name_or_path", "rm", "--r2m_enable",
              "--r2m_omega_min", "2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--r2m_omega_min must be a number in [0, 1], got 2" in err and "R2MConfig" not in err


def test_installed_classes_are_what_openrlhf_cli_launches():
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import launcher, ppo_actor

    from r2m.integrations.openrlhf import R2MPolicyModelActor, R2MPPOTrainer, R2MRewardModelActor
    from r2m.integrations.openrlhf.train_ppo_ray import r2m_installed

    originals = (launcher.RewardModelActor, ppo_actor.PolicyModelActor, ppo_trainer.PPOTrainer)
    with r2m_installed():
        cli = runpy.run_module(OPENRLHF_CLI, run_name="r2m_contract_test")
        assert cli["RewardModelActor"] is R2MRewardModelActor
        assert cli["PolicyModelActor"] is R2MPolicyModelActor
        assert ppo_trainer.PPOTrainer is R2MPPOTrainer
        assert "from openrlhf.trainer.ppo_trainer import PPOTrainer" in inspect.getsource(cli["train"])
    assert (launcher.RewardModelActor, ppo_actor.PolicyModelActor, ppo_trainer.PPOTrainer) == originals


def test_reward_func_file_through_openrlhf_loader(monkeypatch):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    sys.path.insert(0, str(FIXTURES))
    try:
        from chat_server import ChatServer, Reply, completion
    finally:
        sys.path.remove(str(FIXTURES))
    path = importlib.util.find_spec("r2m.integrations.openrlhf.reward_func").origin
    replies = {"fine answer": 9, "poor answer": 2}

    def spct(body):
        user = body["messages"][-1]["content"]
        score = next(value for text, value in replies.items() if text in user)
        return Reply(body=completion([f"Principles: ...\nCritique: ...\nScores: [{score}]"] * body["n"]))

    with ChatServer(spct) as server:
        monkeypatch.setenv("R2M_JUDGE", "spct")
        monkeypatch.setenv("R2M_JUDGE_URL", server.url)
        monkeypatch.setenv("R2M_JUDGE_MODEL", "judge")
        executor = SingleTurnAgentExecutor(remote_rm_url=path)
        results = [asyncio.run(executor._fetch_rewards_via_func([f"Q? {text}"], ["Q? "], [""]))[0]
                   for text in replies]
    assert [float(r["rewards"][0]) for r in results] == [9.0, 2.0]
    assert all(set(r) == {"rewards", "scores", "extra_logs"} for r in results)

    monkeypatch.delenv("R2M_JUDGE_URL")
    with pytest.raises(ValueError, match="R2M_JUDGE_URL"):
        SingleTurnAgentExecutor(remote_rm_url=path)
