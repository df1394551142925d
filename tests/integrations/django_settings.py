"""Django settings shared by every Django test under tests/integrations.

``tests/integrations/conftest.py`` puts this directory on ``sys.path`` and points
``DJANGO_SETTINGS_MODULE`` at this module, so all Django tests run against one configuration instead
of racing over ``settings.configure()``. Add what your tests need here (keep it side-effect free);
per-test variations belong in ``django.test.override_settings``.
"""

from __future__ import annotations

SECRET_KEY = "kotoba-memory-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
]

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}

MIDDLEWARE: list[str] = []

# This module doubles as the default URLconf (empty); tests install their own views with
# override_settings(ROOT_URLCONF=<object with a urlpatterns attribute>).
ROOT_URLCONF = __name__
urlpatterns: list[object] = []

CACHES = {
    "default": {
        "BACKEND": "kotoba_memory_integrations.django.KotobaCache",
        "LOCATION": "kotoba-tests-default",
    },
    # Same LOCATION as "default": Django aliases that share a LOCATION share the data.
    "default_alias": {
        "BACKEND": "kotoba_memory_integrations.django.KotobaCache",
        "LOCATION": "kotoba-tests-default",
    },
    "other": {
        "BACKEND": "kotoba_memory_integrations.django.KotobaCache",
        "LOCATION": "kotoba-tests-other",
    },
}

SESSION_ENGINE = "django.contrib.sessions.backends.cache"
SESSION_CACHE_ALIAS = "default"
