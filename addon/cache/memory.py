"""In-process caches and rate windows: the embedded default, and the fallback when Redis is down."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from cachetools import TTLCache

from ..config import Config
from ..model import Consumer, Listing
from ..ratelimit import LimitVerdict, Window, verdict
from .base import MISS, _Miss
from .breaker import MemoryBreakers

SESSION_TTL = 24 * 3600


class MemoryCache(MemoryBreakers):
    def __init__(self, config: Config, clock=time.time) -> None:
        self._clock = clock
        self._consumers: TTLCache[str, Consumer] = TTLCache(100_000, config.key_cache_ttl_seconds, timer=clock)
        self._listings: TTLCache[str, Listing] = TTLCache(10_000, config.mcp_cache_ttl_seconds, timer=clock)
        self._unknown: TTLCache[str, bool] = TTLCache(100_000, config.negative_cache_ttl_seconds, timer=clock)
        # A bucket idle for a day has nothing left in any window.
        self._windows: TTLCache[str, tuple[deque[float], ...]] = TTLCache(200_000, 86_400, timer=clock)
        self._sessions: TTLCache[str, str] = TTLCache(100_000, SESSION_TTL, timer=clock)

    async def get_consumer(self, key_hash: str) -> Consumer | None | _Miss:
        return self._get(self._consumers, "k:" + key_hash, key_hash)

    async def put_consumer(self, key_hash: str, consumer: Consumer | None) -> None:
        self._put(self._consumers, "k:" + key_hash, key_hash, consumer)

    async def get_listing(self, slug: str) -> Listing | None | _Miss:
        return self._get(self._listings, "m:" + slug, slug)

    async def put_listing(self, slug: str, listing: Listing | None) -> None:
        self._put(self._listings, "m:" + slug, slug, listing)

    def _get(self, cache: TTLCache, negative_key: str, key: str):
        if negative_key in self._unknown:
            return None
        return cache.get(key, MISS)

    def _put(self, cache: TTLCache, negative_key: str, key: str, value) -> None:
        if value is None:
            self._unknown[negative_key] = True
        else:
            self._unknown.pop(negative_key, None)  # the last write wins, as in Redis
            cache[key] = value

    async def hit(self, bucket: str, windows: Sequence[Window]) -> LimitVerdict:
        return self.hit_now(bucket, windows)

    def hit_now(self, bucket: str, windows: Sequence[Window]) -> LimitVerdict:
        now = self._clock()
        logs = self._windows.get(bucket)
        if logs is None or len(logs) != len(windows):
            logs = tuple(deque() for _ in windows)
        for log, w in zip(logs, windows, strict=True):
            while log and log[0] <= now - w.seconds:
                log.popleft()
        v = verdict(logs, windows, now)
        if v.allowed:
            for log in logs:
                log.append(now)
        self._windows[bucket] = logs  # re-set so the idle TTL restarts
        return v

    async def bind_session(self, session_id: str, principal: str) -> None:
        self._sessions[session_id] = principal

    async def session_owner(self, session_id: str) -> str | None:
        return self._sessions.get(session_id)

    async def health(self) -> dict[str, object]:
        return {"cache": "memory", "ok": True}

    async def close(self) -> None:
        pass
