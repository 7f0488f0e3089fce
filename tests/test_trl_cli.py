"""`r2m grpo` / `r2m rloo` (train from local paths) and `r2m demo`."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import r2m
from r2m import cli as r2m_cli
from r2m.benchmarks.lab import DEMO_VARIANT
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
    run_state = json.loads((out / "r2m" / "r2m_state.json").read_text())
    assert run_state["total_steps"] == 2 and (out / "config.json").is_file()
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
        cli.make_parser("grpo").parse_args_and_config([*argv[:-6], "--r2m_lr", "None"])  # lr takes no None


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
    variants = ["vanilla", "oracle", DEMO_VARIANT]  # the oracle: the gain a better reward can buy
    assert all(f"| {variant} |" in printed for variant in variants)
    results = json.loads((tmp_path / "lab.json").read_text())
    assert results["args"]["quick"] is True and results["args"]["seeds"] == 1 and results["args"]["steps"] == 3
    assert results["args"]["rm_bias"] == 0.8 and results["args"]["sft_spurious_share"] == 0.3  # the revised world
    assert set(results["runs"]) == set(variants)
    # two policy epochs per generation batch: the 3 steps score batches at steps 1 and 3
    assert all([r["step"] for r in run["0"]["curve"]] == [1, 3] for run in results["runs"].values())
    assert [row["variant"] for row in results["summary"]] == variants
    assert all(row["extra_policy_forwards"] == 0 for row in results["summary"])
    assert (tmp_path / "lab.png").stat().st_size > 0 and (tmp_path / "lab.md").is_file()


def usage_error(argv: list[str], capsys, monkeypatch) -> str:
    """Run the CLI on a mistake: exit status 2, one message (after any progress bar of `datasets`), no traceback,
    no model loaded."""
    monkeypatch.setattr(cli, "R2MReward", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    messages = [line for line in err.splitlines() if line.startswith("r2m ")]
    assert len(messages) == 1 and err.endswith(messages[0]) and "Traceback" not in err, err
    return messages[0]


def base_argv(files, kind="grpo", dataset="prompts.jsonl"):
    return [kind, "--model_name_or_path", str(files / "policy"), "--reward_model_path", str(files / "rm"),
            "--dataset_path", str(files / dataset), "--output_dir", str(files / "out")]


def replace_flag(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def test_a_missing_model_path_names_its_flag(local_files, capsys, monkeypatch):
    for flag in ("--reward_model_path", "--model_name_or_path"):
        err = usage_error(replace_flag(base_argv(local_files), flag, "./nope"), capsys, monkeypatch)
        assert err == f"r2m grpo: {flag} './nope' does not exist (expected a local model directory)"
    (local_files / "empty").mkdir()
    err = usage_error(replace_flag(base_argv(local_files), "--reward_model_path", str(local_files / "empty")),
                      capsys, monkeypatch)
    assert "--reward_model_path" in err and "config.json" in err


def test_a_reward_model_given_as_the_policy_and_the_reverse_are_refused(local_files, capsys, monkeypatch):
    swapped = replace_flag(replace_flag(base_argv(local_files), "--model_name_or_path", str(local_files / "rm")),
                           "--reward_model_path", str(local_files / "policy"))
    err = usage_error(swapped, capsys, monkeypatch)
    assert "--model_name_or_path" in err and "holds a reward model (LlamaForSequenceClassification)" in err
    err = usage_error(replace_flag(base_argv(local_files), "--reward_model_path", str(local_files / "policy")),
                      capsys, monkeypatch)
    assert "--reward_model_path" in err and "GPT2LMHeadModel" in err and "ForSequenceClassification" in err


def test_a_dataset_without_a_prompt_column_is_refused_before_training(local_files, capsys, monkeypatch):
    (local_files / "texts.jsonl").write_text('{"text": "w1 w2"}\n')
    err = usage_error(base_argv(local_files, dataset="texts.jsonl"), capsys, monkeypatch)
    assert "--dataset_path" in err and "'prompt'" in err and "['text']" in err
    err = usage_error(base_argv(local_files, dataset="nope.jsonl"), capsys, monkeypatch)
    assert "--dataset_path" in err and "does not exist" in err
    err = usage_error([*base_argv(local_files), "--dataset_train_split", "dev"], capsys, monkeypatch)
    assert "--dataset_train_split 'dev'" in err and "['train']" in err


def test_an_unknown_flag_gets_the_nearest_known_one(local_files, capsys, monkeypatch):
    err = usage_error([*base_argv(local_files), "--r2m_omga_min", "0.5"], capsys, monkeypatch)
    assert "--r2m_omga_min (did you mean --r2m_omega_min?)" in err
    err = usage_error([*base_argv(local_files), "--no_such_thing", "1"], capsys, monkeypatch)
    assert "--no_such_thing" in err and "did you mean" not in err


def test_an_r2m_value_out_of_range_names_the_flag_the_user_typed(local_files, capsys, monkeypatch):
    err = usage_error([*base_argv(local_files), "--r2m_omega_min", "2"], capsys, monkeypatch)
    assert "--r2m_omega_min" in err and "R2MConfig" not in err and "2" in err


def test_config_file_mistakes_name_the_key(local_files, capsys, monkeypatch):
    config = local_files / "run.yaml"
    config.write_text("r2m_omga_min: 0.5\n")
    err = usage_error([*base_argv(local_files), "--config", str(config)], capsys, monkeypatch)
    assert "in the --config file" in err and "r2m_omga_min (did you mean r2m_omega_min?)" in err
    err = usage_error([*base_argv(local_files), "--config", str(local_files / "nope.yaml")], capsys, monkeypatch)
    assert "--config expects a YAML file" in err


def test_precision_follows_the_hardware_unless_given(tmp_path, monkeypatch):
    argv = ["--reward_model_path", "rm", "--dataset_path", "data", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(cli, "is_torch_bf16_gpu_available", lambda: False)
    assert cli.parse_arguments("grpo", argv)[2].bf16 is False
    with pytest.raises(cli.UsageError, match="bf16"):  # asked for explicitly on a machine without bf16: TRL says why
        cli.parse_arguments("grpo", [*argv, "--bf16", "True"])
    assert cli.parse_arguments("rloo", [*argv, "--bf16", "True", "--use_cpu"])[2].bf16 is True
    config = tmp_path / "run.yaml"
    config.write_text("use_cpu: true\nbf16: true\n")
    assert cli.parse_arguments("grpo", [*argv, "--config", str(config)])[2].bf16 is True
    monkeypatch.setattr(cli, "is_torch_bf16_gpu_available", lambda: True)
    assert cli.hardware_defaults() == {}  # TRL's own default (bf16) where a GPU supports it


def test_the_command_line_exits_2_without_a_traceback(local_files):
    done = subprocess.run([sys.executable, "-m", "r2m", *base_argv(local_files), "--r2m_omga_min", "0.5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("r2m grpo: unknown flag on the command line")
