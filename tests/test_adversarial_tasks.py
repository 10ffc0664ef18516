"""Adversarial review: tasks, multi-round calls and cancellations (deferred.py, pending.py, stream_watch.py).

Each test states the money rule it checks: a consumer never keeps a result it was refunded for, and
never gets a result it did not pay for."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import taddons

from addon import deferred
from addon.gateway import Mcpmeter
from tests.refusals import refusal
from tests.test_gateway_hooks import (  # noqa: F401  (fixtures)
    ALICE, BOB, OPENING, PRICE, SEED, USERS, Db, Gw, forwarded, isolated, json_response, make_flow, rpc, sent,
    sse_response, upstream_answers, write_config,
)

pytestmark = pytest.mark.timeout(30)

PATH = "/tasks-test"
SESSION = {"Mcp-Session-Id": "s-1", "MCP-Protocol-Version": "2025-11-25"}
CREATED = {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T1", "status": "working"}}}
DONE = {"content": [{"type": "text", "text": "done"}]}


MAX_EVENT = 1024


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    listing = {"slug": PATH[1:], "upstream_url": "http://127.0.0.1:1/tasks", "price_micro_cents": PRICE}
    seed = {**SEED, "listings": [*SEED["listings"], listing]}
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, seed=seed, max_event_bytes=MAX_EVENT)))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


def task_call(rpc_id: int = 1) -> dict[str, object]:
    return rpc("tools/call", rpc_id, name="work", arguments={}, task={"ttl": 60_000})


def cancellation(request_id: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id}}


async def send(gw: Gw, body: object, headers: dict[str, str] | None = None) -> http.HTTPFlow:
    flow = make_flow(PATH, body=body, headers=headers)
    await gw.addon.request(flow)
    return flow


async def fetch_result(gw: Gw, rpc_id: int = 2) -> tuple[http.HTTPFlow, bool]:
    """Alice's tasks/result for T1; whether its result reached her."""
    flow = await send(gw, rpc("tasks/result", rpc_id, taskId="T1"), SESSION)
    if not forwarded(flow):
        return flow, False
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": rpc_id, "result": DONE}))
    return flow, True


async def test_a_task_call_cancelled_before_its_answer_does_not_hand_out_the_task_result(gw: Gw) -> None:
    """Alice sends a task-augmented call and cancels it at once: the gateway refunds it (no answer yet)
    and withholds the CreateTaskResult, but the upstream had created the task (the cancellation reached
    it after its answer, a request already over). Alice learns the task id (tasks/list, a status
    notification) and fetches its result: a result delivered for a refunded call."""
    call = await send(gw, task_call(), SESSION)
    assert forwarded(call)
    notice = await send(gw, cancellation(1), SESSION)
    assert forwarded(notice)
    await upstream_answers(gw, call, json_response(CREATED))
    assert call.response is not None and b"T1" not in call.response.content  # withheld
    assert gw.db.balance(USERS[ALICE]) == OPENING  # refunded
    flow, delivered = await fetch_result(gw)
    await gw.addon.drain()
    assert not delivered, "the refunded task's result was delivered"
    assert flow.response is not None and refusal(flow.response)["error"] == "task_expired"
    assert gw.db.balance(USERS[ALICE]) == OPENING
    gw.db.assert_reconciled()


async def test_a_task_call_cancelled_with_its_answer_streaming_does_not_hand_out_the_task_result(gw: Gw) -> None:
    """The same on an SSE answer: the CreateTaskResult event, coming after the cancellation, is blanked."""
    call = await send(gw, task_call(), SESSION)
    call.response = sse_response()
    await gw.addon.responseheaders(call)
    await send(gw, cancellation(1), SESSION)
    out = sent(call.response.stream(b"data: " + json.dumps(CREATED).encode() + b"\n\n"))
    assert b"T1" not in out
    call.response.stream(b"")
    await gw.addon.response(call)
    await gw.addon.drain()
    assert gw.db.balance(USERS[ALICE]) == OPENING
    _, delivered = await fetch_result(gw)
    await gw.addon.drain()
    assert not delivered, "the refunded task's result was delivered"
    gw.db.assert_reconciled()


