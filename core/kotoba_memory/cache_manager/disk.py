"""A persistent, byte-bounded cache in one SQLite file (stdlib ``sqlite3``, WAL journal).

Every write is one SQLite transaction, so a process killed mid-write leaves either the old row or the
new one, never half a value; each value also carries a CRC32 checked on read, and a row that fails it
(or no longer unpickles) is dropped and counted as a miss. A file with structural damage (SQLite's
"malformed" or "not a database") is moved aside as ``<name>.corrupt-<UTC time>-<pid>`` and replaced
by an empty one (``stats().quarantined``): the cache loses its contents, never its availability.
Values are pickled, optionally compressed. Eviction is least-recently-accessed once the stored bytes
exceed ``max_bytes``; expiry is by a stored wall-clock deadline, so it survives restarts.
Several processes may share one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import sqlite3
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

from kotoba_memory.cache_manager.base import BaseCache
from kotoba_memory.cache_manager.compression import Codec, CompressionStats, Compressor
from kotoba_memory.cache_manager.latency import LatencyWindow
from kotoba_memory.cache_manager.signing import Signer
from kotoba_memory.cache_manager.types import (
    CachedValue,
    CacheError,
    CacheStats,
    UnhashableKeyError,
    check_ttl,
)
from kotoba_memory.process import forks
from kotoba_memory.validation import check_non_negative, check_positive_int

__all__ = ["DiskCache", "DiskCacheError", "DiskCacheStats", "DiskFullError", "DiskHit"]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
_DEFAULT_FILENAME = "kotoba-cache.sqlite3"
_BATCH = 256  # rows per eviction/purge statement: keeps each write transaction short
_MAX_BATCHES = 10_000  # bound on one eviction/purge loop, whatever the table holds
_PURGE_EVERY = 64  # puts between two bounded purges of expired rows
_IN_CHUNK = 500  # keys per "IN (...)" query, well under SQLite's bound on bound parameters
_TOUCH_BATCH = 128  # hits whose access time is buffered before one UPDATE transaction writes them

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kotoba_cache (
    key BLOB PRIMARY KEY,
    vid INTEGER NOT NULL,
    codec TEXT,
    checksum INTEGER NOT NULL,
    size INTEGER NOT NULL,
    raw_size INTEGER NOT NULL,
    expires_at REAL,
    accessed_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kotoba_cache_values (
    vid INTEGER PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS kotoba_cache_accessed ON kotoba_cache (accessed_at);
CREATE INDEX IF NOT EXISTS kotoba_cache_expires ON kotoba_cache (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS kotoba_cache_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO kotoba_cache_totals VALUES (0, 0, 0, 0);
CREATE TRIGGER IF NOT EXISTS kotoba_cache_insert AFTER INSERT ON kotoba_cache BEGIN
    UPDATE kotoba_cache_totals SET entries = entries + 1, bytes = bytes + NEW.size,
        raw_bytes = raw_bytes + NEW.raw_size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kotoba_cache_delete AFTER DELETE ON kotoba_cache BEGIN
    UPDATE kotoba_cache_totals SET entries = entries - 1, bytes = bytes - OLD.size,
        raw_bytes = raw_bytes - OLD.raw_size WHERE id = 0;
    DELETE FROM kotoba_cache_values WHERE vid = OLD.vid;
END;
CREATE TRIGGER IF NOT EXISTS kotoba_cache_resize AFTER UPDATE OF size, raw_size ON kotoba_cache BEGIN
    UPDATE kotoba_cache_totals SET bytes = bytes - OLD.size + NEW.size,
        raw_bytes = raw_bytes - OLD.raw_size + NEW.raw_size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kotoba_cache_revalue AFTER UPDATE OF vid ON kotoba_cache
    WHEN OLD.vid != NEW.vid BEGIN
    DELETE FROM kotoba_cache_values WHERE vid = OLD.vid;
END;
"""

_DAMAGE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})  # structural damage to the file
_IDENTITY_CHECK_EVERY = 1.0  # seconds between checks that the file at ``path`` is still the one we opened


class DiskCacheError(CacheError, OSError):
    """The cache file cannot be used: a newer format, a closed cache, a lock held too long, a full disk."""


class DiskFullError(DiskCacheError):
    """A write failed because the file system is full; reads still work, writes work again with space."""


