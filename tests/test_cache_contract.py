"""The cache contract, run on both adapters; then what only Redis promises.

Both adapters: positive and negative caching with their own TTLs, faithful round trips, the
GCRA limit (N allowed then refused, exact Retry-After, refused calls uncounted, windows
and buckets independent), MCP session ownership. Redis only: its Lua script decides exactly as
`ratelimit.check` does, call for call; two gateways share one limit exactly under concurrency;
keys live under the prefix with the promised TTLs; a dead, hung or restarted Redis never stalls or
fails a call, and the cache comes back to Redis by itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from addon.cache import MISS, Cache, open_cache
from addon.cache.breaker import circuit_keys
from addon.cache.memory import MemoryCache
from addon.cache import redis as redis_module
from addon.cache.redis import RedisCache, rate_keys
from addon.config import Config, RedisSettings
from addon.model import Consumer, Listing
from addon.ratelimit import US, LimitVerdict, Window, check, windows_for
from tests import redisutil

pytestmark = pytest.mark.timeout(60)

CONSUMER = Consumer(user_id=7, project_id=8, status="active", key_id=9, env="test")
OAUTH = Consumer(user_id=7, project_id=8, status="suspended", token_id=12, env="oauth", expires_at=1_800_000_000.25)
LISTING = Listing(
    id=3, slug="weather", status="live", upstream_url="http://127.0.0.1:9/mcp", transport="sse",
    upstream_headers={"X-Publisher-Key": "s3cret", "X-Note": "café ☕"}, free_calls_per_consumer=5,
    rate_limit_per_minute=10, rate_limit_per_day=None, upstream_timeout_seconds=12, default_price=1000,
    tool_prices={"forecast": 2500, "ping": 0}, bill_tool_errors=True,
)
BARE_LISTING = Listing(id=4, slug="draft-one", status="draft", upstream_url=None)

MakeCache = Callable[..., Cache]


@pytest.fixture(params=["memory", "redis"])
async def make_cache(request: pytest.FixtureRequest) -> AsyncIterator[MakeCache]:
    """Build caches of one kind from Config overrides; Redis ones get a prefix of their own.

    A Redis cache must never have fallen back to memory during a contract test: the test would
    then prove nothing about Redis.
    """
    made: list[Cache] = []
    with ExitStack() as stack:
        settings = stack.enter_context(redisutil.scratch_prefix()) if request.param == "redis" else None

        def make(**overrides: object) -> Cache:
            config = replace(Config(), **overrides)
            if settings is not None:
                config = replace(config, cache="redis", redis=settings)
            cache = open_cache(config)
            assert type(cache) is (RedisCache if settings is not None else MemoryCache)
            made.append(cache)
            return cache

        yield make
        fell_back = [c._error for c in made if isinstance(c, RedisCache) and c._epoch != 0]
        for cache in made:
            await cache.close()
        assert not fell_back, f"the Redis cache fell back to memory: {fell_back}"


# --- consumers and listings ------------------------------------------------------------------


async def test_consumer_is_cached_until_its_ttl(make_cache: MakeCache) -> None:
    cache = make_cache(key_cache_ttl_seconds=0.4, negative_cache_ttl_seconds=5)
    assert await cache.get_consumer("h1") is MISS
    await cache.put_consumer("h1", CONSUMER)
    assert await cache.get_consumer("h1") == CONSUMER
    assert await cache.get_consumer("h2") is MISS
    await asyncio.sleep(0.6)
    assert await cache.get_consumer("h1") is MISS


async def test_consumers_round_trip_faithfully(make_cache: MakeCache) -> None:
    cache = make_cache()
    await cache.put_consumer("oauth", OAUTH)
    got = await cache.get_consumer("oauth")
    assert got == OAUTH and isinstance(got, Consumer)
    assert got.principal == "t12" and got.key_id is None and got.expires_at == 1_800_000_000.25


async def test_listing_round_trips_and_expires(make_cache: MakeCache) -> None:
    cache = make_cache(mcp_cache_ttl_seconds=0.4, negative_cache_ttl_seconds=5)
    await cache.put_listing("weather", LISTING)
    await cache.put_listing("draft-one", BARE_LISTING)
    got = await cache.get_listing("weather")
    assert got == LISTING and isinstance(got, Listing)
    assert dict(got.tool_prices) == {"forecast": 2500, "ping": 0}
    assert all(type(v) is int for v in got.tool_prices.values())
    assert dict(got.upstream_headers) == {"X-Publisher-Key": "s3cret", "X-Note": "café ☕"}
    assert await cache.get_listing("draft-one") == BARE_LISTING
    assert await cache.get_listing("other") is MISS
    await asyncio.sleep(0.6)
    assert await cache.get_listing("weather") is MISS
    assert await cache.get_listing("draft-one") is MISS


async def test_unknown_keys_and_slugs_are_cached_for_the_negative_ttl(make_cache: MakeCache) -> None:
    cache = make_cache(key_cache_ttl_seconds=5, mcp_cache_ttl_seconds=5, negative_cache_ttl_seconds=0.4)
    await cache.put_consumer("guess", None)
    await cache.put_listing("nope", None)
    await cache.put_consumer("real", CONSUMER)
    await cache.put_listing("weather", LISTING)
    assert await cache.get_consumer("guess") is None  # known not to exist: not a miss
    assert await cache.get_listing("nope") is None
    await asyncio.sleep(0.6)
    assert await cache.get_consumer("guess") is MISS
    assert await cache.get_listing("nope") is MISS
    assert await cache.get_consumer("real") == CONSUMER  # the positive TTL is its own
    assert await cache.get_listing("weather") == LISTING


async def test_a_negative_entry_hides_an_earlier_positive_one(make_cache: MakeCache) -> None:
    cache = make_cache()
    await cache.put_consumer("revoked", CONSUMER)
    await cache.put_consumer("revoked", None)
    assert await cache.get_consumer("revoked") is None
    await cache.put_listing("gone", LISTING)
    await cache.put_listing("gone", None)
    assert await cache.get_listing("gone") is None


# --- rate limits -------------------------------------------------------------------------------


async def test_n_calls_per_window_then_refused_with_exact_retry_after(make_cache: MakeCache) -> None:
    cache = make_cache()
    windows = windows_for(3, 100)
    verdicts = [await cache.hit("1:k1", windows) for _ in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.remaining for v in verdicts[:3]] == [2, 1, 0]
    assert all(v.scope == "minute" and v.limit == 3 for v in verdicts)
    assert verdicts[0].reset_seconds == 20 and verdicts[0].retry_after == 0  # one cell: 60 s / 3
    refused = verdicts[3]
    # One cell (20 s) refills a few ms from now.
    assert refused.remaining == 0 and refused.retry_after in (19, 20) and refused.reset_seconds == refused.retry_after


async def test_refused_calls_are_not_counted(make_cache: MakeCache) -> None:
    cache = make_cache()
    windows = (Window("minute", 2, 2), Window("day", 3600, 100))
    start = time.monotonic()
    assert [(await cache.hit("b", windows)).allowed for _ in range(2)] == [True, True]
    await asyncio.sleep(0.5)
    refused = [await cache.hit("b", windows) for _ in range(3)]
    assert not any(v.allowed for v in refused)
    assert {v.retry_after for v in refused} == {1}  # one cell (1 s) refills at start + 1 s
    await asyncio.sleep(2.1 - (time.monotonic() - start))
    # The window is full again; the refused calls moved no TAT (counted, they would still weigh 3 s).
    again = [await cache.hit("b", windows) for _ in range(3)]
    assert [v.allowed for v in again] == [True, True, False]


async def test_day_window_counts_independently_of_the_minute_window(make_cache: MakeCache) -> None:
    cache = make_cache()
    windows = (Window("minute", 2, 2), Window("day", 3600, 3))
    first = [await cache.hit("b", windows) for _ in range(3)]
    assert [v.allowed for v in first] == [True, True, False]
    assert first[2].scope == "minute" and first[2].retry_after in (1, 2)
    await asyncio.sleep(2.1)
    third = await cache.hit("b", windows)  # minute window empty again, day window has 2 of 3
    assert third.allowed and third.scope == "day" and third.limit == 3 and third.remaining == 0
    fourth = await cache.hit("b", windows)
    assert not fourth.allowed and fourth.scope == "day" and fourth.limit == 3
    assert 1197 <= fourth.retry_after <= 1198  # the day's next cell (3600 s / 3) refills 2.1 s earlier


async def test_the_tightest_window_is_reported(make_cache: MakeCache) -> None:
    cache = make_cache()
    v = await cache.hit("b", windows_for(10, 3))
    assert v == LimitVerdict(True, "day", 3, 2, 28_800)  # back to full one cell (86400 s / 3) from now


async def test_retry_after_waits_for_every_refusing_window(make_cache: MakeCache) -> None:
    cache = make_cache()
    windows = (Window("minute", 2, 1), Window("day", 4, 1))
    assert (await cache.hit("b", windows)).allowed
    v = await cache.hit("b", windows)
    assert not v.allowed and v.scope == "day" and v.retry_after == 4


async def test_reset_is_until_the_window_is_full_again(make_cache: MakeCache) -> None:
    cache = make_cache()
    windows = (Window("minute", 5, 3),)  # one cell: 5/3 s
    assert (await cache.hit("b", windows)).reset_seconds == 2  # ceil(1.67)
    await asyncio.sleep(1.2)
    v = await cache.hit("b", windows)
    assert v.allowed and v.remaining == 1 and v.reset_seconds == 3  # ceil(2 * 5/3 - 1.2)


async def test_a_zero_limit_refuses_everything(make_cache: MakeCache) -> None:
    cache = make_cache()
    v = await cache.hit("b", (Window("minute", 60, 0), Window("day", 86_400, 10)))
    assert v == LimitVerdict(False, "minute", 0, 0, 60, 60)


async def test_buckets_are_independent(make_cache: MakeCache) -> None:
    cache = make_cache()
    windows = windows_for(2, 100)
    assert [(await cache.hit("1:k1", windows)).allowed for _ in range(3)] == [True, True, False]
    for other in ("1:k2", "2:k1"):
        v = await cache.hit(other, windows)
        assert v.allowed and v.remaining == 1


# --- sessions and health ---------------------------------------------------------------------


async def test_session_ownership(make_cache: MakeCache) -> None:
    cache = make_cache()
    assert await cache.session_owner(3, "s-1") is None
    await cache.bind_session(3, "s-1", "k9")
    await cache.bind_session(3, "s-2", "t12")
    assert await cache.session_owner(3, "s-1") == "k9"
    assert await cache.session_owner(3, "s-2") == "t12"
    assert await cache.session_owner(3, "s-3") is None


async def test_a_session_id_is_owned_per_listing(make_cache: MakeCache) -> None:
    """Upstreams choose session ids: two listings' can be the same, and are two sessions."""
    cache = make_cache()
    await cache.bind_session(3, "1", "k9")
    await cache.bind_session(4, "1", "k5")  # listing 4's upstream hands out "1" too
    for c in (cache, make_cache()) if isinstance(cache, RedisCache) else (cache,):  # (another gateway)
        assert await c.session_owner(3, "1") == "k9"  # still its opener's, not the last binder's
        assert await c.session_owner(4, "1") == "k5"
    if not isinstance(cache, RedisCache):  # (on Redis, while LEGACY_SESSION_KEYS: see the rolling upgrade's test)
        assert await cache.session_owner(5, "1") is None  # nor a third's


