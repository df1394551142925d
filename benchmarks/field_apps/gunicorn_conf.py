"""gunicorn settings for the field apps: several gthread workers; each dumps its analysis on exit."""

import os

from kotoba_memory_integrations.runtime import post_fork, pre_fork  # noqa: F401  (gunicorn server hooks)

bind = os.environ.get("FIELD_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("FIELD_WORKERS", "2"))
threads = int(os.environ.get("FIELD_THREADS", "4"))
graceful_timeout = 20
accesslog = None
loglevel = "warning"


def worker_exit(server: object, worker: object) -> None:
    """Write the worker's leak analysis before it exits (the runner reads every worker's)."""
    from benchmarks.field_apps._profiling import dump_analysis

    dump_analysis()
