"""The circuit breaker: the pure state machine, its state in both caches, and the hooks using it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addon.billing import Failure
from addon.breaker import (
    CLOSED, BreakerConfig, BreakerSettings, Circuit, CircuitState, after_failure, state, upstream_failed,
)
from addon.circuits import Circuits
from addon.config import ConfigError, _build
from addon.gateway import Mcpmeter
from addon.model import Listing
from tests.refusals import refusal
from tests.test_cache_contract import MakeCache, make_cache  # noqa: F401  (a fixture)
from tests.test_gateway_hooks import (  # noqa: F401  (isolated is an autouse fixture)
    OPENING, Db, Gw, forwarded, isolated, json_response, make_flow, rpc, tool_call, upstream_answers,
    upstream_fails, write_config,
)

SETTINGS = BreakerSettings(failures=3, cooldown_seconds=10)
LISTING = Listing(id=31, slug="flaky", status="live", upstream_url="http://127.0.0.1:9/mcp")


# --- the state machine -----------------------------------------------------------------------------


def test_n_consecutive_failures_open_then_half_open_after_the_cooldown() -> None:
    c = CLOSED
    for _ in range(2):
        c = after_failure(c, SETTINGS, now=100)
        assert state(c, 100) is CircuitState.CLOSED
    c = after_failure(c, SETTINGS, now=100)
    assert c == Circuit(3, 110) and state(c, 109.9) is CircuitState.OPEN
    assert state(c, 110) is CircuitState.HALF_OPEN
    reopened = after_failure(c, SETTINGS, now=120)  # the probe failed
    assert state(reopened, 125) is CircuitState.OPEN and reopened.open_until == 130


@pytest.mark.parametrize("status, failure, expected", [
    (200, None, False), (404, None, False), (500, None, True), (502, None, True), (503, None, True),
    (None, Failure.UPSTREAM, True), (None, Failure.TIMEOUT, True), (504, Failure.TIMEOUT, True),
    (499, Failure.CLIENT_GONE, None), (500, Failure.INTERNAL, None), (None, None, None),
])
def test_what_counts_as_an_upstream_failure(status: int | None, failure: Failure | None, expected: bool | None) -> None:
    assert upstream_failed(status, failure) is expected


def test_thresholds_per_listing_with_defaults() -> None:
    config = _build({"circuit_breaker": {"failures": 4, "listings": {"flaky": {"cooldown_seconds": 2}}}})
    assert config.circuit_breaker.for_listing("other") == BreakerSettings(4, 30.0)
    assert config.circuit_breaker.for_listing("flaky") == BreakerSettings(4, 2.0)
    assert _build({}).circuit_breaker.for_listing("x") == BreakerSettings()
    for bad in ({"failures": -1}, {"cooldown_seconds": 0}, {"surprise": 1}, {"listings": {"x": {"y": 1}}}):
        with pytest.raises(ConfigError, match="circuit_breaker"):
            _build({"circuit_breaker": bad})


# --- the state in the cache, both adapters ---------------------------------------------------------


async def test_cache_counts_failures_opens_and_hands_out_one_probe(make_cache: MakeCache) -> None:
    cache = make_cache()
    assert await cache.circuit(LISTING.id) == CLOSED
    for n in (1, 2):
        assert (await cache.circuit_failed(LISTING.id, SETTINGS, 1000.0)).failures == n
    opened = await cache.circuit_failed(LISTING.id, SETTINGS, 1000.0)
    assert opened == Circuit(3, 1010.0) and await cache.circuit(LISTING.id) == opened
    assert await cache.circuit_probe(LISTING.id, 5, 1011.0) is True
    assert await cache.circuit_probe(LISTING.id, 5, 1011.0) is False  # one probe at a time
    reopened = await cache.circuit_failed(LISTING.id, SETTINGS, 1012.0)  # the probe failed
    assert reopened.open_until == 1022.0
    assert await cache.circuit_probe(LISTING.id, 5, 1023.0) is True  # a failed probe frees the slot
    await cache.circuit_reset(LISTING.id)
    assert await cache.circuit(LISTING.id) == CLOSED
    assert await cache.circuit_probe(LISTING.id, 5, 1023.0) is True


async def test_gateways_sharing_a_cache_share_the_circuit(make_cache: MakeCache,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("addon.circuits.REFRESH_SECONDS", 0.0)  # read the shared state on every call
    first, second = make_cache(), make_cache()
    if type(first).__name__ == "MemoryCache":
        second = first  # in-process: gateways in one process share one cache
    config = BreakerConfig(SETTINGS)
    a, b = Circuits(lambda: first, lambda: config), Circuits(lambda: second, lambda: config)
    for _ in range(3):
        await a.record(LISTING, 502, None)
    with pytest.raises(Exception) as refused:
        await b.admit(LISTING, priced=True)
    assert refused.value.spec.code == "upstream_unavailable" and 1 <= refused.value.details["retry_after"] <= 10
    await b.admit(LISTING, priced=False)  # unpriced traffic is not refused
    assert b.snapshot() == {"flaky": "open"}


# --- through the hooks -------------------------------------------------------------------------------


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(
            tmp_path, metrics_public=True,
            circuit_breaker={"failures": 5, "listings": {"echo-test": {"failures": 2, "cooldown_seconds": 0.3}}})))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


async def failing_call(gw: Gw, status: int | None) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    if status is None:
        await upstream_fails(gw, flow, "Connection refused")
    else:
        await upstream_answers(gw, flow, json_response({"error": "boom"}, status=status))


async def test_open_circuit_refuses_priced_calls_before_money_moves_then_probes(gw: Gw) -> None:
    await failing_call(gw, 502)
    await failing_call(gw, None)
    balance, ledger = gw.db.balance(1), gw.db.ledger(1)

    refused = make_flow(body=tool_call(rpc_id=9))
    await gw.addon.request(refused)
    assert refused.response.status_code == 503 and not forwarded(refused)
    answer = refusal(refused.response)
    assert answer["error"] == "upstream_unavailable" and refused.response.headers["Retry-After"] == "1"
    assert json.loads(refused.response.content)["id"] == 9
    assert gw.db.balance(1) == balance and gw.db.ledger(1) == ledger  # nothing charged, nothing recorded
    unpriced = make_flow(body=rpc("tools/list"))
    await gw.addon.request(unpriced)
    assert forwarded(unpriced)  # only priced calls are refused...
    await upstream_answers(gw, unpriced, json_response({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}))
    still = make_flow()
    await gw.addon.request(still)
    assert still.response.status_code == 503  # ...and only their answers close the circuit

    health = make_flow("/health", method="GET")
    await gw.addon.request(health)
    assert json.loads(health.response.content)["circuits"] == {"echo-test": "open"}
    metrics = make_flow("/metrics", token=None, method="GET")
    await gw.addon.request(metrics)
    assert b'mcpmeter_circuit_state{listing="echo-test"} 2.0' in metrics.response.content

    await asyncio.sleep(0.35)  # the cool-down is over: half-open
    probe = make_flow()
    await gw.addon.request(probe)
    assert forwarded(probe)
    second = make_flow()
    await gw.addon.request(second)
    assert second.response.status_code == 503 and refusal(second.response)["error"] == "upstream_unavailable"
    await upstream_answers(gw, probe, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    await gw.addon.drain()

    after = make_flow()
    await gw.addon.request(after)
    assert forwarded(after)  # the probe's success closed the circuit
    health = make_flow("/health", method="GET")
    await gw.addon.request(health)
    assert json.loads(health.response.content)["circuits"] == {}
    gw.db.assert_reconciled()


async def test_a_failed_probe_opens_the_circuit_again(gw: Gw) -> None:
    await failing_call(gw, 500)
    await failing_call(gw, 504)
    await asyncio.sleep(0.35)
    await failing_call(gw, 502)  # the probe
    again = make_flow()
    await gw.addon.request(again)
    assert again.response.status_code == 503
    assert gw.db.balance(1) == OPENING  # every failed call was refunded
    gw.db.assert_reconciled()


async def test_successes_reset_the_count_of_consecutive_failures(gw: Gw) -> None:
    await failing_call(gw, 502)
    ok = make_flow()
    await gw.addon.request(ok)
    await upstream_answers(gw, ok, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    await gw.addon.drain()
    await failing_call(gw, 502)
    still = make_flow()
    await gw.addon.request(still)
    assert forwarded(still)
