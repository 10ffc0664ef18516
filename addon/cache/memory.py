"""In-process caches and rate windows: the embedded default, and the fallback when Redis is down."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cachetools import TTLCache

from ..config import Config
from ..model import Consumer, Listing
from ..ratelimit import US, LimitVerdict, Window, check
from .base import MISS, _Miss
from .breaker import MemoryBreakers
from .idempotency import MemoryIdempotency

SESSION_TTL = 24 * 3600


class MemoryCache(MemoryBreakers, MemoryIdempotency):
    def __init__(self, config: Config, clock=time.time) -> None:
        self._clock = clock
        self._consumers: TTLCache[str, Consumer] = TTLCache(100_000, config.key_cache_ttl_seconds, timer=clock)
        self._listings: TTLCache[str, Listing] = TTLCache(10_000, config.mcp_cache_ttl_seconds, timer=clock)
        self._unknown: TTLCache[str, bool] = TTLCache(100_000, config.negative_cache_ttl_seconds, timer=clock)
        # One TAT per window of a bucket (GCRA, see addon.ratelimit). A TAT is at most one window
        # ahead of the clock, so a bucket idle for a day is back to full and can be forgotten.
        self._tats: TTLCache[str, tuple[tuple[int, int], ...]] = TTLCache(200_000, 86_400, timer=clock)
        # (listing id, session id) -> its owner: upstreams pick session ids, so two listings' may coincide.
        self._sessions: TTLCache[tuple[int, str], str] = TTLCache(100_000, SESSION_TTL, timer=clock)

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
        now = round(self._clock() * US)
        stored = dict(self._tats.get(bucket, ()))  # window length -> TAT
        v, tats = check(now, [stored.get(w.seconds, 0) for w in windows], windows)
        if v.allowed:  # a refused call changes no TAT
            self._tats[bucket] = tuple((w.seconds, tat) for w, tat in zip(windows, tats, strict=True))
        return v

    async def bind_session(self, listing_id: int, session_id: str, principal: str) -> None:
        self._sessions[listing_id, session_id] = principal

    async def session_owner(self, listing_id: int, session_id: str) -> str | None:
        return self._sessions.get((listing_id, session_id))

    async def health(self) -> dict[str, object]:
        return {"cache": "memory", "ok": True}

    async def close(self) -> None:
        pass
