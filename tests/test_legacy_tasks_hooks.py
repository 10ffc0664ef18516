"""Tasks and input_required rounds on a legacy HTTP+SSE session, through the hooks (taddons, embedded store).

A legacy POST is answered 202 and its answer comes on the session's GET stream: a task-augmented call's
CreateTaskResult there holds the call, and the statuses and tasks/result answers read from the same
session's stream (same listing, key and session) settle it, as on a streamable HTTP session.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http

from addon import deferred
from tests.refusals import refusal
from tests.test_confinement_hooks import _gw, accepted, open_session, settled
from tests.test_gateway_hooks import (  # noqa: F401  (isolated: an autouse fixture)
    ALICE, BOB, OPENING, PRICE, USERS, Gw, isolated, make_flow, rpc,
)

pytestmark = pytest.mark.timeout(30)

ROUTE = "/legacy-one/messages/?session_id=abc"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path):
        yield g


def event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n\n"


def on_stream(stream: http.HTTPFlow, message: dict[str, Any]) -> bytes:
    """The upstream writes `message` on the session's stream: what the client gets of it."""
    assert stream.response is not None and callable(stream.response.stream)
    out = stream.response.stream(event(message))
    return out if isinstance(out, bytes) else b"".join(out)


async def posted(gw: Gw, body: dict[str, Any], token: str = ALICE, route: str = ROUTE) -> http.HTTPFlow:
    """A POST into the session, forwarded and acknowledged 202."""
    flow = make_flow(route, token=token, body=body)
    await gw.addon.request(flow)
    assert flow.response is None, flow.response and refusal(flow.response)
    await accepted(gw, flow)
    return flow


def reasons(gw: Gw) -> list[tuple[int, int, str | None]]:
    """(refunded, settled, reason) of each journal row, in charge order."""
    return [tuple(r) for r in gw.db.rows(  # type: ignore[misc]
        "SELECT refunded, settled_at IS NOT NULL, reason FROM mcpmeter_calls ORDER BY created_at, request_id")]


CREATED = {"id": 1, "result": {"task": {"taskId": "T1", "status": "working"}}}


async def held_task(gw: Gw) -> tuple[http.HTTPFlow, http.HTTPFlow]:
    """Alice's session stream and her task-augmented call, charged and held on its CreateTaskResult."""
    stream = await open_session(gw)
    call = await posted(gw, rpc("tools/call", 1, name="work", arguments={}, task={"ttl": 60_000}))
    assert on_stream(stream, CREATED) == event(CREATED)
    await gw.addon.drain()
    assert reasons(gw) == [(0, 0, "task_pending")]  # held: not settled, not billed yet
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE and gw.db.usage() == []
    return stream, call


def status(task_id: str, state: str, rpc_id: int | None = None) -> dict[str, Any]:
    task = {"taskId": task_id, "status": state}
    if rpc_id is None:
        return {"method": "notifications/tasks/status", "params": task}
    return {"id": rpc_id, "result": task}


@pytest.mark.parametrize("how", ["tasks/get", "notification", "tasks/result"])
async def test_a_task_that_completes_is_billed_once(gw: Gw, how: str) -> None:
    stream, _ = await held_task(gw)
    if how == "tasks/get":
        await posted(gw, rpc("tasks/get", 2, taskId="T1"))
        answer = status("T1", "completed", 2)
    elif how == "notification":
        answer = status("T1", "completed")
    else:
        await posted(gw, rpc("tasks/result", 2, taskId="T1"))
        answer = {"id": 2, "result": {"content": [{"type": "text", "text": "done"}]}}
    assert on_stream(stream, answer) == event(answer)
    await gw.addon.drain()
    assert reasons(gw) == [(0, 1, "task_completed")]
    on_stream(stream, status("T1", "completed"))  # seen again: settled once
    await gw.addon.drain()
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == PRICE and row["status"] == 200
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE and gw.addon.deferred.tasks == {}
    gw.db.assert_reconciled()


@pytest.mark.parametrize("how", ["failed", "cancelled", "result error"])
async def test_a_task_that_fails_is_refunded(gw: Gw, how: str) -> None:
    stream, _ = await held_task(gw)
    if how == "result error":
        await posted(gw, rpc("tasks/result", 2, taskId="T1"))
        on_stream(stream, {"id": 2, "error": {"code": -32603, "message": "tool crashed"}})
        reason = "task_failed"
    else:
        on_stream(stream, status("T1", how))
        reason = f"task_{how}"
    await gw.addon.drain()
    assert reasons(gw) == [(1, 1, reason)]
    assert gw.db.balance(USERS[ALICE]) == OPENING and [r["billed_micro_cents"] for r in gw.db.usage()] == [0]
    gw.db.assert_reconciled()


async def test_a_task_that_ends_in_the_chunk_that_creates_it_is_settled_by_that_end(gw: Gw) -> None:
    """The terminal status after its CreateTaskResult on the stream, before the call is held."""
    stream = await open_session(gw)
    await posted(gw, rpc("tools/call", 1, name="work", arguments={}, task={"ttl": 60_000}))
    assert stream.response is not None and callable(stream.response.stream)
    stream.response.stream(event(CREATED) + event(status("T1", "failed")))
    await gw.addon.drain()
    await settled(gw)
    assert reasons(gw) == [(1, 1, "task_failed")] and gw.db.balance(USERS[ALICE]) == OPENING
    gw.db.assert_reconciled()


