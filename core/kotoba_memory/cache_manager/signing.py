"""Authenticated values for the shared tiers (Redis, disk): an HMAC-SHA256 tag over key and payload.

Anyone who can write to the shared store but does not hold the secret can at most make a value fail
the check (a miss); a value is only unpickled after its tag matched. The tag covers the key the value
was written under, so a valid value cannot be replayed under another key.
"""

from __future__ import annotations

import hashlib
import hmac

from kotoba_memory.errors import ConfigError

__all__ = ["SIGNED_OVERHEAD", "Signer"]

_MAGIC = b"\x00KS1"
_TAG = 32
#: Bytes a signed value carries beyond its payload.
SIGNED_OVERHEAD = len(_MAGIC) + _TAG


class Signer:
    """Signs and checks payloads with a key derived from ``secret`` for one ``purpose``."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes, purpose: str, *, field: str = "secret") -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, bytes) or not secret:
            raise ConfigError(field, "must be a non-empty str or bytes (the key that signs shared values)")
        # A derived key: the application's own secret (Django's SECRET_KEY) is never used as is.
        self._key = hashlib.sha256(b"kotoba-memory:" + purpose.encode("utf-8") + b":" + secret).digest()

    def _tag(self, context: bytes, body: bytes) -> bytes:
        mac = hmac.new(self._key, len(context).to_bytes(4, "big"), hashlib.sha256)
        mac.update(context)
        mac.update(body)
        return mac.digest()

    def sign(self, context: bytes, body: bytes) -> bytes:
        """``body`` with a header proving it was written for ``context`` by a holder of the secret."""
        return _MAGIC + self._tag(context, body) + body

    def verify(self, context: bytes, data: bytes) -> bytes | None:
        """The body of a value signed for ``context``; None when it is not one (forged, moved, damaged)."""
        if len(data) < SIGNED_OVERHEAD or not data.startswith(_MAGIC):
            return None
        body = data[SIGNED_OVERHEAD:]
        if not hmac.compare_digest(data[len(_MAGIC) : SIGNED_OVERHEAD], self._tag(context, body)):
            return None
        return body
