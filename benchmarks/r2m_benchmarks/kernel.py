"""`r2m bench kernel`: sequence-to-token attention through `SequenceToTokenAttention`, per implementation.

Times the forward (under no_grad, as when annotating rewards) and the forward + backward (as in the reward model
update) of `naive` (eager), `torch` (absorbed, eager), `torch` under `torch.compile` and `triton` (CUDA only) on
full-length sequences (total tokens = B * S). Each implementation gets its natural input: padded hidden states
with a mask for `naive` and `torch`, the same memory as packed rows with cu_seqlens for `triton`.

Reported per row: the median time over repeats (implementations alternate inside every repeat, in a rotating
order, so a noisy machine hurts them alike), the bytes the sequence must cross at least (h read once by the
forward, once more by the backward: total_tokens * D_p * bytes per pass) over that time, that rate as a fraction
of the device copy bandwidth measured in the same run, and the speed-up over `naive`. Writes JSON, a markdown
table and a PNG plot into --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from r2m.benchmarks.report import markdown_table, write_results
from r2m.fusion import SequenceToTokenAttention

IMPLS = ("naive", "torch", "torch+compile", "triton")
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One benchmark row's problem: B sequences of S tokens, hidden sizes and heads."""

    batch: int
    seq: int
    policy_dim: int
    rm_dim: int
    attn_dim: int
    heads: int
    dtype: str

    @property
    def label(self) -> str:
        return (f"B={self.batch} S={self.seq} D_p={self.policy_dim} D_rm={self.rm_dim} d={self.attn_dim} "
                f"H={self.heads} {self.dtype}")

    def floor_bytes(self, mode: str) -> int:
        passes = 2 if mode == "forward+backward" else 1
        return passes * self.batch * self.seq * self.policy_dim * DTYPES[self.dtype].itemsize


PRESETS: dict[str, list[Shape]] = {
    "gpu": [Shape(256, 1024, 4096, 4096, 2048, h, "bfloat16") for h in (1, 4)]
    + [Shape(4, 65536, 4096, 4096, 2048, h, "bfloat16") for h in (1, 4)],  # few long sequences: splits matter
    "cpu": [Shape(32, 512, 1024, 1024, 1024, 1, "float32")],
}
QUICK: dict[str, list[Shape]] = {
    "gpu": [Shape(8, 256, 512, 512, 256, h, "bfloat16") for h in (1, 4)],
    "cpu": [Shape(4, 64, 128, 128, 128, 1, "float32")],
}


