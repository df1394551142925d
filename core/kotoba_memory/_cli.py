"""Helpers shared by the ``kotoba-memory`` subcommands: plain-text help, and the workload after ``--``."""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["plain", "split_command"]

_ROLE = re.compile(r":[a-z]+:`~?([^`<]+?)(?:\s*<[^>]+>)?`")  # :class:`~pkg.Name` -> Name
_LITERAL = re.compile(r"``([^`]+)``")
_INTERPRETED = re.compile(r"`([^`]+)`")


def plain(doc: str | None) -> str:
    """A docstring as terminal help: reStructuredText roles and literals reduced to their text."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc or "")
    text = _LITERAL.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.M)


def split_command(args: argparse.Namespace, parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """The workload's argv, with our own options given after it (without ``--``) applied to ``args``.

    After ``--`` everything belongs to the workload, untouched. Without it, argparse hands us the
    first word of the workload and everything after it, our own options included; those are parsed
    here (``kotoba-memory profile python app.py --duration 5`` profiles for 5 s).
    """
    command = list(args.command)
    if command[:1] == ["--"]:
        return command[1:]
    ours: list[str] = []
    rest: list[str] = []
    tokens = iter(command)
    for token in tokens:
        name = token.split("=", 1)[0] if token.startswith("--") else token
        action = parser._option_string_actions.get(name) if token.startswith("-") and rest else None
        if action is None or action.dest == "help":
            rest.append(token)
            continue
        ours.append(token)
        if action.nargs != 0 and "=" not in token:
            ours.append(next(tokens, ""))
    if ours:
        parsed, _ = parser.parse_known_args(ours)
        given = {token.split("=", 1)[0] for token in ours if token.startswith("-")}
        for action in parser._actions:
            if given.intersection(action.option_strings):
                setattr(args, action.dest, getattr(parsed, action.dest))
        print(f"{prog}: applying {' '.join(ours)} given after the command (put the workload after -- "
              "to pass such options to it instead)", file=sys.stderr)
    return rest
