"""Writing a benchmark's results: JSON, a markdown table and the machine they came from."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict[str, str | int]:
    """What the numbers were measured on."""
    info: dict[str, str | int] = {"platform": platform.platform(), "python": platform.python_version(),
                                  "torch": torch.__version__, "cpu_count": os.cpu_count() or 0,
                                  "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``; floats get 4 significant digits."""
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def subplots(*args, **kwargs):
    """A matplotlib figure and axes drawn off-screen (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | os.PathLike, **layout) -> None:
    """Lay out, write as PNG and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**layout)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir: str | os.PathLike, name: str, payload: dict, table: str) -> Path:
    """Write ``<name>.json`` (payload plus the machine) and ``<name>.md`` (the table) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    (out / f"{name}.md").write_text(table)
    return out
