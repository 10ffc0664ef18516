"""Idempotency-Key records in the cache: in-process, or in Redis shared by every gateway.

Kept apart from the caches' other methods: MemoryCache and RedisCache take these as mixins.
One key per (listing, consumer, Idempotency-Key): `idem:{<listing id>:<principal>}:<sha256 of the
key>` (under the prefix), holding one JSON record (addon/idempotency.py): the in-flight claim
(written with SET NX and the claim's TTL, so a crashed gateway's claim frees itself) or the stored
answer (24 h). Finishing and releasing compare the claim exactly (one Lua script each), so a call
whose claim expired and was taken by a retry cannot overwrite or delete the retry's.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Protocol

from cachetools import TTLCache

from ..idempotency import MAX_STORED_BYTES, TTL_SECONDS, Answer, Claim, done_record

log = logging.getLogger("mcpmeter")

MEMORY_BUDGET_BYTES = 64 * MAX_STORED_BYTES  # the in-process records' memory, bodies and bookkeeping included
# What an in-process record costs beside its text, measured with tracemalloc (CPython 3.12): its key
# (prefix, hash tag and a sha256 in hex), the (expiry, record) tuple and float, and the TTLCache's own
# entries (its dicts, its expiry link). Counted with the text's real size (sys.getsizeof: a non-ASCII
# record takes 2 or 4 bytes a character), so that small records, the usual ones, cannot hold two and a
# half times the budget (they did when 200 bytes were counted per record).
ENTRY_BYTES = 640


def record_bytes(entry: tuple[float, str]) -> int:
    """What one in-process record takes in memory, as the budget counts it."""
    return sys.getsizeof(entry[1]) + ENTRY_BYTES

# KEYS[1] the record; ARGV[1] the claim as stored, ARGV[2] the answer's record, ARGV[3] its TTL (ms).
FINISH_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# KEYS[1] the record; ARGV[1] the claim as stored.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class MemoryIdempotency:
    """For MemoryCache: this process's records, bounded in bytes (cachetools TTLCache)."""

    _clock: Any

    def _idem(self) -> TTLCache[str, tuple[float, str]]:
        records = self.__dict__.get("_idem_records")
        if records is None:
            # Each entry carries its own expiry (claims live shorter than answers); the TTLCache's
            # TTL is the longest one, its size the records' length.
            records = self.__dict__["_idem_records"] = TTLCache(
                MEMORY_BUDGET_BYTES, TTL_SECONDS, timer=self._clock, getsizeof=record_bytes)
        return records

    def _idem_get(self, key: str) -> str | None:
        entry = self._idem().get(key)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    async def idem_claim(self, key: str, claim: str, ttl_seconds: float) -> str | None:
        """Claim `key` unless it holds a record: None when claimed, else the record it holds."""
        record = self._idem_get(key)
        if record is not None:
            return record
        self._idem()[key] = (self._clock() + ttl_seconds, claim)
        return None

    async def idem_finish(self, key: str, claim: str, record: str, ttl_seconds: float = TTL_SECONDS) -> bool:
        """Replace our claim by the stored answer; False if the claim is no longer ours."""
        if self._idem_get(key) != claim:
            return False
        entry = (self._clock() + ttl_seconds, record)
        if record_bytes(entry) > MEMORY_BUDGET_BYTES:
            return False
        self._idem()[key] = entry
        return True

    async def idem_release(self, key: str, claim: str) -> bool:
        if self._idem_get(key) != claim:
            return False
        self._idem().pop(key, None)
        return True


class RedisIdempotency:
    """For RedisCache: records shared by every gateway; on Redis failure, the in-process fallback's."""

    _redis: Any
    _prefix: str
    _fallback: Any
    _run: Any

    async def idem_claim(self, key: str, claim: str, ttl_seconds: float) -> str | None:
        name = self._prefix + key

        async def shared() -> str | None:
            for _ in range(3):  # the record can vanish between the SET NX and the GET: claim again
                if await self._redis.set(name, claim, nx=True, px=max(1, int(ttl_seconds * 1000))):
                    return None
                record = await self._redis.get(name)
                if record is not None:
                    return record
            return claim  # contended to the end: seen as in flight (409), the client retries

        return await self._run(shared, lambda: self._fallback.idem_claim(key, claim, ttl_seconds))

    async def idem_finish(self, key: str, claim: str, record: str, ttl_seconds: float = TTL_SECONDS) -> bool:
        async def shared() -> bool:
            done = await self._redis.eval(FINISH_SCRIPT, 1, self._prefix + key, claim, record,
                                          int(ttl_seconds * 1000))
            return bool(done)

        return await self._run(shared, lambda: self._fallback.idem_finish(key, claim, record, ttl_seconds))

    async def idem_release(self, key: str, claim: str) -> bool:
        async def shared() -> bool:
            return bool(await self._redis.eval(RELEASE_SCRIPT, 1, self._prefix + key, claim))

        return await self._run(shared, lambda: self._fallback.idem_release(key, claim))


class IdempotencyStore(Protocol):
    """The part of the Cache interface Idempotency-Key uses."""

    async def idem_claim(self, key: str, claim: str, ttl_seconds: float) -> str | None: ...

    async def idem_finish(self, key: str, claim: str, record: str, ttl_seconds: float = TTL_SECONDS) -> bool: ...

    async def idem_release(self, key: str, claim: str) -> bool: ...


async def conclude(cache: IdempotencyStore, claim: Claim, answer: Answer | None) -> None:
    """Store the call's answer in place of its claim, or release the claim (answer None)."""
    if claim.ended:
        return
    claim.ended = True
    try:
        if answer is not None:
            await cache.idem_finish(claim.key, claim.value, done_record(claim.fingerprint, answer))
        else:
            await cache.idem_release(claim.key, claim.value)
    except Exception:  # the claim then expires by itself (the listing's timeout + a margin)
        log.exception("mcpmeter: could not conclude the Idempotency-Key claim %s", claim.key)
