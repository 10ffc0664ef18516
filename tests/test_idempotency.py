"""Idempotency-Key: the pure rules (addon/idempotency.py), then the cache contract on both caches."""

from __future__ import annotations

import asyncio
import json

import pytest

from addon import idempotency as idem
from addon.cache.idempotency import conclude
from addon.cache.redis import RedisCache
from tests.test_cache_contract import MakeCache, make_cache  # noqa: F401  (fixture: memory and Redis)

pytestmark = pytest.mark.timeout(60)

ANSWER = idem.Answer(200, (("content-type", "application/json"), ("X-Mcpmeter-Billed", "1000")), b'{"ok":1}\xff')


# --- the pure rules ----------------------------------------------------------------------------


def test_key_check() -> None:
    assert idem.check_key([]) is None
    assert idem.check_key(["a"]) == "a"
    assert idem.check_key(["k" * 255]) == "k" * 255
    assert idem.check_key(["retry 1: ~!"]) == "retry 1: ~!"
    for bad in ["", "k" * 256, "caf\u00e9", "tab\there", "nl\n", "\x7f"]:
        with pytest.raises(idem.InvalidKey):
            idem.check_key([bad])
    with pytest.raises(idem.InvalidKey):
        idem.check_key(["a", "a"])


def test_cache_key_is_scoped_bounded_and_hash_tagged() -> None:
    a = idem.cache_key(3, "k9", "x" * 255)
    assert a.startswith("idem:{3:k9}:") and len(a) == len("idem:{3:k9}:") + 64
    assert idem.cache_key(3, "k9", "x") != idem.cache_key(3, "k10", "x") != idem.cache_key(4, "k9", "x")


