"""Flask integration: the ``KotobaMemory`` extension (and ``KotobaCache``, the Flask-Caching backend).

::

    from kotoba_memory_integrations.flask import KotobaMemory
    memory = KotobaMemory(app)            # or KotobaMemory() ... memory.init_app(app)

``init_app`` reads ``KOTOBA_MEMORY_*`` keys from ``app.config`` (keyword overrides given to the
constructor win, lower-case without the prefix), starts the process's memory optimizer, wraps
``app.wsgi_app`` in the WSGI middleware and labels each request with ``request.url_rule.rule`` (read
when the response starts: no ``before_request`` function, which costs microseconds per request).
Keys: every :class:`~kotoba_memory.config.MemoryConfig` field (``KOTOBA_MEMORY_CACHE_SIZE_MB`` ...),
plus ``KOTOBA_MEMORY_ENABLED`` (True), ``KOTOBA_MEMORY_AUTOSTART`` (True), ``KOTOBA_MEMORY_OTEL``
(False), ``KOTOBA_MEMORY_REPORT_ENDPOINT`` (None: off), ``KOTOBA_MEMORY_REPORT_TOKEN`` and
``KOTOBA_MEMORY_REPORT_AUTH`` (a ``callable(request) -> bool``), ``KOTOBA_MEMORY_RSS_SAMPLE_EVERY`` (1:
measure memory on every request; N: on one in N, which cuts the per-request cost on busy servers),
``KOTOBA_MEMORY_FLEET`` (True: every worker of the server writes its snapshot to a per-host spool named
after the app and the report lists them all; a str names the spool; False: off).
A key whose prefix looks like a misspelling of ``KOTOBA_MEMORY_`` raises ``ConfigError`` like an unknown key.

The report endpoint is off by default. When on it needs a token (``Authorization: Bearer <token>``,
compared in constant time) or an auth callable: 401 without credentials, 403 with wrong ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import hmac
import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, abort, current_app, got_request_exception, request

from kotoba_memory.errors import ConfigError
from kotoba_memory.validation import check_bool, check_positive, check_positive_int
from kotoba_memory_integrations.request import (
    DEFAULT_RSS_SAMPLE_BUDGET,
    DEFAULT_RSS_SAMPLE_EVERY,
    ENVIRON_KEY,
    RequestMeasurement,
)
from kotoba_memory_integrations.wsgi import MemoryMiddleware

if TYPE_CHECKING:
    from kotoba_memory_integrations.flask.caching import KotobaCache

__all__ = ["EXTENSION_KEY", "KotobaCache", "KotobaMemory"]

EXTENSION_KEY = "kotoba_memory"
_PREFIX = "KOTOBA_MEMORY_"
_OWN_KEYS: dict[str, Any] = {
    "enabled": True,
    "autostart": True,
    "otel": False,
    "report_endpoint": None,
    "report_token": None,
    "report_auth": None,
    "rss_sample_every": DEFAULT_RSS_SAMPLE_EVERY,
    "rss_sample_budget": DEFAULT_RSS_SAMPLE_BUDGET,
    "fleet": True,
}
_BOOL_KEYS = ("enabled", "autostart", "otel")


def __getattr__(name: str) -> Any:
    # KotobaCache lives in .caching and pulls in Flask-Caching; import it only when asked for.
    if name == "KotobaCache":
        from kotoba_memory_integrations.flask.caching import KotobaCache

        return KotobaCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _misspelt_prefix(key: object) -> bool:
    """True for a config key whose prefix looks like a misspelling of ``KOTOBA_MEMORY_`` (e.g. MEMROY)."""
    if not isinstance(key, str) or not key.upper().startswith("KOTOBA") or key.startswith(_PREFIX):
        return False
    head = key.upper()[: len(_PREFIX)]
    return difflib.SequenceMatcher(None, head, _PREFIX).ratio() >= 0.8


def _config_fields() -> set[str]:
    from kotoba_memory.config import MemoryConfig

    return {field.name for field in dataclasses.fields(MemoryConfig)}


class _State:
    """What ``init_app`` set up for one app (kept in ``app.extensions["kotoba_memory"]``)."""

    def __init__(self, options: dict[str, Any], memory_config: Any, optimizer: Any) -> None:
        self.options = options
        self.memory_config = memory_config
        self.optimizer = optimizer


def _is_reloader_parent() -> bool:
    """True in the process ``flask run --debug`` (or ``--reload``) keeps only to watch files: it loads the
    app too, but the serving child (``WERKZEUG_RUN_MAIN=true``) is the one to optimize."""
    if os.environ.get("WERKZEUG_RUN_MAIN") == "true":
        return False
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.info_name != "run" or "reload" not in ctx.params:
        return False  # not the flask CLI's run command (app.run() or a WSGI server)
    reload = ctx.params["reload"]
    if reload is None:  # flask run's default: reload when debugging
        from flask.helpers import get_debug_flag

        reload = get_debug_flag()
    return bool(reload)


class KotobaMemory:
    """Attach kotoba-memory to a Flask app (see the module docstring for the config keys)."""

    def __init__(self, app: Flask | None = None, **overrides: Any) -> None:
        self.overrides = overrides
        if app is not None:
            self.init_app(app)

    def _settings(self, app: Flask) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split the app's ``KOTOBA_MEMORY_*`` keys into (extension options, MemoryConfig fields)."""
        fields = _config_fields()
        merged: dict[str, Any] = {}
        for key, value in app.config.items():
            if key.startswith(_PREFIX):
                merged[key[len(_PREFIX) :].lower()] = value
            elif _misspelt_prefix(key):
                raise ConfigError(
                    key, f"not a kotoba-memory setting: misspelt prefix, did you mean {_PREFIX}...?"
                )
        for key, value in self.overrides.items():
            merged[key.lower()] = value
        options = dict(_OWN_KEYS)
        memory: dict[str, Any] = {}
        for key, value in merged.items():
            if key in _OWN_KEYS:
                options[key] = value
            elif key in fields:
                memory[key] = value
            else:
                raise ConfigError(_PREFIX + key.upper(), "unknown kotoba-memory setting")
        for key in _BOOL_KEYS:
            check_bool(options[key], _PREFIX + key.upper())
        check_positive_int(options["rss_sample_every"], _PREFIX + "RSS_SAMPLE_EVERY", high=1_000_000)
        if options["rss_sample_budget"] is not None:
            check_positive(options["rss_sample_budget"], _PREFIX + "RSS_SAMPLE_BUDGET", high=1.0)
        fleet = options["fleet"]
        if not isinstance(fleet, bool | str) or (isinstance(fleet, str) and not fleet.strip()):
            raise ConfigError(_PREFIX + "FLEET", f"must be True, False or a non-empty str, got {fleet!r}")
        endpoint = options["report_endpoint"]
        if endpoint is not None:
            if not isinstance(endpoint, str) or not endpoint.startswith("/"):
                raise ConfigError(
                    _PREFIX + "REPORT_ENDPOINT", f"must be a URL path starting with '/', got {endpoint!r}"
                )
            token, auth = options["report_token"], options["report_auth"]
            if token is not None and (not isinstance(token, str) or len(token) < 16):
                raise ConfigError(_PREFIX + "REPORT_TOKEN", "must be a string of at least 16 characters")
            if token is not None and any(c.isspace() for c in token):
                # A bearer credential has no whitespace: the one presented is stripped, so it never matches.
                raise ConfigError(
                    _PREFIX + "REPORT_TOKEN", "must not contain whitespace (it could never match)"
                )
            if auth is not None and not callable(auth):
                raise ConfigError(_PREFIX + "REPORT_AUTH", "must be a callable(request) -> bool")
            if token is None and auth is None:
                raise ConfigError(
                    _PREFIX + "REPORT_ENDPOINT",
                    "the report endpoint needs KOTOBA_MEMORY_REPORT_TOKEN or KOTOBA_MEMORY_REPORT_AUTH",
                )
        return options, memory

    def init_app(self, app: Flask) -> None:
        """Set up ``app``; raises ConfigError naming the key on bad configuration (nothing installed)."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("KotobaMemory is already initialised on this app")
        options, memory = self._settings(app)
        from kotoba_memory.config import MemoryConfig

        memory_config = MemoryConfig.from_mapping(memory)
        optimizer = None
        if options["enabled"]:
            if options["autostart"] and not _is_reloader_parent():
                from kotoba_memory_integrations.runtime import start_optimizer

                optimizer = start_optimizer(memory_config)
            if options["otel"]:
                from kotoba_memory_integrations import otel

                otel.instrument()
            from kotoba_memory_integrations.runtime import configure_fleet

            fleet = options["fleet"]
            configure_fleet(f"flask:{app.import_name}:{app.root_path}" if fleet is True else fleet)
            app.wsgi_app = MemoryMiddleware(  # type: ignore[method-assign]
                app.wsgi_app, rss_sample_every=options["rss_sample_every"],
                rss_sample_budget=options["rss_sample_budget"], route_of=_url_rule,
            )
            # An exception that propagates never starts a response: label the route while Flask's
            # request is still there (the signal fires on errors only, so it costs nothing otherwise).
            got_request_exception.connect(_label_failed_request, app, weak=False)
        if options["report_endpoint"] is not None:
            app.add_url_rule(
                options["report_endpoint"],
                endpoint="kotoba_memory_report",
                view_func=_report_view,
                methods=["GET"],
            )
        app.extensions[EXTENSION_KEY] = _State(options, memory_config, optimizer)

    @staticmethod
    def optimizer(app: Flask | None = None) -> Any:
        """The optimizer serving ``app`` (default: the current app), or None."""
        from kotoba_memory_integrations.runtime import get_optimizer

        state = (app or current_app).extensions.get(EXTENSION_KEY)
        return get_optimizer() if state is not None else None


def _url_rule(environ: dict[str, Any]) -> str | None:
    # Werkzeug keeps the request object in the environ until Flask pops its context, which happens
    # after the response started; its url_rule is the matched rule (None on a 404).
    req = environ.get("werkzeug.request")
    rule = getattr(req, "url_rule", None)
    return rule.rule if rule is not None else None


def _label_failed_request(sender: Flask, **extra: Any) -> None:
    measurement = request.environ.get(ENVIRON_KEY)
    if isinstance(measurement, RequestMeasurement) and measurement.route is None:
        measurement.route = _url_rule(request.environ)


def _authorized(options: Mapping[str, Any]) -> bool:
    token: str | None = options["report_token"]
    auth: Callable[[Any], bool] | None = options["report_auth"]
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    presented = credentials.strip() if scheme.lower() == "bearer" else ""
    if token is not None and presented and hmac.compare_digest(presented.encode(), token.encode()):
        return True
    if auth is not None and auth(request) is True:
        return True
    if not presented and token is not None:
        challenge = {"WWW-Authenticate": 'Bearer realm="kotoba-memory"'}
        abort(Response("authentication required\n", 401, challenge))
    return False


def _report_view() -> Response:
    state: _State = current_app.extensions[EXTENSION_KEY]
    if not _authorized(state.options):
        abort(403)
    from kotoba_memory_integrations.runtime import current_report

    report = current_report()
    if report is None:
        abort(Response("kotoba-memory optimizer is not running in this process\n", 503))
    fmt = request.args.get("format", "text")
    if fmt == "json":
        return Response(json.dumps(report.to_dict(), default=str), mimetype="application/json")
    if fmt == "html":
        return Response(report.to_html(), mimetype="text/html")
    if fmt != "text":
        abort(Response("format must be one of text, json, html\n", 400))
    return Response(report.summary(), mimetype="text/plain")
