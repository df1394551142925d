"""Deprecated location of :mod:`kotoba_memory_integrations.request`; kept so existing imports work."""

from kotoba_memory_integrations.request import *  # noqa: F403
from kotoba_memory_integrations.request import __all__  # noqa: F401
