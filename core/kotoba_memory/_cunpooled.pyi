"""Type stubs for calling a C function with its objects kept out of pymalloc's pools (csrc/_cunpooled.c)."""

from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

def call(func: Callable[[], _T], /) -> tuple[_T, int, int]: ...
def alone() -> bool: ...
