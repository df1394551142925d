"""ASGI entry point (uvicorn); wrapped in kotoba-memory's pure ASGI middleware."""

import os

from django.core.asgi import get_asgi_application

from kotoba_memory_integrations.django.middleware import wrap_asgi

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleproject.settings")
application = wrap_asgi(get_asgi_application())
