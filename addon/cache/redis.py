"""Redis caches and rate-limit windows, shared by every gateway instance; memory when Redis is down.

Keys (all under the configured prefix): `key:<sha256>` and `mcp:<slug>` hold a Consumer or a
Listing as JSON (`null` caches "no such key/listing" for the negative TTL), `owner:{<listing id>}:<id>`
the principal that opened an MCP session of a listing (and, while LEGACY_SESSION_KEYS, the unscoped
`session:<id>` of earlier versions too), `rl:{u<user id>}:<listing id>:<seconds>` the GCRA TAT of
one rate window of a (listing, consumer) bucket (one integer, µs of Redis server time; see
addon.ratelimit). A bucket's keys share the hash tag of the user's wallets, so the scripts that touch
them together (the rate limit's, and the wallets' RATE_SPEND) run unchanged on Redis Cluster; every
other operation touches a single key. Idempotency-Key
records `idem:{<listing id>:<principal>}:<sha256>` are per key (addon/cache/idempotency.py).

A rate-limit check is one EVALSHA of RATE_LIMIT_SCRIPT (the checks of concurrent calls share one
round trip: addon/cache/redis_scripts.py): decide over every window, then advance all
of their TATs or none, atomically and on the server's clock, so any number of gateways share one
limit, in O(1) memory per (listing, consumer) pair. The verdict is built from the TATs the script
saw by `ratelimit.check` itself (tests prove the two agree call for call).

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
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import redis.asyncio as aioredis
from cachetools import TTLCache
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import Config
from ..model import Consumer, Listing
from ..ratelimit import LimitVerdict, Window, check
from .base import MISS, _Miss
from .breaker import RedisBreakers
from .idempotency import RedisIdempotency
from .memory import SESSION_TTL, MemoryCache
from .redis_scripts import ScriptRuns

log = logging.getLogger("mcpmeter")

CONNECT_TIMEOUT = 0.25  # seconds to open a connection
SOCKET_TIMEOUT = 0.5  # seconds for one reply (and to wait for a free connection of the pool)
POOL_SIZE = 16  # connections per gateway process
OP_TIMEOUT = 0.75  # seconds for a whole operation, connection set-up included
PROBE_INTERVAL = 1.0  # while degraded, at most one probe per this many seconds
NEAR_CACHE_SECONDS = 2.0  # how long a key, listing or session owner read or written is reused in-process
# A session binding this process wrote is not written again for this long (its Redis TTL is a day):
# a session's answers then wait for no Redis round trip, except one refresh a minute.
SESSION_REWRITE_SECONDS = 60.0
# Gateways before owners were scoped by listing bound a session by its id alone, `session:<id>`. While
# they share a Redis with this version (a rolling deploy, then the day those bindings live), each must
# honour the other's bindings, or a session opened through one is anyone's on the other: this version
# writes that key too, and reads it when a session has no binding of its own listing (README, "Rolling
# upgrades"). Drop it once no earlier gateway has run for a day.
LEGACY_SESSION_KEYS = True

_T = TypeVar("_T")

# GCRA over every window of one bucket, the same arithmetic as `ratelimit.decide` (all integers in
# µs; Lua's doubles hold them exactly until the year 2255).
# KEYS[i]  window i's TAT (a string of µs), rate_keys: one hash tag, one slot.
# ARGV[1]  "now" in µs, or "" for the server's TIME.
# ARGV[3i-1], ARGV[3i], ARGV[3i+1]  window i's limit, emission interval T and tolerance tau (µs).
# `out` = {allowed (1/0), now, then each window's TAT as it was before this call (0 if none)}.
# Only when every window conforms are the new TATs written, each expiring when it falls behind
# `now` (then it means the same as no key): refused calls change nothing. GCRA_LUA judges the first
# `n` keys: RATE_LIMIT_SCRIPT all of them, the wallets' RATE_SPEND all but its wallet's.
GCRA_LUA = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local out = {1, now}
local base = {}
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  local limit = tonumber(ARGV[3 * i - 1])
  local tau = tonumber(ARGV[3 * i + 1])
  base[i] = math.max(tat, now)
  if limit <= 0 or base[i] - now > tau then
    out[1] = 0
  end
  out[#out + 1] = tat
end
if out[1] == 1 then
  for i = 1, n do
    local new = base[i] + tonumber(ARGV[3 * i])
    redis.call('SET', KEYS[i], string.format('%d', new), 'PX', string.format('%d', math.ceil((new - now) / 1000)))
  end
end
"""
RATE_LIMIT_SCRIPT = "local n = #KEYS\n" + GCRA_LUA + "return out\n"
_SCRIPT_SHA = hashlib.sha1(RATE_LIMIT_SCRIPT.encode()).hexdigest()

