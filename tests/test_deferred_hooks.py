"""Task refusals in the addon's hooks (taddons, embedded store): a tasks/result refused with 403
task_forbidden or 410 task_expired passes the rate limit first and counts against it, so task ids
cannot be probed without limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from addon.gateway import Mcpmeter
from tests.refusals import refusal
from tests.test_gateway_hooks import (ALICE, BOB, OPENING, PRICE, SEED, USERS, Db, Gw, forwarded,  # noqa: F401
                                      isolated, json_response, make_flow, meta, rpc, upstream_answers,
                                      write_config)

pytestmark = pytest.mark.timeout(30)

PATH = "/tasks-test"
PER_MINUTE = 3


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    listing = {"slug": PATH[1:], "upstream_url": "http://127.0.0.1:1/tasks", "price_micro_cents": PRICE,
               "rate_limit_per_minute": PER_MINUTE}
    seed = {**SEED, "listings": [*SEED["listings"], listing]}
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, seed=seed)))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


async def held_task(gw: Gw, task_id: str = "T1") -> None:
    """Alice's task-augmented call, charged and held on its CreateTaskResult (one of her requests)."""
    flow = make_flow(PATH, body=rpc("tools/call", 1, name="work", arguments={}, task={"ttl": 60_000}))
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response(
        {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": task_id, "status": "working"}}}))
    assert gw.db.journal()[0][4] == 0  # held: not settled


async def result_request(gw: Gw, token: str, task_id: str = "T1", rpc_id: int = 2) -> http.HTTPFlow:
    flow = make_flow(PATH, token=token, body=rpc("tasks/result", rpc_id, taskId=task_id))
    await gw.addon.request(flow)
    return flow


def refused(flow: http.HTTPFlow) -> tuple[int, str]:
    assert flow.response is not None and not forwarded(flow)
    assert flow.response.headers["X-Mcpmeter-Billed"] == "0"
    return flow.response.status_code, refusal(flow.response)["error"]


async def test_a_rate_limited_key_gets_429_not_task_forbidden(gw: Gw) -> None:
    await held_task(gw)
    for n in range(PER_MINUTE):  # Bob spends his window on ordinary traffic
        flow = make_flow(PATH, token=BOB, body=rpc("tools/list", n))
        await gw.addon.request(flow)
        assert forwarded(flow)
    probe = await result_request(gw, BOB)
    assert refused(probe) == (429, "rate_limited")
    assert "Retry-After" in probe.response.headers  # type: ignore[union-attr]


async def test_probing_held_task_ids_is_rate_limited(gw: Gw) -> None:
    await held_task(gw)
    # Each refusal counts like any request that passed the rate limit: the window runs out.
    answers = [refused(await result_request(gw, BOB, rpc_id=n)) for n in range(PER_MINUTE + 2)]
    assert answers == [(403, "task_forbidden")] * PER_MINUTE + [(429, "rate_limited")] * 2
    assert gw.db.balance(USERS[BOB]) == OPENING  # refusals cost nothing
    # Alice's own window and her task are untouched: her tasks/result goes on and bills the task.
    own = await result_request(gw, ALICE)
    assert forwarded(own)
    await upstream_answers(gw, own, json_response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
    assert gw.db.journal()[0][4] == 1 and gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_probing_a_refunded_task_is_rate_limited(gw: Gw) -> None:
    await held_task(gw)
    failed = await result_request(gw, ALICE)  # the task's tasks/result is an error: refunded
    await upstream_answers(gw, failed, json_response(
        {"jsonrpc": "2.0", "id": 2, "error": {"code": -32603, "message": "boom"}}))
    assert gw.db.balance(USERS[ALICE]) == OPENING
    # Two of Alice's three requests are spent: one 410 still fits, then 429, not 410 again.
    answers = [refused(await result_request(gw, ALICE, rpc_id=n)) for n in range(3)]
    assert answers == [(410, "task_expired"), (429, "rate_limited"), (429, "rate_limited")]
    assert gw.db.balance(USERS[ALICE]) == OPENING
    gw.db.assert_reconciled()


def reasons(gw: Gw) -> dict[str, tuple[int, int, str | None]]:
    """request id -> (refunded, settled, reason) of each journal row."""
    return {rid: (refunded, settled, reason) for rid, refunded, settled, reason in gw.db.rows(
        "SELECT request_id, refunded, settled_at IS NOT NULL, reason FROM mcpmeter_calls")}


async def paid_call(gw: Gw, answer: dict[str, object], **params: object) -> str:
    """One of Alice's tools/call, charged, answered with `answer`'s result; its request id."""
    flow = make_flow(PATH, body=rpc("tools/call", 1, name="work", arguments={}, **params))
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": answer}))
    return str(meta(flow)["request_id"])


async def test_a_task_id_given_twice_refunds_the_first_call_at_once_and_bills_the_second_once(gw: Gw) -> None:
    created = {"task": {"taskId": "T1", "status": "working"}}
    first = await paid_call(gw, created, task={"ttl": 60_000})
    second = await paid_call(gw, created, task={"ttl": 60_000})  # the upstream reuses the id
    await gw.addon.drain()
    assert reasons(gw) == {first: (1, 1, "task_replaced"), second: (0, 0, "task_pending")}
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE  # the first one's money is back now, not in an hour
    own = await result_request(gw, ALICE)
    await upstream_answers(gw, own, json_response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
    await gw.addon.drain()
    assert reasons(gw) == {first: (1, 1, "task_replaced"), second: (0, 1, "task_completed")}
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_a_request_state_given_twice_bills_the_first_round_at_once(gw: Gw) -> None:
    asks = {"resultType": "input_required", "requestState": "same", "inputRequests": {}}
    first, second = await paid_call(gw, asks), await paid_call(gw, asks)
    await gw.addon.drain()
    assert reasons(gw) == {first: (0, 1, "input_replaced"), second: (0, 0, "input_pending")}
    retry = make_flow(PATH, body=rpc("tools/call", 2, name="work", arguments={}, requestState="same",
                                     inputResponses={}))
    await gw.addon.request(retry)
    assert forwarded(retry)
    await upstream_answers(gw, retry, json_response({"jsonrpc": "2.0", "id": 2, "error": {"code": -1, "message": "x"}}))
    await gw.addon.drain()
    assert retry.response is not None and retry.response.headers["X-Mcpmeter-Billed"] == "0"
    assert reasons(gw) == {first: (0, 1, "input_replaced"), second: (1, 1, "rpc_error")}
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()
