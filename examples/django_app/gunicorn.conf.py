"""gunicorn settings for the Django example: ``gunicorn -c gunicorn.conf.py exampleproject.wsgi``."""

import os

from kotoba_memory_integrations.runtime import post_fork, pre_fork  # noqa: F401  (gunicorn server hooks)

bind = os.environ.get("KOTOBA_EXAMPLE_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("KOTOBA_EXAMPLE_WORKERS", "1"))
threads = int(os.environ.get("KOTOBA_EXAMPLE_THREADS", "4"))
graceful_timeout = 10
loglevel = os.environ.get("KOTOBA_EXAMPLE_LOGLEVEL", "warning")
