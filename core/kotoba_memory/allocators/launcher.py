"""``kotoba-memory run``: re-execute a command with jemalloc or mimalloc preloaded, or glibc tuned."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kotoba_memory._cli import plain, split_command
from kotoba_memory.allocators.process import (
    DEBIAN_PACKAGES,
    AllocatorNotFoundError,
    find_allocator_library,
)
from kotoba_memory.allocators.types import AllocatorType

__all__ = ["add_parser", "build_environment", "main", "run"]

ENV_MARKER = "KOTOBA_MEMORY_ALLOCATOR"  # tells the child (and our stats) what the launcher chose
_PRELOAD_MARKERS = ("libjemalloc", "libmimalloc")

_EPILOG = """examples:
  kotoba-memory run --allocator jemalloc -- gunicorn myproject.wsgi -w 4
  kotoba-memory run --allocator mimalloc -- uvicorn app:app
  kotoba-memory run --allocator system --arena-max 2 -- gunicorn app:app --threads 8
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run a command with jemalloc/mimalloc preloaded or glibc malloc tuned",
        description=plain(__doc__),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--allocator",
        default="jemalloc",
        choices=[t.value for t in AllocatorType if t is not AllocatorType.CUSTOM],
        help="malloc for the command (default: jemalloc); 'system' removes a preloaded one",
    )
    parser.add_argument(
        "--arena-max",
        type=int,
        metavar="N",
        help="glibc only: set MALLOC_ARENA_MAX=N (2 is a good value for threaded workers)",
    )
    parser.add_argument("--library", metavar="PATH", help="preload this .so instead of searching for it")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the environment changes and command, run nothing"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command, best after -- (without it our own options are taken from it)")
    parser.set_defaults(func=run, parser=parser)
    return parser


def build_environment(
    allocator: AllocatorType | str,
    base: Mapping[str, str] | None = None,
    *,
    arena_max: int | None = None,
    library: str | None = None,
) -> dict[str, str]:
    """The environment to exec a command with ``allocator``; raises ``AllocatorNotFoundError``."""
    kind = AllocatorType.parse(allocator)
    if kind is AllocatorType.CUSTOM:
        raise ValueError(
            "the custom allocator is kotoba-memory's in-process arena (create_custom_allocator()), "
            "not a process malloc; choose system, jemalloc or mimalloc"
        )
    if arena_max is not None:
        if kind is not AllocatorType.SYSTEM:
            raise ValueError("--arena-max tunes glibc malloc; it has no effect with " + kind.value)
        if arena_max < 1:
            raise ValueError(f"--arena-max must be >= 1, got {arena_max}")
    env = dict(os.environ if base is None else base)
    # Drop any malloc preloaded earlier (e.g. by an outer launcher) so exactly one is active.
    entries = [
        e
        for e in env.get("LD_PRELOAD", "").replace(":", " ").split()
        if not any(m in os.path.basename(e) for m in _PRELOAD_MARKERS)
    ]
    if kind.preloadable:
        if library is not None:
            if not os.path.isfile(library):
                package = DEBIAN_PACKAGES[kind]
                raise AllocatorNotFoundError(
                    f"--library {library}: no such file (the {kind.value} library comes with the Debian "
                    f"package {package})"
                )
            path = os.path.abspath(library)
        else:
            path = find_allocator_library(kind)
        entries.insert(0, path)
    if entries:
        env["LD_PRELOAD"] = " ".join(entries)
    else:
        env.pop("LD_PRELOAD", None)
    if arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    env[ENV_MARKER] = kind.value
    return env


def run(args: argparse.Namespace) -> int:
    """Exec the command with the chosen allocator; returns an exit code only when it cannot."""
    command = split_command(args, args.parser, "kotoba-memory run")
    if not command:
        print("kotoba-memory run: error: no command given (put it after --)", file=sys.stderr)
        return 2
    try:
        env = build_environment(args.allocator, arena_max=args.arena_max, library=args.library)
    except AllocatorNotFoundError as exc:
        print(f"kotoba-memory run: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"kotoba-memory run: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for key in ("LD_PRELOAD", "MALLOC_ARENA_MAX", ENV_MARKER):
            if key in env and env.get(key) != os.environ.get(key):
                print(f"{key}={shlex.quote(env[key])}")
        print(shlex.join(command))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"kotoba-memory run: error: command not found: {command[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"kotoba-memory run: error: permission denied: {command[0]}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - execvpe only returns by raising


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kotoba_memory.allocators.launcher ...``: the ``run`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="kotoba-memory")
    add_parser(parser.add_subparsers(dest="command_name", required=True))
    args = parser.parse_args(["run", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
