"""ADAPTIVE policy (interim: plain LRU until the W-TinyLFU implementation lands in the next commit)."""

from __future__ import annotations

from kotoba_memory.cache_manager.policies import LruPolicy, register_policy
from kotoba_memory.cache_manager.types import CachePolicy

__all__ = ["AdaptivePolicy"]


class AdaptivePolicy(LruPolicy):
    """Interim stand-in with LRU behaviour."""

    kind = CachePolicy.ADAPTIVE


register_policy(CachePolicy.ADAPTIVE, AdaptivePolicy)
