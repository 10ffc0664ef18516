"""Redis caches and rate-limit windows, shared by every gateway instance; memory when Redis is down.

Keys (all under the configured prefix): `key:<sha256>` and `mcp:<slug>` hold a Consumer or a
Listing as JSON (`null` caches "no such key/listing" for the negative TTL), `session:<id>` the
principal that opened an MCP session, `rl:<bucket>:<seconds>` the sliding log of one rate window
(a sorted set of accepted call times, in microseconds of Redis server time).

A rate-limit check is one EVALSHA of RATE_LIMIT_SCRIPT: prune, count and decide over every window,
then record the call in all of them or in none, atomically and on the server's clock, so any
number of gateways share one exact limit. The verdict is built from the script's counts by the
same rules as `ratelimit.verdict` (tests prove the two agree call for call).

Redis is a cache here, never the source of truth, so it must not take the gateway down: a call
that fails or takes longer than OP_TIMEOUT falls back to a per-process MemoryCache, one WARNING
says so, and from then on calls go straight to memory while a background probe, at most once per
PROBE_INTERVAL, waits for Redis to answer again (one more WARNING). No Redis error reaches a caller.
The probe is a PING and a small write, so a Redis that answers but refuses writes (a read-only
replica after a failover, out of memory) stays "down" instead of flapping every second.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

import redis.asyncio as aioredis
from cachetools import TTLCache
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..config import Config
from ..model import Consumer, Listing
from ..ratelimit import LimitVerdict, Window
from .base import MISS, _Miss
from .breaker import RedisBreakers
from .memory import SESSION_TTL, MemoryCache

log = logging.getLogger("mcpmeter")

CONNECT_TIMEOUT = 0.25  # seconds to open a connection
SOCKET_TIMEOUT = 0.5  # seconds for one reply
OP_TIMEOUT = 0.75  # seconds for a whole operation, connection set-up included
PROBE_INTERVAL = 1.0  # while degraded, at most one probe per this many seconds
NEAR_CACHE_SECONDS = 2.0  # how long a key or listing read from Redis is reused in-process

_US = 1_000_000
_T = TypeVar("_T")

# KEYS[i]  the sorted set of window i (scores and members: accepted call times, µs).
# ARGV[1]  a unique id for this call; ARGV[2] "now" in µs, or "" for the server's TIME.
# ARGV[2i+1], ARGV[2i+2]  window i's length in whole seconds and its limit.
# Returns {allowed (1/0), now_us, then per window: count, oldest_us, anchor_us} where count is the
# calls inside the window before this one, oldest_us the oldest of them (0 if none), and anchor_us
# (refused windows with limit > 0, else 0) the call whose leaving makes room: the window frees at
# anchor_us + length. A window holds the calls with time > now - length, as in ratelimit.verdict.
RATE_LIMIT_SCRIPT = """
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local out = {0, now}
local allowed = 1
for i = 1, #KEYS do
  local key = KEYS[i]
  local length = tonumber(ARGV[2 * i + 1]) * 1000000
  local limit = tonumber(ARGV[2 * i + 2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - length))
  local count = redis.call('ZCARD', key)
  local oldest, anchor = 0, 0
  if count > 0 then
    oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
  end
  if count >= limit then
    allowed = 0
    if limit > 0 then
      anchor = tonumber(redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')[2])
    end
  end
  out[#out + 1] = count
  out[#out + 1] = oldest
  out[#out + 1] = anchor
end
if allowed == 1 then
  local score = string.format('%d', now)
  local member = score .. '-' .. ARGV[1]
  for i = 1, #KEYS do
    redis.call('ZADD', KEYS[i], score, member)
    redis.call('PEXPIRE', KEYS[i], string.format('%d', tonumber(ARGV[2 * i + 1]) * 1000))
  end
end
out[1] = allowed
return out
"""
_SCRIPT_SHA = hashlib.sha1(RATE_LIMIT_SCRIPT.encode()).hexdigest()

_CONSUMER_FIELDS = frozenset(f.name for f in fields(Consumer))
_LISTING_FIELDS = frozenset(f.name for f in fields(Listing))
_FAILURES = (RedisError, OSError, TimeoutError)  # TimeoutError: OP_TIMEOUT (asyncio.timeout)


class RedisCache(RedisBreakers):
    def __init__(self, config: Config) -> None:
        s = config.redis
        self._config = config
        self._prefix = s.prefix
        self._where = f"{s.host}:{s.port}/{s.db}"
        self._redis = aioredis.Redis(
            host=s.host, port=s.port, db=s.db, password=s.password or None,
            socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
            # No retries: a retried rate-limit script could count one call twice, and a dead
            # Redis must cost one short timeout, not a backoff schedule.
            retry=Retry(NoBackoff(), 0), decode_responses=True,
        )
        self._fallback = MemoryCache(config)
        # A near cache in front of Redis: a warm key or listing costs no round trip at all, and is
        # at most NEAR_CACHE_SECONDS staler than Redis (whose own TTLs bound the staleness anyway).
        self._near: TTLCache[str, Any] = TTLCache(
            100_000, min(NEAR_CACHE_SECONDS, config.key_cache_ttl_seconds, config.mcp_cache_ttl_seconds,
                         config.negative_cache_ttl_seconds) or 0.001)
        self._degraded = False
        self._error: str | None = None
        self._epoch = 0  # bumped on every transition, so a failure from before one cannot undo it
        self._last_probe = float("-inf")
        self._probe: asyncio.Task[None] | None = None
        self._instance = secrets.token_hex(6)  # with a call counter: unique members in the logs
        self._calls = 0

    # --- consumers and listings ---------------------------------------------------------------

    async def get_consumer(self, key_hash: str) -> Consumer | None | _Miss:
        return await self._near_get(f"key:{key_hash}", lambda: self._run(
            lambda: self._get(f"{self._prefix}key:{key_hash}", _decode_consumer),
            lambda: self._fallback.get_consumer(key_hash)))

    async def put_consumer(self, key_hash: str, consumer: Consumer | None) -> None:
        self._near[f"key:{key_hash}"] = consumer
        value = None if consumer is None else {f: getattr(consumer, f) for f in _CONSUMER_FIELDS}
        await self._run(lambda: self._put(f"{self._prefix}key:{key_hash}", value,
                                          self._config.key_cache_ttl_seconds),
                        lambda: self._fallback.put_consumer(key_hash, consumer))

    async def get_listing(self, slug: str) -> Listing | None | _Miss:
        return await self._near_get(f"mcp:{slug}", lambda: self._run(
            lambda: self._get(f"{self._prefix}mcp:{slug}", _decode_listing),
            lambda: self._fallback.get_listing(slug)))

    async def put_listing(self, slug: str, listing: Listing | None) -> None:
        self._near[f"mcp:{slug}"] = listing
        value = None if listing is None else _encode_listing(listing)
        await self._run(lambda: self._put(f"{self._prefix}mcp:{slug}", value, self._config.mcp_cache_ttl_seconds),
                        lambda: self._fallback.put_listing(slug, listing))

    async def _near_get(self, key: str, far: Callable[[], Awaitable[Any]]) -> Any:
        value = self._near.get(key, MISS)
        if value is MISS:
            value = await far()
            if value is not MISS:
                self._near[key] = value
        return value

    async def _get(self, key: str, decode: Callable[[Any], Any]) -> Any:
        raw = await self._redis.get(key)
        if raw is None:
            return MISS
        try:
            value = json.loads(raw)
            return None if value is None else decode(value)
        except (ValueError, TypeError, KeyError, AttributeError):
            return MISS  # written by another version, or not by us: look it up again

    async def _put(self, key: str, value: dict[str, Any] | None, ttl: float) -> None:
        if value is None:
            ttl = self._config.negative_cache_ttl_seconds
        if ttl <= 0:
            return
        try:
            text = json.dumps(value, separators=(",", ":"))
        except (TypeError, ValueError):  # not plain data: leave it uncached rather than fail the call
            log.debug("mcpmeter: not caching %s: not JSON-serialisable", key)
            return
        await self._redis.set(key, text, px=max(1, round(ttl * 1000)))

    # --- rate limits ----------------------------------------------------------------------------

    async def hit(self, bucket: str, windows: Sequence[Window]) -> LimitVerdict:
        async def shared() -> LimitVerdict:
            return (await self._hit_redis(bucket, windows))[0]

        return await self._run(shared, lambda: self._fallback.hit(bucket, windows))

    async def _hit_redis(self, bucket: str, windows: Sequence[Window],
                         now_us: int | None = None) -> tuple[LimitVerdict, int]:
        """One script run; also returns the time it judged at (µs). `now_us` overrides it, for tests."""
        self._calls += 1
        keys = [f"{self._prefix}rl:{bucket}:{w.seconds}" for w in windows]
        args: list[str] = [f"{self._instance}.{self._calls}", "" if now_us is None else str(now_us)]
        for w in windows:
            args += [str(w.seconds), str(w.limit)]
        try:
            reply = await self._redis.evalsha(_SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:  # a new or flushed server: EVAL sends the text and caches it
            reply = await self._redis.eval(RATE_LIMIT_SCRIPT, len(keys), *keys, *args)
        allowed, now = bool(reply[0]), int(reply[1])
        counts = [tuple(int(x) for x in reply[2 + 3 * i: 5 + 3 * i]) for i in range(len(windows))]
        return verdict_from_counts(allowed, counts, windows, now), now

    # --- MCP sessions ---------------------------------------------------------------------------

    async def bind_session(self, session_id: str, principal: str) -> None:
        # Also kept in memory, so that while Redis is down this process still knows its own sessions.
        await self._fallback.bind_session(session_id, principal)
        await self._run(lambda: self._redis.set(f"{self._prefix}session:{session_id}", principal, ex=SESSION_TTL),
                        _none)

    async def session_owner(self, session_id: str) -> str | None:
        owner = await self._run(lambda: self._redis.get(f"{self._prefix}session:{session_id}"), _none)
        if owner is None:  # e.g. bound here while Redis was down
            owner = await self._fallback.session_owner(session_id)
        return owner

    # --- health and degradation -----------------------------------------------------------------

    async def health(self) -> dict[str, object]:
        if not self._degraded:
            epoch = self._epoch
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await self._check()
            except _FAILURES as e:
                self._fail(e, epoch)
        else:
            self._maybe_probe()
            if self._probe is not None:
                await asyncio.shield(self._probe)  # bounded by OP_TIMEOUT
        return {"cache": "redis", "ok": not self._degraded, "degraded": self._degraded, "error": self._error}

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        try:
            await self._redis.aclose(close_connection_pool=True)
        except _FAILURES:
            pass
        await self._fallback.close()

    async def _run(self, op: Callable[[], Awaitable[_T]], fallback: Callable[[], Awaitable[_T]]) -> _T:
        if self._degraded:
            self._maybe_probe()
            return await fallback()
        epoch = self._epoch
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                return await op()
        except _FAILURES as e:
            self._fail(e, epoch)
            return await fallback()

    def _fail(self, error: BaseException, epoch: int) -> None:
        if self._degraded or epoch != self._epoch:
            return
        self._degraded, self._epoch, self._error = True, self._epoch + 1, _describe(error)
        self._last_probe = time.monotonic()
        log.warning("mcpmeter: Redis at %s failed (%s); caches, sessions and rate limits now live in this "
                    "process only, until Redis answers again", self._where, self._error)

    def _maybe_probe(self) -> None:
        now = time.monotonic()
        if self._probe is not None or now - self._last_probe < PROBE_INTERVAL:
            return
        self._last_probe = now
        self._probe = asyncio.get_running_loop().create_task(self._probe_once())

    async def _check(self) -> None:
        """Does Redis answer, and take writes?"""
        await self._redis.ping()
        await self._redis.set(f"{self._prefix}probe", "1", px=10_000)

    async def _probe_once(self) -> None:
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                await self._check()
        except _FAILURES as e:
            self._error = _describe(e)
        else:
            if self._degraded:
                self._degraded, self._epoch, self._error = False, self._epoch + 1, None
                log.warning("mcpmeter: Redis at %s answers again; caches and rate limits are shared again",
                            self._where)
        finally:
            self._probe = None


def verdict_from_counts(allowed: bool, counts: Sequence[tuple[int, ...]], windows: Sequence[Window],
                        now: int) -> LimitVerdict:
    """`ratelimit.verdict`, computed from the script's per-window (count, oldest, anchor) in exact µs."""
    refused: list[tuple[int, Window]] = []
    tightest: tuple[int, int, Window] | None = None
    for (count, oldest, anchor), w in zip(counts, windows, strict=True):
        length = w.seconds * _US
        if count >= w.limit:
            frees_at = anchor + length if w.limit > 0 else now + length
            refused.append((frees_at - now, w))
            continue
        remaining = w.limit - count - 1
        reset = _ceil_seconds(oldest + length - now) if count else w.seconds
        if tightest is None or remaining < tightest[0]:
            tightest = (remaining, reset, w)
    if refused:
        wait, w = max(refused, key=lambda r: r[0])
        retry = max(1, _ceil_seconds(wait))
        return LimitVerdict(False, w.scope, w.limit, 0, retry, retry)
    assert allowed and tightest is not None
    remaining, reset, w = tightest
    return LimitVerdict(True, w.scope, w.limit, remaining, max(reset, 1))


def _ceil_seconds(us: int) -> int:
    return -(-us // _US)


def _encode_listing(listing: Listing) -> dict[str, Any]:
    value = {f: getattr(listing, f) for f in _LISTING_FIELDS}
    value["upstream_headers"] = dict(listing.upstream_headers)
    value["tool_prices"] = dict(listing.tool_prices)
    return value


def _decode_consumer(value: dict[str, Any]) -> Consumer:
    if set(value) != _CONSUMER_FIELDS:
        raise KeyError("fields differ")
    return Consumer(**value)


def _decode_listing(value: dict[str, Any]) -> Listing:
    if set(value) != _LISTING_FIELDS:
        raise KeyError("fields differ")
    return Listing(**{**value, "upstream_headers": dict(value["upstream_headers"]),
                      "tool_prices": {str(k): int(v) for k, v in value["tool_prices"].items()}})


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _none() -> None:
    """The in-memory side of an operation that has nothing to fall back to."""
    return None
