"""Allocators: ``AllocatorType``, in-process allocators taking a ``Layout``, process-level malloc control."""

from __future__ import annotations

from kotoba_memory.allocators.types import AllocatorType

__all__ = ["AllocatorType"]
