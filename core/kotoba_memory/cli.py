"""The ``kotoba-memory`` command line: each subcommand lives beside the feature it drives."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kotoba_memory._cli import plain
from kotoba_memory._version import __version__

# name -> module exposing ``add_parser(subparsers)``; the module's parser sets ``func(args) -> int``.
_SUBCOMMANDS = {
    "run": "kotoba_memory.allocators.launcher",
    "profile": "kotoba_memory.profile_cli",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="kotoba-memory", description=plain(__doc__))
    parser.add_argument("--version", action="version", version=f"kotoba-memory {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
