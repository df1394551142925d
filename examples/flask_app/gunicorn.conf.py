"""gunicorn settings for the Flask example: ``gunicorn -c gunicorn.conf.py 'app:create_app()'``.

One gthread worker keeps the demo's report about one process (the report endpoint answers for the
worker that serves it); raise ``KOTOBA_EXAMPLE_WORKERS`` for real load.
"""

import os

from kotoba_memory_integrations.runtime import post_fork, pre_fork  # noqa: F401  (gunicorn server hooks)

bind = os.environ.get("KOTOBA_EXAMPLE_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("KOTOBA_EXAMPLE_WORKERS", "1"))
threads = int(os.environ.get("KOTOBA_EXAMPLE_THREADS", "4"))
graceful_timeout = 10
accesslog = None
loglevel = os.environ.get("KOTOBA_EXAMPLE_LOGLEVEL", "warning")
