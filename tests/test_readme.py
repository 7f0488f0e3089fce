"""The README's TRL snippet and shell lines, taken from README.md itself (so they cannot drift) and run as written
on tiny local checkpoints, on this CPU machine."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_lines(block: str) -> list[list[str]]:
    """Each command of a bash block as argv: continuation lines joined, comments dropped."""
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def block_with(language: str, text: str) -> str:
    (block,) = [b for b in readme_blocks(language) if text in b]
    return block


def trl_commands() -> list[list[str]]:
    return [argv for argv in shell_lines(block_with("bash", "r2m grpo --model_name_or_path")) if argv[0] == "r2m"]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def user_files(tmp_path):
    """What the README assumes a user has: ./policy, ./rm (saved with their tokenizers) and prompts.jsonl."""
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_("gpt2", "llama", rm_tokenizer="byte")
    for model, tokenizer, name in ((policy, policy_tokenizer, "policy"), (reward_model, reward_tokenizer, "rm")):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for row in trl_tiny.dataset(2):
            f.write(json.dumps(row) + "\n")
    return tmp_path


def assert_trained(folder: Path, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    saved = folder / "out" / "r2m"
    assert saved.is_dir() and any(saved.glob("*.safetensors")), sorted(p.name for p in folder.rglob("*"))


def test_the_readme_shows_the_commands_this_test_runs():
    commands = trl_commands()
    assert [argv[:2] for argv in commands] == [["r2m", "grpo"], ["r2m", "grpo"], ["r2m", "rloo"]]
    assert "--config" in commands[1]
    config = block_with("yaml", "r2m_omega_min")
    assert config.startswith(f"# {commands[1][commands[1].index('--config') + 1]}")


@pytest.mark.slow
def test_the_python_snippet_trains_as_written(user_files):
    snippet = block_with("python", "from r2m.integrations.trl import R2MReward\n")
    (user_files / "snippet.py").write_text(snippet)
    assert_trained(user_files, run([sys.executable, "snippet.py"], user_files))


@pytest.mark.slow
def test_the_shell_lines_train_as_written(user_files):
    flags_line, config_line, help_line = trl_commands()
    assert_trained(user_files, run([sys.executable, "-m", "r2m", *flags_line[1:]], user_files))
    saved = json.loads((user_files / "out" / "r2m" / "r2m_config.json").read_text())["config"]
    assert (saved["omega_min"], saved["lr"]) == (0.6, 1e-6)

    subprocess.run(["rm", "-r", str(user_files / "out")], check=True)
    config_file = config_line[config_line.index("--config") + 1]
    (user_files / config_file).write_text(block_with("yaml", "r2m_omega_min"))
    assert_trained(user_files, run([sys.executable, "-m", "r2m", *config_line[1:]], user_files))
    assert json.loads((user_files / "out" / "r2m" / "r2m_config.json").read_text())["config"] == saved

    done = run([sys.executable, "-m", "r2m", *help_line[1:]], user_files)
    assert done.returncode == 0 and "--r2m_omega_min" in done.stdout


def test_the_fast_loop_the_readme_names_is_the_makefile_target_and_skips_the_marked_tests():
    assert "make test-fast" in README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    recipe = re.search(r"^test-fast:.*\n\t(.+)$", makefile, flags=re.M).group(1)
    assert recipe.endswith('-m pytest -m "not slow and not distributed"')
    markers = (README.parent / "pyproject.toml").read_text()
    assert '"slow: ' in markers and '"distributed: ' in markers
