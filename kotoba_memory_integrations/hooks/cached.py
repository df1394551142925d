"""``@cached``: memoise a function, method or coroutine function in any kotoba-memory cache.

The key is built from the qualified name and the arguments; per-key stampede protection comes from the
cache's ``get_or_set``/``aget_or_set``.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import wrapt

from kotoba_memory.cache_manager.inventory import note_use
from kotoba_memory.validation import check_ttl

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import BaseCache


F = TypeVar("F", bound=Callable[..., Any])

_KEY_MARK = "kotoba_memory.cached"
_MISS: Any = object()
_local_ids = itertools.count(1)


def _qualified_name(func: Callable[..., Any]) -> str:
    inner = getattr(func, "__func__", func)  # classmethod/staticmethod objects
    module = getattr(inner, "__module__", None) or "?"
    qualname = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or repr(inner)
    return f"{module}.{qualname}"


def _is_coroutine_function(func: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(func, "__func__", func))


class _CachedCall:
    """The wrapt wrapper function behind ``@cached``: builds the key and defers to ``get_or_set``."""

    def __init__(
        self,
        cache: BaseCache,
        ttl: float | None,
        key: Callable[..., Hashable] | None,
        name: str,
        is_async: bool,
    ) -> None:
        self.cache = cache
        self.ttl = ttl
        self.key = key
        self.name = name
        self.is_async = is_async

    def make_key(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        # functools.lru_cache convention: for methods the instance (or class, for classmethods) is part of
        # the arguments, so two instances never share a result. A user key sees the same arguments.
        call_args = args if instance is None else (instance, *args)
        if self.key is not None:
            return self.key(*call_args, **kwargs)
        # Keyword order does not matter; sorting compares only the (unique) names, never the values.
        return (_KEY_MARK, self.name, call_args, tuple(sorted(kwargs.items())) if kwargs else ())

    def _unhashable(self, exc: TypeError) -> TypeError:
        return TypeError(
            f"@cached {self.name}: the cache key must be hashable; pass hashable arguments or a "
            f"key= function ({exc})"
        )

    def _checked_key(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        key = self.make_key(instance, args, kwargs)
        try:
            hash(key)
        except TypeError as exc:
            raise self._unhashable(exc) from exc
        return key

    def __call__(
        self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        key = self.make_key(instance, args, kwargs)
        if self.is_async:
            return self._acall(key, wrapped, args, kwargs)
        # The hit path is one lookup; the stampede-safe get_or_set runs only on a miss.
        try:
            value = self.cache.get(key, _MISS)
        except TypeError as exc:  # unhashable arguments
            raise self._unhashable(exc) from exc
        if value is not _MISS:
            return value
        return self.cache.get_or_set(key, lambda: wrapped(*args, **kwargs), ttl=self.ttl)

    async def _acall(
        self, key: Hashable, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            value = await self.cache.aget(key, _MISS)
        except TypeError as exc:
            raise self._unhashable(exc) from exc
        if value is not _MISS:
            return value

        async def factory() -> Any:
            return await wrapped(*args, **kwargs)

        return await self.cache.aget_or_set(key, factory, ttl=self.ttl)


class _BoundCachedFunction(wrapt.BoundFunctionWrapper):
    """What accessing a ``@cached`` method through an instance or class returns."""

    def cache_key(self, *args: Any, **kwargs: Any) -> Hashable:
        """The cache key a call with these arguments uses."""
        call = cast("_CachedCall", self._self_wrapper)
        return call._checked_key(self._self_instance, args, kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached result of a call with these arguments; True if one was cached."""
        call = cast("_CachedCall", self._self_wrapper)
        return bool(call.cache.delete(self.cache_key(*args, **kwargs)))

    @property
    def cache(self) -> BaseCache:
        """The cache results are stored in."""
        return cast("_CachedCall", self._self_wrapper).cache


class CachedFunction(wrapt.FunctionWrapper):
    """A function (or descriptor) memoised by ``@cached``; behaves as the original otherwise."""

    __bound_function_wrapper__ = _BoundCachedFunction

    def cache_key(self, *args: Any, **kwargs: Any) -> Hashable:
        """The cache key a call with these arguments uses (pass the instance first for methods)."""
        call = cast("_CachedCall", self._self_wrapper)
        return call._checked_key(None, args, kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached result of a call with these arguments; True if one was cached."""
        call = cast("_CachedCall", self._self_wrapper)
        return bool(call.cache.delete(self.cache_key(*args, **kwargs)))

    @property
    def cache(self) -> BaseCache:
        """The cache results are stored in."""
        return cast("_CachedCall", self._self_wrapper).cache


class _CachedDecorator:
    """The decorator ``cached(cache, ...)`` returns; also accepted by ``instrument``."""

    def __init__(self, cache: BaseCache, ttl: float | None, key: Callable[..., Hashable] | None) -> None:
        self.cache = cache
        self.ttl = ttl
        self.key = key

    def __call__(self, func: F) -> F:
        if not callable(func) and not isinstance(func, classmethod | staticmethod):
            raise TypeError(f"@cached needs a function or method, got {type(func).__name__}")
        inner = getattr(func, "__func__", func)
        if inspect.isgeneratorfunction(inner) or inspect.isasyncgenfunction(inner):
            # A generator can be consumed once; caching it would hand an exhausted one to later callers.
            raise TypeError(f"@cached cannot cache generator function {_qualified_name(func)}")
        name, is_async = _qualified_name(func), _is_coroutine_function(func)
        if "<locals>" in name or "<lambda>" in name:
            # Closures made by one factory share a qualified name but not their results: keep them apart.
            name = f"{name}#{next(_local_ids)}"
        call = _CachedCall(self.cache, self.ttl, self.key, name, is_async)
        note_use(self.cache, f"@cached {name}")
        return cast(F, CachedFunction(func, call))

    def _identity(self) -> tuple[int, float | None, int]:
        return (id(self.cache), self.ttl, id(self.key))

    def __eq__(self, other: object) -> bool:
        # Equal when they would cache the same way, so instrument() with a fresh cached(...) is idempotent.
        return isinstance(other, _CachedDecorator) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        return f"cached({self.cache!r}, ttl={self.ttl!r}, key={self.key!r})"


def cached(
    cache: BaseCache, ttl: float | None = None, key: Callable[..., Hashable] | None = None
) -> Callable[[F], F]:
    """Memoise a function or method in ``cache`` for ``ttl`` seconds (None: the cache's default).

    Concurrent callers (threads or coroutines) of one key run the function once. The default key is the
    qualified name plus the arguments, with the instance (or class) included for methods, as
    ``functools.lru_cache`` does; ``key`` is called with the function's own arguments instead.
    """
    from kotoba_memory.cache_manager import BaseCache as KotobaBaseCache

    if not isinstance(cache, KotobaBaseCache):
        # e.g. a Django or cachelib cache: their get_or_set has another signature and no stampede guard
        raise TypeError(
            f"cached() needs a kotoba-memory cache (CacheManager, TieredCache...), got {type(cache).__name__}"
        )
    ttl = check_ttl(ttl, "ttl")
    if key is not None and not callable(key):
        raise TypeError(f"cached(): key must be callable, got {type(key).__name__}")
    return _CachedDecorator(cache, ttl, key)
