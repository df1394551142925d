"""Compression codecs and the Compressor's keep-raw-when-it-does-not-pay rule."""

from __future__ import annotations

import builtins
import json
import os
import threading

import pytest

from kotoba_memory.cache_manager.compression import (
    Codec,
    CompressionError,
    Compressor,
    ZlibCodec,
    ZstdCodec,
    available_codecs,
    get_codec,
)


def _json_payload(n: int) -> bytes:
    rows = [
        {"id": i, "name": f"user-{i}", "email": f"user{i}@example.com", "active": i % 3 == 0}
        for i in range(n)
    ]
    return json.dumps(rows).encode()


@pytest.mark.parametrize("name", ["zlib", "zstd"])
def test_codec_round_trips_and_shrinks_text(name: str) -> None:
    codec = get_codec(name)
    assert codec is not None and codec.name == name
    data = _json_payload(200)
    packed = codec.compress(data)
    assert len(packed) < len(data) / 3
    assert codec.decompress(packed) == data


@pytest.mark.parametrize("name", ["zlib", "zstd"])
def test_corrupt_blob_raises_compression_error(name: str) -> None:
    codec = get_codec(name)
    assert codec is not None
    with pytest.raises(CompressionError):
        codec.decompress(b"\x00not a compressed blob at all")


def test_get_codec_resolves_names_instances_and_none() -> None:
    zlib_codec = ZlibCodec(level=1)
    assert get_codec(zlib_codec) is zlib_codec
    assert get_codec(None) is None
    assert isinstance(get_codec("ZLIB"), ZlibCodec)
    assert "zlib" in available_codecs()


def test_bad_codec_arguments_are_named() -> None:
    with pytest.raises(CompressionError, match="lz4"):
        get_codec("lz4")
    with pytest.raises(TypeError, match="int"):
        get_codec(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zlib level"):
        ZlibCodec(level=42)
    with pytest.raises(ValueError, match="zstd level"):
        ZstdCodec(level=0)
    with pytest.raises(ValueError, match="compress_min_bytes"):
        Compressor("zlib", min_bytes=-1)


def test_missing_zstandard_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_zstandard(name: str, *args: object, **kwargs: object) -> object:
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    with pytest.raises(CompressionError, match=r"kotoba-memory\[compression\]"):
        get_codec("zstd")
    assert available_codecs() == ["zlib"]


def test_compressor_keeps_small_and_incompressible_values_raw() -> None:
    compressor = Compressor("zstd", min_bytes=64)
    small = b"a" * 10
    assert compressor.pack(small) == (small, None)
    noise = os.urandom(4096)
    blob, codec = compressor.pack(noise)
    assert codec is None and blob == noise
    text = _json_payload(100)
    blob, codec = compressor.pack(text)
    assert codec == "zstd" and len(blob) < len(text)
    assert compressor.unpack(blob, codec) == text
    stats = compressor.stats()
    assert stats.values_compressed == 1
    assert stats.values_stored_raw == 1
    assert stats.bytes_in == len(noise) + len(text)
    assert stats.bytes_out == len(noise) + len(blob)
    assert stats.ratio == pytest.approx((len(noise) + len(text)) / (len(noise) + len(blob)))


def test_compressor_reads_blobs_of_another_codec() -> None:
    data = _json_payload(50)
    blob, codec = Compressor("zlib", min_bytes=0).pack(data)
    assert codec == "zlib"
    assert Compressor("zstd").unpack(blob, codec) == data
    assert Compressor(None).unpack(blob, codec) == data


def test_compressor_without_codec_is_a_pass_through() -> None:
    compressor = Compressor(None)
    data = _json_payload(50)
    assert compressor.pack(data) == (data, None)
    assert compressor.stats().ratio is None


def test_zstd_codec_is_safe_across_threads() -> None:
    codec: Codec = ZstdCodec()
    payloads = [_json_payload(20 + i) for i in range(8)]
    errors: list[BaseException] = []

    def work(data: bytes) -> None:
        try:
            for _ in range(50):
                assert codec.decompress(codec.compress(data)) == data
        except BaseException as exc:  # pragma: no cover - only on failure
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
