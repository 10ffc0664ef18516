"""Adversarial review 7: rate limits, auth, the circuit breaker, shadow mode, refusal answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addon.breaker import BreakerSettings
from addon.gateway import Mcpmeter
from tests.refusals import refusal
from tests.test_breaker import gw  # noqa: F401  (a fixture: a two-failure, 0.3 s circuit on echo-test)
from tests.test_cache_contract import MakeCache, make_cache  # noqa: F401  (a fixture)
from tests.test_gateway_hooks import (  # noqa: F401  (isolated is an autouse fixture)
    ALICE, BOB, CAPPED, OPENING, POOR, SEED, Db, Gw, forwarded, isolated, json_response, make_flow, rpc,
    upstream_answers, upstream_fails, write_config,
)

pytestmark = pytest.mark.timeout(30)


async def open_circuit(gw: Gw) -> None:
    for status, token in ((502, ALICE), (500, BOB)):  # two consumers' failures: one alone never opens it
        flow = make_flow(token=token)
        await gw.addon.request(flow)
        assert forwarded(flow)
        await upstream_answers(gw, flow, json_response({"error": "boom"}, status=status))
    refused = make_flow()
    await gw.addon.request(refused)
    assert refused.response.status_code == 503


# --- the circuit breaker ---------------------------------------------------------------------------


async def test_a_refused_charge_does_not_keep_the_half_open_probe_slot(gw: Gw) -> None:
    """A consumer with no credit (or over its cap) takes the half-open circuit's one probe slot, is
    refused 402 before anything is forwarded, and the slot stays taken for a whole cool-down: every
    paying consumer gets 503 meanwhile, and the same broke consumer can take it again each time it
    frees, keeping a recovered upstream unavailable for everyone at no cost."""
    await open_circuit(gw)
    await asyncio.sleep(0.35)  # half-open
    broke = make_flow(token=POOR)
    await gw.addon.request(broke)
    assert broke.response.status_code == 402 and not forwarded(broke)
    paying = make_flow()
    await gw.addon.request(paying)
    assert forwarded(paying), (paying.response.status_code, refusal(paying.response))


async def test_a_probe_cancelled_for_free_frees_its_slot(gw: Gw) -> None:
    """A 2026-07-28 client takes the probe slot and closes its stream at once: the call is refunded
    (cancelled), it said nothing about the upstream, and the slot must not stay taken for a whole
    cool-down: else one consumer holds a recovered listing unavailable for everyone, for free."""
    await open_circuit(gw)
    await asyncio.sleep(0.35)
    probe = make_flow(headers={"MCP-Protocol-Version": "2026-07-28"})
    await gw.addon.request(probe)
    assert forwarded(probe)
    await upstream_fails(gw, probe, "Client disconnected.")
    await gw.addon.drain()
    assert gw.db.balance(1) == OPENING  # cancelled: refunded, the probe cost nothing
    paying = make_flow()
    await gw.addon.request(paying)
    assert forwarded(paying), (paying.response.status_code, refusal(paying.response))


async def test_only_the_probe_that_holds_the_slot_frees_it(make_cache: MakeCache) -> None:  # noqa: F811
    cache = make_cache()
    for consumer in (1, 2):  # two consumers: the window must hold two to open it
        await cache.circuit_failed(77, BreakerSettings(failures=1, cooldown_seconds=10), 1000.0, consumer)
    assert await cache.circuit_probe(77, 5, 1011.0, "a") is True
    await cache.circuit_release_probe(77, "b")  # not its slot: nothing happens
    assert await cache.circuit_probe(77, 5, 1011.0, "c") is False
    await cache.circuit_release_probe(77, "a")
    assert await cache.circuit_probe(77, 5, 1011.0, "c") is True
    assert await cache.circuit_probe(77, 5, 1011.0, "d") is False


# --- headers the gateway checked on the request, replaced through X-Forward-<Name> -------------------


@pytest.mark.parametrize("name, value", [
    ("Content-Type", "application/json; charset=utf-7"),  # check_request_charset: a ping can be a tools/call
    ("Content-Encoding", "br"),  # check_request_encoding: the upstream would inflate what the meter priced
    ("MCP-Protocol-Version", "2025-06-18"),  # close_cancels: refunded on a close the upstream ignores
])
async def test_x_forward_cannot_replace_a_header_the_gateway_checked(gw: Gw, name: str, value: str) -> None:
    flow = make_flow(body=rpc("ping"), headers={"MCP-Protocol-Version": "2026-07-28", f"X-Forward-{name}": value})
    await gw.addon.request(flow)
    assert forwarded(flow)
    assert value not in flow.request.headers.get_all(name), flow.request.headers


# --- rate limits ------------------------------------------------------------------------------------

ALICE_SECOND_KEY = "mcpm_test_alicesecond0123456"


async def test_the_rate_limit_is_per_consumer_not_per_key(tmp_path: Path) -> None:
    """The limit is per (listing, consumer): a consumer who mints a second key (or an OAuth client
    that refreshes its access token, each token its own id) must not get a second allowance."""
    seed = {**SEED, "consumers": [*SEED["consumers"], {"key": ALICE_SECOND_KEY, "user_id": 1, "project_id": 1,
                                                       "credit_micro_cents": OPENING}]}
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, seed=seed)))
        first = make_flow("/strict")  # rate_limit_per_minute: 1
        await addon.request(first)
        assert forwarded(first)
        again = make_flow("/strict")
        await addon.request(again)
        assert again.response.status_code == 429
        other_key = make_flow("/strict", token=ALICE_SECOND_KEY)
        await addon.request(other_key)
        assert other_key.response is not None and other_key.response.status_code == 429, "a new key, a new limit"
        addon.done()


async def test_one_consumer_alone_cannot_open_the_circuit_for_everyone_for_free(gw: Gw) -> None:
    for _ in range(2):  # echo-test opens at 2 consecutive failures
        flow = make_flow()
        await gw.addon.request(flow)
        assert forwarded(flow)
        await upstream_answers(gw, flow, json_response({"error": "boom"}, status=504))
    assert gw.db.balance(1) == OPENING  # refunded: opening it cost nothing
    bob = make_flow(token=BOB)
    await gw.addon.request(bob)
    assert forwarded(bob), (bob.response.status_code, refusal(bob.response))


# --- shadow mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("token, user, would", [(POOR, 4, "insufficient_credit"), (CAPPED, 5, "project_cap_exceeded")])
async def test_shadow_mode_forwards_what_money_would_refuse_and_moves_none(
        tmp_path: Path, token: str, user: int, would: str) -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, shadow=True)))
        db = Db(tmp_path / "mcpmeter.db")
        before, ledger = db.balance(user), db.ledger(user)
        flow = make_flow(token=token)
        await addon.request(flow)
        assert forwarded(flow), flow.response and refusal(flow.response)
        gw = Gw(addon, tctx, db)
        await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
        assert db.balance(user) == before and db.ledger(user) == ledger
        assert flow.response.headers["X-Mcpmeter-Billed"] == "0"
        assert [r["billed_micro_cents"] for r in db.usage()] == [0]
        assert db.rows("SELECT reason FROM mcpmeter_calls") == [(f"shadow:{would}",)]
        addon.done()


# --- a held input_required round continued as the half-open probe --------------------------------------

ROUNDS = "/rounds-test"


@pytest.fixture
async def rounds_gw(tmp_path: Path) -> AsyncIterator[Gw]:
    rounds = {"slug": ROUNDS[1:], "upstream_url": "http://127.0.0.1:1/rounds", "price_micro_cents": 1000}
    seed = {**SEED, "listings": [*SEED["listings"], rounds]}
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, seed=seed, circuit_breaker={
            "failures": 5, "listings": {ROUNDS[1:]: {"failures": 2, "cooldown_seconds": 0.3}}})))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


def ask(rpc_id: int, state: str | None = None) -> dict[str, object]:
    params: dict[str, object] = {"name": "ask", "arguments": {}}
    if state is not None:
        params.update(requestState=state, inputResponses={})
    return rpc("tools/call", rpc_id, **params)


@pytest.mark.parametrize("probe_status, next_forwarded", [(502, False), (200, True)])
async def test_a_continued_round_as_the_probe_reports_how_the_upstream_did(
        rounds_gw: Gw, probe_status: int, next_forwarded: bool) -> None:
    gw = rounds_gw
    first = make_flow(ROUNDS, body=ask(1))
    await gw.addon.request(first)
    await upstream_answers(gw, first, json_response(
        {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "requestState": "S1"}}))
    for rpc_id, token in ((7, ALICE), (8, BOB)):  # other calls, two consumers', fail: the circuit opens
        flow = make_flow(ROUNDS, token=token, body=ask(rpc_id))
        await gw.addon.request(flow)
        assert forwarded(flow)
        await upstream_answers(gw, flow, json_response({"error": "boom"}, status=502))
    await asyncio.sleep(0.35)  # half-open
    probe = make_flow(ROUNDS, body=ask(2, "S1"))
    await gw.addon.request(probe)
    assert forwarded(probe)  # the continuation, forwarded free, is the probe
    answer = ({"jsonrpc": "2.0", "id": 2, "result": {"content": []}} if probe_status == 200 else {"error": "boom"})
    await upstream_answers(gw, probe, json_response(answer, status=probe_status))
    nxt = make_flow(ROUNDS, token=BOB, body=ask(9))
    await gw.addon.request(nxt)
    assert forwarded(nxt) is next_forwarded, nxt.response and (nxt.response.status_code, refusal(nxt.response))
