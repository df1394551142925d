"""Type stubs for the request recorder's begin/finish in C (csrc/_crecord.c)."""

from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

class Recorder:
    every: int
    countdown: int
    _log_q: float
    gc_optimizer: Callable[[], Any]
    profiler: Callable[[], Any]
    on_request: Callable[[Any], None] | None
    rss_reader: Any
    def begin(self, method: Any = "GET") -> Any: ...
    def next_gap(self) -> int: ...
    def deliver(self, metrics: Any) -> None: ...

def configure(
    measurement_base: type,
    metrics_type: type[tuple[Any, ...]],
    current: ContextVar[Any],
    flight: list[None],
    events: Iterator[int],
    scheduler: Any,
    globals: dict[str, Any],
    count_error: Callable[[], None],
    random: Callable[[], float],
    unmatched: str,
    known_methods: frozenset[str],
    other_method: str,
    is_tracing: Callable[[], bool],
    get_traced_memory: Callable[[], tuple[int, int]],
    rss_reuse_s: float,
    /,
) -> type: ...

class StartResponse:
    def __init__(
        self,
        measurement: Any,
        start_response: Callable[..., Any],
        route_of: Callable[[dict[str, Any]], str | None] | None,
        environ: dict[str, Any],
        /,
    ) -> None: ...
    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any: ...

class Body:
    def __init__(self, result: Iterable[bytes], measurement: Any, /) -> None: ...
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None: ...

class RouteTable:
    max_routes: int
    def __init__(self, max_routes: int) -> None: ...
    def record(self, route: str, rss_delta: Any, traced_delta: Any, duration_s: Any, /) -> None: ...
    def take_window_counts(self) -> dict[str, int]: ...
    def rows(self) -> list[tuple[str, int, int, int, int, float, int]]: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...

class WSGICall:
    app: Any
    recorder: Any
    route_of: Any
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any], /) -> Any: ...

class RssCore:
    _fd: int | None
    _last: tuple[int, float]
    _peak: int
    _page_size: int
    def rss(self) -> int: ...
    def recent(self, max_age_s: float, /) -> int: ...
