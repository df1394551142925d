"""The pure ASGI middleware on a real Starlette app: routes, streaming, exceptions, lifespan."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2 is not ours to fix
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from kotoba_memory_integrations.asgi import MemoryMiddleware, route_from_scope
from kotoba_memory_integrations.request import UNMATCHED_ROUTE, RequestMetrics, RequestRecorder


class Collected(list[RequestMetrics]):
    def __call__(self, metrics: RequestMetrics) -> None:
        self.append(metrics)


class Boom(RuntimeError):
    pass


async def item(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"item {request.path_params['item_id']}")


async def stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0)
            yield b"part%d;" % i

    return StreamingResponse(body())


async def boom(request: Request) -> PlainTextResponse:
    raise Boom("view failed")


async def broken_stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"start;"
        raise Boom("stream failed")

    return StreamingResponse(body())


def build(collected: Collected, lifespan_events: list[str] | None = None) -> Any:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if lifespan_events is not None:
            lifespan_events.append("startup")
        yield
        if lifespan_events is not None:
            lifespan_events.append("shutdown")

    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/stream", stream),
            Route("/boom", boom),
            Route("/broken-stream", broken_stream),
            Mount("/api", routes=[Route("/v1/items/{item_id}", item)]),
        ],
        lifespan=lifespan,
    )
    recorder = RequestRecorder(on_request=collected, gc_optimizer=lambda: None, profiler=lambda: None)
    return MemoryMiddleware(app, recorder=recorder)


def test_route_template_not_raw_path() -> None:
    collected = Collected()
    with TestClient(build(collected)) as client:
        assert client.get("/items/7").text == "item 7"
        assert client.get("/items/8").text == "item 8"
        assert client.get("/nope/123").status_code == 404
    assert [m.route for m in collected] == ["/items/{item_id}", "/items/{item_id}", UNMATCHED_ROUTE]
    assert [m.status for m in collected] == [200, 200, 404]
    assert all(m.method == "GET" and m.error is None for m in collected)


def test_mounted_route_reports_inner_template() -> None:
    collected = Collected()
    with TestClient(build(collected)) as client:
        assert client.get("/api/v1/items/x").status_code == 200
    assert collected[0].route == "/v1/items/{item_id}"


def test_streaming_response_recorded_after_last_chunk() -> None:
    collected = Collected()
    with TestClient(build(collected)) as client:
        assert client.get("/stream").content == b"part0;part1;part2;"
    [m] = collected
    assert (m.route, m.status, m.error) == ("/stream", 200, None)


def test_exception_is_reraised_and_recorded() -> None:
    collected = Collected()
    with TestClient(build(collected)) as client, pytest.raises(Boom, match="view failed"):
        client.get("/boom")
    [m] = collected
    assert (m.route, m.status, m.error) == ("/boom", 500, "Boom")


def test_exception_mid_stream_is_reraised_and_recorded() -> None:
    collected = Collected()
    with TestClient(build(collected)) as client, pytest.raises(Boom, match="stream failed"):
        client.get("/broken-stream")
    [m] = collected
    assert (m.route, m.status, m.error) == ("/broken-stream", 200, "Boom")


def test_lifespan_and_websocket_pass_through_unmeasured() -> None:
    collected = Collected()
    events: list[str] = []
    with TestClient(build(collected, events)):
        pass
    assert events == ["startup", "shutdown"]
    assert collected == []

    seen: list[str] = []

    async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = MemoryMiddleware(raw_app, on_request=collected)
    asyncio.run(middleware({"type": "websocket"}, None, None))  # type: ignore[arg-type]
    assert seen == ["websocket"] and collected == []


def test_concurrent_requests_in_one_event_loop_and_threads() -> None:
    collected = Collected()
    lock = threading.Lock()

    def record(m: RequestMetrics) -> None:
        with lock:
            collected.append(m)

    async def endpoint(request: Request) -> PlainTextResponse:
        await asyncio.sleep(0.001)
        return PlainTextResponse(request.path_params["n"])

    app = MemoryMiddleware(
        Starlette(routes=[Route("/n/{n}", endpoint)]),
        recorder=RequestRecorder(on_request=record, gc_optimizer=lambda: None, profiler=lambda: None),
    )

    async def drive() -> list[str]:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            responses = await asyncio.gather(*(client.get(f"/n/{i}") for i in range(40)))
        return [r.text for r in responses]

    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(asyncio.run(drive()))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 3 and all(r == [str(i) for i in range(40)] for r in results)
    assert len(collected) == 120
    assert {m.route for m in collected} == {"/n/{n}"}


def test_route_from_scope_variants() -> None:
    assert route_from_scope({}) is None
    assert route_from_scope({"route": Route("/a/{b}", item)}) == "/a/{b}"
    assert route_from_scope({"route": "/plain"}) == "/plain"
