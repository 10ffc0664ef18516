"""The request hook on the wallets (MySQL + Redis, `wallets: true`), driven with taddons/tflow.

A call paid from a wallet costs one Redis round trip before it is forwarded: its rate limit and its
spend are one script (RATE_SPEND), judged after the checks that may refuse it. Those checks' refusals
still count against the limit (ids are not probed for free), and over the limit still answer 429.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy.test import taddons

from addon.cache.redis import RedisCache
from addon.gateway import Mcpmeter
from addon.store.wallets import WalletStore
from tests.backends import ProductionBackend, TestConsumer
from tests.refusals import refusal
from tests.test_gateway_hooks import (forwarded, json_response, make_flow, rpc, tool_call, upstream_answers)

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
