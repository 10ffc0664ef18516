"""The rate-limit script runs of concurrent calls share Redis round trips (addon/cache/redis_scripts.py),
on a real Redis: every run decides exactly as alone, none is sent twice or lost, and one its caller
gave up on is not sent at all."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from addon.cache.redis import RATE_LIMIT_SCRIPT, RedisCache, _SCRIPT_SHA
from addon.cache.redis_scripts import ScriptRuns
from addon.config import Config, RedisSettings
from addon.ratelimit import windows_for
from tests import redisutil


@pytest.fixture
async def redis_settings() -> AsyncIterator[RedisSettings]:
    with redisutil.scratch_prefix() as settings:
        yield settings


@pytest.fixture
async def cache(redis_settings: RedisSettings) -> AsyncIterator[RedisCache]:
    c = RedisCache(replace(Config(), cache="redis", redis=redis_settings))
    try:
        yield c
    finally:
        await c.close()


async def test_concurrent_calls_share_round_trips_and_the_limit_holds_exactly(cache: RedisCache) -> None:
    windows = windows_for(40, 10_000)  # a burst of 40 in a minute
    verdicts = await asyncio.gather(*(cache.hit("1:u1", windows) for _ in range(100)))
    assert sum(v.allowed for v in verdicts) == 40  # no run lost, none counted twice
    assert cache._scripts.round_trips < 20  # one alone, then the rest batched (100 alone before)
    assert not cache._degraded
    # Refused runs changed nothing: 40 more later in the minute are refused, one by one.
    assert not any([(await cache.hit("1:u1", windows)).allowed for _ in range(3)])


async def test_each_bucket_of_a_batch_is_judged_on_its_own(cache: RedisCache) -> None:
    windows = windows_for(3, 10_000)
    verdicts = await asyncio.gather(*(cache.hit(f"1:u{i % 5}", windows) for i in range(50)))
    allowed = [sum(v.allowed for v, i in zip(verdicts, range(50), strict=True) if i % 5 == u) for u in range(5)]
    assert allowed == [3] * 5


async def test_a_server_without_the_script_runs_each_call_once(cache: RedisCache,
                                                               redis_settings: RedisSettings) -> None:
    windows = windows_for(30, 10_000)
    with redisutil.client(redis_settings) as r:
        r.script_flush()
    verdicts = await asyncio.gather(*(cache.hit("2:u1", windows) for _ in range(45)))
    assert sum(v.allowed for v in verdicts) == 30 and not cache._degraded
    with redisutil.client(redis_settings) as r:
        r.script_flush()  # again, between a lone run and a batch
    verdicts = await asyncio.gather(*(cache.hit("2:u2", windows) for _ in range(45)))
    assert sum(v.allowed for v in verdicts) == 30 and not cache._degraded


async def test_a_run_whose_caller_gave_up_is_not_sent(redis_settings: RedisSettings) -> None:
    windows = windows_for(10, 10_000)
    r = aioredis.Redis(host=redis_settings.host, port=redis_settings.port, db=redis_settings.db,
                       password=redis_settings.password, decode_responses=True)
    admin = aioredis.Redis(host=redis_settings.host, port=redis_settings.port, db=redis_settings.db,
                           password=redis_settings.password)
    cache = RedisCache(replace(Config(), cache="redis", redis=redis_settings))
    try:
        runs = ScriptRuns(r, RATE_LIMIT_SCRIPT, _SCRIPT_SHA)
        await admin.client_pause(400)  # the first run waits in Redis; the others queue behind it
        keys = cache_keys(cache, "3:u1", windows)
        args = cache_args(windows)
        first = asyncio.ensure_future(runs.run(keys, args))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(runs.run(keys, args)) for _ in range(9)]
        await asyncio.sleep(0.05)
        for task in queued[:4]:
            task.cancel()  # as the caller's timeout does (RedisCache._run, OP_TIMEOUT)
        replies = await asyncio.gather(first, *queued[4:])
        assert [reply[0] for reply in replies] == [1] * 6
        assert runs.round_trips == 2  # the first alone, the 5 still wanted together
        # Only 6 of the limit's 10 were taken: 4 more pass, the 11th does not.
        more = [await runs.run(keys, args) for _ in range(5)]
        assert [reply[0] for reply in more] == [1, 1, 1, 1, 0]
    finally:
        await cache.close()
        await r.aclose()
        await admin.aclose()


async def test_a_dead_server_fails_every_run_of_a_batch_at_once(redis_settings: RedisSettings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    r = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.25, decode_responses=True,
                       retry=Retry(NoBackoff(), 0))  # as the gateway's client (RedisCache)
    try:
        runs = ScriptRuns(r, RATE_LIMIT_SCRIPT, _SCRIPT_SHA)
        results = await asyncio.wait_for(asyncio.gather(
            *(runs.run(["k"], ["", "1", "1", "1"]) for _ in range(20)), return_exceptions=True), 5)
        assert len(results) == 20 and all(isinstance(e, (ConnectionError, OSError, aioredis.RedisError))
                                          for e in results), results
        assert runs.round_trips == 2  # one alone, then the 19 that queued behind it together
    finally:
        await r.aclose()


async def test_a_cache_falls_back_when_redis_dies_under_concurrent_calls(redis_settings: RedisSettings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = RedisCache(replace(Config(), cache="redis", redis=replace(redis_settings, port=port)))
    try:
        verdicts = await asyncio.wait_for(asyncio.gather(
            *(cache.hit("4:u1", windows_for(5, 10_000)) for _ in range(12))), 5)
        assert sum(v.allowed for v in verdicts) == 5  # the in-process limiter decided, exactly
        assert cache._degraded
    finally:
        await cache.close()


def cache_keys(cache: RedisCache, bucket: str, windows: tuple) -> list[str]:
    from addon.cache.redis import rate_keys
    return rate_keys(cache._prefix, bucket, windows)


def cache_args(windows: tuple) -> list[str]:
    args = [""]
    for w in windows:
        args += [str(w.limit), str(w.interval_us), str(w.tolerance_us)]
    return args