async def test_health(make_cache: MakeCache) -> None:
    cache = make_cache()
    health = await cache.health()
    assert health["ok"] is True
    assert health["cache"] == ("redis" if isinstance(cache, RedisCache) else "memory")
    if isinstance(cache, RedisCache):
        assert health["degraded"] is False and health["error"] is None


# --- Redis only --------------------------------------------------------------------------------


@pytest.fixture
async def redis_settings() -> AsyncIterator[RedisSettings]:
    with redisutil.scratch_prefix() as settings:
        yield settings


def _config(settings: RedisSettings, **overrides: object) -> Config:
    return replace(Config(), cache="redis", redis=settings, **overrides)


@pytest.mark.parametrize("windows", [
    (Window("minute", 10, 3), Window("day", 60, 5)),
    (Window("day", 20, 4), Window("minute", 5, 2)),
    (Window("minute", 5, 1),),
    (Window("minute", 10, 0), Window("day", 60, 5)),
    None,  # limits change between calls, as when a publisher edits them: a window can hold more than its limit
], ids=["minute+day", "day-first", "one-window", "zero-limit", "changing-limits"])
async def test_the_script_decides_exactly_as_the_pure_verdict(redis_settings: RedisSettings,
                                                             windows: tuple[Window, ...] | None) -> None:
    """Same call times (a synthetic clock, exact in both float and µs), same verdicts, call for call.

    Times are multiples of 1/64 s, so the pure side's float arithmetic is exact; jumps land on
    exact window boundaries (a call aged exactly one window has left it) as well as in between.
    """
    changing = windows is None
    if windows is None:
        windows = (Window("minute", 10, 6), Window("day", 60, 9))
    cache = RedisCache(_config(redis_settings))
    ticks = 1_700_000_000 * 64  # 1/64 s = 15625 µs
    memory = MemoryCache(Config(), clock=lambda: ticks / 64)
    rng = random.Random(f"{windows}")
    accepted: list[int] = []
    seen = {"allowed": 0, "refused": 0, "on_boundary": 0, "over_limit": 0}
    try:
        for _ in range(200):
            edges = [a + w.seconds * 64 for a in accepted[-8:] for w in windows if a + w.seconds * 64 > ticks]
            if edges and rng.random() < 0.3:
                ticks = rng.choice(edges)
                seen["on_boundary"] += 1
            else:
                ticks += rng.choice([0, 1, 5, 32, 64, 200, 640])
            if changing:
                windows = (Window("minute", 10, rng.choice([1, 2, 6])), Window("day", 60, rng.choice([3, 9])))
            expected = memory.hit_now("b", windows)
            got, now_us = await cache._hit_redis("b", windows, now_us=ticks * 15_625)
            assert now_us == ticks * 15_625
            assert got == expected, f"at tick {ticks}"
            seen["allowed" if got.allowed else "refused"] += 1
            in_window = sum(1 for a in accepted if a > ticks - windows[0].seconds * 64)
            seen["over_limit"] += in_window > windows[0].limit
            if got.allowed:
                accepted.append(ticks)
        assert seen["refused"] > 0
        if windows[0].limit > 0:
            assert not changing or seen["over_limit"] > 0
            assert seen["allowed"] > 0 and seen["on_boundary"] > 0
        assert cache._epoch == 0
    finally:
        await cache.close()


