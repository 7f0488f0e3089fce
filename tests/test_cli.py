"""The `r2m` command line dispatch."""

import subprocess
import sys

from r2m.cli import BENCHMARKS, main


def test_help_and_unknown_commands(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert main(["bench"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in BENCHMARKS)


def test_every_benchmark_answers_help():
    for name in BENCHMARKS:
        done = subprocess.run([sys.executable, "-m", "r2m", "bench", name, "--help"], capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        assert "usage" in done.stdout.lower(), name
