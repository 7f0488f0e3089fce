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
    running = {name: subprocess.Popen([sys.executable, "-m", "r2m", "bench", name, "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name in BENCHMARKS}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (name, err[-2000:])
        assert "usage" in out.lower(), name
