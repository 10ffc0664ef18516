"""The request hook on the wallets (MySQL + Redis, `wallets: true`), driven with taddons/tflow.

A call paid from a wallet costs one Redis round trip before it is forwarded: its rate limit and its
spend are one script (RATE_SPEND), judged after the checks that may refuse it. Those checks' refusals
still count against the limit (ids are not probed for free), and over the limit still answer 429.
Whatever a client does (the second half: a review's attacks), a call is counted once, never when the
limit itself refused it, and the wallet and journal paths refuse the same calls the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy.test import taddons

from addon.breaker import BreakerSettings
from addon.cache.redis import RedisCache
from addon.gateway import Mcpmeter
from addon.store.wallets import WalletStore
from tests import redisutil
from tests.backends import ProductionBackend, TestConsumer
from tests.refusals import refusal
from tests.test_gateway_hooks import (forwarded, json_response, make_flow, rpc, tool_call, upstream_answers)

pytestmark = pytest.mark.timeout(60)

PRICE = 1000
PER_MINUTE = 3


@dataclass
class WalletGw:
    addon: Mcpmeter
    backend: ProductionBackend
    alice: TestConsumer
    bob: TestConsumer

    @property
    def store(self) -> WalletStore:
        assert isinstance(self.addon.store, WalletStore)
        return self.addon.store

    @property
    def cache(self) -> RedisCache:
        assert isinstance(self.addon.cache, RedisCache)
        return self.addon.cache

    def round_trips(self) -> tuple[int, int, int]:
        """Redis round trips so far: rate limits alone, spends alone, rate limit and spend together."""
        return (self.cache._scripts.round_trips, self.store._spend.round_trips, self.store._rate_spend.round_trips)

    async def call(self, who: TestConsumer, body: Any = None, path: str = "/paid",
                   headers: dict[str, str] | None = None) -> Any:
        flow = make_flow(path, token=who.key, body=body if body is not None else tool_call(),
                         headers=headers)
        await self.addon.request(flow)
        return flow


@pytest.fixture
async def wgw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[WalletGw]:
    backend = ProductionBackend(wallets=True)
    try:
        for name, value in backend.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(tmp_path)
        backend.add_listing("paid", "http://127.0.0.1:1/mcp", price=PRICE, rpm=PER_MINUTE, rpd=1000)
        backend.add_listing("paid-free-tier", "http://127.0.0.1:1/mcp", price=PRICE, free=5, rpm=PER_MINUTE)
        alice, bob = backend.add_consumer(credit=100 * PRICE), backend.add_consumer(credit=100 * PRICE)
        path = tmp_path / "mcpmeter.yaml"
        path.write_text(yaml.safe_dump({"wallet_calls": 10}))
        addon = Mcpmeter()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, mcpmeter_config=str(path))
            try:
                yield WalletGw(addon, backend, alice, bob)
            finally:
                stopping = addon.done()
                if stopping is not None:
                    await stopping
    finally:
        backend.close()


async def answered(gw: WalletGw, flow: Any) -> None:
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))


async def test_a_wallet_call_pays_one_redis_round_trip_before_it_is_forwarded(wgw: WalletGw) -> None:
    first = await wgw.call(wgw.alice)  # the wallet is granted (MySQL) on the first call
    assert forwarded(first)
    before = wgw.round_trips()
    flow = await wgw.call(wgw.alice)
    assert forwarded(flow)
    assert [b - a for a, b in zip(before, wgw.round_trips(), strict=True)] == [0, 0, 1]
    assert flow.response is None
    for f in (first, flow):
        await answered(wgw, f)
        assert f.response.status_code == 200
        assert f.response.headers["RateLimit-Limit"] == str(PER_MINUTE)
    assert [f.response.headers["RateLimit-Remaining"] for f in (first, flow)] == ["2", "1"]


async def test_over_the_limit_a_wallet_call_is_refused_and_spends_nothing(wgw: WalletGw) -> None:
    for _ in range(PER_MINUTE):
        assert forwarded(await wgw.call(wgw.alice))
    left = wgw.backend.balance(wgw.alice.user_id)
    refused = await wgw.call(wgw.alice)
    assert not forwarded(refused) and refused.response.status_code == 429
    assert refusal(refused.response)["error"] == "rate_limited" and "Retry-After" in refused.response.headers
    assert wgw.backend.balance(wgw.alice.user_id) == left
    assert forwarded(await wgw.call(wgw.bob))  # Bob's limit is his own


async def test_a_refused_session_probe_still_counts_and_is_answered_429_past_the_limit(wgw: WalletGw) -> None:
    init = await wgw.call(wgw.alice, body=rpc("initialize", protocolVersion="2025-06-18", capabilities={},
                                              clientInfo={"name": "t", "version": "1"}))
    await upstream_answers(wgw, init, json_response({"jsonrpc": "2.0", "id": 1, "result": {}},
                                                          headers={"Mcp-Session-Id": "alice-1"}))
    answers = []
    for _ in range(PER_MINUTE + 2):  # Bob's paid calls in Alice's session: refused, and counted
        probe = await wgw.call(wgw.bob, headers={"Mcp-Session-Id": "alice-1"})
        assert not forwarded(probe)
        answers.append(refusal(probe.response)["error"])
    assert answers == ["session_forbidden"] * PER_MINUTE + ["rate_limited"] * 2
    refused = await wgw.call(wgw.bob)  # and his own calls are over the limit too
    assert refusal(refused.response)["error"] == "rate_limited"
    assert wgw.store._rate_spend.round_trips == 1  # his own call, refused by it: nothing spent
    assert wgw.backend.balance(wgw.bob.user_id) == 100 * PRICE


async def test_calls_the_wallet_does_not_pay_judge_the_limit_before_the_checks(wgw: WalletGw) -> None:
    """A free tier (the journal's charge), an unpriced call and an Idempotency-Key (its claim must
    not outlive a 429) are limited by the rate-limit script alone, as before."""
    before = wgw.round_trips()
    assert forwarded(await wgw.call(wgw.alice, path="/paid-free-tier"))
    assert forwarded(await wgw.call(wgw.alice, body=rpc("tools/list")))
    assert forwarded(await wgw.call(wgw.alice, headers={"Idempotency-Key": "k-1"}))
    after = wgw.round_trips()
    assert (after[0] - before[0], after[2] - before[2]) == (3, 0)
    assert forwarded(await wgw.call(wgw.alice, body=rpc("tools/list")))  # the paid listing's third
    refused = await wgw.call(wgw.alice)
    assert refusal(refused.response)["error"] == "rate_limited"


async def test_concurrent_wallet_calls_never_pass_the_limit_nor_overspend(wgw: WalletGw) -> None:
    flows = await asyncio.gather(*(wgw.call(wgw.alice) for _ in range(20)))
    assert sum(forwarded(f) for f in flows) == PER_MINUTE
    assert sorted(refusal(f.response)["error"] for f in flows if not forwarded(f)) == ["rate_limited"] * 17
    await asyncio.gather(*(answered(wgw, f) for f in flows if forwarded(f)))
    await wgw.addon.drain()
    assert wgw.backend.balance(wgw.alice.user_id) == 100 * PRICE - PER_MINUTE * PRICE


# --- the limit judged at the charge, attacked (a review's finds) ------------------------------

async def listing_id(gw: WalletGw, slug: str = "paid") -> int:
    listing = await gw.addon.admission.listing(slug)
    assert listing is not None
    return listing.id


async def test_a_check_failing_unexpectedly_still_counts_the_call(wgw: WalletGw,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that fails with something else than a refusal (a bug, an internal error: answered 500,
    never forwarded) counted the call when the limit was judged first; a wallet call must not become
    an uncounted probe either (its limit is judged after the checks)."""
    async def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a check failed")

    monkeypatch.setattr(wgw.addon.circuits, "admit", broken)
    for _ in range(PER_MINUTE):
        failed = await wgw.call(wgw.alice)
        assert not forwarded(failed) and failed.response.status_code == 500
    past = await wgw.call(wgw.alice)
    assert not forwarded(past) and refusal(past.response)["error"] == "rate_limited"
    monkeypatch.undo()
    refused = await wgw.call(wgw.alice)  # the limit is spent: by the calls that failed
    assert not forwarded(refused) and refusal(refused.response)["error"] == "rate_limited"
    assert wgw.backend.balance(wgw.alice.user_id) == 100 * PRICE