async def test_the_script_uses_redis_time_and_matches_the_pure_verdict(redis_settings: RedisSettings) -> None:
    """On the server's own clock: replay the times it judged at through `ratelimit.check`, exactly."""
    cache = RedisCache(_config(redis_settings))
    windows = (Window("minute", 1, 3), Window("day", 3, 5))
    tats: tuple[int, ...] = (0, 0)
    outcomes = []
    try:
        for _ in range(14):
            got, now_us = await cache._hit_redis("b", windows)
            assert abs(now_us / 1e6 - time.time()) < 5, "the script's clock is Redis TIME, in µs"
            expected, tats = check(now_us, tats, windows)
            assert got == expected
            outcomes.append(got.allowed)
            await asyncio.sleep(0.12)
        assert True in outcomes and False in outcomes
    finally:
        await cache.close()


async def test_two_gateways_share_one_limit_exactly(redis_settings: RedisSettings) -> None:
    gateways = [RedisCache(_config(redis_settings)), RedisCache(_config(redis_settings))]
    windows = windows_for(30, 1000)
    try:
        # Both pools opened first, outside the cache's failure handling: a connection that misses its
        # short connect timeout on a busy machine would put a gateway on its own limits (the designed
        # fallback, tested elsewhere), which is not what this test is about.
        deadline = time.monotonic() + 15
        for g in gateways:
            while True:
                try:
                    await asyncio.gather(*(g._redis.ping() for _ in range(redis_module.POOL_SIZE)))
                    break
                except (redis.RedisError, OSError):
                    assert time.monotonic() < deadline, "Redis connections could not be opened"
        verdicts = await asyncio.gather(*(gateways[i % 2].hit("7:k1", windows) for i in range(100)))
        allowed = [v for v in verdicts if v.allowed]
        assert len(allowed) == 30
        assert sorted(v.remaining for v in allowed) == list(range(30))  # each slot handed out once
        assert all(v.scope == "minute" and v.retry_after in (1, 2) for v in verdicts if not v.allowed)  # 1 cell: 2 s
        with redisutil.client(redis_settings) as r:  # 30 cells ahead of the first call in each window
            tat_minute = int(r.get(f"{redis_settings.prefix}rl:{{7}}:k1:60"))
            tat_day = int(r.get(f"{redis_settings.prefix}rl:{{7}}:k1:86400"))
            assert tat_day - tat_minute == 30 * (86_400 * US // 1000) - 30 * (60 * US // 30)
        assert [g._epoch for g in gateways] == [0, 0]
    finally:
        for g in gateways:
            await g.close()


async def test_keys_live_under_the_prefix_with_their_ttls(redis_settings: RedisSettings) -> None:
    cache = RedisCache(_config(redis_settings, key_cache_ttl_seconds=60, mcp_cache_ttl_seconds=120))
    p = redis_settings.prefix
    try:
        await cache.put_consumer("abc", CONSUMER)
        await cache.put_consumer("guess", None)
        await cache.put_listing("weather", LISTING)
        await cache.bind_session(3, "sess", "k9")
        windows = (Window("minute", 60, 1), Window("day", 86_400, 5))
        await cache.hit("3:k9", windows)
        await cache.hit("3:k9", windows)  # refused: adds nothing
        with redisutil.client(redis_settings) as r:
            assert redisutil.keys(redis_settings) == {
                f"{p}key:abc", f"{p}key:guess", f"{p}mcp:weather", f"{p}owner:{{3}}:sess", f"{p}session:sess",
                f"{p}rl:{{3}}:k9:60", f"{p}rl:{{3}}:k9:86400"}
            ttl = {k.removeprefix(p): r.pttl(k) for k in redisutil.keys(redis_settings)}
            assert 59_000 < ttl["key:abc"] <= 60_000
            assert 29_000 < ttl["key:guess"] <= 30_000  # the negative TTL
            assert 119_000 < ttl["mcp:weather"] <= 120_000
            assert 86_399_000 < ttl["owner:{3}:sess"] <= 86_400_000
            assert 86_399_000 < ttl["session:sess"] <= 86_400_000  # LEGACY_SESSION_KEYS
            # A TAT lives until it falls behind the clock: one cell after one call (60 s / 1, 86400 s / 5).
            assert 59_000 < ttl["rl:{3}:k9:60"] <= 60_000
            assert 17_279_000 < ttl["rl:{3}:k9:86400"] <= 17_280_000
            assert r.get(f"{p}rl:{{3}}:k9:60").isdigit() and r.get(f"{p}rl:{{3}}:k9:86400").isdigit()
            assert r.get(f"{p}key:guess") == "null"
        assert cache._epoch == 0
    finally:
        await cache.close()


class _Clock:
    """time.monotonic for the Redis cache's session owners, moved by hand."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def _count_session_commands(cache: RedisCache, family: str = "owner:") -> list[str]:
    """The GETs and SETs of session owners (`owner:`, or the earlier versions' `session:`) the cache
    sends from now on."""
    sent: list[str] = []
    real_get, real_set = cache._redis.get, cache._redis.set

    async def get(key: str, *a: object, **k: object) -> object:
        if key.startswith(cache._prefix + family):
            sent.append("GET")
        return await real_get(key, *a, **k)

    async def set_(key: str, *a: object, **k: object) -> object:
        if key.startswith(cache._prefix + family):
            sent.append("SET")
        return await real_set(key, *a, **k)

    cache._redis.get, cache._redis.set = get, set_  # type: ignore[method-assign]
    return sent


async def test_a_sessions_calls_cost_fewer_round_trips_for_its_owner(
        redis_settings: RedisSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answer of a session re-binds it and every call checks its owner: a binding this
    process wrote is not written again for SESSION_REWRITE_SECONDS, and an owner read or written is
    trusted for NEAR_CACHE_SECONDS."""
    clock = _Clock()
    monkeypatch.setattr(redis_module.time, "monotonic", clock)
    cache = RedisCache(_config(redis_settings))
    try:
        sent = _count_session_commands(cache)
        await cache.bind_session(3, "s-1", "k9")
        for _ in range(5):  # calls in quick succession
            assert await cache.session_owner(3, "s-1") == "k9"
            await cache.bind_session(3, "s-1", "k9")
        assert sent == ["SET"]
        clock.now += redis_module.NEAR_CACHE_SECONDS + 0.01
        assert await cache.session_owner(3, "s-1") == "k9"  # read again before forwarding ...
        await cache.bind_session(3, "s-1", "k9")  # ... but the answer is not held up by a rewrite
        assert sent == ["SET", "GET"]
        await cache.bind_session(3, "s-1", "t3")  # another principal: written at once (the last write wins)
        assert sent == ["SET", "GET", "SET"] and await cache.session_owner(3, "s-1") == "t3"
        clock.now += redis_module.SESSION_REWRITE_SECONDS + 0.1
        await cache.bind_session(3, "s-1", "t3")  # a minute on: written again, its day-long TTL renewed
        assert sent == ["SET", "GET", "SET", "SET"]
        with redisutil.client(redis_settings) as r:
            assert r.get(f"{redis_settings.prefix}owner:{{3}}:s-1") == "t3"
    finally:
        await cache.close()


async def test_another_gateways_binding_is_seen_at_once_or_within_the_near_cache_time(
        redis_settings: RedisSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(redis_module.time, "monotonic", clock)
    one, two = RedisCache(_config(redis_settings)), RedisCache(_config(redis_settings))
    try:
        assert await two.session_owner(3, "s-1") is None  # unbound: not near-cached
        await one.bind_session(3, "s-1", "k9")
        assert await two.session_owner(3, "s-1") == "k9"  # seen at once
        sent = _count_session_commands(two)
        await two.bind_session(3, "s-1", "t3")  # re-bound on the second gateway (a careless upstream)
        clock.now += redis_module.NEAR_CACHE_SECONDS + 0.01
        assert await one.session_owner(3, "s-1") == "t3"  # the writer of the old binding sees it too
        await one.bind_session(3, "s-1", "k9")  # and a binding it reads changed is written again
        assert await two.session_owner(3, "s-1") == "k9"  # its own write is 2 s old: read, the last write wins
        assert sent == ["SET", "GET"]
    finally:
        await one.close()
        await two.close()


async def test_a_binding_lost_in_redis_is_written_again_at_the_next_answer(
        redis_settings: RedisSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis restarted without persistence, a failover or an eviction loses bindings: once this
    process reads one gone, it does not wait out the minute to write it again."""
    clock = _Clock()
    monkeypatch.setattr(redis_module.time, "monotonic", clock)
    cache = RedisCache(_config(redis_settings))
    try:
        await cache.bind_session(3, "s-1", "k9")
        with redisutil.client(redis_settings) as r:
            r.delete(f"{redis_settings.prefix}owner:{{3}}:s-1")
        clock.now += redis_module.NEAR_CACHE_SECONDS + 0.01
        assert await cache.session_owner(3, "s-1") == "k9"  # from this process's memory
        await cache.bind_session(3, "s-1", "k9")
        with redisutil.client(redis_settings) as r:
            assert r.get(f"{redis_settings.prefix}owner:{{3}}:s-1") == "k9"
    finally:
        await cache.close()


async def test_an_earlier_gateways_binding_is_honoured_during_a_rolling_upgrade(
        redis_settings: RedisSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateways from before owners were scoped by listing bind `session:<id>`. While both versions
    share one Redis (LEGACY_SESSION_KEYS), a session opened through either is not anyone's on the other:
    that key is read when a session has no binding of its own listing, and written too."""
    clock = _Clock()
    monkeypatch.setattr(redis_module.time, "monotonic", clock)
    cache = RedisCache(_config(redis_settings))
    p = redis_settings.prefix
    try:
        with redisutil.client(redis_settings) as r:
            r.set(f"{p}session:s-old", "k9", ex=86_400)  # opened through an earlier gateway
            r.set(f"{p}session:{{3}}:x", "t1", ex=86_400)  # an earlier gateway's binding of the id "{3}:x" ...
            assert await cache.session_owner(3, "x") is None  # ... is not listing 3's "x"
            legacy = _count_session_commands(cache, "session:")
            for _ in range(2):  # not near-cached: this version's own binding is what counts
                assert await cache.session_owner(3, "s-old") == "k9"
            assert legacy == ["GET", "GET"]
            await cache.bind_session(3, "s-old", "k9")  # its next answer binds it for this listing
            assert r.get(f"{p}owner:{{3}}:s-old") == "k9" and legacy == ["GET", "GET", "SET"]
            r.set(f"{p}session:s-old", "t1", ex=86_400)  # another listing's "s-old", bound by an earlier gateway
            clock.now += redis_module.NEAR_CACHE_SECONDS + 0.01
            assert await cache.session_owner(3, "s-old") == "k9"  # this listing's binding wins, and is enough
            assert legacy == ["GET", "GET", "SET"]
            await cache.bind_session(4, "s-new", "k5")  # written where the earlier gateways read it too
            assert r.get(f"{p}session:s-new") == "k5" and r.ttl(f"{p}session:s-new") > 86_399
            # The price, while it lasts: a session without a binding of its own listing (never opened
            # through this version, or lost) takes the owner of the id's latest binding, whatever its listing.
            assert await cache.session_owner(3, "s-new") == "k5"
        assert cache._epoch == 0
    finally:
        await cache.close()


async def test_without_legacy_session_keys_only_the_listings_binding_counts(
        redis_settings: RedisSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_module, "LEGACY_SESSION_KEYS", False)
    cache = RedisCache(_config(redis_settings))
    p = redis_settings.prefix
    try:
        with redisutil.client(redis_settings) as r:
            r.set(f"{p}session:s-1", "t1", ex=86_400)
            assert await cache.session_owner(3, "s-1") is None
            await cache.bind_session(3, "s-2", "k9")
            assert await cache.session_owner(3, "s-2") == "k9"
            assert await cache.session_owner(4, "s-2") is None  # not another listing's
            assert r.get(f"{p}session:s-2") is None
    finally:
        await cache.close()


async def test_a_binding_redis_did_not_take_or_from_before_an_outage_is_not_trusted(tmp_path: Path) -> None:
    with redisutil.RedisProcess(tmp_path) as server:
        settings = server.settings()
        cache = RedisCache(_config(settings))
        try:
            await cache.bind_session(3, "s-0", "k9")
            server.stop()
            await cache.bind_session(3, "s-1", "k9")  # Redis down: kept in memory only
            assert await cache.session_owner(3, "s-1") == "k9"
            assert (3, "s-1") not in cache._owners
            # What this process knew from before the outage is not trusted across it.
            assert cache._owners[3, "s-0"].epoch != cache._epoch
        finally:
            await cache.close()


async def test_foreign_or_damaged_entries_are_misses(redis_settings: RedisSettings) -> None:
    cache = RedisCache(_config(redis_settings))
    p = redis_settings.prefix
    try:
        with redisutil.client(redis_settings) as r:
            r.set(f"{p}key:garbage", "{not json")
            r.set(f"{p}key:newer", '{"user_id": 1, "project_id": 1, "status": "active", "future_field": 1}')
            r.set(f"{p}mcp:odd", "[1, 2]")
            r.set(f"{p}mcp:num", "5")
        assert await cache.get_consumer("garbage") is MISS
        assert await cache.get_consumer("newer") is MISS
        assert await cache.get_listing("odd") is MISS
        assert await cache.get_listing("num") is MISS
        assert cache._epoch == 0
    finally:
        await cache.close()


async def test_a_flushed_script_cache_is_refilled(tmp_path: Path) -> None:
    with redisutil.RedisProcess(tmp_path) as server:
        settings = server.settings()
        cache = RedisCache(_config(settings))
        try:
            windows = windows_for(5, 100)
            assert (await cache.hit("b", windows)).remaining == 4
            with redisutil.client(settings) as r:
                r.script_flush()
            assert (await cache.hit("b", windows)).remaining == 3
            with redisutil.client(settings) as r:
                assert r.get(f"{settings.prefix}rl:{{b}}:60").isdigit()
            assert cache._epoch == 0
        finally:
            await cache.close()


def _transitions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return ["down" if "failed" in r.getMessage() else "up" for r in caplog.records
            if r.name == "mcpmeter" and r.levelno == logging.WARNING and "Redis" in r.getMessage()]


async def test_redis_going_down_falls_back_to_memory_and_comes_back_by_itself(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, logger="mcpmeter")
    with redisutil.RedisProcess(tmp_path) as server:
        settings = server.settings()
        cache = RedisCache(_config(settings))
        windows = windows_for(5, 100)
        try:
            assert (await cache.hit("b", windows)).remaining == 4
            await cache.bind_session(3, "s-1", "k9")
            await cache.put_consumer("h", CONSUMER)
            assert await cache.get_consumer("h") == CONSUMER
            assert len(redisutil.keys(settings)) == 5  # 2 windows, a key, a session's 2

            server.stop()
            started = time.monotonic()
            # Many calls in flight find Redis gone at once: one warning, and every call is answered.
            verdicts = await asyncio.gather(*(cache.hit("b", windows) for _ in range(7)))
            # Per-process windows now: five fresh slots, then refusals.
            assert sorted(v.allowed for v in verdicts) == [False] * 2 + [True] * 5
            assert _transitions(caplog) == ["down"]
            assert await cache.get_consumer("h") == CONSUMER  # still warm in the near cache
            cache._near.clear()  # as NEAR_CACHE_SECONDS later
            assert await cache.get_consumer("h") is MISS  # only Redis had it
            await cache.put_consumer("h", CONSUMER)
            assert await cache.get_consumer("h") == CONSUMER
            assert await cache.session_owner(3, "s-1") == "k9"  # sessions are also kept in memory
            await cache.bind_session(3, "s-2", "t1")
            assert await cache.session_owner(3, "s-2") == "t1"
            assert time.monotonic() - started < 1.0
            health = await cache.health()
            assert health["ok"] is False and health["degraded"] is True and health["cache"] == "redis"
            assert health["error"]

            pings = 0
            real_check = cache._check

            async def counted_check() -> None:
                nonlocal pings
                pings += 1
                await real_check()

            monkeypatch.setattr(cache, "_check", counted_check)
            spin_until = time.monotonic() + 2.5
            calls = 0
            while time.monotonic() < spin_until:
                await cache.get_listing("x")
                await cache.hit("c", windows)
                calls += 2
                await asyncio.sleep(0.005)
            assert calls > 100 and 2 <= pings <= 3, f"{pings} probes during 2.5 s of calls"
            assert _transitions(caplog) == ["down"]

            server.start()
            started = time.monotonic()
            while cache._degraded and time.monotonic() - started < 3:
                await cache.get_listing("never-cached")  # a near-cache miss: the call that triggers probes
                await asyncio.sleep(0.02)
            assert not cache._degraded, "did not recover within 3 s"
            assert time.monotonic() - started < 1.5  # the next probe, at most a second away
            assert _transitions(caplog) == ["down", "up"]
            health = await cache.health()
            assert health == {"cache": "redis", "ok": True, "degraded": False, "error": None}

            # Redis is used again: the new, empty server starts counting afresh and holds the keys.
            assert (await cache.hit("b", windows)).remaining == 4
            await cache.put_listing("weather", LISTING)
            assert redisutil.keys(settings) == {f"{settings.prefix}rl:{{b}}:60", f"{settings.prefix}rl:{{b}}:86400",
                                                f"{settings.prefix}mcp:weather", f"{settings.prefix}probe"}
            assert _transitions(caplog) == ["down", "up"]
        finally:
            await cache.close()


async def test_a_hung_redis_costs_one_short_timeout_then_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts connections and never answers (a stuck or partitioned Redis)."""
    caplog.set_level(logging.WARNING, logger="mcpmeter")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # connections complete in the kernel; nobody ever reads or answers
        settings = RedisSettings(host="127.0.0.1", port=listener.getsockname()[1], db=0, prefix="hung:")
        cache = RedisCache(_config(settings))
        try:
            started = time.monotonic()
            assert (await cache.hit("b", windows_for(3, 100))).allowed
            assert time.monotonic() - started < 1.2
            started = time.monotonic()
            for _ in range(50):
                await cache.put_consumer("h", CONSUMER)
                assert await cache.get_consumer("h") == CONSUMER
            assert time.monotonic() - started < 0.2  # degraded: no more waiting on Redis
            started = time.monotonic()
            health = await cache.health()
            assert time.monotonic() - started < 1.0
            assert health["ok"] is False and health["degraded"] is True and "Timeout" in str(health["error"])
            assert _transitions(caplog) == ["down"]
        finally:
            await cache.close()


async def test_an_unreachable_redis_from_the_start_still_serves(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcpmeter")
    settings = RedisSettings(host="127.0.0.1", port=redisutil.free_port(), db=0, prefix="nobody:")
    cache = RedisCache(_config(settings))
    try:
        health = await cache.health()  # the first thing asked: health checks Redis itself
        assert health["ok"] is False and health["degraded"] is True and "Connect" in str(health["error"])
        assert await cache.get_listing("weather") is MISS
        await cache.put_listing("weather", LISTING)
        assert await cache.get_listing("weather") == LISTING
        assert [(await cache.hit("b", windows_for(2, 100))).allowed for _ in range(3)] == [True, True, False]
        assert (await cache.health())["degraded"] is True
        assert _transitions(caplog) == ["down"]
    finally:
        await cache.close()


async def test_a_redis_that_refuses_writes_stays_down_without_flapping(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Answers PING but refuses writes (as a read-only replica after a failover, or out of memory)."""
    caplog.set_level(logging.WARNING, logger="mcpmeter")
    with redisutil.RedisProcess(tmp_path) as server:
        settings = server.settings()
        cache = RedisCache(_config(settings))
        try:
            assert (await cache.hit("b", windows_for(3, 100))).allowed
            with redisutil.client(settings) as r:
                r.config_set("min-replicas-to-write", 1)  # every write now fails with NOREPLICAS
            spin_until = time.monotonic() + 2.5
            while time.monotonic() < spin_until:
                await cache.hit("b", windows_for(1000, 10_000))
                await cache.put_consumer("h", CONSUMER)
                await asyncio.sleep(0.01)
            assert cache._degraded and "NOREPLICAS" in str((await cache.health())["error"])
            assert _transitions(caplog) == ["down"]
            with redisutil.client(settings) as r:
                r.config_set("min-replicas-to-write", 0)
            started = time.monotonic()
            while cache._degraded and time.monotonic() - started < 3:
                await cache.get_listing("never-cached")  # a near-cache miss: the call that triggers probes
                await asyncio.sleep(0.02)
            assert not cache._degraded and _transitions(caplog) == ["down", "up"]
        finally:
            await cache.close()


async def test_redis_near_cache_serves_warm_entries_without_a_round_trip(tmp_path: Path) -> None:
    with redisutil.scratch_prefix() as settings:
        cache = RedisCache(_config(settings))
        try:
            await cache.put_consumer("h", CONSUMER)
            redisutil.delete_prefix(settings)  # Redis forgets; the near cache still knows
            assert await cache.get_consumer("h") == CONSUMER
            cache._near.clear()
            assert await cache.get_consumer("h") is MISS
        finally:
            await cache.close()


# --- O(1) memory and the Redis Cluster key layout ----------------------------------------------

async def test_redis_memory_per_pair_is_constant_whatever_the_limits_and_the_calls(
        redis_settings: RedisSettings) -> None:
    """One small string per window: after 500 calls as after 1 (the sliding log held 500 entries)."""
    cache = RedisCache(_config(redis_settings))
    p = redis_settings.prefix
    windows = windows_for(600, 1_000_000)  # 500 calls fit in the bursts
    try:
        assert (await cache.hit("3:k9", windows)).allowed
        with redisutil.client(redis_settings) as r:
            after_one = {k: r.memory_usage(k) for k in redisutil.keys(redis_settings)}
        for _ in range(499):
            assert (await cache.hit("3:k9", windows)).allowed
        with redisutil.client(redis_settings) as r:
            keys = redisutil.keys(redis_settings)
            assert keys == {f"{p}rl:{{3}}:k9:60", f"{p}rl:{{3}}:k9:86400"}
            assert all(r.type(k) == "string" and r.strlen(k) <= 16 for k in keys)
            after_500 = {k: r.memory_usage(k) for k in keys}
        # (A TAT a few ms ahead may already have expired when measured after one call.)
        assert all(after_500[k] == size for k, size in after_one.items()) and after_one, (after_one, after_500)
        assert max(after_500.values()) < 128, after_500
        assert cache._epoch == 0
    finally:
        await cache.close()


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def cluster_slot(key: str) -> int:
    """The Redis Cluster slot of a key: only the text in the first `{...}` counts, when not empty."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return crc16_xmodem(raw) % 16384


HOSTILE_BUCKETS = ["3:k9", "3:user:42", "7:}", "7:{", "7:{x}", "7:}{", "7:a{b}c", "12:café ☕", "1:" + "z" * 300]


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) exists and is free too: a cluster-enabled
    redis-server binds both, and exits at once when it cannot (ports past 55535 have no bus port)."""
    while True:
        port = redisutil.free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def test_the_cluster_slot_function_matches_redis() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the CRC's published check value
    assert cluster_slot("foo") == 12182 and cluster_slot("{foo}bar") == cluster_slot("foo")
    assert cluster_slot("{}x") == crc16_xmodem(b"{}x") % 16384  # an empty tag hashes the whole key
    binary = shutil.which("redis-server")
    if binary is None:
        return
    with tempfile.TemporaryDirectory() as workdir:  # a cluster-enabled server answers CLUSTER KEYSLOT
        for attempt in range(5):  # a free port can be taken before the server binds it: try another
            port = cluster_port()
            proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--cluster-enabled", "yes",
                                     "--cluster-config-file", f"{workdir}/nodes-{attempt}.conf",
                                     "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    r.ping()
                    break
                except redis.RedisError:
                    time.sleep(0.05)
            else:
                proc.kill()
                proc.wait()
                continue
            break
        else:
            raise AssertionError("cluster-enabled redis-server did not start")
        try:
            for bucket in HOSTILE_BUCKETS:
                for key in rate_keys("mcpmeter:", bucket, windows_for(1, 1)) + [f"x{bucket}", bucket]:
                    assert cluster_slot(key) == r.execute_command("CLUSTER", "KEYSLOT", key), key
            r.close()
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("prefix", ["mcpmeter:", "", "tenant{7}:", "a}b:", "{:"])
@pytest.mark.parametrize("bucket", HOSTILE_BUCKETS)
def test_every_rate_limit_script_run_touches_one_cluster_slot(prefix: str, bucket: str) -> None:
    keys = rate_keys(prefix, bucket, windows_for(60, 10_000))
    assert len(keys) == 2 and len({cluster_slot(k) for k in keys}) == 1, keys


@pytest.mark.parametrize("prefix", ["mcpmeter:", "", "tenant{7}:", "a}b:", "{:"])
@pytest.mark.parametrize("listing_id", [1, 42, 10**12])
def test_the_circuit_breaker_script_touches_one_cluster_slot(prefix: str, listing_id: int) -> None:
    keys = circuit_keys(prefix, listing_id)
    assert len(set(keys)) == 2 and len({cluster_slot(k) for k in keys}) == 1, keys


async def test_the_keys_the_script_is_really_called_with_share_one_slot(redis_settings: RedisSettings) -> None:
    cache = RedisCache(_config(redis_settings))
    seen: list[list[str]] = []
    real = cache._redis.evalsha

    async def spy(sha: str, numkeys: int, *keys_and_args: str):
        seen.append(list(keys_and_args[:numkeys]))
        return await real(sha, numkeys, *keys_and_args)

    cache._redis.evalsha = spy  # type: ignore[method-assign]
    try:
        for bucket in HOSTILE_BUCKETS:
            await cache.hit(bucket, windows_for(60, 10_000))
        assert len(seen) == len(HOSTILE_BUCKETS)
        assert all(len(keys) == 2 and len({cluster_slot(k) for k in keys}) == 1 for keys in seen), seen
        assert cache._epoch == 0
    finally:
        await cache.close()
