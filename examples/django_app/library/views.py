"""Views of the Django example: ORM + cache backend, a streaming view, the leak and metrics.

The memory report is kotoba-memory's packaged view (see ``exampleproject/urls.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)

from library.models import Book

# Module level on purpose: what /leak/ appends here is never freed (the leak the report must find).
_LEAKED: list[bytes] = []


def index(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok", "leak_enabled": settings.EXAMPLE_LEAK})


def books(request: HttpRequest) -> JsonResponse:
    rows = cache.get_or_set(
        "books:first50",
        lambda: list(Book.objects.order_by("id").values("id", "title", "year")[:50]),
        timeout=30,
    )
    return JsonResponse(rows, safe=False)


def book(request: HttpRequest, book_id: int) -> JsonResponse:
    key = f"book:{book_id}"
    data = cache.get(key)
    if data is None:
        row = Book.objects.select_related("author").filter(id=book_id).first()
        if row is None:
            raise Http404("no such book")
        data = {"id": row.id, "title": row.title, "year": row.year, "author": row.author.name}
        cache.set(key, data, timeout=30)
    return JsonResponse(data)


async def abook(request: HttpRequest, book_id: int) -> JsonResponse:
    data = await cache.aget(f"book:{book_id}")
    if data is None:
        row = await Book.objects.select_related("author").filter(id=book_id).afirst()
        if row is None:
            raise Http404("no such book")
        data = {"id": row.id, "title": row.title, "year": row.year, "author": row.author.name}
        await cache.aset(f"book:{book_id}", data, timeout=30)
    return JsonResponse(data)


def stats(request: HttpRequest) -> JsonResponse:
    def compute() -> dict[str, int]:
        rows = Book.objects.values("author__name").annotate(n=Count("id")).order_by("author__name")
        return {row["author__name"]: row["n"] for row in rows}

    return JsonResponse(cache.get_or_set("stats:per-author", compute, timeout=10))


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def rows() -> Iterator[str]:
        for b in Book.objects.order_by("id").values_list("id", "title").iterator(chunk_size=50):
            yield f"{b[0]},{b[1]}\n"

    return StreamingHttpResponse(rows(), content_type="text/csv")


def leak(request: HttpRequest) -> JsonResponse:
    if not settings.EXAMPLE_LEAK:
        raise Http404("the leak is off (KOTOBA_EXAMPLE_LEAK=1 turns it on)")
    _LEAKED.append(os.urandom(32) * 256)  # 8 KiB per request, kept forever
    return JsonResponse({"leaked_chunks": len(_LEAKED)})


def metrics(request: HttpRequest) -> HttpResponse:
    """OpenTelemetry metrics in Prometheus format (the exporter is set up in LibraryConfig.ready)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
