"""A Flask shop under gunicorn: seven bounded-but-churning routes and, with FIELD_LEAKS=1, two leaks.

Leaks: ``/orders/<n>`` appends every order to a module-level list; ``/subscribe/<n>`` registers a
listener per request and never removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from benchmarks.field_apps import churn
from benchmarks.field_apps._profiling import LEAKS_ON, config
from kotoba_memory_integrations.flask import KotobaMemory

_ORDERS: list[dict[str, Any]] = []
_LISTENERS: list[Callable[[str], int]] = []


def create_app() -> Flask:
    """The app, with kotoba-memory attached through the Flask extension."""
    app = Flask("flask_shop")
    cfg = config()
    app.config.update(
        KOTOBA_MEMORY_ENABLE_CACHING=cfg.enable_caching,
        KOTOBA_MEMORY_ENABLE_PROFILING=cfg.enable_profiling,
        KOTOBA_MEMORY_ENABLE_LEAK_DETECTION=cfg.enable_leak_detection,
        KOTOBA_MEMORY_MONITORING_INTERVAL_MS=cfg.monitoring_interval_ms,
        KOTOBA_MEMORY_LEAK_WINDOW_S=cfg.leak_window_s,
        KOTOBA_MEMORY_LEAK_WINDOW_INTERVAL_S=cfg.leak_window_interval_s,
        KOTOBA_MEMORY_LEAK_TRACE_BUDGET=cfg.leak_trace_budget,
    )

    @app.get("/")
    def index() -> ResponseReturnValue:
        return jsonify(status="ok")

    @app.get("/products/<int:sku>")
    def products(sku: int) -> ResponseReturnValue:
        return jsonify(churn.product(sku))

    @app.get("/recent")
    def recent() -> ResponseReturnValue:
        return jsonify(churn.remember("/recent"))

    @app.get("/session/<sid>")
    def session(sid: str) -> ResponseReturnValue:
        return jsonify(churn.session(sid))

    @app.get("/render/<int:n>")
    def render(n: int) -> ResponseReturnValue:
        return jsonify(churn.render(n))

    @app.get("/audit/<int:user>")
    def audit(user: int) -> ResponseReturnValue:
        return jsonify(churn.audit(user))

    @app.get("/query/<int:n>")
    def query(n: int) -> ResponseReturnValue:
        return jsonify(churn.query(n))

    @app.get("/report/<int:n>")
    def report(n: int) -> ResponseReturnValue:
        return jsonify(churn.report(n))

    @app.get("/orders/<int:n>")
    def orders(n: int) -> ResponseReturnValue:
        order = {"id": n, "lines": [f"line {i} of order {n}" for i in range(8)]}
        if LEAKS_ON:
            _ORDERS.append(order)
        return jsonify(count=len(_ORDERS))

    @app.get("/subscribe/<int:n>")
    def subscribe(n: int) -> ResponseReturnValue:
        def listener(event: str, payload: str = f"subscriber {n} " * 16) -> int:
            return len(event) + len(payload)

        if LEAKS_ON:
            _LISTENERS.append(listener)
        return jsonify(listeners=len(_LISTENERS))

    KotobaMemory(app)
    return app
