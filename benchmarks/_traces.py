"""Loading the shared cache traces (``../shared/traces`` relative to the repo root, or ``--traces DIR``).

``*.keys.gz``: gzip text, one integer key per line. ``*.sized.gz``: gzip text ``key size`` per line.
Other benchmarks may import this module (``sys.path`` must include ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REFERENCE_ROWS",
    "Trace",
    "add_traces_argument",
    "default_traces_dir",
    "find_traces",
    "load_keys",
    "load_sized",
    "require_traces_dir",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# (trace stem, capacity in entries): the rows of the reference table in the traces README.
REFERENCE_ROWS: list[tuple[str, int]] = [
    ("lirs-multi1", 500),
    ("lirs-multi1", 1000),
    ("lirs-sprite", 100),
    ("lirs-sprite", 500),
    ("lirs-2_pools", 100),
    ("lirs-2_pools", 1000),
    ("lirs-loop", 500),
    ("cache2k-web07", 1000),
    ("cache2k-web07", 4000),
]


@dataclass(frozen=True)
class Trace:
    """A trace file: its short name (file name without the ``.keys.gz``/``.sized.gz`` suffix) and path."""

    name: str
    path: Path
    sized: bool


def default_traces_dir() -> Path:
    """``../shared/traces`` relative to the repository root."""
    return (REPO_ROOT / ".." / "shared" / "traces").resolve()


def add_traces_argument(parser: argparse.ArgumentParser) -> None:
    """Add the common ``--traces DIR`` option."""
    parser.add_argument(
        "--traces",
        type=Path,
        default=default_traces_dir(),
        help="directory holding *.keys.gz / *.sized.gz traces (default: ../shared/traces)",
    )


def require_traces_dir(path: Path) -> Path | None:
    """Return ``path`` if it holds traces, else print why and return None."""
    if not path.is_dir() or not any(path.glob("*.gz")):
        print(f"No traces found in {path}: nothing to measure (pass --traces DIR).", file=sys.stderr)
        return None
    return path


def find_traces(directory: Path) -> list[Trace]:
    """Every trace file in ``directory``, sorted by name."""
    found = []
    for path in sorted(directory.glob("*.gz")):
        if path.name.endswith(".keys.gz"):
            found.append(Trace(path.name[: -len(".keys.gz")], path, False))
        elif path.name.endswith(".sized.gz"):
            found.append(Trace(path.name[: -len(".sized.gz")], path, True))
    return found


def load_keys(path: Path, limit: int | None = None) -> list[int]:
    """The keys of a ``*.keys.gz`` trace in access order (the first ``limit`` if given)."""
    keys: list[int] = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            line = line.strip()
            if line:
                keys.append(int(line))
                if limit is not None and len(keys) >= limit:
                    break
    return keys


def load_sized(path: Path, limit: int | None = None) -> list[tuple[int, int]]:
    """The ``(key, size_bytes)`` requests of a ``*.sized.gz`` trace in access order."""
    out: list[tuple[int, int]] = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2:
                out.append((int(parts[0]), int(parts[1])))
                if limit is not None and len(out) >= limit:
                    break
    return out
