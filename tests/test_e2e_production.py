"""Two gateway processes sharing one MySQL and one Redis, under load and faults (SPEC I1-I4).

Everything here runs real `mitmdump` processes against a throwaway MySQL database and a
Redis server of the test's own (so it can be stopped and started), in front of the
fault-on-demand upstream; the ledger is reconciled to the micro-cent at the end of each test.
The money tests run on both stores (`both_stores`): the journal's, and wallets (credit held in
bulk, spent in Redis), whose holds the gateways' own sweepers settle before the money is checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests import dbutil, fault_server, redisutil
from tests.refusals import refusal
from tests.backends import Backend, ProductionBackend
from tests.wallet_money import assert_settled_money, gateway_config, holds_settled, uses_wallets
from tests.gateway_proc import Gateway, gateway_pair, start_gateway
from tests.test_e2e_gateway import MCP_HEADERS, call, eventually, slug


class OwnRedisBackend(ProductionBackend):
    """MySQL as usual, but a Redis server of this test's own, which it may stop and start."""

    def __init__(self, redis_proc: redisutil.RedisProcess, wallets: bool = False) -> None:
        super().__init__(wallets=wallets)
        self.redis = redis_proc.settings()


# The journal's store, and wallets (addon/store/wallets.py): `prod` takes the parameter.
both_stores = pytest.mark.parametrize("prod", ["mysql", "wallets"], indirect=True)


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[redisutil.RedisProcess]:
    dbutil.require_server()
    proc = redisutil.RedisProcess(tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def prod(request: pytest.FixtureRequest, redis_proc: redisutil.RedisProcess) -> Iterator[OwnRedisBackend]:
    b = OwnRedisBackend(redis_proc, wallets=getattr(request, "param", "mysql") == "wallets")
    yield b
    assert b.unreconciled() == [], "balances differ from their ledgers"
    b.close()


@pytest.fixture
def pair(prod: Backend, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateways behind an imaginary load balancer: same database, same Redis. With wallets, short
    lives: every hold settles within seconds (else nothing is swept during a test)."""
    config = gateway_config(prod) if uses_wallets(prod) else {"stale_call_seconds": 301}
    with gateway_pair(config, tmp_path, prod.env()) as both:
        yield both


async def spray(gateways: tuple[Gateway, ...], path: str, auth: dict[str, str], n: int,
                tool: str = "ok", args: dict[str, Any] | None = None, timeout: float = 60,
                concurrency: int | None = None, seen: dict[str, int] | None = None) -> Counter[int]:
    """n calls, alternating between the gateways, at most `concurrency` (default all) at once;
    returns the count of each status. `seen` gets each 200's request id and X-Mcpmeter-Billed."""
    limits = httpx2.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    gate = asyncio.Semaphore(concurrency or n)
    async with httpx2.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(i: int) -> int:
            gw = gateways[i % len(gateways)]
            try:
                async with gate:
                    r = await client.post(gw.url + path, content=json.dumps(call(tool, args, rpc_id=i)).encode(),
                                          headers={**MCP_HEADERS, **auth})
                if seen is not None and r.status_code == 200:
                    seen[r.headers["X-Mcpmeter-Request-Id"]] = int(r.headers["X-Mcpmeter-Billed"])
                return r.status_code
            except httpx2.HTTPError:
                return -1  # no answer at all (a killed gateway)

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


@both_stores
async def test_two_gateways_200_calls_against_a_balance_for_80(pair: tuple[Gateway, Gateway], prod: OwnRedisBackend,
                                                              fault_url: str) -> None:
    s = slug("prod")
    prod.add_listing(s, fault_url + "/mcp", price=1000, rpm=10_000, rpd=100_000)
    c = prod.add_consumer(credit=80_000)
    seen: dict[str, int] = {}
    statuses = await spray(pair, f"/{s}", c.auth, 200, seen=seen)
    assert statuses == Counter({200: 80, 402: 120})
    assert prod.balance(c.user_id) == 0  # with wallets: nothing left in MySQL nor in a wallet
    await eventually(lambda: len(prod.usage(c)) == 80)
    assert sum(u["billed"] for u in prod.usage(c)) == 80_000
    if prod.wallets:  # debited by holds, not call by call
        await holds_settled(prod)
        assert_settled_money(prod, c, 80_000, 1000, seen)
    else:
        assert [t for _, t, _ in prod.ledger(c.user_id)].count("usage") == 80


async def test_two_gateways_never_exceed_a_free_allowance(pair: tuple[Gateway, Gateway], prod: Backend,
                                                          fault_url: str) -> None:
    s = slug("prod")
    mcp_id = prod.add_listing(s, fault_url + "/mcp", price=1000, free=10, rpm=10_000, rpd=100_000)
    c = prod.add_consumer(credit=0)
    statuses = await spray(pair, f"/{s}", c.auth, 60)
    assert statuses == Counter({200: 10, 402: 50})
    assert prod.free_used(mcp_id, c.user_id) == 10
    assert prod.balance(c.user_id) == 0


async def _health(gw: Gateway) -> dict[str, Any]:
    async with httpx2.AsyncClient(timeout=5) as client:
        return (await client.get(gw.url + "/health")).json()


async def redis_in_use(pair: tuple[Gateway, Gateway], prod: Backend, fault_url: str) -> None:
    """Open both gateways' Redis connections with a burst elsewhere, then wait until neither runs on its
    own: on a starved machine a new Redis connection can time out, and the gateway then (as designed)
    limits alone for a while, which is the degradation tests elsewhere check, not this test's subject."""
    s = slug("warm")
    prod.add_listing(s, fault_url + "/mcp", price=1, rpm=100_000, rpd=100_000)
    await spray(pair, f"/{s}", prod.add_consumer(credit=1_000).auth, 64, concurrency=16)
    deadline = time.monotonic() + 15
    while not all([(await _health(gw))["cache"].get("degraded") is False for gw in pair]):
        assert time.monotonic() < deadline, "the gateways did not go back to Redis"
        await asyncio.sleep(0.2)


async def test_two_gateways_share_one_rate_limit(pair: tuple[Gateway, Gateway], prod: Backend,
                                                 fault_url: str) -> None:
    s = slug("prod")
    # rpd=30 too: GCRA refills a minute cell every 2 s, a day cell only every 48 min, so exactly
    # 30 pass however long a loaded machine takes to serve the 90.
    prod.add_listing(s, fault_url + "/mcp", price=10, rpm=30, rpd=30)
    c = prod.add_consumer(credit=1_000_000)
    await redis_in_use(pair, prod, fault_url)
    statuses = await spray(pair, f"/{s}", c.auth, 90, concurrency=16)
    assert statuses == Counter({200: 30, 429: 60})
    for gw in pair:  # a gateway that fell back to its own limits meanwhile would explain a miscount
        assert (await _health(gw))["cache"].get("degraded") is False
    assert prod.balance(c.user_id) == 1_000_000 - 30 * 10


@both_stores
async def test_redis_stopped_and_started_mid_run(pair: tuple[Gateway, Gateway], prod: OwnRedisBackend,
                                                 redis_proc: redisutil.RedisProcess, fault_url: str) -> None:
    s = slug("prod")
    prod.add_listing(s, fault_url + "/mcp", price=100, rpm=10_000, rpd=100_000)
    c = prod.add_consumer(credit=1_000_000)
    seen: dict[str, int] = {}
    before = await spray(pair, f"/{s}", c.auth, 20, seen=seen)
    redis_proc.stop()  # with wallets, the wallets go with it (no persistence): their holds settle later
    forwarded = fault_server.calls["ok"]
    during = await spray(pair, f"/{s}", c.auth, 20, seen=seen)  # auth and limits fall back to each process
    if prod.wallets:  # the wallets are in Redis: refused, and none forwarded unpaid
        assert during == Counter({503: 20}) and fault_server.calls["ok"] == forwarded
    else:
        assert during == Counter({200: 20})
    async with httpx2.AsyncClient() as client:
        health = (await client.get(pair[0].url + "/health")).json()
    assert health["cache"]["degraded"] is True
    redis_proc.start()

    async def recovered() -> bool:
        async with httpx2.AsyncClient() as client:
            return all([(await client.get(gw.url + "/health")).json()["cache"].get("degraded") is False
                        for gw in pair])

    deadline = time.monotonic() + 10
    while not await recovered():
        assert time.monotonic() < deadline, "the gateways did not go back to Redis by themselves"
        await asyncio.sleep(0.2)
    after = await spray(pair, f"/{s}", c.auth, 20, seen=seen)
    assert before == after == Counter({200: 20})
    paid = 40 if prod.wallets else 60
    await eventually(lambda: len(prod.usage(c)) == paid)
    if prod.wallets:  # the holds funded before the outage lost their wallets: settled, they add up anyway
        await holds_settled(prod)
        assert_settled_money(prod, c, 1_000_000, 100, seen)
    assert prod.balance(c.user_id) == 1_000_000 - paid * 100


@both_stores
async def test_gateway_killed_mid_load_leaves_no_debit_unexplained(pair: tuple[Gateway, Gateway],
                                                                   prod: OwnRedisBackend, fault_url: str) -> None:
    a, b = pair
    s = slug("prod")
    prod.add_listing(s, fault_url + "/mcp", price=1000, rpm=10_000, rpd=100_000)
    c = prod.add_consumer(credit=1_000_000)

    def unsettled() -> int:
        return int(prod.query("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL")[0][0])

    # A's calls first, and A killed once it has charged some of them (the tool takes 1.5 s): a fixed
    # sleep, or a count shared with B's calls, could kill A before a loaded machine let it charge any.
    # A call reaches the upstream only once charged (and wallet calls have no journal row to count).
    before, forwarded = unsettled(), fault_server.calls["slow"]
    seen_a: dict[str, int] = {}
    seen_b: dict[str, int] = {}
    load_a = asyncio.ensure_future(spray((a,), f"/{s}", c.auth, 30, tool="slow", args={"seconds": 1.5},
                                         seen=seen_a))
    deadline = time.monotonic() + 15
    while fault_server.calls["slow"] < forwarded + 10:
        assert time.monotonic() < deadline, "gateway A never charged its calls"
        await asyncio.sleep(0.05)
    load_b = asyncio.ensure_future(spray((b,), f"/{s}", c.auth, 30, tool="slow", args={"seconds": 1.5},
                                         seen=seen_b))
    await asyncio.sleep(0.2)  # B's calls are under way too
    os.kill(a.proc.pid, signal.SIGKILL)
    statuses = await load_a + await load_b
    assert statuses[-1] > 0, "calls in flight on the killed gateway get no answer"
    assert a.proc.wait(5) == -signal.SIGKILL
    if prod.wallets:
        # The calls A charged and never recorded (in flight, or answered but still in its queue) are in
        # no journal: their holds' rests give their price back once B's sweeper settles them.
        await holds_settled(prod)
        assert_settled_money(prod, c, 1_000_000, 1000, {**seen_a, **seen_b}, lost=set(seen_a))
        rest = int(prod.query("SELECT COALESCE(SUM(rest_micro_cents), 0) FROM mcpmeter_holds")[0][0])
        assert rest > 0 and rest % 1000 == 0, f"the calls A died with came back as {rest} µ¢"
        return
    # Every debit has its ledger row, whatever was in flight on the killed process (I1, I4).
    debited = {r[0] for r in prod.query("SELECT request_id FROM mcpmeter_calls WHERE verdict = 'debited'")}
    usage_rows = {r[0] for r in prod.query("SELECT request_id FROM credit_transactions WHERE type = 'usage'")}
    assert debited == usage_rows and len(debited) >= statuses[200]
    await eventually(lambda: len(prod.usage(c)) >= statuses[200], timeout=10)
    assert unsettled() > before, "the killed gateway left calls for the sweeper"


async def test_mysql_unreachable_answers_503_fast_and_recovers(prod: Backend, tmp_path: Path,
                                                               fault_url: str) -> None:
    relay = dbutil.Relay(prod.mysql)  # type: ignore[attr-defined]
    relay.start()
    env = {**prod.env(), "DB_PORT": str(relay.port)}
    gw = start_gateway({}, tmp_path, env=env, name="gateway-relay")
    try:
        s = slug("prod")
        prod.add_listing(s, fault_url + "/mcp", price=1000)
        c = prod.add_consumer(credit=10_000)
        assert (await spray((gw,), f"/{s}", c.auth, 1)) == Counter({200: 1})
        relay.stop()
        started = time.monotonic()
        async with httpx2.AsyncClient(timeout=10) as client:
            r = await client.post(gw.url + f"/{s}", content=json.dumps(call("ok")).encode(),
                                  headers={**MCP_HEADERS, **c.auth})
        assert time.monotonic() - started < 1.5
        assert r.status_code == 503 and refusal(r)["error"] == "store_unavailable"
        assert r.headers["Retry-After"] == "1"
        relay.start()
        await eventually(lambda: True)
        deadline = time.monotonic() + 10
        while (await spray((gw,), f"/{s}", c.auth, 1)) != Counter({200: 1}):
            assert time.monotonic() < deadline, "the gateway did not recover when MySQL came back"
            await asyncio.sleep(0.3)
        assert prod.balance(c.user_id) == 8_000
    finally:
        gw.stop()
        relay.stop()


@pytest.mark.parametrize("prod", ["wallets"], indirect=True)
async def test_wallet_calls_a_killed_gateway_never_wrote_come_back_to_the_consumer(
        prod: OwnRedisBackend, tmp_path: Path, fault_url: str) -> None:
    """A gateway that cannot reach MySQL still spends from its funded wallet, and keeps the settled calls
    queued; SIGKILLed, it never writes them. They stay unbilled and their price comes back to the consumer
    when the other gateway's sweeper settles the hold (which a flush race can only sometimes show)."""
    relay = dbutil.Relay(prod.mysql)
    relay.start()
    config = gateway_config(prod, wallet_seconds=8)  # the wallet outlives the test's calls on A
    a = start_gateway(config, tmp_path, env={**prod.env(), "DB_PORT": str(relay.port)}, name="gateway-a")
    try:
        b = start_gateway(config, tmp_path, env=prod.env(), name="gateway-b")
    except BaseException:
        a.stop()
        raise
    try:
        s = slug("prod")
        prod.add_listing(s, fault_url + "/mcp", price=1000, rpm=10_000, rpd=100_000)
        c = prod.add_consumer(credit=1_000_000)
        written: dict[str, int] = {}
        assert await spray((a,), f"/{s}", c.auth, 5, seen=written) == Counter({200: 5})  # A's wallet funded
        await eventually(lambda: len(prod.usage(c)) == 5)
        relay.stop()  # A can no longer write: what it settles stays queued
        lost: dict[str, int] = {}
        assert await spray((a,), f"/{s}", c.auth, 10, seen=lost) == Counter({200: 10})
        assert all(billed == 1000 for billed in lost.values())
        os.kill(a.proc.pid, signal.SIGKILL)
        assert a.proc.wait(5) == -signal.SIGKILL
        relay.start()  # (A is gone: nothing of it comes through)
        after: dict[str, int] = {}
        assert await spray((b,), f"/{s}", c.auth, 10, seen=after) == Counter({200: 10})
        await holds_settled(prod, wallet_seconds=8)
        assert_settled_money(prod, c, 1_000_000, 1000, {**written, **lost, **after}, lost=set(lost), wallet_seconds=8)
        assert not set(lost) & {u["request_id"] for u in prod.usage(c)}
        assert int(prod.query("SELECT SUM(rest_micro_cents) FROM mcpmeter_holds")[0][0]) == 10 * 1000
        assert prod.balance(c.user_id) == 1_000_000 - 15 * 1000
    finally:
        a.stop()
        b.stop()
        relay.stop()
