"""`r2m grpo` / `r2m rloo` (train from local paths) and `r2m demo`."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from r2m import cli as r2m_cli
from r2m.config import R2MConfig
from r2m.integrations.trl import cli

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny

COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
          "--max_completion_length", "4", "--use_cpu", "--bf16", "False", "--report_to", "none",
          "--save_strategy", "no", "--logging_steps", "1", "--r2m_attn_dim", "16", "--r2m_lr", "1e-2"]


@pytest.fixture
def local_files(tmp_path):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_("gpt2", "llama", rm_tokenizer="byte")
    policy.save_pretrained(tmp_path / "policy")
    policy_tokenizer.save_pretrained(tmp_path / "policy")
    reward_model.save_pretrained(tmp_path / "rm")
    reward_tokenizer.save_pretrained(tmp_path / "rm")
    data = trl_tiny.dataset(8)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for row in data:
            f.write(json.dumps(row) + "\n")
    data.save_to_disk(str(tmp_path / "prompts_dir"))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("kind, dataset, extra", [
    ("grpo", "prompts.jsonl", ["--r2m_mode", "r2m"]),
    ("rloo", "prompts_dir", ["--beta", "0.05", "--r2m_omega_min", "0.7"]),  # RLOO's reference from the policy path
])
def test_train_from_local_paths(kind, dataset, extra, local_files):
    out = local_files / f"out-{kind}"
    code = cli.main([kind, "--model_name_or_path", str(local_files / "policy"),
                     "--reward_model_path", str(local_files / "rm"), "--dataset_path", str(local_files / dataset),
                     "--output_dir", str(out), *COMMON, *extra])
    assert code == 0
    saved = json.loads((out / "r2m" / "r2m_config.json").read_text())
    assert saved["config"]["attn_dim"] == 16 and saved["config"]["lr"] == 1e-2
    assert saved["total_steps"] == 2 and (out / "config.json").is_file()
    if kind == "rloo":
        assert saved["config"]["omega_min"] == 0.7


def test_help_documents_every_r2m_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grpo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for config_field in dataclasses.fields(R2MConfig):
        assert f"--r2m_{config_field.name}" in text
    assert "--reward_model_path" in text and "--num_generations" in text
    assert {f.name for f in dataclasses.fields(cli.R2MArguments)} == {
        f"r2m_{f.name}" for f in dataclasses.fields(R2MConfig)}


def test_bad_command_and_missing_dataset(tmp_path, capsys):
    assert cli.main(["ppo"]) == 2
    with pytest.raises(FileNotFoundError, match="dataset_path"):
        cli.load_local_dataset(str(tmp_path / "nothing.jsonl"))


@pytest.mark.slow
def test_demo_is_the_quick_lab_and_writes_table_plot_and_curves(tmp_path, capsys):
    assert r2m_cli.main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| vanilla |" in printed and "| r2m |" in printed
    results = json.loads((tmp_path / "lab.json").read_text())
    assert results["args"]["quick"] is True and results["args"]["seeds"] == 1 and results["args"]["steps"] == 3
    assert set(results["runs"]) == {"vanilla", "r2m"}
    assert all(len(run["0"]["curve"]) == 3 for run in results["runs"].values())
    assert [row["variant"] for row in results["summary"]] == ["vanilla", "r2m"]
    assert all(row["extra_policy_forwards"] == 0 for row in results["summary"])
    assert (tmp_path / "lab.png").stat().st_size > 0 and (tmp_path / "lab.md").is_file()