async def test_a_create_task_result_that_overtakes_the_202_holds_the_call(gw: Gw) -> None:
    stream = await open_session(gw)
    flow = make_flow(ROUTE, body=rpc("tools/call", 1, name="work", arguments={}, task={"ttl": 60_000}))
    await gw.addon.request(flow)
    on_stream(stream, CREATED)  # before the POST's own 202: its response hook settles it, held
    await accepted(gw, flow)
    await gw.addon.drain()
    assert reasons(gw) == [(0, 0, "task_pending")] and gw.db.usage() == []
    on_stream(stream, status("T1", "completed"))
    await gw.addon.drain()
    assert reasons(gw) == [(0, 1, "task_completed")] and [r["status"] for r in gw.db.usage()] == [200]
    gw.db.assert_reconciled()


async def test_a_task_never_seen_ending_is_refunded_by_the_sweep_and_its_result_refused(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    stream, _ = await held_task(gw)
    late = gw.addon.config.task_settle_seconds + 61  # type: ignore[union-attr]
    with closing(sqlite3.connect(gw.db.path)) as conn, conn:
        conn.execute("UPDATE mcpmeter_calls SET created_at = datetime(created_at, ?)", (f"-{late} seconds",))
    monotonic = time.monotonic
    monkeypatch.setattr(deferred, "time", SimpleNamespace(monotonic=lambda: monotonic() + late))
    await gw.addon.deferred.sweep()
    await gw.addon.drain()
    assert reasons(gw) == [(1, 1, "task_expired")] and gw.db.balance(USERS[ALICE]) == OPENING
    # Refunded: its result is not delivered afterwards, and a late status settles nothing.
    asked = make_flow(ROUTE, body=rpc("tasks/result", 2, taskId="T1"))
    await gw.addon.request(asked)
    assert asked.response is not None and asked.response.status_code == 410
    on_stream(stream, status("T1", "completed"))
    await gw.addon.drain()
    assert reasons(gw) == [(1, 1, "task_expired")] and len(gw.db.usage()) == 1
    gw.db.assert_reconciled()


async def test_another_keys_session_settles_nothing(gw: Gw) -> None:
    stream, _ = await held_task(gw)
    other = await open_session(gw, session_id="bob", token=BOB)
    bobs = "/legacy-one/messages/?session_id=bob"
    for method in ("tasks/result", "tasks/get", "tasks/cancel"):  # Bob naming Alice's task: refused
        probe = make_flow(bobs, token=BOB, body=rpc(method, 2, taskId="T1"))
        await gw.addon.request(probe)
        assert probe.response is not None and refusal(probe.response)["error"] == "task_forbidden"
    await posted(gw, rpc("tasks/result", 2, taskId="T1"))  # Alice's, answered on her stream only
    # On Bob's stream, under the ids Alice's and Bob's requests carry: neither settles Alice's task.
    on_stream(other, {"id": 2, "result": {"content": []}})
    on_stream(other, status("T1", "failed", 2))
    on_stream(other, status("T1", "failed"))
    await gw.addon.drain()
    assert reasons(gw) == [(0, 0, "task_pending")] and gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    on_stream(stream, {"id": 2, "result": {"content": []}})
    await gw.addon.drain()
    assert reasons(gw) == [(0, 1, "task_completed")]
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE and gw.db.balance(USERS[BOB]) == OPENING
    gw.db.assert_reconciled()


def ask(rpc_id: int, state: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": "ask", "arguments": {}}
    if state is not None:
        params.update(requestState=state, inputResponses={})
    return rpc("tools/call", rpc_id, **params)


@pytest.mark.parametrize("final, billed", [({"result": {"content": []}}, True),
                                           ({"error": {"code": -32603, "message": "boom"}}, False)])
async def test_an_input_required_round_is_held_and_its_continuation_settles_it(
        gw: Gw, final: dict[str, Any], billed: bool) -> None:
    stream = await open_session(gw)
    await posted(gw, ask(1))
    on_stream(stream, {"id": 1, "result": {"resultType": "input_required", "requestState": "S1"}})
    await gw.addon.drain()
    assert reasons(gw) == [(0, 0, "input_pending")] and gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    retry = await posted(gw, ask(2, "S1"))  # forwarded free: the first round is paid
    assert retry.response is not None and retry.response.headers["X-Mcpmeter-Billed"] == "0"
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE and len(gw.db.journal()) == 1
    on_stream(stream, {"id": 2, **final})
    await gw.addon.drain()
    assert reasons(gw) == [(0, 1, "result")] if billed else [(1, 1, "rpc_error")]
    assert gw.db.balance(USERS[ALICE]) == OPENING - (PRICE if billed else 0)
    assert [r["billed_micro_cents"] for r in gw.db.usage()] == [PRICE if billed else 0]
    assert gw.addon.deferred.rounds == {}
    gw.db.assert_reconciled()
