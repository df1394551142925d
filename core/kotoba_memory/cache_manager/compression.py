"""Compression codecs for cache values (zlib from the stdlib, zstd via ``zstandard``) and ratio tracking.

A :class:`Compressor` decides per value whether compression pays: values under ``min_bytes`` and values
whose compressed form is not smaller are kept raw, so a stored blob is never larger than its input.
"""

from __future__ import annotations

import threading
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from kotoba_memory.cache_manager.types import CacheError
from kotoba_memory.validation import check_int, check_non_negative_int

__all__ = [
    "Codec",
    "CompressionError",
    "CompressionStats",
    "Compressor",
    "ZlibCodec",
    "ZstdCodec",
    "available_codecs",
    "get_codec",
]


class CompressionError(CacheError, ValueError):
    """A codec is unknown or unavailable, or a blob cannot be decompressed."""


class Codec(ABC):
    """One compression algorithm: ``compress``/``decompress`` of bytes, safe to share between threads."""

    name: ClassVar[str]

    @abstractmethod
    def compress(self, data: bytes) -> bytes:
        """Return ``data`` compressed."""

    @abstractmethod
    def decompress(self, data: bytes) -> bytes:
        """Return the original bytes of a blob made by :meth:`compress`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ZlibCodec(Codec):
    """DEFLATE from the standard library: always available, moderate speed and ratio."""

    name = "zlib"

    def __init__(self, level: int = 6) -> None:
        self.level = check_int(level, "zlib level", low=-1, high=9)

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data, self.level)

    def decompress(self, data: bytes) -> bytes:
        try:
            return zlib.decompress(data)
        except zlib.error as exc:
            raise CompressionError(f"zlib blob is corrupt: {exc}") from exc


class ZstdCodec(Codec):
    """Zstandard via the ``zstandard`` package: faster and usually smaller than zlib."""

    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        try:
            import zstandard
        except ImportError as exc:
            raise CompressionError(
                "compression='zstd' needs the zstandard package: pip install 'kotoba-memory[compression]'"
            ) from exc
        self.level = check_int(level, "zstd level", low=1, high=22)
        self._zstd: Any = zstandard
        # zstandard's (de)compressor objects must not be used by two threads at once: one per thread.
        self._local = threading.local()

    def _pair(self) -> tuple[Any, Any]:
        pair: tuple[Any, Any] | None = getattr(self._local, "pair", None)
        if pair is None:
            pair = (
                self._zstd.ZstdCompressor(level=self.level),
                self._zstd.ZstdDecompressor(),
            )
            self._local.pair = pair
        return pair

    def compress(self, data: bytes) -> bytes:
        result: bytes = self._pair()[0].compress(data)
        return result

    def decompress(self, data: bytes) -> bytes:
        try:
            result: bytes = self._pair()[1].decompress(data)
        except self._zstd.ZstdError as exc:
            raise CompressionError(f"zstd blob is corrupt: {exc}") from exc
        return result


_CODECS: dict[str, type[Codec]] = {"zlib": ZlibCodec, "zstd": ZstdCodec}


def available_codecs() -> list[str]:
    """Names of the codecs usable in this environment (zstd only when ``zstandard`` is installed)."""
    names = ["zlib"]
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return names
    names.append("zstd")
    return names


def get_codec(codec: str | Codec | None) -> Codec | None:
    """Resolve ``None``, a codec name (``"zlib"``, ``"zstd"``) or a :class:`Codec` instance."""
    if codec is None or isinstance(codec, Codec):
        return codec
    if not isinstance(codec, str):
        raise TypeError(f"compression must be None, a codec name or a Codec, got {type(codec).__name__}")
    cls = _CODECS.get(codec.lower())
    if cls is None:
        raise CompressionError(f"unknown compression {codec!r}; choose one of {sorted(_CODECS)}")
    return cls()


@dataclass(frozen=True)
class CompressionStats:
    """Totals of what went through a :class:`Compressor`.

    ``ratio`` is bytes in / bytes out over the values that were offered for compression (values kept raw
    because compression did not pay count with ratio 1), or ``None`` when nothing was offered yet.
    """

    codec: str | None
    values_compressed: int
    values_stored_raw: int
    bytes_in: int
    bytes_out: int

    @property
    def ratio(self) -> float | None:
        return self.bytes_in / self.bytes_out if self.bytes_out else None


class Compressor:
    """Compress blobs of at least ``min_bytes`` with ``codec`` when that makes them smaller; count ratios."""

    def __init__(self, codec: str | Codec | None, min_bytes: int = 1024) -> None:
        check_non_negative_int(min_bytes, "compress_min_bytes")
        self.codec = get_codec(codec)
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._compressed = 0
        self._raw = 0
        self._bytes_in = 0
        self._bytes_out = 0

    def pack(self, data: bytes) -> tuple[bytes, str | None]:
        """Return ``(blob, codec_name)``; ``codec_name`` is None when the blob is ``data`` itself."""
        if self.codec is None or len(data) < self.min_bytes:
            return data, None
        packed = self.codec.compress(data)
        if len(packed) >= len(data):
            with self._lock:
                self._raw += 1
                self._bytes_in += len(data)
                self._bytes_out += len(data)
            return data, None
        with self._lock:
            self._compressed += 1
            self._bytes_in += len(data)
            self._bytes_out += len(packed)
        return packed, self.codec.name

    def unpack(self, blob: bytes, codec_name: str | None) -> bytes:
        """Return the original bytes of a blob made by :meth:`pack` (by any compressor of that codec)."""
        if codec_name is None:
            return blob
        if self.codec is not None and self.codec.name == codec_name:
            return self.codec.decompress(blob)
        # The blob was written under another configuration (e.g. the store was reopened with zlib).
        codec = get_codec(codec_name)
        assert codec is not None
        return codec.decompress(blob)

    def stats(self) -> CompressionStats:
        """A snapshot of the counters."""
        with self._lock:
            return CompressionStats(
                codec=self.codec.name if self.codec else None,
                values_compressed=self._compressed,
                values_stored_raw=self._raw,
                bytes_in=self._bytes_in,
                bytes_out=self._bytes_out,
            )