def test_fingerprint_is_the_body_sha256() -> None:
    assert idem.fingerprint(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_judge_each_state() -> None:
    claim = idem.new_claim("k", b"body", 30)
    assert claim.fingerprint == idem.fingerprint(b"body")
    assert idem.judge(claim.value, claim.fingerprint).kind == "in_flight"
    assert idem.judge(claim.value, idem.fingerprint(b"other")).kind == "reused"
    done = idem.done_record(claim.fingerprint, ANSWER)
    replay = idem.judge(done, claim.fingerprint)
    assert replay.kind == "replay" and replay.answer == ANSWER
    assert idem.judge(done, idem.fingerprint(b"other")).kind == "reused"
    assert idem.judge("not json", claim.fingerprint).answer is None  # unreadable: never replayed
    assert idem.new_claim("k", b"body", 30).value != claim.value  # every claim is its own


def test_answer_keeps_only_relevant_headers_and_bounds_the_body() -> None:
    got = idem.answer_of(201, [("Content-Type", "text/event-stream"), ("Set-Cookie", "x"), ("Server", "u")],
                         b"data: 1\n\n", {"X-Mcpmeter-Billed": "0", "X-Mcpmeter-Refunded": "1"})
    assert got == idem.Answer(201, (("Content-Type", "text/event-stream"), ("X-Mcpmeter-Billed", "0"),
                                    ("X-Mcpmeter-Refunded", "1")), b"data: 1\n\n")
    assert idem.answer_of(200, [], b"x" * (idem.MAX_STORED_BYTES + 1), {}) is None
    assert idem.should_store(billed=True, upstream_answered=False)
    assert idem.should_store(billed=False, upstream_answered=True)  # a refunded answer is replayed
    assert not idem.should_store(billed=False, upstream_answered=False)  # 502/504: released


def test_capture_keeps_what_passes_and_gives_up_past_the_bound() -> None:
    claim = idem.new_claim("k", b"", 30)
    watch = idem.capture(lambda chunk: chunk.upper(), claim)
    assert watch(b"ab") == b"AB" and watch(b"") == b""
    assert bytes(claim.captured or b"") == b"AB" and not claim.overflow
    big = idem.new_claim("k", b"", 30)
    watch = idem.capture(None, big)
    watch(b"x" * idem.MAX_STORED_BYTES)
    assert watch(b"y") == b"y"  # the answer still passes
    assert big.overflow and big.captured is None


def test_capture_takes_its_bytes_of_a_budget_and_gives_way_without_closing_anyone() -> None:
    from addon.budget import Budget, Share

    closed: list[object] = []
    pool = Budget(closer=lambda owner, context: lambda: closed.append(owner))
    limit = 100
    claim = idem.new_claim("k", b"", 30)
    watch = idem.capture(None, claim, Share(pool, limit))
    watch(b"x" * 60)
    assert pool.held == 60 and not claim.overflow
    other = idem.new_claim("k", b"", 30)
    watch_other = idem.capture(None, other, Share(pool, limit))
    assert watch_other(b"y" * 50) == b"y" * 50  # passes; not kept: the budget has no room for it
    assert other.overflow and other.captured is None and pool.held == 60 and closed == []
    idem.drop_capture(claim)
    assert pool.held == 0 and claim.captured is None


# --- the cache contract (both caches) ------------------------------------------------------------


async def test_claim_once_then_see_the_claim(make_cache: MakeCache) -> None:
    cache = make_cache()
    first, second = idem.new_claim("idem:{1:k1}:a", b"b", 30), idem.new_claim("idem:{1:k1}:a", b"b", 30)
    assert await cache.idem_claim(first.key, first.value, 30) is None
    assert await cache.idem_claim(second.key, second.value, 30) == first.value
    assert await cache.idem_claim("idem:{1:k2}:a", second.value, 30) is None  # another consumer's key


async def test_concurrent_claims_one_wins(make_cache: MakeCache) -> None:
    first = make_cache()
    caches = [first, make_cache()] if isinstance(first, RedisCache) else [first]  # Redis: two gateways
    claims = [idem.new_claim("idem:{1:k1}:race", b"b", 30) for _ in range(20)]
    got = await asyncio.gather(*(caches[i % len(caches)].idem_claim(c.key, c.value, 30)
                                 for i, c in enumerate(claims)))
    assert got.count(None) == 1
    winner = claims[got.index(None)].value
    assert all(g == winner for g in got if g is not None)


async def test_finish_stores_the_answer_only_for_the_claim_holder(make_cache: MakeCache) -> None:
    cache = make_cache()
    claim = idem.new_claim("idem:{1:k1}:f", b"b", 30)
    other = idem.new_claim("idem:{1:k1}:f", b"b", 30)
    assert await cache.idem_claim(claim.key, claim.value, 30) is None
    record = idem.done_record(claim.fingerprint, ANSWER)
    assert not await cache.idem_finish(claim.key, other.value, record)  # not ours
    assert not await cache.idem_release(claim.key, other.value)
    assert await cache.idem_finish(claim.key, claim.value, record)
    seen = await cache.idem_claim(other.key, other.value, 30)
    assert seen == record and idem.judge(seen, other.fingerprint).answer == ANSWER
    assert not await cache.idem_release(claim.key, claim.value)  # the answer is no claim to release


async def test_release_frees_the_key(make_cache: MakeCache) -> None:
    cache = make_cache()
    claim, retry = idem.new_claim("idem:{1:k1}:r", b"b", 30), idem.new_claim("idem:{1:k1}:r", b"b", 30)
    assert await cache.idem_claim(claim.key, claim.value, 30) is None
    await conclude(cache, claim, None)
    assert claim.ended
    assert await cache.idem_claim(retry.key, retry.value, 30) is None


async def test_a_crashed_claim_expires_and_answers_live_longer(make_cache: MakeCache) -> None:
    cache = make_cache()
    crashed, retry = idem.new_claim("idem:{1:k1}:c", b"b", 0.3), idem.new_claim("idem:{1:k1}:c", b"b", 0.3)
    assert await cache.idem_claim(crashed.key, crashed.value, 0.3) is None
    assert await cache.idem_claim(retry.key, retry.value, 0.3) == crashed.value
    await asyncio.sleep(0.5)
    assert await cache.idem_claim(retry.key, retry.value, 0.3) is None  # never locked forever
    assert not await cache.idem_finish(crashed.key, crashed.value, "late")  # the late one cannot overwrite
    await conclude(cache, retry, ANSWER)
    await asyncio.sleep(0.5)  # past the claim's TTL: the answer stays (24 h)
    assert idem.judge(await cache.idem_claim(retry.key, "x", 0.3) or "", retry.fingerprint).answer == ANSWER


async def test_redis_records_live_under_the_prefix_with_their_ttls(make_cache: MakeCache) -> None:
    cache = make_cache()
    if not isinstance(cache, RedisCache):
        pytest.skip("Redis only")
    claim = idem.new_claim(idem.cache_key(5, "k1", "key"), b"b", 40)
    await cache.idem_claim(claim.key, claim.value, 40)
    name = cache._prefix + claim.key
    assert 39_000 < await cache._redis.pttl(name) <= 40_000
    await conclude(cache, claim, ANSWER)
    assert 24 * 3600 * 1000 - 5000 < await cache._redis.pttl(name) <= 24 * 3600 * 1000
    assert json.loads(await cache._redis.get(name))["state"] == "done"


@pytest.mark.parametrize("record_chars", [20, 300, 3000])
async def test_in_process_records_stay_within_their_memory_budget(monkeypatch: pytest.MonkeyPatch,
                                                                   record_chars: int) -> None:
    # Small records, the usual ones, are mostly bookkeeping (the key, the entry, the cache's own
    # dicts): the budget counts that too, so the memory they take is the budget's, not a multiple.
    import time
    import tracemalloc

    from addon.cache import idempotency as cache_idem
    from addon.cache.memory import MemoryCache

    budget = 4 * 1024 * 1024
    monkeypatch.setattr(cache_idem, "MEMORY_BUDGET_BYTES", budget)
    cache = MemoryCache.__new__(MemoryCache)  # only its Idempotency-Key part, on a plain clock
    cache._clock = time.monotonic
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3 * budget // (record_chars + 500)):  # three times what fits
            key = idem.cache_key(1, f"user:{i}", f"retry-{i}")
            assert await cache.idem_claim(key, "claim", 60) is None
            assert await cache.idem_finish(key, "claim", "r" * record_chars + str(i))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.5 * budget < used <= 1.1 * budget, (used, budget)


async def test_a_header_value_that_is_not_utf8_survives_the_store(make_cache: MakeCache) -> None:
    # mitmproxy reads such bytes as surrogate escapes: the record (JSON, ASCII) keeps them on both caches.
    cache = make_cache()
    answer = idem.Answer(200, (("content-type", "text/plain; x=\udcff"),), b"x")
    claim = idem.new_claim("idem:{1:k1}:u", b"b", 30)
    assert await cache.idem_claim(claim.key, claim.value, 30) is None
    await conclude(cache, claim, answer)
    seen = await cache.idem_claim(claim.key, "x", 30)
    assert seen is not None and idem.judge(seen, claim.fingerprint).answer == answer
