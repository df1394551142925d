"""Exceptions raised by kotoba-memory."""

from __future__ import annotations


class KotobaMemoryError(Exception):
    """Base class of every error kotoba-memory raises on purpose."""


class ConfigError(KotobaMemoryError, ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        return type(self), (self.field, self.reason)


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type (also a ``TypeError``, as such errors used to be)."""
