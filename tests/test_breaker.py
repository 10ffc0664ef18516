"""The circuit breaker: the pure state machine, its state in both caches, and the hooks using it."""

from __future__ import annotations

import asyncio
import json
import random
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
    ALICE, BOB, OPENING, Db, Gw, forwarded, isolated, json_response, make_flow, rpc, tool_call, upstream_answers,
    upstream_fails, write_config,
)

SETTINGS = BreakerSettings(failures=3, cooldown_seconds=10)
LISTING = Listing(id=31, slug="flaky", status="live", upstream_url="http://127.0.0.1:9/mcp")


# --- the state machine -----------------------------------------------------------------------------


def test_n_consecutive_failures_open_then_half_open_after_the_cooldown() -> None:
    c = CLOSED
    for consumer in (1, 2):
        c = after_failure(c, SETTINGS, now=100, consumer=consumer)
        assert state(c, 100) is CircuitState.CLOSED
    c = after_failure(c, SETTINGS, now=100, consumer=1)
    assert c == Circuit(3, 110, first=1) and state(c, 109.9) is CircuitState.OPEN
    assert state(c, 110) is CircuitState.HALF_OPEN
    reopened = after_failure(c, SETTINGS, now=120, consumer=2)  # the probe, another consumer's, failed
    assert state(reopened, 125) is CircuitState.OPEN and reopened.open_until == 130


def test_one_consumer_failing_alone_never_opens_the_circuit() -> None:
    c = CLOSED
    for n in range(1, 20):
        c = after_failure(c, SETTINGS, now=100, consumer=7)
        assert c == Circuit(n, 0.0, first=7) and state(c, 100) is CircuitState.CLOSED
    c = after_failure(c, SETTINGS, now=100, consumer=8)  # a second consumer's failure: the streak is long enough
    assert state(c, 100) is CircuitState.OPEN and c == Circuit(20, 110, first=8)


def test_two_consumers_open_it_whatever_the_order() -> None:
    for order in ((1, 1, 2), (1, 2, 2), (2, 1, 1), (1, 2, 3)):
        c = CLOSED
        for consumer in order:
            c = after_failure(c, SETTINGS, now=100, consumer=consumer)
        assert state(c, 100) is CircuitState.OPEN, order


def test_a_probe_failed_by_the_consumer_that_opened_it_closes_it_and_cannot_keep_it_shut() -> None:
    c = CLOSED
    for consumer in (2, 1, 1):  # the attacker (1) fails last: its failure opened the circuit
        c = after_failure(c, SETTINGS, now=100, consumer=consumer)
    assert state(c, 105) is CircuitState.OPEN
    c = after_failure(c, SETTINGS, now=105, consumer=1)  # its call in flight fails while open: no change
    assert c.open_until == 110 and state(c, 105) is CircuitState.OPEN
    for now in (110, 111, 112):  # it takes every probe and fails it: the circuit closes, and stays closed
        c = after_failure(c, SETTINGS, now=now, consumer=1)
        assert state(c, now) is CircuitState.CLOSED and c.open_until == 0
    c = after_failure(c, SETTINGS, now=113, consumer=2)  # another consumer fails: it re-opens at once
    assert state(c, 113) is CircuitState.OPEN and c.open_until == 123


def test_a_failed_probe_re_opens_once_at_most_without_another_consumer() -> None:
    c = CLOSED
    for consumer in (1, 1, 2):  # an honest consumer (2) failed last: its failure opened the circuit
        c = after_failure(c, SETTINGS, now=100, consumer=consumer)
    c = after_failure(c, SETTINGS, now=110, consumer=1)  # 1 fails the probe: 2 then 1, it re-opens
    assert state(c, 110) is CircuitState.OPEN and c.open_until == 120
    c = after_failure(c, SETTINGS, now=120, consumer=1)  # 1 fails the next probe too: 1 alone, it closes
    assert state(c, 120) is CircuitState.CLOSED


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
    for n, consumer in ((1, 1), (2, 2)):
        assert (await cache.circuit_failed(LISTING.id, SETTINGS, 1000.0, consumer)).failures == n
    opened = await cache.circuit_failed(LISTING.id, SETTINGS, 1000.0, 1)
    assert opened == Circuit(3, 1010.0, first=1) and await cache.circuit(LISTING.id) == opened
    assert await cache.circuit_probe(LISTING.id, 5, 1011.0) is True
    assert await cache.circuit_probe(LISTING.id, 5, 1011.0) is False  # one probe at a time
    reopened = await cache.circuit_failed(LISTING.id, SETTINGS, 1012.0, 2)  # the probe failed
    assert reopened == Circuit(4, 1022.0, first=2) and await cache.circuit(LISTING.id) == reopened
    assert await cache.circuit_probe(LISTING.id, 5, 1023.0) is True  # a failed probe frees the slot
    await cache.circuit_reset(LISTING.id)
    assert await cache.circuit(LISTING.id) == CLOSED
    assert await cache.circuit_probe(LISTING.id, 5, 1023.0) is True


