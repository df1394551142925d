"""``ObjectPool``: reuse expensive objects (parsers, buffers, clients) instead of rebuilding them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from kotoba_memory.memory_pool.errors import BlockReleasedError, PoolClosedError, PoolExhausted
from kotoba_memory.validation import check_non_negative, check_positive_int

__all__ = ["ObjectPool", "ObjectPoolStats"]

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectPoolStats:
    """Counters of one object pool."""

    created: int
    reused: int  # acquisitions served by an idle object
    discarded: int  # objects dropped because ``reset`` raised
    reset_errors: int
    in_use: int
    idle: int
    max_size: int
    waits: int  # acquisitions that had to wait for a release
    timeouts: int  # acquisitions that gave up with PoolExhausted
    hit_rate: float  # reused / acquisitions


class ObjectPool(Generic[T]):
    """Keeps up to ``max_size`` objects made by ``factory``; ``reset(obj)`` cleans one before reuse.

    ``acquire()`` hands out an idle object, or makes one while fewer than ``max_size`` exist, or waits up to
    ``timeout`` seconds for a release, then raises ``PoolExhausted`` (like SQLAlchemy's ``QueuePool``).
    An object whose ``reset`` raises is discarded (``dispose`` is called on it). Thread-safe.
    """

    def __init__(
        self,
        factory: Callable[[], T],
        reset: Callable[[T], object] | None = None,
        max_size: int = 16,
        *,
        dispose: Callable[[T], object] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {type(factory).__name__}")
        if reset is not None and not callable(reset):
            raise TypeError(f"reset must be callable or None, got {type(reset).__name__}")
        if dispose is not None and not callable(dispose):
            raise TypeError(f"dispose must be callable or None, got {type(dispose).__name__}")
        check_positive_int(max_size, "max_size")
        check_non_negative(timeout, "timeout")  # finite: waiting forever overflows Condition.wait
        self._factory = factory
        self._reset = reset
        self._dispose = dispose
        self.max_size = max_size
        self.timeout = float(timeout)
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[T] = []
        self._out: dict[int, T] = {}  # id -> object checked out (holding it keeps the id unique)
        self._creating = 0
        self._returning = 0  # released objects being reset
        self._closed = False
        self._created = 0
        self._reused = 0
        self._discarded = 0
        self._reset_errors = 0
        self._waits = 0
        self._timeouts = 0

    def acquire(self, timeout: float | None = None) -> T:
        """An object for exclusive use until ``release(obj)``; waits up to ``timeout`` (None: the pool's)."""
        wait = self.timeout if timeout is None else float(check_non_negative(timeout, "timeout"))
        deadline = time.monotonic() + wait
        with self._cond:
            waited = False
            while True:
                if self._closed:
                    raise PoolClosedError("object pool is closed")
                if self._idle:
                    obj = self._idle.pop()
                    self._out[id(obj)] = obj
                    self._reused += 1
                    return obj
                if len(self._out) + self._creating + self._returning < self.max_size:
                    self._creating += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._timeouts += 1
                    raise PoolExhausted(
                        f"all {self.max_size} pooled objects are in use (waited {wait:g}s); "
                        "raise max_size or release objects sooner"
                    )
                if not waited:
                    self._waits += 1
                    waited = True
                self._cond.wait(remaining)
        # The factory may be slow (a connection, a model): run it outside the lock.
        try:
            obj = self._factory()
        except BaseException:
            with self._cond:
                self._creating -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._creating -= 1
            self._created += 1
            self._out[id(obj)] = obj
        return obj

    def release(self, obj: T) -> None:
        """Give ``obj`` back: it is reset and kept for reuse (or discarded if ``reset`` raises)."""
        with self._cond:
            if self._out.get(id(obj)) is not obj:
                raise BlockReleasedError(
                    f"{type(obj).__name__} object was not acquired from this pool or was already released"
                )
            # Claimed here, so a concurrent second release fails; still counted against max_size.
            del self._out[id(obj)]
            self._returning += 1
        keep = True
        if self._reset is not None:
            try:
                self._reset(obj)
            except Exception:
                keep = False
        with self._cond:
            self._returning -= 1
            if not keep:
                self._reset_errors += 1
                self._discarded += 1
            elif self._closed:
                keep = False
            else:
                self._idle.append(obj)
            self._cond.notify()
        if not keep:
            self._dispose_quietly(obj)

    @contextmanager
    def borrow(self, timeout: float | None = None) -> Iterator[T]:
        """``with pool.borrow() as obj:`` acquires an object and releases it on exit."""
        obj = self.acquire(timeout)
        try:
            yield obj
        finally:
            self.release(obj)

    async def aacquire(self, timeout: float | None = None) -> T:
        """Async twin of ``acquire``: idle objects come inline, waiting or creating runs in a thread."""
        with self._cond:
            if self._idle and not self._closed:
                obj = self._idle.pop()
                self._out[id(obj)] = obj
                self._reused += 1
                return obj
        return await asyncio.to_thread(self.acquire, timeout)

    async def arelease(self, obj: T) -> None:
        """Async twin of ``release`` (a user ``reset`` may block, so it runs in a thread)."""
        if self._reset is None:
            self.release(obj)
        else:
            await asyncio.to_thread(self.release, obj)

    def clear(self) -> int:
        """Drop every idle object (calling ``dispose``); returns how many were dropped."""
        with self._cond:
            idle, self._idle = self._idle, []
        for obj in idle:
            self._dispose_quietly(obj)
        return len(idle)

    def close(self) -> None:
        """Drop idle objects; objects still out are disposed when released. Further acquires raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.clear()

    def stats(self) -> ObjectPoolStats:
        """A snapshot of the pool's counters."""
        with self._cond:
            acquisitions = self._created + self._reused
            return ObjectPoolStats(
                created=self._created,
                reused=self._reused,
                discarded=self._discarded,
                reset_errors=self._reset_errors,
                in_use=len(self._out),
                idle=len(self._idle),
                max_size=self.max_size,
                waits=self._waits,
                timeouts=self._timeouts,
                hit_rate=self._reused / acquisitions if acquisitions else 0.0,
            )

    def __len__(self) -> int:
        """Objects that exist now (idle plus in use)."""
        with self._cond:
            return len(self._idle) + len(self._out)

    def __repr__(self) -> str:
        return f"<ObjectPool in_use={len(self._out)} idle={len(self._idle)} max_size={self.max_size}>"

    def _dispose_quietly(self, obj: T) -> None:
        if self._dispose is None:
            return
        try:
            self._dispose(obj)
        except Exception:  # a failing dispose must not break the caller's release
            pass


