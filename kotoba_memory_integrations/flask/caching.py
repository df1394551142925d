"""Flask-Caching backend: ``CACHE_TYPE = "kotoba_memory_integrations.flask.KotobaCache"``.

The cachelib ``KotobaCache`` (pickled values in a byte-bounded, policy-driven kotoba-memory cache) with
Flask-Caching's ``factory``: ``CACHE_THRESHOLD`` bounds the entries, ``CACHE_DEFAULT_TIMEOUT`` is the
default (``0`` = never expire), and ``CACHE_OPTIONS`` may add ``max_bytes``, ``policy``, ``key_prefix``
or ``cache`` (an existing kotoba-memory cache to share). ``CACHE_REDIS_URL = "redis://..."`` makes it a
near-cache shared by every worker, its values signed with the app's ``SECRET_KEY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask_caching.backends.base import BaseCache as FlaskCachingBaseCache

from kotoba_memory_integrations.cachelib import KotobaCache as CachelibKotobaCache

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["KotobaCache"]


class KotobaCache(FlaskCachingBaseCache, CachelibKotobaCache):
    """Flask-Caching backend storing pickled values in a kotoba-memory ``CacheManager``."""

    report_label = "Flask-Caching KotobaCache"

    def __init__(
        self,
        threshold: int = 500,
        default_timeout: int = 300,
        ignore_delete_many_errors: bool = False,
        **options: Any,
    ) -> None:
        CachelibKotobaCache.__init__(
            self,
            threshold=threshold,
            default_timeout=default_timeout,
            ignore_delete_many_errors=ignore_delete_many_errors,
            **options,
        )

    @classmethod
    def factory(
        cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
    ) -> KotobaCache:
        """Build the backend from the app's ``CACHE_*`` config (called by ``flask_caching.Cache``)."""
        kwargs.setdefault("threshold", config.get("CACHE_THRESHOLD", 500))
        if config.get("CACHE_REDIS_URL") and "cache" not in kwargs:
            kwargs.setdefault("redis_url", config["CACHE_REDIS_URL"])
        if "redis_url" in kwargs:
            kwargs.setdefault("secret", app.config.get("SECRET_KEY"))
        if "cache" not in kwargs:  # a store built here is named after the app in reports and metrics
            kwargs.setdefault("name", f"flask-caching:{app.name}")
        return cls(*args, **kwargs)
