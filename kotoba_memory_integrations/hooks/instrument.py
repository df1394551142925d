"""``instrument``/``uninstrument``: apply ``@cached``, ``@track_memory`` or any wrapt wrapper to code you
do not own, and put back the exact original object.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import wrapt

from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory_integrations.hooks.cached import _CachedDecorator, cached
from kotoba_memory_integrations.hooks.tracking import _track_memory_decorator

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import BaseCache


class InstrumentationError(KotobaMemoryError, ValueError):
    """A target path cannot be instrumented, or is already instrumented differently."""


@dataclass(frozen=True, slots=True)
class Instrumentation:
    """Handle of one applied patch; ``remove()`` restores the original exactly."""

    target: str
    module: str
    path: str
    original: Any
    wrapper: Any  # the installed wrapt proxy, recognised by identity
    spec: tuple[Any, ...]
    parent: Any  # the object whose attribute was set (module, class or instance)
    attribute: str
    created: bool  # True when the attribute was inherited/served from elsewhere: removal deletes it

    def remove(self) -> bool:
        """Undo the patch; False if it was already removed."""
        return uninstrument(self.target)

    @property
    def active(self) -> bool:
        """Whether this patch is still installed."""
        with _installed_lock:
            return _installed.get(self.target) is self


_MISSING_ATTR: Any = object()
# Every wrapt wrapper derives from this (named BaseObjectProxy since wrapt 2, ObjectProxy before).
_PROXY_BASE: type = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)
_installed: dict[str, Instrumentation] = {}
_installed_lock = threading.RLock()


def _parse_target(target: str) -> tuple[str, str]:
    if not isinstance(target, str):
        kind = type(target).__name__
        raise TypeError(f"instrument target must be a 'pkg.module:Attr.path' string, got {kind}")
    module, sep, path = target.partition(":")
    if not sep or not module or not path or any(not part.isidentifier() for part in path.split(".")):
        raise InstrumentationError(
            f"instrument target {target!r} is not of the form 'pkg.module:Class.method'"
        )
    return module.strip(), path.strip()


def _build_decorator(
    wrapper: Any, cache: BaseCache | None, ttl: float | None, key: Any, track: bool
) -> Callable[[Any], Any] | None:
    decorators: list[Callable[[Any], Any]] = []
    if cache is not None:
        decorators.append(cached(cache, ttl=ttl, key=key))
    elif ttl is not None or key is not None:
        raise InstrumentationError("instrument(): ttl= and key= need cache=")
    if track:
        decorators.append(_track_memory_decorator)
    if wrapper is not None:
        if decorators:
            raise InstrumentationError("instrument(): pass either a wrapper or cache=/track=, not both")
        if wrapper is _track_memory_decorator or isinstance(wrapper, _CachedDecorator):
            return cast(Callable[[Any], Any], wrapper)
        if not callable(wrapper):
            raise TypeError(f"instrument(): wrapper must be callable, got {type(wrapper).__name__}")
        # Any other callable is a wrapt wrapper function: (wrapped, instance, args, kwargs) -> result.
        return functools.partial(wrapt.FunctionWrapper, wrapper=wrapper)
    if not decorators:
        return None

    def apply_all(original: Any) -> Any:
        # The cache is innermost, so tracked figures are those of the cached call as callers see it.
        for decorate in decorators:
            original = decorate(original)
        return original

    return apply_all


def instrument(
    target: str,
    wrapper: Callable[..., Any] | None = None,
    *,
    cache: BaseCache | None = None,
    ttl: float | None = None,
    key: Callable[..., Hashable] | None = None,
    track: bool = False,
) -> Instrumentation:
    """Patch ``"pkg.module:Class.method"`` (or a module function) at runtime.

    ``wrapper`` is ``track_memory``, a ``cached(...)`` decorator or a wrapt wrapper function
    ``(wrapped, instance, args, kwargs)``; or use the options ``cache=``/``ttl=``/``key=``/``track=``.
    Instrumenting an already instrumented target with the same arguments returns the existing handle.
    """
    module_name, path = _parse_target(target)
    spec = (wrapper, cache, ttl, key, track)
    decorate = _build_decorator(wrapper, cache, ttl, key, track)
    if decorate is None:
        raise InstrumentationError("instrument(): nothing to apply; pass a wrapper, cache= or track=True")
    canonical = f"{module_name}:{path}"
    with _installed_lock:
        current = _installed.get(canonical)
        if current is not None:
            if len(current.spec) == len(spec) and all(a is b or a == b for a, b in zip(current.spec, spec)):
                return current
            raise InstrumentationError(
                f"{canonical} is already instrumented differently; uninstrument it first"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InstrumentationError(f"instrument(): cannot import module {module_name!r}: {exc}") from exc
        try:
            # resolve_path reads a class attribute from the __dict__ that defines it (no binding), so
            # ``original`` is the very object to put back, be it a function, staticmethod or classmethod.
            parent, attribute, original = wrapt.resolve_path(module, path)
        except AttributeError as exc:  # wrapt's PathResolutionError is an AttributeError
            raise InstrumentationError(f"instrument(): {canonical} does not exist") from exc
        if not (callable(original) or isinstance(original, classmethod | staticmethod)):
            kind = type(original).__name__
            raise InstrumentationError(f"instrument(): {canonical} is not callable ({kind})")
        try:
            created = attribute not in vars(parent)
        except TypeError:  # an object without __dict__
            created = False
        installed = decorate(original)
        wrapt.apply_patch(parent, attribute, installed)
        handle = Instrumentation(
            canonical, module_name, path, original, installed, spec, parent, attribute, created
        )
        _installed[canonical] = handle
        return handle


def _chain(obj: Any, limit: int = 64) -> list[Any]:
    """``obj`` and what it wraps, following ``__wrapped__`` (outermost first, bounded, no cycles)."""
    chain: list[Any] = []
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen and len(chain) < limit:
        chain.append(obj)
        seen.add(id(obj))
        obj = getattr(obj, "__wrapped__", None)
    return chain


def _remove(handle: Instrumentation) -> bool:
    """Take ``handle``'s wrapper out; False when it is no longer there (replaced wholesale)."""
    parent, attribute = handle.parent, handle.attribute
    try:
        current = vars(parent).get(attribute, _MISSING_ATTR)
    except TypeError:
        current = getattr(parent, attribute, _MISSING_ATTR)
    if current is handle.wrapper:
        if handle.created:
            delattr(parent, attribute)  # the original is reachable again from where it was served
        else:
            setattr(parent, attribute, handle.original)
        return True
    chain = _chain(current) if current is not _MISSING_ATTR else []
    position = next((i for i, entry in enumerate(chain) if entry is handle.wrapper), None)
    if position is None:
        return False
    above = chain[position - 1]
    if not issubclass(type(above), _PROXY_BASE):
        # A plain closure's __wrapped__ is only metadata: rewiring it would not take ours out.
        raise InstrumentationError(
            f"cannot uninstrument {handle.target}: {type(above).__name__} was wrapped around it "
            "since; remove that first"
        )
    above.__wrapped__ = handle.original  # splice ours out from under a wrapt wrapper stacked on top
    return True


def uninstrument(target: str | Instrumentation | None = None) -> bool:
    """Restore the original of ``target`` (or of every instrumented target when None).

    Returns whether anything was restored; calling it again, or on a target never instrumented, is a
    no-op. A wrapt wrapper stacked on ours since stays (ours is spliced out beneath it); if someone
    replaced the attribute wholesale, their object is left alone.
    """
    if target is None:
        with _installed_lock:
            names = list(_installed)
        return any([uninstrument(name) for name in names])
    if isinstance(target, Instrumentation):
        target = target.target
    module_name, path = _parse_target(target)
    canonical = f"{module_name}:{path}"
    with _installed_lock:
        handle = _installed.get(canonical)
        if handle is None:
            return False
        removed = _remove(handle)  # raises (and keeps the record) if it cannot be removed
        del _installed[canonical]
        return removed


def instrumented_targets() -> list[str]:
    """The targets currently instrumented through ``instrument``."""
    with _installed_lock:
        return sorted(_installed)