class DiskHit(NamedTuple):
    """A value read from disk with its remaining time to live (None: no expiry) and stored size."""

    value: Any
    ttl_remaining: float | None
    stored_bytes: int


@dataclass(frozen=True, kw_only=True)
class DiskCacheStats(CacheStats):
    """:class:`CacheStats` plus what only a disk store has: compression and corruption counters.

    ``bytes`` counts stored (possibly compressed) payload bytes; ``raw_bytes`` the same values
    uncompressed. ``compression_ratio`` is raw/stored over every entry now in the file.
    """

    raw_bytes: int = 0
    compression_ratio: float | None = None
    compression: CompressionStats | None = None
    corrupt: int = 0
    refused: int = 0
    quarantined: int = 0
    disk_full: int = 0
    path: str = ""


_open_caches: weakref.WeakSet[DiskCache] = weakref.WeakSet()
# The caches whose lock the forking thread took in ``_quiesce_before_fork``, by thread id.
_held_for_fork: dict[int, list[DiskCache]] = {}
_FORK_GRACE = 5.0  # seconds a fork waits for a cache call in flight, beyond the cache's busy timeout


def _quiesce_before_fork() -> None:
    """In the parent before fork: wait for every cache call in flight and close each SQLite handle."""
    held = [cache for cache in list(_open_caches) if cache._quiesce_for_fork()]
    _held_for_fork[threading.get_ident()] = held


def _resume_in_parent() -> None:
    """In the parent after fork: let cache calls run again (each reopens its connection on first use)."""
    for cache in _held_for_fork.pop(threading.get_ident(), []):
        cache._lock.release()


def _reset_locks_after_fork() -> None:
    # A thread of the parent may have held a lock at fork time; in the child it would never be released.
    _held_for_fork.clear()
    for cache in list(_open_caches):
        cache._lock = threading.RLock()
        cache._touched.clear()  # the parent's buffered access times are the parent's to write


