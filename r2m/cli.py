"""The `r2m` command line: each subcommand hands its remaining arguments to the module that implements it."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("r2m.benchmarks.lab", "demo", "the over-optimisation lab's quick mode: GRPO with the vanilla RM, the gold "
             "reward and anchored R2M on the built-in tiny task"),
    "grpo": ("r2m.integrations.trl.cli", "main", "train with TRL's GRPOTrainer and an R2M reward"),
    "rloo": ("r2m.integrations.trl.cli", "main", "train with TRL's RLOOTrainer and an R2M reward"),
    "bench": ("r2m.benchmarks.{benchmark}", "main",
              "run a benchmark: kernel | overhead | lab | accuracy | ceiling | openrlhf_traffic"),
}
BENCHMARKS = ("kernel", "overhead", "lab", "accuracy", "ceiling", "openrlhf_traffic")


def _usage() -> str:
    lines = ["usage: r2m <command> [args...]", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"r2m: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = COMMANDS[command]
    if command == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: r2m bench {{{','.join(BENCHMARKS)}}} [args...]")
            return 0
        if rest[0] not in BENCHMARKS:
            print(f"r2m bench: unknown benchmark {rest[0]!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        module_name, rest = module_name.format(benchmark=rest[0]), rest[1:]
    elif command in ("grpo", "rloo"):
        rest = [command, *rest]
    module = importlib.import_module(module_name)
    return int(getattr(module, function)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
