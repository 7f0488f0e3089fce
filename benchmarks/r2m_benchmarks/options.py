"""Command-line options the benchmarks share: `--quick` as a set of defaults that explicit flags still override."""

from __future__ import annotations

import argparse


def add_quick(parser: argparse.ArgumentParser, quick: dict[str, object]) -> None:
    """Add ``--quick``; the options named in ``quick`` must default to None (see `resolve_defaults`)."""
    values = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"defaults of {values} (flags given still apply)")


def resolve_defaults(options: argparse.Namespace, quick: dict[str, object], defaults: dict[str, object]) -> None:
    """Fill the options left at None from ``quick`` (when ``options.quick``) or ``defaults``."""
    for name, value in (quick if options.quick else defaults).items():
        if getattr(options, name) is None:
            setattr(options, name, value)
