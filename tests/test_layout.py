"""The repository layout: Python run from the repo root finds none of r2m's top-level folders as a package.

transformers >= 5.25 imports Hugging Face's ``kernels`` package at ``import transformers.activations``; a regular
package ``kernels/`` at the root (the first entry of ``sys.path`` for ``python -m ...`` there) shadowed it and broke
every model import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_FOLDERS = ("kernels", "integrations", "benchmarks")


def run_from_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("folder", TOP_LEVEL_FOLDERS)
def test_top_level_folders_are_not_regular_packages(folder):
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py makes the root shadow `{folder}`"


def test_a_transformers_model_imports_from_the_repo_root_with_hugging_face_kernels_installed():
    out = run_from_root(
        "import json, kernels, transformers.activations\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
        "print(json.dumps({'kernels': kernels.__file__, 'params': sum(p.numel() for p in model.parameters())}))\n")
    seen = json.loads(out.strip().splitlines()[-1])
    assert not Path(seen["kernels"]).resolve().is_relative_to(ROOT), seen["kernels"]
    assert seen["params"] > 0


def test_top_level_folders_never_shadow_an_installed_package(tmp_path):
    """A regular package of the same name anywhere on sys.path after the root wins over the root's folder."""
    for folder in TOP_LEVEL_FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("INSTALLED = True\n")
    out = run_from_root(
        f"import sys, json; sys.path.insert(1, {str(tmp_path)!r})\n"
        f"print(json.dumps([getattr(__import__(name), 'INSTALLED', False) for name in {TOP_LEVEL_FOLDERS!r}]))\n")
    assert json.loads(out.strip().splitlines()[-1]) == [True] * len(TOP_LEVEL_FOLDERS)


def test_the_r2m_namespace_maps_the_folders_from_the_repo_root():
    out = run_from_root(
        "import json, sys, r2m.kernels, r2m.integrations.trl, r2m.integrations.openrlhf, r2m.benchmarks.lab\n"
        "print(json.dumps({name: sys.modules[name].__file__ for name in ('r2m.kernels.seq_to_token_attention',"
        " 'r2m.integrations.trl', 'r2m.benchmarks.lab')}))\n")
    files = {name: Path(path).resolve() for name, path in json.loads(out.strip().splitlines()[-1]).items()}
    assert files["r2m.kernels.seq_to_token_attention"].is_relative_to(ROOT / "kernels")
    assert files["r2m.integrations.trl"].is_relative_to(ROOT / "integrations" / "trl")
    assert files["r2m.benchmarks.lab"].is_relative_to(ROOT / "benchmarks")


@pytest.mark.slow
def test_the_wheel_installs_everything_under_r2m(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("r2m-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"r2m"}
    for module in ("r2m/kernels/seq_to_token_attention.py", "r2m/integrations/trl/reward.py",
                   "r2m/integrations/openrlhf/actors.py", "r2m/benchmarks/lab.py"):
        assert module in names