forks.register(
    _reset_locks_after_fork,
    before=_quiesce_before_fork,
    after_in_parent=_resume_in_parent,
    name="cache_manager.disk",
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _is_damage(exc: BaseException) -> bool:
    """True for SQLite's "malformed" and "not a database" errors: the file itself is broken."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in _DAMAGE


def _is_full(exc: BaseException) -> bool:
    """True for SQLite's "database or disk is full" (the file system has no space left)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does on a full disk, for one)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the error being raised is the one that matters
            conn.execute("ROLLBACK")


def _translate_errors(
    method: Callable[Concatenate[DiskCache, _P], _R],
) -> Callable[Concatenate[DiskCache, _P], _R]:
    """Turn SQLite failures (a lock held too long, a full disk, an I/O error) into DiskCacheError.

    A damaged file is quarantined and the call runs once more on a fresh, empty one.
    """

    @functools.wraps(method)
    def wrapper(self: DiskCache, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if not _is_damage(exc):
                raise self._error(exc) from exc
            self._quarantine(exc)
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    return wrapper


def _encode_key(key: Hashable) -> bytes:
    """A stable byte form of ``key``; the common key types get a readable, pickle-free encoding."""
    kind = type(key)
    if kind is str:
        return b"s" + key.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
    if kind is bytes:
        return b"b" + key  # type: ignore[operator]
    if kind is int:
        return b"i" + str(key).encode("ascii")
    try:
        hash(key)
    except TypeError:
        raise UnhashableKeyError(key) from None
    try:
        return b"p" + pickle.dumps(key, protocol=4)
    except Exception as exc:
        raise TypeError(f"DiskCache keys must be picklable, got {kind.__name__}: {exc}") from exc


class _Refused(Exception):
    """A stored value whose signature does not match: never unpickled."""


def _sign_context(encoded: bytes, codec: str | None) -> bytes:
    return encoded + b"\x00" + (codec or "").encode("ascii")


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # pickle raises PicklingError, TypeError, AttributeError, ...
        raise TypeError(
            f"DiskCache values must be picklable; a {type(value).__qualname__} is not: {exc}"
        ) from exc


class DiskCache(BaseCache):
    """A byte-bounded cache of pickled values in a SQLite file that survives restarts and crashes.

    ``path`` is the database file, or a directory to hold ``kotoba-cache.sqlite3``. ``max_bytes``
    bounds the stored payload (keys + possibly compressed values; SQLite adds its own page overhead).
    ``compression`` (``None``, ``"zlib"``, ``"zstd"`` or a :class:`Codec`) applies to pickled values
    of at least ``compress_min_bytes`` and only when it makes them smaller. With ``secret`` every value
    is signed (HMAC-SHA256 over key and payload); a value that fails the check is refused (counted in
    ``stats().refused``) and never unpickled. The file (and its directory, when created) is private to
    the user.
    """

    shared_storage = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        *,
        default_ttl: float | None = None,
        compression: str | Codec | None = None,
        compress_min_bytes: int = 1024,
        name: str | None = None,
        timeout: float = 30.0,
        secret: str | bytes | None = None,
    ) -> None:
        check_positive_int(max_bytes, "max_bytes")
        check_non_negative(timeout, "timeout")
        self.default_ttl = check_ttl(default_ttl, "default_ttl")
        self.max_bytes = max_bytes
        self._compressor = Compressor(compression, compress_min_bytes)
        self._signer = None if secret is None else Signer(secret, "disk-cache")
        target = Path(path)
        if target.is_dir():
            target = target / _DEFAULT_FILENAME
        self.path = target
        self._timeout = timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._inherited: sqlite3.Connection | None = None
        self._pid = -1
        self._closed = False
        self._last_access = 0.0
        self._puts_since_purge = 0
        self._touched: dict[bytes, float] = {}
        self._hits = self._misses = self._puts = self._deletes = 0
        self._evictions = self._expirations = self._rejections = self._corrupt = 0
        self._quarantined = self._disk_full = self._refused = 0
        self._full_since: float | None = None  # wall time of the first write refused for a full disk
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file our connection opened
        self._next_identity_check = 0.0
        self._hit_ns, self._miss_ns = LatencyWindow(), LatencyWindow()
        super().__init__(name or f"disk:{target.name}")
        _open_caches.add(self)  # before the first connection: a fork must not catch it half-open
        try:
            self._shrink_to_budget()
        except DiskCacheError:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            raise

    @_translate_errors
    def _shrink_to_budget(self) -> None:
        """Reopened with a smaller budget than the file holds: shrink it now, not at the next put."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._evict_over_budget(conn, keep=b"", now=time.time())
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    # -- connection -------------------------------------------------------------------------------

    def _quiesce_for_fork(self) -> bool:
        """Take the lock (no call of ours mid-flight) and close our handle; False if the lock never came.

        SQLite keeps per-process lock bookkeeping for each open file: a handle that crosses a fork (even
        an idle one) makes the child's new connection believe it holds locks it does not, and one caught
        inside a write leaves the child's copy of the write lock held for good ("database is locked").
        """
        if not self._lock.acquire(timeout=self._timeout + _FORK_GRACE):
            log.warning(
                "%s: a cache call outlasted the wait before fork; the child may find it locked", self.name
            )
            return False
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.warning("%s: could not close the connection before fork: %s", self.name, exc)
        elif conn is not None:  # inherited from our own parent: neither used nor closed here
            self._inherited = conn
        return True

    def _connection(self) -> sqlite3.Connection:
        """The shared connection, reopened after a fork (a SQLite handle must not cross one)."""
        if self._closed:
            raise DiskCacheError(f"{self.name} is closed")
        if self._conn is not None:
            if self._pid == os.getpid():
                if time.monotonic() < self._next_identity_check or not self._file_replaced():
                    return self._conn
                # Another process quarantined the file (or it was removed): use the one now at path.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
            else:
                # Forked: the parent's handle must be neither used nor closed here (closing could disturb
                # the parent's WAL state); keep it referenced so garbage collection does not close it.
                self._inherited = self._conn
                self._conn = None
                self._touched.clear()
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise DiskCacheError(f"{self.path} is not a usable disk cache: {exc}") from exc
            self._quarantine(exc)
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            raise DiskCacheError(f"{self.path} is not a usable disk cache: {exc}") from exc

    def _file_replaced(self) -> bool:
        """Whether the file at ``path`` is no longer the one our connection opened (checked once a second)."""
        self._next_identity_check = time.monotonic() + _IDENTITY_CHECK_EVERY
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._file_id

    def _open(self) -> sqlite3.Connection:
        """Open ``path`` (creating the schema); a damaged file raises sqlite3.DatabaseError."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:  # created private to the user; SQLite gives its -wal/-shm files the same mode
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise DiskCacheError(f"cannot open disk cache at {self.path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL never corrupts the file; only a power loss may drop the last commits.
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise DiskCacheError(
                    f"{self.path} holds disk cache format {version}, this version reads {_SCHEMA_VERSION}"
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_script(_SCHEMA):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            st = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._pid = os.getpid()
        self._file_id = (st.st_dev, st.st_ino)
        self._next_identity_check = time.monotonic() + _IDENTITY_CHECK_EVERY
        return conn

    def _error(self, exc: sqlite3.Error) -> DiskCacheError:
        """The DiskCacheError for a SQLite failure; a full disk is counted and said once per episode."""
        message = f"{self.name} ({self.path}): {exc}"
        if not _is_full(exc):
            return DiskCacheError(message)
        with self._lock:
            self._disk_full += 1
            first = self._full_since is None
            if first:
                self._full_since = time.time()
        if first:
            log.warning(
                "%s: the disk holding %s is full; writes fail until space returns", self.name, self.path
            )
        return DiskFullError(message)

    def _wrote(self) -> None:
        """A write committed: if the disk was full, space is back (said once)."""
        if self._full_since is not None:
            self._full_since = None
            log.warning("%s: %s is writable again", self.name, self.path)

    def _quarantine(self, exc: BaseException) -> None:
        """Move a damaged file (and its WAL and shared-memory files) aside, so the next open starts afresh.

        A file another process already replaced is left alone: we only drop our connection to the old one.
        """
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
            self._conn = None
            self._touched.clear()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
            with _directory_lock(self.path.parent):
                try:
                    st = os.stat(self.path)
                except OSError:
                    return
                if self._file_id is not None and (st.st_dev, st.st_ino) != self._file_id:
                    return  # already quarantined and replaced by another process
                # The WAL goes too: its frames must never be replayed into the fresh file.
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            self._file_id = None
            self._quarantined += 1
        log.warning(
            "%s: %s is damaged (%s); moved it to %s and started an empty cache",
            self.name,
            self.path,
            exc,
            aside,
        )

    def _flush_touched(self, conn: sqlite3.Connection, *, transaction: bool) -> None:
        """Write the buffered access times (inside the caller's transaction unless ``transaction``)."""
        if not self._touched:
            return
        rows = [(when, key) for key, when in self._touched.items()]
        self._touched.clear()
        if not transaction:
            conn.executemany("UPDATE kotoba_cache SET accessed_at = ? WHERE key = ?", rows)
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("UPDATE kotoba_cache SET accessed_at = ? WHERE key = ?", rows)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    @_translate_errors
    def flush(self) -> None:
        """Write buffered access times now (done on close, before evicting, and every 128 hits)."""
        with self._lock:
            self._flush_touched(self._connection(), transaction=True)

    def close(self) -> None:
        """Close the database connection; later operations raise :class:`DiskCacheError`."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                try:
                    self._flush_touched(self._conn, transaction=True)
                except sqlite3.Error as exc:  # closing must not fail over lost recency information
                    log.warning("%s: could not write access times on close: %s", self.name, exc)
                self._conn.close()
            self._conn = None
            self._closed = True

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _now(self) -> float:
        """Wall-clock time (deadlines must survive restarts), strictly increasing within this process."""
        now = time.time()
        if now <= self._last_access:
            now = self._last_access + 1e-6
        self._last_access = now
        return now

    # -- reads ------------------------------------------------------------------------------------

    def _touches_lost(self, exc: sqlite3.OperationalError) -> None:
        """Buffered access times could not be written: only recency is lost (a full disk is said once)."""
        if _is_full(exc):
            self._error(exc)
        else:
            log.warning("%s: access times not written: %s", self.name, exc)

    def _drop_while_reading(self, conn: sqlite3.Connection, encoded: bytes) -> int:
        """Delete a row a read found expired or corrupt; 0 when a full disk refuses (it stays unserved)."""
        try:
            conn.execute("DELETE FROM kotoba_cache WHERE key = ?", (encoded,))
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise
            self._error(exc)  # counted and said once; the read still answers
            return 0
        return 1

    @_translate_errors
    def _fetch(self, key: Hashable, *, remove: bool) -> tuple[bool, Any, float | None, int]:
        """Look ``key`` up: ``(found, value, ttl_remaining, stored_bytes)``; counts hits and misses."""
        started = time.perf_counter_ns()
        encoded = _encode_key(key)
        with self._lock:
            conn = self._connection()
            row = conn.execute(
                "SELECT v.value, c.codec, c.checksum, c.size, c.expires_at FROM kotoba_cache c"
                " JOIN kotoba_cache_values v ON v.vid = c.vid WHERE c.key = ?",
                (encoded,),
            ).fetchone()
            if row is not None:
                blob, codec, checksum, size, expires_at = row
                now = self._now()
                if expires_at is not None and expires_at <= now:
                    self._expirations += self._drop_while_reading(conn, encoded)
                    row = None
                elif zlib.crc32(blob) != checksum:
                    self._drop_while_reading(conn, encoded)
                    self._corrupt += 1
                    log.warning("%s: dropped a value whose checksum does not match", self.name)
                    row = None
                elif remove:
                    conn.execute("DELETE FROM kotoba_cache WHERE key = ?", (encoded,))
                else:
                    # Access times are written in batches: one small transaction per hit would cost
                    # more than the read itself. A crash only loses recency, never a value.
                    self._touched[encoded] = now
                    if len(self._touched) >= _TOUCH_BATCH:
                        try:
                            self._flush_touched(conn, transaction=True)
                        except sqlite3.OperationalError as exc:  # e.g. another process holds the lock
                            self._touches_lost(exc)
            if row is None:
                self._misses += 1
                self._miss_ns.add(started)
                return False, None, None, 0
        try:
            value = self._load(encoded, blob, codec)
        except Exception as exc:  # a class that moved since it was stored, a codec now missing, ...
            with self._lock:
                if not remove:
                    self._connection().execute(
                        "DELETE FROM kotoba_cache WHERE key = ? AND checksum = ?", (encoded, checksum)
                    )
                self._count_unloadable(exc)
                self._misses += 1
                self._miss_ns.add(started)
            log.warning("%s: dropped a value that no longer loads: %r", self.name, exc)
            return False, None, None, 0
        remaining = None if expires_at is None else max(expires_at - time.time(), 1e-3)
        with self._lock:
            self._hits += 1
            self._hit_ns.add(started)
        return True, value, remaining, size

    def _count_unloadable(self, exc: Exception) -> None:
        """Count a dropped value (caller holds the lock): refused (bad signature) or corrupt."""
        if isinstance(exc, _Refused):
            self._refused += 1
        else:
            self._corrupt += 1

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when absent, expired or unreadable."""
        found, value, _, _ = self._fetch(key, remove=False)
        return value if found else default

    def lookup(self, key: Hashable, *, remove: bool = False) -> DiskHit | None:
        """Like :meth:`get` but also give the remaining ttl; ``remove=True`` takes the entry out."""
        found, value, remaining, size = self._fetch(key, remove=remove)
        return DiskHit(value, remaining, size) if found else None

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The hits among ``keys``, read with one SELECT per 500 keys (same checks as :meth:`get`)."""
        return {key: hit.value for key, hit in self.lookup_many(keys).items()}

    @_translate_errors
    def lookup_many(self, keys: Iterable[Hashable], *, remove: bool = False) -> dict[Hashable, DiskHit]:
        """:meth:`lookup` for many keys at once: ``{key: DiskHit}`` of the hits; ``remove`` takes them out."""
        wanted = [(key, _encode_key(key)) for key in keys]
        result: dict[Hashable, DiskHit] = {}
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            unique = list(dict.fromkeys(encoded for _, encoded in chunk))
            with self._lock:
                conn = self._connection()
                rows = conn.execute(
                    "SELECT c.key, v.value, c.codec, c.checksum, c.size, c.expires_at FROM kotoba_cache c"
                    " JOIN kotoba_cache_values v ON v.vid = c.vid"
                    f" WHERE c.key IN ({','.join('?' * len(unique))})",
                    unique,
                ).fetchall()
                now = self._now()
                usable: dict[bytes, tuple[bytes, str | None, int, int, float | None]] = {}
                for encoded, blob, codec, checksum, size, expires_at in rows:
                    if expires_at is not None and expires_at <= now:
                        self._expirations += self._drop_while_reading(conn, encoded)
                    elif zlib.crc32(blob) != checksum:
                        self._drop_while_reading(conn, encoded)
                        self._corrupt += 1
                        log.warning("%s: dropped a value whose checksum does not match", self.name)
                    else:
                        usable[encoded] = (blob, codec, checksum, size, expires_at)
                if remove and usable:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        conn.executemany("DELETE FROM kotoba_cache WHERE key = ?", [(e,) for e in usable])
                        conn.execute("COMMIT")
                    except BaseException:
                        _rollback(conn)
                        raise
                elif usable:
                    self._touched.update(dict.fromkeys(usable, now))
                    if len(self._touched) >= _TOUCH_BATCH:
                        try:
                            self._flush_touched(conn, transaction=True)
                        except sqlite3.OperationalError as exc:
                            self._touches_lost(exc)
            decoded: dict[bytes, DiskHit] = {}
            wall = time.time()
            for encoded, (blob, codec, checksum, size, expires_at) in usable.items():
                try:
                    value = self._load(encoded, blob, codec)
                except Exception as exc:
                    log.warning("%s: dropped a value that no longer loads: %r", self.name, exc)
                    with self._lock:
                        if not remove:
                            self._connection().execute(
                                "DELETE FROM kotoba_cache WHERE key = ? AND checksum = ?", (encoded, checksum)
                            )
                        self._count_unloadable(exc)
                    continue
                remaining = None if expires_at is None else max(expires_at - wall, 1e-3)
                decoded[encoded] = DiskHit(value, remaining, size)
            hits = 0
            for key, encoded in chunk:
                if encoded in decoded:
                    result[key] = decoded[encoded]
                    hits += 1
            with self._lock:
                self._hits += hits
                self._misses += len(chunk) - hits
        return result

    @_translate_errors
    def __contains__(self, key: object) -> bool:
        encoded = _encode_key(key)
        with self._lock:
            row = self._connection().execute(
                "SELECT expires_at FROM kotoba_cache WHERE key = ?", (encoded,)
            ).fetchone()
        return row is not None and (row[0] is None or row[0] > time.time())

    @_translate_errors
    def ttl_remaining(self, key: Hashable) -> float | None:
        """Seconds until ``key`` expires; None when it never expires. KeyError when it is absent."""
        encoded = _encode_key(key)
        with self._lock:
            row = self._connection().execute(
                "SELECT expires_at FROM kotoba_cache WHERE key = ?", (encoded,)
            ).fetchone()
        now = time.time()
        if row is None or (row[0] is not None and row[0] <= now):
            raise KeyError(key)
        return None if row[0] is None else row[0] - now

    def ttl(self, key: Hashable) -> float | None:
        """Alias of :meth:`ttl_remaining` (the name this method had before it joined ``BaseCache``)."""
        return self.ttl_remaining(key)

    # -- writes -----------------------------------------------------------------------------------

    def _resolve_ttl(self, value: Any, ttl: float | None) -> float | None:
        ttl = check_ttl(ttl)
        if ttl is None and isinstance(value, CachedValue):
            ttl = value.ttl
        return self.default_ttl if ttl is None else ttl

    def _encode_value(self, value: Any, encoded: bytes) -> tuple[bytes, str | None, int]:
        raw = _dumps(value)
        blob, codec = self._compressor.pack(raw)
        if self._signer is not None:
            blob = self._signer.sign(_sign_context(encoded, codec), blob)
        return blob, codec, len(raw)

    def _load(self, encoded: bytes, blob: bytes, codec: str | None) -> Any:
        """Unpickle a stored value; with a ``secret``, only after its signature matched."""
        if self._signer is not None:
            body = self._signer.verify(_sign_context(encoded, codec), blob)
            if body is None:
                raise _Refused("a value not signed with this cache's secret")
            blob = body
        return pickle.loads(self._compressor.unpack(blob, codec))

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key``; False (and the key left absent) when it exceeds ``max_bytes``.

        Raises TypeError for an unhashable key or an unpicklable value, leaving what was stored intact.
        """
        encoded = _encode_key(key)
        seconds = self._resolve_ttl(value, ttl)
        blob, codec, raw_size = self._encode_value(value, encoded)
        return self._store(encoded, blob, codec, raw_size, seconds, only_if_absent=False)

    def add(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` holds no live entry (atomic, also across processes)."""
        encoded = _encode_key(key)
        seconds = self._resolve_ttl(value, ttl)
        blob, codec, raw_size = self._encode_value(value, encoded)
        return self._store(encoded, blob, codec, raw_size, seconds, only_if_absent=True)

    def put_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping``; all are encoded before the first is written."""
        encoded = []
        for key, value in mapping.items():
            key_bytes = _encode_key(key)
            encoded.append((key_bytes, self._resolve_ttl(value, ttl), *self._encode_value(value, key_bytes)))
        for key_bytes, seconds, blob, codec, raw_size in encoded:
            self._store(key_bytes, blob, codec, raw_size, seconds, only_if_absent=False)

    @_translate_errors
    def _store(
        self,
        encoded: bytes,
        blob: bytes,
        codec: str | None,
        raw_size: int,
        ttl: float | None,
        *,
        only_if_absent: bool,
    ) -> bool:
        size = len(encoded) + len(blob)
        raw_size += len(encoded)
        checksum = zlib.crc32(blob)
        with self._lock:
            conn = self._connection()
            now = self._now()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if only_if_absent:
                    row = conn.execute(
                        "SELECT expires_at FROM kotoba_cache WHERE key = ?", (encoded,)
                    ).fetchone()
                    if row is not None and (row[0] is None or row[0] > now):
                        conn.execute("COMMIT")
                        return False
                if size > self.max_bytes:
                    # A value the whole cache cannot hold: the key must not keep serving an older one.
                    conn.execute("DELETE FROM kotoba_cache WHERE key = ?", (encoded,))
                    conn.execute("COMMIT")
                    self._rejections += 1
                    return False
                # Values live in their own table so that bumping accessed_at on a hit rewrites a small
                # metadata row, not the value's overflow pages.
                vid = conn.execute("INSERT INTO kotoba_cache_values (value) VALUES (?)", (blob,)).lastrowid
                conn.execute(
                    "INSERT INTO kotoba_cache (key, vid, codec, checksum, size, raw_size, expires_at,"
                    " accessed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                    " vid = excluded.vid, codec = excluded.codec, checksum = excluded.checksum,"
                    " size = excluded.size, raw_size = excluded.raw_size,"
                    " expires_at = excluded.expires_at, accessed_at = excluded.accessed_at",
                    (encoded, vid, codec, checksum, size, raw_size, None if ttl is None else now + ttl, now),
                )
                self._touched.pop(encoded, None)
                self._flush_touched(conn, transaction=False)
                self._evict_over_budget(conn, keep=encoded, now=now)
                self._puts_since_purge += 1
                if self._puts_since_purge >= _PURGE_EVERY:
                    self._puts_since_purge = 0
                    self._expirations += self._purge(conn, now, max_batches=1)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self._puts += 1
            self._wrote()
        return True

    def _evict_over_budget(self, conn: sqlite3.Connection, *, keep: bytes, now: float) -> None:
        total = conn.execute("SELECT bytes FROM kotoba_cache_totals WHERE id = 0").fetchone()[0]
        if total <= self.max_bytes:
            return
        # Expired rows are the cheapest to lose; then the least recently accessed.
        self._expirations += self._purge(conn, now, max_batches=_MAX_BATCHES)
        total = conn.execute("SELECT bytes FROM kotoba_cache_totals WHERE id = 0").fetchone()[0]
        for _ in range(_MAX_BATCHES):
            if total <= self.max_bytes:
                return
            rows = conn.execute(
                "SELECT key, size FROM kotoba_cache WHERE key != ? ORDER BY accessed_at LIMIT ?",
                (keep, _BATCH),
            ).fetchall()
            if not rows:
                return
            victims = []
            for victim, size in rows:
                victims.append(victim)
                total -= size
                if total <= self.max_bytes:
                    break
            conn.execute(
                f"DELETE FROM kotoba_cache WHERE key IN ({','.join('?' * len(victims))})", victims
            )
            self._evictions += len(victims)

    def _purge(self, conn: sqlite3.Connection, now: float, *, max_batches: int) -> int:
        purged = 0
        for _ in range(max_batches):
            cursor = conn.execute(
                "DELETE FROM kotoba_cache WHERE key IN (SELECT key FROM kotoba_cache"
                " WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
                (now, _BATCH),
            )
            purged += cursor.rowcount
            if cursor.rowcount < _BATCH:
                break
        return purged

    @_translate_errors
    def purge_expired(self) -> int:
        """Delete every expired row now (in bounded batches); return how many went."""
        with self._lock:
            conn = self._connection()
            total = 0
            for _ in range(_MAX_BATCHES):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    purged = self._purge(conn, time.time(), max_batches=1)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
                total += purged
                if purged < _BATCH:
                    break
            self._expirations += total
            return total

    @_translate_errors
    def touch(self, key: Hashable, ttl: float | None = None) -> bool:
        """Give a live entry a new ttl (None: the default ttl, or no expiry); False when absent."""
        encoded = _encode_key(key)
        seconds = check_ttl(ttl)
        if seconds is None:
            seconds = self.default_ttl
        with self._lock:
            now = self._now()
            cursor = self._connection().execute(
                "UPDATE kotoba_cache SET expires_at = ?, accessed_at = ?"
                " WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (None if seconds is None else now + seconds, now, encoded, now),
            )
            return cursor.rowcount > 0

    @_translate_errors
    def delete(self, key: Hashable) -> bool:
        """Remove ``key``; True when a live entry was there."""
        encoded = _encode_key(key)
        with self._lock:
            now = time.time()
            row = self._connection().execute(
                "DELETE FROM kotoba_cache WHERE key = ? RETURNING expires_at", (encoded,)
            ).fetchone()
            live = row is not None and (row[0] is None or row[0] > now)
            if live:
                self._deletes += 1
            self._wrote()
            return live

    @_translate_errors
    def clear(self) -> None:
        """Remove every entry (of every process sharing the file)."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM kotoba_cache")
                conn.execute("DELETE FROM kotoba_cache_values")
                conn.execute("UPDATE kotoba_cache_totals SET entries = 0, bytes = 0, raw_bytes = 0")
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self._wrote()

    @_translate_errors
    def __len__(self) -> int:
        try:
            self.purge_expired()
        except DiskFullError:  # expired rows cannot be deleted now: count the live ones instead
            with self._lock:
                row = self._connection().execute(
                    "SELECT count(*) FROM kotoba_cache WHERE expires_at IS NULL OR expires_at > ?",
                    (time.time(),),
                ).fetchone()
            return int(row[0])
        with self._lock:
            row = self._connection().execute(
                "SELECT entries FROM kotoba_cache_totals WHERE id = 0"
            ).fetchone()
        return int(row[0])

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- introspection ----------------------------------------------------------------------------

    @_translate_errors
    def stats(self) -> DiskCacheStats:
        """Counters of this process plus the file's current size (shared by every process using it)."""
        with self._lock:
            entries, stored, raw = self._connection().execute(
                "SELECT entries, bytes, raw_bytes FROM kotoba_cache_totals WHERE id = 0"
            ).fetchone()
            hits, misses = self._hits, self._misses
            lookups = hits + misses
            return DiskCacheStats(
                hits=hits,
                misses=misses,
                hit_rate=hits / lookups if lookups else 0.0,
                evictions=self._evictions,
                expirations=self._expirations,
                rejections=self._rejections,
                puts=self._puts,
                deletes=self._deletes,
                bytes=stored,
                entries=entries,
                max_bytes=self.max_bytes,
                max_entries=None,
                metadata_bytes=sys.getsizeof(self._touched),  # RAM bookkeeping: buffered access times
                hit_latency_ns=self._hit_ns.median(),
                miss_latency_ns=self._miss_ns.median(),
                raw_bytes=raw,
                compression_ratio=raw / stored if stored else None,
                compression=self._compressor.stats(),
                corrupt=self._corrupt,
                refused=self._refused,
                quarantined=self._quarantined,
                disk_full=self._disk_full,
                path=str(self.path),
                name=self.name,
                policy="lru",
            )

    # -- async twins beyond BaseCache's (whose twins already run in a worker thread) ----------------

    async def apurge_expired(self) -> int:
        return await asyncio.to_thread(self.purge_expired)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        return f"DiskCache({str(self.path)!r}, max_bytes={self.max_bytes}, name={self.name!r})"


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory``: processes quarantining one file take turns (POSIX)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks on directories
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _split_script(script: str) -> list[str]:
    """Split the schema into statements (triggers hold inner semicolons, so split on ``END;``)."""
    statements: list[str] = []
    buffer = ""
    for part in script.split(";"):
        buffer += part + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n;"):
                statements.append(buffer.strip())
            buffer = ""
    return statements
