"""Cache and rate-limit adapters."""

from __future__ import annotations

from ..config import Config
from .base import MISS, Cache


def open_cache(config: Config) -> Cache:
    if config.cache == "redis":
        from .redis import RedisCache

        return RedisCache(config)
    from .memory import MemoryCache

    return MemoryCache(config)


__all__ = ["MISS", "Cache", "open_cache"]
