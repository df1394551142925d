"""Django integration: the ``KotobaCache`` cache backend (plus app config, middleware and checks)."""

from kotoba_memory_integrations.django.cache import KotobaCache

__all__ = ["KotobaCache"]
