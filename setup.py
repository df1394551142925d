"""Builds kotoba-memory's optional C extensions; everything else is declared in pyproject.toml.

Each ``csrc/<name>.c`` becomes the module ``kotoba_memory.<name>``. Where no C compiler works the build
warns and goes on: the package then runs on its pure-Python implementation, which is always shipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


def _extensions() -> list[Extension]:
    if os.environ.get("KOTOBA_MEMORY_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    args = ["-O2", "-std=c11", "-Wall"] if sys.platform != "win32" else []
    return [
        Extension(f"kotoba_memory.{src.stem}", [src.relative_to(HERE).as_posix()], extra_compile_args=args)
        for src in sorted((HERE / "csrc").glob("_*.c"))
    ]


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when an extension cannot be compiled."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all (DistutilsPlatformError and friends)
            self._warn("C extensions", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # a compile or link error in this one extension
            self._warn(ext.name, exc)

    @staticmethod
    def _warn(what: str, exc: BaseException) -> None:
        print(
            f"WARNING: kotoba-memory: {what} not built ({exc}); "
            "the pure-Python implementation will be used (slower hot paths, same behaviour).",
            file=sys.stderr,
        )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