_CONSUMER_FIELDS = frozenset(f.name for f in fields(Consumer))
_LISTING_FIELDS = frozenset(f.name for f in fields(Listing))
_FAILURES = (RedisError, OSError, TimeoutError)  # TimeoutError: OP_TIMEOUT (asyncio.timeout)


class RedisCache(RedisBreakers, RedisIdempotency):
    def __init__(self, config: Config) -> None:
        s = config.redis
        self._config = config
        self._prefix = s.prefix
        self._where = f"{s.host}:{s.port}/{s.db}"
        # A bounded pool that makes a burst wait for a connection: unbounded, a burst of N calls on a
        # cold gateway opened N connections at once, some of which missed CONNECT_TIMEOUT on a busy
        # machine, and the gateway then limited on its own as if Redis were down (measured: 90 of a
        # limit of 30 let through by two gateways). One command per call, a fraction of a ms each.
        self._redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
            max_connections=POOL_SIZE, timeout=SOCKET_TIMEOUT,
            host=s.host, port=s.port, db=s.db, password=s.password or None,
            socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
            # No retries: a retried rate-limit script could count one call twice, and a dead
            # Redis must cost one short timeout, not a backoff schedule.
            retry=Retry(NoBackoff(), 0), decode_responses=True,
        ))
        self._scripts = ScriptRuns(self._redis, RATE_LIMIT_SCRIPT, _SCRIPT_SHA)
        self._fallback = MemoryCache(config)
        # A near cache in front of Redis: a warm key or listing costs no round trip at all, and is
        # at most NEAR_CACHE_SECONDS staler than Redis (whose own TTLs bound the staleness anyway).
        self._near: TTLCache[str, Any] = TTLCache(
            100_000, min(NEAR_CACHE_SECONDS, config.key_cache_ttl_seconds, config.mcp_cache_ttl_seconds,
                         config.negative_cache_ttl_seconds) or 0.001)
        # (listing id, session id) -> its owner as this process last read or wrote it (see _Owner).
        self._owners: TTLCache[tuple[int, str], _Owner] = TTLCache(100_000, SESSION_REWRITE_SECONDS)
        self._degraded = False
        self._error: str | None = None
        self._epoch = 0  # bumped on every transition, so a failure from before one cannot undo it
        self._last_probe = float("-inf")
        self._probe: asyncio.Task[None] | None = None

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
        """One script run; also returns the time it judged at (µs). `now_us` overrides it, for tests.

        The script reads Redis's own clock (TIME) rather than taking `now` from the gateway: every
        gateway then judges on one clock, so a gateway whose clock runs ahead cannot push a TAT
        into the future for everyone (nor one running behind grant extra calls), and a TAT written
        by one gateway means the same to all. Redis >= 5 replicates a script's effects, not the
        script, so calling TIME in a script that writes is allowed."""
        reply = await self._scripts.run(rate_keys(self._prefix, bucket, windows),
                                        rate_args(windows, now_us))  # with the concurrent calls' runs
        return rate_verdict(reply, windows, bucket), int(reply[1])

    # --- MCP sessions ---------------------------------------------------------------------------

    async def bind_session(self, listing_id: int, session_id: str, principal: str) -> None:
        # Also kept in memory, so that while Redis is down this process still knows its own sessions.
        await self._fallback.bind_session(listing_id, session_id, principal)
        now, scope = time.monotonic(), (listing_id, session_id)
        known = self._owners.get(scope)
        if (known is not None and known.principal == principal and known.epoch == self._epoch
                and known.written is not None and now - known.written < SESSION_REWRITE_SECONDS):
            return  # this process wrote it within the minute, and Redis still had it since

        async def write() -> bool:
            await self._redis.set(session_key(self._prefix, listing_id, session_id), principal, ex=SESSION_TTL)
            if LEGACY_SESSION_KEYS:  # for the earlier gateways still running
                await self._redis.set(f"{self._prefix}session:{session_id}", principal, ex=SESSION_TTL)
            return True

        epoch = self._epoch
        if await self._run(write, _false):  # only a binding Redis took counts as written
            self._owners[scope] = _Owner(principal, now, now, epoch)
        else:
            self._owners.pop(scope, None)

    async def session_owner(self, listing_id: int, session_id: str) -> str | None:
        scope = (listing_id, session_id)
        now, known = time.monotonic(), self._owners.get(scope)
        if known is not None and known.epoch == self._epoch and now - known.seen < NEAR_CACHE_SECONDS:
            return known.principal
        epoch = self._epoch
        owner = await self._run(lambda: self._redis.get(session_key(self._prefix, listing_id, session_id)), _none)
        if self._owners.get(scope) is not known:
            pass  # a bind (or another read) during the GET knows better than this read
        elif owner is not None and epoch == self._epoch:
            # Only owners are near-cached: an unbound session must be seen bound at once.
            written = known.written if known is not None and known.principal == owner else None
            self._owners[scope] = _Owner(owner, now, written, epoch)
        else:  # unbound in Redis (lost, expired, or never bound there): the next answer binds it again
            self._owners.pop(scope, None)
        if owner is None:  # e.g. bound here while Redis was down
            owner = await self._fallback.session_owner(listing_id, session_id)
        if owner is None and LEGACY_SESSION_KEYS:
            # Bound by an earlier gateway (not near-cached: this version's binding, at the session's
            # next answer, is what counts). Last: unscoped, it may name another listing's session.
            owner = await self._run(lambda: self._redis.get(f"{self._prefix}session:{session_id}"), _none)
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


