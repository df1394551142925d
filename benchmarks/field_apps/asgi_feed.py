"""A Starlette feed service under uvicorn (several worker processes): eight bounded-but-churning routes
and no leak at all — the suite's leak-free app. Async churn of its own: a TTL cache of feed pages and a
per-request fan-out of tasks; plus the shared churn of :mod:`benchmarks.field_apps.churn`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cachetools
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.field_apps import churn
from benchmarks.field_apps._profiling import config, dump_analysis
from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.asgi import MemoryMiddleware

_pages: cachetools.TTLCache[int, dict[str, Any]] = cachetools.TTLCache(maxsize=500, ttl=1.0)


async def index(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def products(request: Request) -> JSONResponse:
    return JSONResponse(churn.product(request.path_params["sku"]))


async def recent(request: Request) -> JSONResponse:
    return JSONResponse(churn.remember("/recent"))


async def session(request: Request) -> JSONResponse:
    return JSONResponse(churn.session(request.path_params["sid"]))


async def render(request: Request) -> JSONResponse:
    return JSONResponse(churn.render(request.path_params["n"]))


async def feed(request: Request) -> JSONResponse:
    """A feed page cached for a second (entries expire; the key space is huge)."""
    n = request.path_params["n"]
    page = _pages.get(n)
    if page is None:
        page = {"page": n, "items": [f"story {n}-{i}" for i in range(20)]}
        _pages[n] = page
    return JSONResponse({"items": len(page["items"])})


async def _fetch(part: int) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"part": part, "text": f"fragment {part} " * 10}


async def fanout(request: Request) -> JSONResponse:
    """Gather a few concurrent tasks per request (their frames and results are temporaries)."""
    parts = await asyncio.gather(*(_fetch(i) for i in range(request.path_params["n"] % 8 + 1)))
    return JSONResponse({"parts": len(parts)})


async def audit(request: Request) -> JSONResponse:
    return JSONResponse(churn.audit(request.path_params["user"]))


async def report(request: Request) -> JSONResponse:
    return JSONResponse(churn.report(request.path_params["n"]))


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    dump_analysis()  # the worker is shutting down: the runner reads every worker's analysis


def create_app() -> MemoryMiddleware:
    """The app in kotoba-memory's ASGI middleware, with this worker process's optimizer started."""
    runtime.start_optimizer(config())
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/products/{sku:int}", products),
            Route("/recent", recent),
            Route("/session/{sid}", session),
            Route("/render/{n:int}", render),
            Route("/feed/{n:int}", feed),
            Route("/fanout/{n:int}", fanout),
            Route("/audit/{user:int}", audit),
            Route("/report/{n:int}", report),
        ],
        lifespan=_lifespan,
    )
    return MemoryMiddleware(app)
