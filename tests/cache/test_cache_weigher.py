"""The default weigher: exact for flat types, within a stated margin of pympler's asizeof otherwise."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest
from pympler.asizeof import asizeof

from kotoba_memory.cache_manager import CachedValue, CacheMetadata, default_weigher, estimate_size


@dataclass
class User:
    id: int
    name: str
    email: str
    tags: list[str] = field(default_factory=list)


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self) -> None:
        self.a = "x" * 100
        self.b = list(range(50))


def typical_values() -> dict[str, object]:
    row = {"id": 12345, "name": "Ada Lovelace", "email": "ada@example.org", "score": 97.5, "active": True}
    return {
        "json row": row,
        "json page": {"results": [dict(row, id=i, name=f"user {i}") for i in range(50)], "count": 50},
        "list of ints": list(range(10_000, 12_000)),
        "list of str": [f"item-{i:05d}" for i in range(3000)],
        "nested lists": [[i, str(i), float(i)] for i in range(500)],
        "tuple row": (1, "two", 3.0, None, b"five"),
        "set": {f"k{i}" for i in range(400)},
        "dataclass": User(1, "Grace", "grace@example.org", ["admin", "ops"]),
        "dataclasses": [User(i, f"u{i}", f"u{i}@x.org", ["t"]) for i in range(200)],
        "slotted": Slotted(),
        "html": "<html>" + "<p>hello</p>" * 500 + "</html>",
    }


@pytest.mark.parametrize("value", [b"", b"x" * 1000, "", "héllo" * 100, "日本語" * 50, 10**30, 3.5, None])
def test_flat_values_are_exact(value: object) -> None:
    assert default_weigher(value) == sys.getsizeof(value)


def test_cached_value_weighs_its_metadata_size() -> None:
    cv = CachedValue(b"abc", CacheMetadata("application/json", 1234))
    assert default_weigher(cv) == 1234


@pytest.mark.parametrize("name", list(typical_values()))
def test_estimate_is_close_to_pympler(name: str) -> None:
    value = typical_values()[name]
    ours, reference = default_weigher(value), asizeof(value)
    # The estimate samples big containers: within 25% of pympler on typical values.
    assert abs(ours - reference) <= 0.25 * reference, (name, ours, reference)


def test_estimate_work_is_bounded_on_huge_values() -> None:
    huge = [{"k": i, "v": [i] * 10} for i in range(200_000)]
    est = estimate_size(huge)
    # sampled, so approximate, but in the right range (each item is well over 100 bytes)
    assert 200_000 * 100 < est < 200_000 * 2000


def test_shared_objects_count_once_and_cycles_terminate() -> None:
    shared = "s" * 10_000
    pair = [shared, shared]
    assert estimate_size(pair) < 2 * sys.getsizeof(shared)
    cyc: list[object] = []
    cyc.append(cyc)
    assert estimate_size(cyc) == sys.getsizeof(cyc)
