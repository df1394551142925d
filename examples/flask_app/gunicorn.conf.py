"""gunicorn settings for the Flask example: ``gunicorn -c gunicorn.conf.py 'app:create_app()'``.

``on_starting`` creates and seeds the database once in the master, before any worker (or, with
``--preload``, after the app is loaded but before any fork), so any number of workers boot cleanly.
The report endpoint lists every worker (the fleet spool); ``KOTOBA_EXAMPLE_WORKERS`` sets how many.
"""

import os
import sys

from kotoba_memory_integrations.runtime import post_fork, pre_fork  # noqa: F401  (gunicorn server hooks)

bind = os.environ.get("KOTOBA_EXAMPLE_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("KOTOBA_EXAMPLE_WORKERS", "1"))
threads = int(os.environ.get("KOTOBA_EXAMPLE_THREADS", "4"))
graceful_timeout = 10
accesslog = None
loglevel = os.environ.get("KOTOBA_EXAMPLE_LOGLEVEL", "warning")


def on_starting(server: object) -> None:
    """Create the example's schema and seed data once, before the workers start."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from app import init_db

    init_db()