class Timer:
    """Wall time of one call, synchronised with the device (CUDA events on GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def copy_bandwidth(device: torch.device, timer: Timer, repeats: int) -> float:
    """Bytes/s of a large device copy, counting the bytes read and the bytes written."""
    numel = (1 << 28 if device.type == "cuda" else 1 << 25)  # 1 GiB on GPU, 128 MiB on CPU (fp32)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(max(repeats, 5)))
    return 2 * src.numel() * src.element_size() / seconds


def build_cases(shape: Shape, impls: list[str], device: torch.device) -> dict[str, dict[str, Callable[[], None]]]:
    """Per implementation, a forward and a forward + backward closure on shared weights and inputs."""
    dtype = DTYPES[shape.dtype]
    base = SequenceToTokenAttention(shape.rm_dim, shape.policy_dim, shape.attn_dim, shape.heads, impl="naive")
    torch.nn.init.normal_(base.o_proj.weight, std=shape.attn_dim ** -0.5)  # zero o_proj would zero all gradients
    rte = torch.randn(shape.batch, shape.rm_dim, device=device)
    hidden = torch.randn(shape.batch, shape.seq, shape.policy_dim, device=device, dtype=dtype)
    mask = torch.ones(shape.batch, shape.seq, dtype=torch.bool, device=device)
    cu_seqlens = torch.arange(0, shape.batch + 1, dtype=torch.int32, device=device) * shape.seq
    upstream = torch.randn(shape.batch, shape.rm_dim, device=device)

    cases = {}
    for name in impls:
        module = SequenceToTokenAttention(shape.rm_dim, shape.policy_dim, shape.attn_dim, shape.heads,
                                          impl=name.removesuffix("+compile")).to(device)
        module.load_state_dict(base.state_dict())
        if name == "triton":
            inputs = (hidden.view(-1, shape.policy_dim), None, cu_seqlens)
        else:
            inputs = (hidden, mask, None)
        call = torch.compile(module) if name.endswith("+compile") else module

        def forward(call=call, inputs=inputs) -> None:
            with torch.no_grad():
                call(rte, *inputs)

        def forward_backward(call=call, module=module, inputs=inputs) -> None:
            module.zero_grad(set_to_none=True)
            call(rte, *inputs).backward(upstream)

        cases[name] = {"forward": forward, "forward+backward": forward_backward}
    return cases


def measure(shapes: list[Shape], impls: list[str], device: torch.device, repeats: int, warmup: int,
            copy_bytes_per_s: float) -> list[dict]:
    """Rows of timings: every (shape, mode) alternates its implementations inside each repeat."""
    timer = Timer(device)
    rows = []
    progress = tqdm(total=len(shapes) * len(MODES) * len(impls) * (repeats + warmup), desc="kernel bench")
    for shape in shapes:
        cases = build_cases(shape, impls, device)
        for mode in MODES:
            times: dict[str, list[float]] = {name: [] for name in impls}
            errors: dict[str, str] = {}
            for rep in range(warmup + repeats):
                shift = rep % len(impls)
                for name in impls[shift:] + impls[:shift]:
                    progress.update()
                    if name in errors:
                        continue
                    try:
                        seconds = timer(cases[name][mode])
                    except Exception as error:  # e.g. torch.compile without a working compiler: report, go on
                        errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                        continue
                    if rep >= warmup:
                        times[name].append(seconds)
            naive = statistics.median(times["naive"]) if times.get("naive") else None
            for name in impls:
                row = {**asdict(shape), "shape": shape.label, "mode": mode, "impl": name}
                if name in errors:
                    rows.append({**row, "error": errors[name]})
                    continue
                seconds = statistics.median(times[name])
                achieved = shape.floor_bytes(mode) / seconds
                rows.append({**row, "time_ms": seconds * 1e3, "min_ms": min(times[name]) * 1e3,
                             "max_ms": max(times[name]) * 1e3, "repeats": len(times[name]),
                             "floor_bytes": shape.floor_bytes(mode), "achieved_GBps": achieved / 1e9,
                             "frac_copy_bw": achieved / copy_bytes_per_s,
                             "speedup_vs_naive": naive / seconds if naive else None})
    progress.close()
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Median time per implementation, one panel per mode, one bar group per shape (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, len(MODES), figsize=(7 * len(MODES), 2.2 + 0.35 * len(shapes) * len(impls)),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, mode in zip(axes[0], MODES, strict=True):
        for k, impl in enumerate(impls):
            by_shape = {r["shape"]: r for r in rows if r["mode"] == mode and r["impl"] == impl and "time_ms" in r}
            ys = [i + k * width for i, s in enumerate(shapes) if s in by_shape]
            values = [by_shape[s]["time_ms"] for s in shapes if s in by_shape]
            bars = ax.barh(ys, values, height=width, label=impl)
            labels = [f"{by_shape[s]['time_ms']:.4g} ms" + (f"  {by_shape[s]['speedup_vs_naive']:.1f}x"
                                                              if by_shape[s]["speedup_vs_naive"] else "")
                      for s in shapes if s in by_shape]
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        times = [r["time_ms"] for r in rows if r["mode"] == mode and "time_ms" in r]
        ax.set_xscale("log")
        ax.set_xlim(min(times) / 4, max(times) * 8)  # bars start well left of the fastest; room for labels
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(shapes))], [s.replace(" D_p", "\nD_p") for s in shapes],
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median time (ms, log scale); label: time, speed-up over naive", fontsize=8)
        ax.set_title(mode)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(impls), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device: torch.device) -> dict[str, str]:
    """Versions and device facts that the numbers depend on."""
    import triton

    info = {"triton": triton.__version__, "torch_threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown"
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def default_out(device: torch.device) -> str:
    if device.type == "cuda":
        slug = torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")
    else:
        slug = f"cpu-{os.cpu_count()}core"
    return f"benchmarks/results/kernel-{slug}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r2m bench kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shape grid (default: gpu when CUDA is available, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 repeats: checks that everything runs")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated subset of {', '.join(IMPLS)} (triton needs CUDA; default: all that run)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default: 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation, autotuning)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a CPU shared with other jobs)")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/kernel-<device>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if i != "triton" or device.type == "cuda"]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"r2m bench kernel: unknown impls {unknown}; choose from {IMPLS}")
    if "triton" in impls and device.type != "cuda":
        raise SystemExit("r2m bench kernel: the triton row needs a CUDA device (CPU runs the other rows)")
    if "naive" in impls:  # the speed-up column is relative to it
        impls.remove("naive")
        impls.insert(0, "naive")
    shapes = QUICK[preset] if args.quick else PRESETS[preset]
    repeats = args.repeats or (3 if args.quick else 20 if device.type == "cuda" else 5)

    timer = Timer(device)
    load_before = os.getloadavg()[0]
    copy_bytes_per_s = copy_bandwidth(device, timer, repeats)
    rows = measure(shapes, impls, device, repeats, args.warmup, copy_bytes_per_s)

    env = environment(device)
    env["load_average_1min"] = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    header = (f"Device: {env['device_name']} ({device.type}); copy bandwidth {copy_bytes_per_s / 1e9:.1f} GB/s "
              f"(read + write); torch {torch.__version__}, triton {env['triton']}, "
              f"{env['torch_threads']} torch threads; median of {repeats} repeats; "
              f"load average {env['load_average_1min']}.\n\n")
    columns = ["shape", "mode", "impl", "time_ms", "achieved_GBps", "frac_copy_bw", "speedup_vs_naive", "error"]
    table = header + markdown_table(rows, [c for c in columns if c != "error" or any("error" in r for r in rows)])
    out = write_results(args.out or default_out(device), "kernel",
                        {"args": vars(args), "preset": preset, "environment": env,
                         "copy_bandwidth_GBps": copy_bytes_per_s / 1e9, "rows": rows}, table)
    plot(rows, out / "kernel.png", f"Device: {env['device_name']} ({device.type}) — preset {preset}, "
                                   f"{env['torch_threads']} torch threads")
    print(table)
    print(f"written to {out}/kernel.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