async def test_a_store_replaced_by_a_reload_mid_admission_is_charged_normally(
        wgw: WalletGw, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload turning wallets off while a wallet call is between its checks and its charge: the
    call is judged and charged by the store that is there at its charge, not answered 500."""
    wallet = wgw.store
    admit = wgw.addon.circuits.admit

    async def reloaded(*args: Any, **kwargs: Any) -> bool:
        wgw.addon.store = wallet.mysql  # what open_store gives for `wallets: false`
        return await admit(*args, **kwargs)

    monkeypatch.setattr(wgw.addon.circuits, "admit", reloaded)
    try:
        flows = [await wgw.call(wgw.alice) for _ in range(PER_MINUTE + 1)]
        assert [forwarded(f) for f in flows] == [True] * PER_MINUTE + [False]
        assert refusal(flows[-1].response)["error"] == "rate_limited"
        for f in flows[:-1]:
            await answered(wgw, f)
            assert f.response.status_code == 200
        await wgw.addon.drain()
        assert wgw.backend.balance(wgw.alice.user_id) == 100 * PRICE - PER_MINUTE * PRICE
    finally:
        wgw.addon.store = wallet


async def test_an_over_the_limit_call_does_not_take_a_half_open_circuits_probe(wgw: WalletGw) -> None:
    """Judged first, a call over its limit never reached the circuit breaker. Judged at the charge, it
    took the half-open circuit's one probe slot until its 429: a consumer past its limit, refused at
    no cost, kept every other consumer's call to a recovering upstream refused 503 meanwhile."""
    for _ in range(PER_MINUTE):
        assert forwarded(await wgw.call(wgw.alice))
    lid = await listing_id(wgw)
    settings = BreakerSettings()
    now = time.time()
    for consumer in range(settings.failures):
        await wgw.cache.circuit_failed(lid, settings, now, consumer + 100)
    wgw.addon.circuits._clock = lambda: time.time() + settings.cooldown_seconds + 1  # half-open now
    wgw.addon.circuits._near.clear()  # (read closed by Alice's calls a moment ago)

    charge_limited = wgw.store.charge_limited
    bobs: list[Any] = []

    async def meanwhile(request: Any, bucket: str, windows: Any) -> Any:
        if request.user_id == wgw.alice.user_id:  # while Alice's call (over its limit) is being judged
            bobs.append(await wgw.call(wgw.bob))
        return await charge_limited(request, bucket, windows)

    wgw.store.charge_limited = meanwhile  # type: ignore[method-assign]
    alice = await wgw.call(wgw.alice)
    assert refusal(alice.response)["error"] == "rate_limited"
    if not bobs:  # (judged before the circuit, Alice's call never reached the charge)
        bobs.append(await wgw.call(wgw.bob))
    assert forwarded(bobs[0]), (bobs[0].response.status_code, refusal(bobs[0].response))


async def test_a_flushed_script_cache_still_counts_and_spends_once(wgw: WalletGw) -> None:
    """SCRIPT FLUSH (a restarted Redis, a failover): the script is sent again as EVAL, once."""
    assert forwarded(first := await wgw.call(wgw.alice))  # the wallet is granted
    await answered(wgw, first)
    with redisutil.client(wgw.store.config.redis) as r:
        r.script_flush()
    flow = await wgw.call(wgw.alice)
    assert forwarded(flow)
    await answered(wgw, flow)
    assert flow.response.headers["RateLimit-Remaining"] == str(PER_MINUTE - 2)
    await wgw.addon.drain()
    assert wgw.backend.balance(wgw.alice.user_id) == 100 * PRICE - 2 * PRICE  # two calls spent, once each


@pytest.mark.parametrize("fault", ["connection", "script_error"])
async def test_redis_failing_at_the_charge_refuses_503_and_forwards_nothing(
        wgw: WalletGw, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError, ResponseError

    assert forwarded(first := await wgw.call(wgw.alice))
    await answered(wgw, first)
    error = RedisConnectionError("gone") if fault == "connection" else ResponseError("ERR user_script:1: boom")

    async def failing(keys: list[str], args: list[str]) -> Any:
        raise error

    monkeypatch.setattr(wgw.store._rate_spend, "run", failing)
    flow = await wgw.call(wgw.alice)
    assert not forwarded(flow) and flow.response.status_code == 503
    assert refusal(flow.response)["error"] == "store_unavailable"
    assert flow.response.headers.get("Retry-After") == "1"
    monkeypatch.undo()
    await wgw.addon.drain()
    assert isinstance(wgw.addon.store, WalletStore) and not wgw.store._open
    assert forwarded(again := await wgw.call(wgw.alice))
    await answered(wgw, again)
    assert again.response.headers["RateLimit-Remaining"] == str(PER_MINUTE - 2)  # the failed one: not counted


async def test_unpriced_and_priced_calls_share_one_bucket_on_the_wallet_path(wgw: WalletGw) -> None:
    """The plain script (tools/list, refusals) and RATE_SPEND (paid calls) count in the same keys."""
    assert forwarded(await wgw.call(wgw.alice, body=rpc("tools/list")))
    assert forwarded(await wgw.call(wgw.alice))
    assert forwarded(await wgw.call(wgw.alice, body=rpc("tools/list")))
    assert refusal((await wgw.call(wgw.alice)).response)["error"] == "rate_limited"
    assert refusal((await wgw.call(wgw.alice, body=rpc("tools/list"))).response)["error"] == "rate_limited"


async def test_an_open_circuits_refusals_of_wallet_calls_count_once_each(wgw: WalletGw) -> None:
    lid = await listing_id(wgw)
    settings = BreakerSettings()
    for consumer in range(settings.failures):
        await wgw.cache.circuit_failed(lid, settings, time.time(), consumer + 100)
    wgw.addon.circuits._near.clear()
    answers = [refusal((await wgw.call(wgw.bob)).response)["error"] for _ in range(PER_MINUTE + 1)]
    assert answers == ["upstream_unavailable"] * PER_MINUTE + ["rate_limited"]
    assert wgw.store._rate_spend.round_trips == 0 and wgw.backend.balance(wgw.bob.user_id) == 100 * PRICE


def ask(rpc_id: int, state: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": "ask", "arguments": {}}
    if state is not None:
        params.update(requestState=state, inputResponses={})
    return rpc("tools/call", rpc_id, **params)


async def held_round(gw: WalletGw, state: str) -> None:
    flow = await gw.call(gw.alice, body=ask(1))
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response(
        {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "requestState": state}}))
    assert flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)


async def test_a_retry_continuing_a_held_round_counts_once_and_a_429_gives_the_round_back(
        wgw: WalletGw) -> None:
    await held_round(wgw, "S1")  # 1
    retry = await wgw.call(wgw.alice, body=ask(2, "S1"))  # 2: counted, not charged
    assert forwarded(retry)
    await upstream_answers(wgw, retry, json_response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
    assert retry.response.headers["X-Mcpmeter-Billed"] == "0"
    await held_round(wgw, "S2")  # 3
    refused = await wgw.call(wgw.alice, body=ask(3, "S2"))  # past the limit: its round is given back
    assert refusal(refused.response)["error"] == "rate_limited"
    assert len(wgw.addon.deferred.rounds) == 1
    await wgw.addon.drain()
    assert wgw.backend.balance(wgw.alice.user_id) == 100 * PRICE - 2 * PRICE


async def test_health_counts_the_spends_made_with_the_rate_limit(wgw: WalletGw) -> None:
    for _ in range(2):
        assert forwarded(await wgw.call(wgw.alice))
    wallets = (await wgw.store.health())["wallets"]
    assert isinstance(wallets, dict)
    assert wallets["spend_round_trips"] == 2 and wallets["rate_spend_round_trips"] == 2
