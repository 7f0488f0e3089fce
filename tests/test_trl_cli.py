"""`r2m grpo` / `r2m rloo` (train from local paths) and `r2m demo`."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

import r2m
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


@dataclasses.dataclass
class ExtendedConfig(R2MConfig):
    """R2MConfig with a field added later: it must reach the flags without editing the CLI."""

    warmup_steps: int = dataclasses.field(default=3, metadata={"help": "Steps without an update."})


def test_every_config_field_has_help_text_and_a_flag_with_it(capsys):
    fields = {f.name: f for f in dataclasses.fields(cli.R2MArguments)}
    for config_field in dataclasses.fields(R2MConfig):
        help_text = config_field.metadata["help"]
        assert help_text.strip(), config_field.name
        flag = fields[f"r2m_{config_field.name}"]
        assert flag.metadata["help"].startswith(help_text) and flag.default == config_field.default
        assert flag.metadata.get("choices") == (list(config_field.metadata["choices"])
                                                if "choices" in config_field.metadata else None)
    assert fields["r2m_mode"].metadata["choices"] == list(r2m.MODES)


def test_parsing_round_trips_to_an_equal_config(tmp_path):
    expected = R2MConfig(omega_min=0.7, alpha=0.5, lr=2e-6, attn_dim=64, num_heads=4, total_steps=9, mode="no_gre",
                         update_steps=2, max_grad_norm=0.5, hidden_offload=True, seed=11, impl="torch")
    argv = ["--reward_model_path", "rm", "--dataset_path", "data", "--output_dir", str(tmp_path), "--use_cpu",
            "--bf16", "False"]
    for name, value in dataclasses.asdict(expected).items():
        argv += [f"--r2m_{name}", str(value)]
    _, r2m_args, _, _ = cli.make_parser("grpo").parse_args_and_config(argv)
    assert r2m_args.to_config() == expected
    assert cli.R2MArguments().to_config() == R2MConfig()


def test_optional_fields_take_none_on_the_command_line(tmp_path):
    argv = ["--reward_model_path", "rm", "--dataset_path", "data", "--output_dir", str(tmp_path), "--use_cpu",
            "--r2m_max_grad_norm", "None", "--r2m_seed", "None", "--r2m_total_steps", "7"]
    _, r2m_args, _, _ = cli.make_parser("rloo").parse_args_and_config(argv)
    config = r2m_args.to_config()
    assert (config.max_grad_norm, config.seed, config.total_steps) == (None, None, 7)
    with pytest.raises(SystemExit):
        cli.make_parser("grpo").parse_args_and_config(argv[:-6] + ["--r2m_lr", "None"])  # lr takes no None


def test_a_new_config_field_reaches_the_flags_without_edits():
    from trl import TrlParser

    arguments = cli.arguments_class(ExtendedConfig)
    (parsed,) = TrlParser((arguments,)).parse_args_and_config(["--r2m_warmup_steps", "5", "--r2m_alpha", "0.1"])
    assert parsed.to_config() == ExtendedConfig(warmup_steps=5, alpha=0.1)
    assert "--r2m_warmup_steps" in TrlParser((arguments,)).format_help()


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
    # two policy epochs per generation batch: the 3 steps score batches at steps 1 and 3
    assert all([r["step"] for r in run["0"]["curve"]] == [1, 3] for run in results["runs"].values())
    assert [row["variant"] for row in results["summary"]] == ["vanilla", "r2m"]
    assert all(row["extra_policy_forwards"] == 0 for row in results["summary"])
    assert (tmp_path / "lab.png").stat().st_size > 0 and (tmp_path / "lab.md").is_file()