async def test_a_task_call_refunded_for_its_answers_status_does_not_hand_out_the_task_result(gw: Gw) -> None:
    """A CreateTaskResult under a 5xx status is refunded (the status decides), the task it names runs."""
    call = await send(gw, task_call(), SESSION)
    await upstream_answers(gw, call, json_response(CREATED, status=503))
    assert gw.db.balance(USERS[ALICE]) == OPENING
    _, delivered = await fetch_result(gw)
    await gw.addon.drain()
    assert not delivered, "the refunded task's result was delivered"
    gw.db.assert_reconciled()


def journal(gw: Gw) -> list[tuple[int, int, str | None]]:
    """(refunded, settled, reason) of each journal row."""
    return [(int(r), int(s), why) for r, s, why in gw.db.rows(
        "SELECT refunded, settled_at IS NOT NULL, reason FROM mcpmeter_calls")]


async def test_a_task_result_in_an_event_over_max_event_bytes_bills_the_task(gw: Gw) -> None:
    """A held task's tasks/result answered in an SSE event larger than max_event_bytes (the consumer
    picks arguments that make a big result) was not read: the task stayed held and was refunded at
    task_settle_seconds as task_expired, its result delivered (SPEC I5: never refunded for its size)."""
    call = await send(gw, task_call())
    await upstream_answers(gw, call, json_response(CREATED))
    assert journal(gw) == [(0, 0, "task_pending")]
    fetch = await send(gw, rpc("tasks/result", 2, taskId="T1"))
    assert forwarded(fetch)
    fetch.response = sse_response()
    await gw.addon.responseheaders(fetch)
    big = {"jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": "x" * (4 * MAX_EVENT)}]}}
    event = b"event: message\ndata: " + json.dumps(big).encode() + b"\n\n"
    assert sent(fetch.response.stream(event)) == event  # delivered
    fetch.response.stream(b"")
    await gw.addon.response(fetch)
    await gw.addon.drain()
    assert gw.addon.deferred.tasks == {}
    assert journal(gw) == [(0, 1, "task_completed")]
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_a_task_result_too_deep_for_the_json_module_bills_the_task(gw: Gw) -> None:
    """The same for a JSON answer nested deeper than Python's json module reads: it was not read."""
    call = await send(gw, task_call())
    await upstream_answers(gw, call, json_response(CREATED))
    fetch = await send(gw, rpc("tasks/result", 2, taskId="T1"))
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"jsonrpc": "2.0", "id": 2, "result": {"content": [], "structuredContent": {"v": ' + deep + b"}}}"
    await upstream_answers(gw, fetch, http.Response.make(200, body, {"Content-Type": "application/json"}))
    assert fetch.response is not None and fetch.response.content == body  # delivered
    assert gw.addon.deferred.tasks == {}
    assert journal(gw) == [(0, 1, "task_completed")]
    gw.db.assert_reconciled()


async def test_a_task_result_resumed_on_the_sessions_get_stream_bills_the_task(gw: Gw) -> None:
    """Alice's tasks/result is answered on an SSE stream that opens with a priming event (an upstream
    with an event store). She closes that POST stream and resumes it with a GET and Last-Event-ID, on
    which the upstream replays the result: read only on the POST stream, it settled nothing, and the
    task was refunded at task_settle_seconds (task_expired), its result delivered."""
    call = await send(gw, task_call(), SESSION)
    await upstream_answers(gw, call, json_response(CREATED))
    assert journal(gw) == [(0, 0, "task_pending")]
    fetch = await send(gw, rpc("tasks/result", 2, taskId="T1"), SESSION)
    assert forwarded(fetch)
    fetch.response = sse_response()
    await gw.addon.responseheaders(fetch)
    sent(fetch.response.stream(b"id: e-1\ndata:\n\n"))
    fetch.error = Error("Client disconnected.")
    await gw.addon.error(fetch)
    resume = make_flow(PATH, method="GET", headers={**SESSION, "Last-Event-ID": "e-1"})
    await gw.addon.request(resume)
    assert forwarded(resume)
    resume.response = sse_response()
    await gw.addon.responseheaders(resume)
    event = b"id: e-2\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 2, "result": DONE}).encode() + b"\n\n"
    assert sent(resume.response.stream(event)) == event  # delivered
    await gw.addon.drain()
    assert gw.addon.deferred.tasks == {} and not gw.addon.deferred.asked  # settled, and the request forgotten
    assert journal(gw) == [(0, 1, "task_completed")]
    gw.db.assert_reconciled()


@pytest.mark.parametrize("error", [None, "x", []])
async def test_a_task_result_beside_an_error_that_is_not_an_object_bills_the_task(gw: Gw, error: object) -> None:
    """A tasks/result answer with a result object and `"error": null` (some JSON-RPC libraries write
    it on success): the SDK clients ignore such an error and deliver the result, as the meter does for
    a call's own answer (What counts as an answer). It refunded the task as task_failed."""
    call = await send(gw, task_call())
    await upstream_answers(gw, call, json_response(CREATED))
    fetch = await send(gw, rpc("tasks/result", 2, taskId="T1"))
    await upstream_answers(gw, fetch, json_response({"jsonrpc": "2.0", "id": 2, "result": DONE, "error": error}))
    assert journal(gw) == [(0, 1, "task_completed")]
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()


@pytest.fixture
def small_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """deferred.py's tables at 4 entries, 2 per consumer (set before the gateway makes them)."""
    monkeypatch.setattr(deferred, "MAX_HELD", 4)
    monkeypatch.setattr(deferred, "MAX_HELD_PER_USER", 2)


@pytest.mark.usefixtures("small_tables")
async def test_another_consumers_unanswered_tasks_result_requests_do_not_evict_alices(gw: Gw) -> None:
    """Bob holds a task of his own and sends tasks/result requests for it that his upstream leaves
    unanswered, as many as the gateway remembers. They pushed out Alice's tasks/result request, whose
    answer she then took on her session's GET stream (resuming the request's stream): read there, it
    settled nothing, and her task was refunded at its limit (task_expired), its result delivered."""
    bob_session = {**SESSION, "Mcp-Session-Id": "s-bob"}
    bob = make_flow(PATH, token=BOB, body=task_call(), headers=bob_session)
    await gw.addon.request(bob)
    bobs_task = {**CREATED, "result": {"task": {"taskId": "B1", "status": "working"}}}
    await upstream_answers(gw, bob, json_response(bobs_task))
    call = await send(gw, task_call(), SESSION)
    await upstream_answers(gw, call, json_response(CREATED))
    fetch = await send(gw, rpc("tasks/result", 2, taskId="T1"), SESSION)
    assert forwarded(fetch)
    fetch.response = sse_response()
    await gw.addon.responseheaders(fetch)
    sent(fetch.response.stream(b"id: e-1\ndata:\n\n"))
    fetch.error = Error("Client disconnected.")
    await gw.addon.error(fetch)
    for rpc_id in range(10, 10 + deferred.MAX_HELD):  # Bob's, never answered
        flood = make_flow(PATH, token=BOB, body=rpc("tasks/result", rpc_id, taskId="B1"), headers=bob_session)
        await gw.addon.request(flood)
        assert forwarded(flood)
    resume = make_flow(PATH, method="GET", headers={**SESSION, "Last-Event-ID": "e-1"})
    await gw.addon.request(resume)
    resume.response = sse_response()
    await gw.addon.responseheaders(resume)
    event = b"id: e-2\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 2, "result": DONE}).encode() + b"\n\n"
    assert sent(resume.response.stream(event)) == event  # delivered
    await gw.addon.drain()
    assert journal(gw)[1] == (0, 1, "task_completed")  # Alice's: billed
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()
