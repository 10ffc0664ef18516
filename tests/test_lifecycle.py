"""Stopping the gateway: `done` as mitmproxy 12.3 really calls it, on shutdown and on a script reload.

On shutdown mitmproxy awaits what `done` returns (Master.done -> AddonManager.invoke_addon); on a
reload it calls `done` synchronously (AddonManager.remove -> invoke_addon_sync, which refuses an
`async def done`). Either way every settlement is written before the store closes, calls in flight
are settled (refunded if unanswered) and new calls are refused while the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import hooks
from mitmproxy.flow import Error

from addon import compat
from addon import gateway as gateway_module
from addon.gateway import Mcpmeter
from tests.refusals import refusal
from tests.test_gateway_hooks import (  # noqa: F401  (gw and isolated are fixtures)
    OPENING, PRICE, Db, Gw, forwarded, gw, isolated, json_response, make_flow, parse_raw, tool_call,
    write_config,
)

pytestmark = pytest.mark.timeout(30)


def slow_settlements(gw: Gw, monkeypatch: pytest.MonkeyPatch, delay: float = 0.3) -> None:
    """Settlements that take a while, as on a loaded database."""
    settle = gw.addon.store.settle

    async def slow(s: Any) -> Any:
        await asyncio.sleep(delay)
        return await settle(s)

    monkeypatch.setattr(gw.addon.store, "settle", slow)


async def billed_answer(gw: Gw, rpc_id: int = 1) -> Any:
    """A paid call answered by its upstream; returns the flow as the client gets it (not drained)."""
    flow = make_flow(body=tool_call(rpc_id=rpc_id))
    await gw.addon.request(flow)
    assert forwarded(flow)
    flow.response = json_response({"jsonrpc": "2.0", "id": rpc_id, "result": {"content": []}})
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    assert flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)
    return flow


def test_done_is_a_plain_function_so_a_script_reload_can_call_it() -> None:
    assert not inspect.iscoroutinefunction(Mcpmeter.done)
    assert not inspect.iscoroutinefunction(Mcpmeter.running)


async def test_shutdown_awaits_every_billed_answers_settlement_before_closing_the_store(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_settlements(gw, monkeypatch)
    flows = [await billed_answer(gw, i) for i in range(1, 6)]
    assert gw.db.usage() == []  # answered, recorded just after
    # What Master.done does on SIGINT/SIGTERM: trigger DoneHook, awaiting what the hook returns.
    await gw.tctx.master.addons.invoke_addon(gw.addon, hooks.DoneHook())
    ids = {f.response.headers["X-Mcpmeter-Request-Id"] for f in flows}
    assert {u["request_id"] for u in gw.db.usage()} == ids
    assert all(u["billed_micro_cents"] == PRICE for u in gw.db.usage())
    assert all(settled for *_, settled in gw.db.journal())
    assert gw.db.balance() == OPENING - 5 * PRICE
    gw.db.assert_reconciled()


async def test_a_script_reload_calls_done_synchronously_and_the_stop_still_drains(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_settlements(gw, monkeypatch)
    flows = [await billed_answer(gw, i) for i in range(1, 4)]
    # What AddonManager.remove does on a reload: no await, the return value dropped.
    gw.tctx.master.addons.invoke_addon_sync(gw.addon, hooks.DoneHook())
    assert gateway_module._closing, "the stop runs on as a task the module keeps"
    await asyncio.gather(*list(gateway_module._closing))
    assert {u["request_id"] for u in gw.db.usage()} == {f.response.headers["X-Mcpmeter-Request-Id"] for f in flows}
    gw.db.assert_reconciled()


async def test_a_stopping_gateway_refuses_new_calls_without_forwarding_or_charging(gw: Gw) -> None:
    await billed_answer(gw)
    stop = gw.addon.done()
    flow = make_flow(body=tool_call(rpc_id=9))
    await gw.addon.request(flow)
    assert not forwarded(flow)
    assert flow.response.status_code == 503 and flow.response.headers["Retry-After"] == "1"
    assert refusal(flow.response)["error"] == "gateway_stopping"
    if stop is not None:
        await stop
    assert gw.db.balance() == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_a_stop_lets_calls_in_flight_finish_then_refunds_the_unanswered(gw: Gw) -> None:
    answered, hung = make_flow(body=tool_call(rpc_id=1)), make_flow(body=tool_call(rpc_id=2))
    for flow in (answered, hung):
        await gw.addon.request(flow)
        assert forwarded(flow)
    assert gw.db.balance() == OPENING - 2 * PRICE
    stop = asyncio.ensure_future(gw.addon.stop(grace=0.5))
    await asyncio.sleep(0.1)
    assert not stop.done(), "a paid call in flight holds the stop"
    answered.response = json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    await gw.addon.responseheaders(answered)
    await gw.addon.response(answered)
    assert answered.response.headers["X-Mcpmeter-Billed"] == str(PRICE)
    await stop  # the hung call is refunded at the end of the grace
    usage = {u["request_id"]: u for u in gw.db.usage()}
    billed_id = answered.response.headers["X-Mcpmeter-Request-Id"]
    assert usage[billed_id]["billed_micro_cents"] == PRICE
    assert len(usage) == 2 and [u["billed_micro_cents"] for k, u in usage.items() if k != billed_id] == [0]
    assert all(settled for *_, settled in gw.db.journal())
    assert gw.db.balance() == OPENING - PRICE
    gw.db.assert_reconciled()
    # An answer that still comes after its refund goes out marked refunded, not billed.
    hung.response = json_response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}})
    await gw.addon.responseheaders(hung)
    await gw.addon.response(hung)
    assert hung.response.headers["X-Mcpmeter-Billed"] == "0"
    assert hung.response.headers["X-Mcpmeter-Refunded"] == "1"
    assert gw.db.balance() == OPENING - PRICE


# --- a reload mid-call ------------------------------------------------------------------------------

async def test_a_config_reload_mid_call_settles_it_against_the_store_that_charged_it(gw: Gw, tmp_path: Path) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    old = gw.addon.store
    other = tmp_path / "other"
    other.mkdir()
    gw.tctx.configure(gw.addon, mcpmeter_config=str(write_config(other)))  # a new database
    assert gw.addon.store is not old and old in gw.addon.settlements.retiring  # kept open for its call
    flow.response = json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    await gw.addon.drain()
    assert [u["request_id"] for u in gw.db.usage()] == [flow.response.headers["X-Mcpmeter-Request-Id"]]
    assert all(settled for *_, settled in gw.db.journal()) and gw.db.balance() == OPENING - PRICE
    assert Db(other / "mcpmeter.db").usage() == []
    await asyncio.wait_for(asyncio.gather(*gw.addon.settlements.retiring.values()), 5)
    assert old in gw.addon.settlements.closed and not gw.addon.settlements.retiring


# --- the string-typed fields of addon.model are enums with the database's values ---------------

def test_statuses_and_transports_are_enums_with_the_database_values() -> None:
    from addon import config
    from addon.model import Consumer, ConsumerStatus, Listing, ListingStatus, Transport

    assert tuple(ListingStatus) == config.LISTING_STATUSES and tuple(Transport) == config.TRANSPORTS
    listing = Listing(id=1, slug="a", status="paused", upstream_url=None, transport="sse")
    assert listing.status is ListingStatus.PAUSED and listing.transport is Transport.SSE
    assert Listing(id=1, slug="a", status="live", upstream_url=None).transport is Transport.STREAMABLE
    with pytest.raises(ValueError):
        Listing(id=1, slug="a", status="gone", upstream_url=None)
    assert Consumer(user_id=1, project_id=1, status="active").status is ConsumerStatus.ACTIVE
    # users.status is a varchar: a value the gateway does not know is refused, not let through.
    assert Consumer(user_id=1, project_id=1, status="banned").status is ConsumerStatus.SUSPENDED
    assert json.dumps({"status": listing.status, "transport": listing.transport}) == \
        '{"status": "paused", "transport": "sse"}'  # cached in Redis as the plain values


# --- a script reload mid-call: the new meter's hooks get the old meter's flows ---------------------

def reloaded(gw: Gw) -> Mcpmeter:
    """What mitmproxy's script loader does on a reload (Script.loadscript): remove the old meter, which
    calls its `done` synchronously (its stop left running as a task), then register a new meter from the
    re-executed script (the same modules, the same process) and configure it with every option."""
    master = gw.tctx.master
    master.addons.remove(gw.addon)
    new = Mcpmeter()
    master.addons.register(new)
    master.addons.invoke_addon_sync(new, hooks.ConfigureHook(set(gw.tctx.options.keys())))
    master.addons.invoke_addon_sync(new, hooks.RunningHook())
    assert new.config is not None and new.store is not None
    return new


@contextlib.asynccontextmanager
async def reloaded_for(gw: Gw) -> AsyncIterator[Mcpmeter]:
    """`reloaded`, and the new meter stopped at the end (its stop awaited), whatever the test did."""
    new = reloaded(gw)
    try:
        yield new
    finally:
        task = new.done()
        if task is not None:
            await task


async def test_a_script_reload_mid_call_bills_the_answer_delivered_through_the_new_meter(
        gw: Gw, tmp_path: Path) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    async with reloaded_for(gw) as new:
        # The answer's hooks reach the meter that is loaded now, which did not charge the call.
        flow.response = json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
        await new.responseheaders(flow)
        await new.response(flow)
        assert flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)  # metered, not passed through bare
        await asyncio.wait_for(asyncio.gather(*list(gateway_module._closing)), 5)  # the old meter's stop
        [usage] = gw.db.usage()
        assert usage["billed_micro_cents"] == PRICE and usage["request_id"] == flow.response.headers[
            "X-Mcpmeter-Request-Id"]
        assert all(settled for *_, settled in gw.db.journal())
        assert gw.db.balance() == OPENING - PRICE  # delivered: billed, never refunded
        gw.db.assert_reconciled()


async def test_a_script_reload_mid_call_refunds_an_upstream_failure_seen_by_the_new_meter(
        gw: Gw, tmp_path: Path) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    async with reloaded_for(gw) as new:
        flow.error = Error("peer closed connection without sending complete message")
        await new.error(flow)
        response, body = parse_raw(compat._pending[flow.client_conn.id])  # answered by the meter that charged it
        assert response.status_code == 502 and refusal(body)["error"] == "upstream_failed"
        assert response.headers["X-Mcpmeter-Refunded"] == "1"
        await asyncio.wait_for(asyncio.gather(*list(gateway_module._closing)), 5)
        [usage] = gw.db.usage()
        assert usage["billed_micro_cents"] == 0 and usage["status"] == 502
        assert gw.db.balance() == OPENING
        gw.db.assert_reconciled()


async def test_a_shutdown_soon_after_a_script_reload_waits_for_the_old_meters_settlements(
        gw: Gw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_settlements(gw, monkeypatch)
    flows = [await billed_answer(gw, i) for i in range(1, 4)]
    new = reloaded(gw)  # the old meter's stop runs on, writing its settlements
    # SIGTERM now: Master.done awaits what the loaded meter's `done` returns, then the event loop ends
    # (asyncio.run cancels every task left): the old meter's stop must be over by then.
    await gw.tctx.master.addons.invoke_addon(new, hooks.DoneHook())
    assert not gateway_module._closing, "a stop left running when the loop ends is cancelled"
    assert {u["request_id"] for u in gw.db.usage()} == {f.response.headers["X-Mcpmeter-Request-Id"] for f in flows}
    assert all(settled for *_, settled in gw.db.journal())
    gw.db.assert_reconciled()
