"""How many bytes a cached value occupies: exact for the common flat types, a bounded estimate otherwise.

``bytes``, ``str``, ``bytearray``, numbers and ``None`` are weighed exactly with :func:`sys.getsizeof`; a
:class:`CachedValue` weighs what its metadata says. Containers and objects are walked breadth-limited:
each container contributes its own size plus a sample of at most ``sample`` of its items, scaled up to
its length, and the walk stops after ``max_nodes`` objects. Shared objects are counted once per value, as
``pympler.asizeof`` does. The test suite compares the estimate with ``asizeof`` on typical values.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from itertools import islice
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any

__all__ = ["Weigher", "default_weigher", "estimate_size"]

Weigher = Callable[[Any], int]

_getsizeof = sys.getsizeof
_FLAT = frozenset({bytes, str, bytearray, int, float, complex, bool, type(None), memoryview, range})
# Objects that belong to the program rather than to the value: never walked into or counted.
_SHARED = (type, ModuleType, FunctionType, BuiltinFunctionType, MethodType)


def default_weigher(value: Any) -> int:
    """The weight in bytes the cache charges for ``value``."""
    kind = type(value)
    if kind in _FLAT:
        return _getsizeof(value)
    if kind is _cached_value_type():
        return int(value.metadata.size_bytes)
    return estimate_size(value)


_CACHED_VALUE: list[type] = []


def _cached_value_type() -> type:
    # types.py imports this module lazily for CachedValue's default metadata: resolve it on first use.
    if not _CACHED_VALUE:
        from kotoba_memory.cache_manager.types import CachedValue

        _CACHED_VALUE.append(CachedValue)
    return _CACHED_VALUE[0]


def estimate_size(obj: Any, *, sample: int = 16, max_nodes: int = 512) -> int:
    """Estimate the deep size of ``obj`` in bytes, sampling large containers (bounded work)."""
    total = 0.0
    seen: set[int] = set()
    stack: list[tuple[Any, float]] = [(obj, 1.0)]
    nodes = 0
    while stack:
        item, scale = stack.pop()
        ident = id(item)
        if ident in seen or isinstance(item, _SHARED):
            continue
        seen.add(ident)
        try:
            total += scale * _getsizeof(item)
        except TypeError:  # a C extension object without __sizeof__
            continue
        nodes += 1
        kind = type(item)
        if kind in _FLAT or nodes >= max_nodes:
            continue
        _push_children(item, kind, scale, sample, stack)
    return max(int(total), 0)


def _push_children(item: Any, kind: type, scale: float, sample: int, stack: list[tuple[Any, float]]) -> None:
    if isinstance(item, dict):
        count = len(item)
        if not count:
            return
        taken = min(count, sample)
        child_scale = scale * count / taken
        for key, value in islice(item.items(), taken):
            stack.append((key, child_scale))
            stack.append((value, child_scale))
        return
    if isinstance(item, (list, tuple)):
        count = len(item)
        if not count:
            return
        if count <= sample:
            stack.extend((child, scale) for child in item)
        else:
            child_scale = scale * count / sample
            stack.extend((item[i * count // sample], child_scale) for i in range(sample))
        return
    if isinstance(item, (set, frozenset)):
        count = len(item)
        if count:
            taken = min(count, sample)
            child_scale = scale * count / taken
            stack.extend((child, child_scale) for child in islice(item, taken))
        return
    attrs = getattr(item, "__dict__", None)
    if isinstance(attrs, dict):
        stack.append((attrs, scale))
    for klass in kind.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            try:
                stack.append((getattr(item, slot), scale))
            except AttributeError:
                pass
