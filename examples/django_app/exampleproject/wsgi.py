"""WSGI entry point; wrapped in kotoba-memory's WSGI middleware so the whole request is measured."""

import os

from django.core.wsgi import get_wsgi_application

from kotoba_memory_integrations.django.middleware import wrap_wsgi

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleproject.settings")
application = wrap_wsgi(get_wsgi_application())