def session_key(prefix: str, listing_id: int, session_id: str) -> str:
    """Where a session's owner is kept: per listing, since upstreams pick session ids and two may pick
    the same. Not under `session:`, where an earlier version's key for the id `{3}:x` would be this
    one's for listing 3's `x`. The tag `{<listing id>}` comes first, so an id holding braces cannot
    choose the slot (single-key operations: any slot would do)."""
    return f"{prefix}owner:{{{listing_id}}}:{session_id}"


def rate_keys(prefix: str, bucket: str, windows: Sequence[Window]) -> list[str]:
    """The keys of one bucket's windows, `<prefix>rl:{<tag>}:<rest>:<seconds>` where the bucket is
    `<tag>:<rest>` (or all tag). `{<tag>}` is a Redis Cluster hash tag: only the text between the
    first `{` and the next `}` is hashed, so a bucket's keys land in one slot, and the gateway's
    buckets (`u<user id>:<listing id>`) in the slot of the user's wallets (`w:{u<user id>}:...`,
    addon/store/wallet_scripts.py), which one script spends from after judging the limit. (A `}` in
    the tag ends it early, still one slot for the bucket; a prefix with braces of its own rules:
    one slot for all.)"""
    tag, sep, rest = bucket.partition(":")
    return [f"{prefix}rl:{{{tag}}}{sep}{rest}:{w.seconds}" for w in windows]


def rate_args(windows: Sequence[Window], now_us: int | None = None) -> list[str]:
    """GCRA_LUA's arguments: now ("" for Redis's clock), then each window's limit, T and tau."""
    args: list[str] = ["" if now_us is None else str(now_us)]
    for w in windows:
        args += [str(w.limit), *((str(w.interval_us), str(w.tolerance_us)) if w.limit > 0 else ("0", "0"))]
    return args


def rate_verdict(reply: Sequence[Any], windows: Sequence[Window], bucket: str) -> LimitVerdict:
    """The verdict, from the time and the TATs GCRA_LUA saw (reply[1], reply[2:2 + len(windows)])."""
    now = int(reply[1])
    v, _ = check(now, [int(x) for x in reply[2:2 + len(windows)]], windows)
    if v.allowed != bool(int(reply[0])):  # cannot happen: the same integer arithmetic on both sides
        raise RedisError(f"rate-limit script and ratelimit.check disagree for {bucket!r}")
    return v


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


@dataclass(frozen=True, slots=True)
class _Owner:
    """A session's owner as this process knows it. Trusted for NEAR_CACHE_SECONDS after `seen`
    (read or written), not rewritten for SESSION_REWRITE_SECONDS after `written` (by this process),
    and neither across a Redis outage (`epoch`, the cache's, bumped at each transition)."""

    principal: str
    seen: float  # monotonic
    written: float | None
    epoch: int


async def _false() -> bool:
    return False


async def _none() -> None:
    """The in-memory side of an operation that has nothing to fall back to."""
    return None
