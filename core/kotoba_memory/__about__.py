"""What this installation of kotoba-memory is: its version and which implementation runs the hot paths."""

from __future__ import annotations

from kotoba_memory._native import PURE_PYTHON_ENV, implementation, implementations, pure_python_forced
from kotoba_memory._version import __version__

__all__ = ["PURE_PYTHON_ENV", "__version__", "implementation", "implementations", "pure_python_forced"]