async def test_cache_one_consumer_alone_neither_opens_nor_keeps_open(make_cache: MakeCache) -> None:
    """The rule, the same on both adapters (the Redis one runs it in FAILURE_SCRIPT)."""
    cache = make_cache()
    for n in range(1, 6):
        assert await cache.circuit_failed(LISTING.id, SETTINGS, 1000.0, 7) == Circuit(n, 0.0, first=7)
    assert await cache.circuit(LISTING.id) == Circuit(5, 0.0, first=7)
    opened = await cache.circuit_failed(LISTING.id, SETTINGS, 1000.0, 8)
    assert opened == Circuit(6, 1010.0, first=8)
    inflight = await cache.circuit_failed(LISTING.id, SETTINGS, 1005.0, 8)  # the same consumer, while open
    assert inflight == Circuit(7, 1010.0, first=8) and state(inflight, 1005.0) is CircuitState.OPEN
    mixed = await cache.circuit_failed(LISTING.id, SETTINGS, 1006.0, 7)  # another one's, while open: extends
    assert mixed == Circuit(8, 1016.0, first=7)
    assert await cache.circuit_probe(LISTING.id, 5, 1016.0, "p") is True
    closed = await cache.circuit_failed(LISTING.id, SETTINGS, 1017.0, 7)  # the probe, by the opener, fails
    assert closed == Circuit(9, 0.0, first=7) and state(closed, 1017.0) is CircuitState.CLOSED
    assert await cache.circuit(LISTING.id) == closed
    again = await cache.circuit_failed(LISTING.id, SETTINGS, 1018.0, 7)
    assert again == Circuit(10, 0.0, first=7)
    reopened = await cache.circuit_failed(LISTING.id, SETTINGS, 1019.0, 9)
    assert reopened == Circuit(11, 1029.0, first=9)
    assert await cache.circuit_probe(LISTING.id, 5, 1029.0, "q") is True  # reopening freed the old slot
    await cache.circuit_reset(LISTING.id)
    assert await cache.circuit(LISTING.id) == CLOSED


async def test_gateways_sharing_a_cache_share_the_circuit(make_cache: MakeCache,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("addon.circuits.REFRESH_SECONDS", 0.0)  # read the shared state on every call
    first, second = make_cache(), make_cache()
    if type(first).__name__ == "MemoryCache":
        second = first  # in-process: gateways in one process share one cache
    config = BreakerConfig(SETTINGS)
    a, b = Circuits(lambda: first, lambda: config), Circuits(lambda: second, lambda: config)
    for consumer in (1, 2, 1):
        await a.record(LISTING, consumer, 502, None)
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


async def failing_call(gw: Gw, status: int | None, token: str = ALICE) -> None:
    flow = make_flow(token=token)
    await gw.addon.request(flow)
    assert forwarded(flow)
    if status is None:
        await upstream_fails(gw, flow, "Connection refused")
    else:
        await upstream_answers(gw, flow, json_response({"error": "boom"}, status=status))


async def test_open_circuit_refuses_priced_calls_before_money_moves_then_probes(gw: Gw) -> None:
    await failing_call(gw, 502)
    await failing_call(gw, None, BOB)  # two consumers' failures: one alone never opens it
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
    await failing_call(gw, 504, BOB)
    await asyncio.sleep(0.35)
    await failing_call(gw, 502)  # the probe, by another consumer than the one whose failure opened it
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
    await failing_call(gw, 502, BOB)  # without the reset, two consumers' failures would open it
    still = make_flow()
    await gw.addon.request(still)
    assert forwarded(still)


async def test_one_consumer_failing_every_probe_cannot_keep_the_circuit_shut(gw: Gw) -> None:
    await failing_call(gw, 502, BOB)
    await failing_call(gw, 502)  # alice's failure opened it
    refused = make_flow(token=BOB)
    await gw.addon.request(refused)
    assert refused.response.status_code == 503
    await asyncio.sleep(0.35)
    await failing_call(gw, 502)  # alice takes the probe and fails it: alone since it opened, it closes
    for _ in range(3):
        await failing_call(gw, 504)  # and she cannot open it again alone, however often she fails
    bob = make_flow(token=BOB)
    await gw.addon.request(bob)
    assert forwarded(bob), (bob.response.status_code, refusal(bob.response))
    await upstream_answers(gw, bob, json_response({"error": "boom"}, status=502))  # bob fails too: it re-opens
    await gw.addon.drain()
    again = make_flow(token=BOB)
    await gw.addon.request(again)
    assert again.response.status_code == 503
    assert gw.db.balance(1) == OPENING and gw.db.balance(2) == OPENING  # every failed call was refunded
    gw.db.assert_reconciled()


async def test_both_caches_follow_the_pure_state_machine_exactly(make_cache: MakeCache) -> None:
    """Random failures, probes and successes: the cache (Redis: FAILURE_SCRIPT) agrees with after_failure."""
    rng = random.Random(7)
    settings = BreakerSettings(failures=3, cooldown_seconds=5)
    cache = make_cache()
    model, now = CLOSED, 1000.0
    for _ in range(300):
        now += rng.choice((0.0, 0.5, 2.0, 5.0))
        if rng.random() < 0.1:
            await cache.circuit_reset(LISTING.id)
            model = CLOSED
        else:
            if state(model, now) is CircuitState.HALF_OPEN and rng.random() < 0.5:
                await cache.circuit_probe(LISTING.id, settings.cooldown_seconds, now, "p")
            consumer = rng.choice((1, 1, 1, 2, 3))
            model = after_failure(model, settings, now, consumer)
            assert await cache.circuit_failed(LISTING.id, settings, now, consumer) == model
        assert await cache.circuit(LISTING.id) == model
