"""Tasks and rounds in the addon's hooks (taddons, embedded store): a tasks/result refused with 403
task_forbidden or 410 task_expired passes the rate limit first and counts against it, so task ids
cannot be probed without limit; a held input_required round taken by a retry the gateway answers
itself (a refusal, an Idempotency-Key replay) is given back."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from addon import deferred, idempotency
from addon.errors import GatewayError
from addon.gateway import Mcpmeter
from addon.store import StoreUnavailable
from tests.refusals import refusal
from tests.test_lifecycle import reloaded
from tests.test_gateway_hooks import (ALICE, BOB, OPENING, PRICE, SEED, USERS, Db, Gw, forwarded,  # noqa: F401
                                      isolated, json_response, make_flow, meta, rpc, upstream_answers,
                                      write_config)

pytestmark = pytest.mark.timeout(30)

PATH = "/tasks-test"
PER_MINUTE = 3
ROUNDS = "/rounds-test"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    listing = {"slug": PATH[1:], "upstream_url": "http://127.0.0.1:1/tasks", "price_micro_cents": PRICE,
               "rate_limit_per_minute": PER_MINUTE}
    rounds = {"slug": ROUNDS[1:], "upstream_url": "http://127.0.0.1:1/rounds", "price_micro_cents": PRICE}
    seed = {**SEED, "listings": [*SEED["listings"], listing, rounds]}
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


# --- input_required rounds ----------------------------------------------------------------------


def ask(rpc_id: int, state: str | None = None) -> dict[str, Any]:
    """A tools/call of `ask`; with a state, the retry that continues its round."""
    params: dict[str, Any] = {"name": "ask", "arguments": {}}
    if state is not None:
        params.update(requestState=state, inputResponses={})
    return rpc("tools/call", rpc_id, **params)


async def held_round(gw: Gw, state: str = "S1") -> None:
    """Alice's `ask`, charged and held on its input_required answer issuing `state`."""
    flow = make_flow(ROUNDS, body=ask(1))
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response(
        {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "requestState": state}}))
    assert flow.response is not None and flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)


async def continued(gw: Gw, state: str, rpc_id: int) -> None:
    """A retry carrying `state` continues the held round: forwarded free, its result bills the first round."""
    flow = make_flow(ROUNDS, body=ask(rpc_id, state))
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": rpc_id, "result": {"content": []}}))
    assert flow.response is not None and flow.response.headers["X-Mcpmeter-Billed"] == "0"
    assert gw.addon.deferred.rounds == {}


async def test_a_retry_answered_by_a_replay_gives_its_round_back(gw: Gw) -> None:
    key = {"Idempotency-Key": "retry-1"}
    # The retry's body ran once already under this key where S1 was not held (as on another gateway
    # sharing Redis, or before S1 was issued here): an ordinary call, charged, its answer stored.
    earlier = make_flow(ROUNDS, body=ask(2, "S1"), headers=key)
    await gw.addon.request(earlier)
    assert forwarded(earlier)
    await upstream_answers(gw, earlier, json_response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
    await held_round(gw)
    assert gw.db.balance(USERS[ALICE]) == OPENING - 2 * PRICE
    replay = make_flow(ROUNDS, body=ask(2, "S1"), headers=key)
    await gw.addon.request(replay)
    assert replay.response is not None and replay.response.headers[idempotency.REPLAYED] == "true"
    assert not forwarded(replay)
    await continued(gw, "S1", 3)  # the round was not used up by the replay: no third charge
    assert gw.db.balance(USERS[ALICE]) == OPENING - 2 * PRICE
    assert all(row[4] == 1 for row in gw.db.journal())  # the held first round is settled, billed
    gw.db.assert_reconciled()


async def test_a_retry_refused_after_it_took_its_round_gives_it_back(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    await held_round(gw)

    async def open_circuit(*_: Any, **__: Any) -> None:
        raise GatewayError("upstream_unavailable", headers={"Retry-After": "5"}, retry_after=5)

    with monkeypatch.context() as patched:
        patched.setattr(gw.addon.circuits, "admit", open_circuit)
        refused_retry = make_flow(ROUNDS, body=ask(2, "S1"))
        await gw.addon.request(refused_retry)
        assert refused(refused_retry) == (503, "upstream_unavailable")
    assert len(gw.addon.deferred.rounds) == 1
    await continued(gw, "S1", 3)
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    assert [row[4] for row in gw.db.journal()] == [1]
    gw.db.assert_reconciled()


async def test_a_task_held_from_a_stream_cut_mid_event_keeps_none_of_that_event(gw: Gw) -> None:
    # The CreateTaskResult passes, then the upstream sends most of a big event and dies: the call is
    # held (up to MAX_HELD of them, for task_settle_seconds), and must not keep what its stream's
    # readers buffered of the unfinished event (the parser's, the editor's: up to max_event_bytes each).
    import gc
    import json
    import tracemalloc
    import weakref

    from tests.test_gateway_hooks import sent, sse_response, upstream_fails

    tracemalloc.start()
    try:
        # In a session: its stream's events are read to the end (a refunded call's answer is blanked).
        flow = make_flow(PATH, body=rpc("tools/call", 1, name="work", arguments={}, task={"ttl": 60_000}),
                         headers={"Mcp-Session-Id": "s-cut"})
        await gw.addon.request(flow)
        assert forwarded(flow)
        flow.response = sse_response()
        await gw.addon.responseheaders(flow)
        created = {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T9", "status": "working"}}}
        sent(flow.response.stream(b"event: message\ndata: " + json.dumps(created).encode() + b"\n\n"))
        before = tracemalloc.get_traced_memory()[0]
        sent(flow.response.stream(b'event: message\ndata: {"jsonrpc": "2.0", "method": "x", "pad": "'
                                  + b"a" * 3_000_000))
        await upstream_fails(gw, flow, "Server disconnected.")
        await gw.addon.drain()
        [held] = gw.addon.deferred.tasks.values()
        ref = weakref.ref(flow)
        del flow
        gc.collect()
        assert ref() is None
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert gw.db.journal()[0][4] == 0  # still held, not settled
    assert kept < 200_000, kept  # not the 3 MB (twice: parser and editor) of the cut event
    assert held.call.parser is not None  # still says the answer was streamed


async def test_a_held_task_expires_in_memory_no_later_than_its_journal_row_is_swept(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal's sweep counts a held task's limit from its charge: so must the gateway holding it.
    Counted from the hold instead (the CreateTaskResult, up to the upstream timeout after the charge),
    the sweep refunded the task while this gateway still held it, and its result was then delivered."""
    flow = make_flow(PATH, body=rpc("tools/call", 1, name="work", arguments={}, task={"ttl": 60_000}))
    await gw.addon.request(flow)
    assert forwarded(flow)
    gw.addon.calls[flow.id].started -= 200  # its CreateTaskResult comes 200 s after the charge
    await upstream_answers(gw, flow, json_response(
        {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T1", "status": "working"}}}))
    assert gw.db.journal()[0][4] == 0 and gw.addon.deferred.tasks  # held
    # Later: the journal's limit, counted from the charge, and its one-sweep margin have passed.
    late = gw.addon.config.task_settle_seconds + 61  # type: ignore[union-attr]
    with closing(sqlite3.connect(gw.db.path)) as conn, conn:
        conn.execute("UPDATE mcpmeter_calls SET created_at = datetime(created_at, ?)", (f"-{late} seconds",))
    monotonic = time.monotonic
    monkeypatch.setattr(deferred, "time", SimpleNamespace(monotonic=lambda: monotonic() + late - 200))
    await gw.addon.deferred.sweep()
    await gw.addon.drain()
    [(_, (refunded, settled, reason))] = reasons(gw).items()
    assert (refunded, settled, reason) == (1, 1, "task_expired")
    assert gw.db.balance(USERS[ALICE]) == OPENING
    # Refunded: its result is not delivered afterwards.
    assert refused(await result_request(gw, ALICE)) == (410, "task_expired")
    gw.db.assert_reconciled()


# --- a script reload: held calls are the process's, and outlive the meter that held them ------------


async def test_a_task_held_before_a_script_reload_is_settled_by_its_status_after_it(gw: Gw) -> None:
    await held_task(gw)
    new = Gw(reloaded(gw), gw.tctx, gw.db)
    try:
        poll = make_flow(PATH, body=rpc("tasks/get", 2, taskId="T1"))
        await new.addon.request(poll)
        assert forwarded(poll)
        await upstream_answers(new, poll, json_response(
            {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T1", "status": "completed"}}))
        await new.addon.drain()
        assert list(reasons(gw).values()) == [(0, 1, "task_completed")]  # not left to be refunded as expired
        assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
        gw.db.assert_reconciled()
    finally:
        new.addon.done()


async def test_a_round_held_before_a_script_reload_is_continued_free_after_it(gw: Gw) -> None:
    await held_round(gw)
    new = Gw(reloaded(gw), gw.tctx, gw.db)
    try:
        await continued(new, "S1", 2)  # not charged a second time
        await new.addon.drain()
        assert list(reasons(gw).values()) == [(0, 1, "result")]
        assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
        gw.db.assert_reconciled()
    finally:
        new.addon.done()


# --- a hold whose journal mark did not land (the database unavailable at that moment) --------------


def hold_fails(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The store refuses to mark held calls; returns the request ids it was asked to mark."""
    asked: list[str] = []

    async def unavailable(request_id: str, mark: str) -> bool:
        asked.append(request_id)
        raise StoreUnavailable("down")

    monkeypatch.setattr(gw.addon.store, "hold", unavailable)
    return asked


async def one_sweep(gw: Gw) -> None:
    """The gateway's sweeper, one turn of it."""
    sweeper = asyncio.ensure_future(gw.addon._sweep_forever())
    await asyncio.sleep(0.2)
    sweeper.cancel()
    await gw.addon.drain()


async def test_a_held_calls_mark_that_failed_is_retried_before_the_ordinary_sweep(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmarked, the ordinary sweep refunded the task at stale_call_seconds while it stayed held here
    (up to task_settle_seconds): its result then passed, delivered for a refunded call."""
    hold = gw.addon.store.hold
    asked = hold_fails(gw, monkeypatch)
    await held_task(gw)
    assert asked and list(reasons(gw).values()) == [(0, 0, None)]  # held, unmarked
    monkeypatch.setattr(gw.addon.store, "hold", hold)  # the database is back
    late = gw.addon.config.stale_call_seconds + 1  # type: ignore[union-attr]
    with closing(sqlite3.connect(gw.db.path)) as conn, conn:
        conn.execute("UPDATE mcpmeter_calls SET created_at = datetime(created_at, ?)", (f"-{late} seconds",))
    await one_sweep(gw)
    assert list(reasons(gw).values()) == [(0, 0, "task_pending")]  # marked, not swept
    poll = make_flow(PATH, body=rpc("tasks/get", 2, taskId="T1"))
    await gw.addon.request(poll)
    await upstream_answers(gw, poll, json_response(
        {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T1", "status": "completed"}}))
    await gw.addon.drain()
    assert list(reasons(gw).values()) == [(0, 1, "task_completed")]
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_a_held_call_whose_mark_never_lands_is_refunded_before_the_sweep_could_and_its_result_refused(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    hold_fails(gw, monkeypatch)
    flow = make_flow(PATH, body=rpc("tools/call", 1, name="work", arguments={}, task={"ttl": 60_000}))
    await gw.addon.request(flow)
    assert forwarded(flow)
    # Charged almost stale_call_seconds ago: the ordinary sweep (this gateway's next, or another's) takes
    # its unmarked row before this gateway sweeps again.
    gw.addon.calls[flow.id].started -= gw.addon.config.stale_call_seconds - 30  # type: ignore[union-attr]
    await upstream_answers(gw, flow, json_response(
        {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T1", "status": "working"}}}))
    assert gw.addon.deferred.tasks and list(reasons(gw).values()) == [(0, 0, None)]
    await one_sweep(gw)
    assert not gw.addon.deferred.tasks  # no longer held: nothing settles it as paid any more
    assert list(reasons(gw).values()) == [(1, 1, "swept")]
    assert gw.db.balance(USERS[ALICE]) == OPENING
    assert refused(await result_request(gw, ALICE)) == (410, "task_expired")  # refunded: never delivered
    gw.db.assert_reconciled()


@pytest.mark.parametrize("method", ["tasks/get", "tasks/cancel"])
async def test_another_user_cannot_poll_or_cancel_a_held_task(gw: Gw, method: str) -> None:
    """The upstream cannot tell consumers apart: Bob's tasks/cancel would cancel Alice's paid task
    (her call then refunded, the publisher's work lost), his tasks/get read its status."""
    await held_task(gw)
    probe = make_flow(PATH, token=BOB, body=rpc(method, 5, taskId="T1"))
    await gw.addon.request(probe)
    assert refused(probe) == (403, "task_forbidden")
    own = make_flow(PATH, body=rpc(method, 6, taskId="T1"))  # Alice's own passes
    await gw.addon.request(own)
    assert forwarded(own)
    assert gw.db.balance(USERS[BOB]) == OPENING


@pytest.mark.parametrize("walks_away", [False, True], ids=["answered", "walked-away"])
async def test_a_keyed_retry_continuing_a_round_is_neither_run_nor_charged_again(gw: Gw, walks_away: bool) -> None:
    """The retry that continues a held round carries an Idempotency-Key: forwarded free, its answer settles
    the first round. Retried with the same key, it must get that outcome (its answer; or, its client gone
    before the answer, 410 idempotency_answer_lost), not run again as an ordinary call (its state is used
    up) and pay a second time for one logical call."""
    from tests.test_gateway_hooks import upstream_fails

    key = {"Idempotency-Key": "continue-1"}
    await held_round(gw)
    retry = make_flow(ROUNDS, body=ask(2, "S1"), headers=key)
    await gw.addon.request(retry)
    assert forwarded(retry)
    if walks_away:
        await upstream_fails(gw, retry, "Client disconnected.")
    else:
        await upstream_answers(gw, retry, json_response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
    await gw.addon.drain()
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE  # the first round billed, the retry free
    again = make_flow(ROUNDS, body=ask(2, "S1"), headers=key)
    await gw.addon.request(again)
    assert again.response is not None and not forwarded(again), "ran again"
    assert again.response.headers[idempotency.REPLAYED] == "true"
    assert again.response.headers["X-Mcpmeter-Billed"] == "0"  # as the continuation itself said
    assert again.response.status_code == (410 if walks_away else 200)
    await gw.addon.drain()
    assert gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    gw.db.assert_reconciled()


@pytest.mark.parametrize("spelt", [123, 123.0, ["123"], {"id": "123"}], ids=["int", "float", "list", "object"])
async def test_a_task_named_by_a_value_that_is_not_a_string_is_refused(gw: Gw, spelt: Any) -> None:
    """A taskId is a string (both SDKs' servers reject another type): one that is not names no task the
    gateway can tell held, so Bob's request naming Alice's held task "123" by 123 passed the task_forbidden
    check, and an upstream that looks tasks up leniently (a JavaScript object's key: String(123) is "123",
    String(["123"]) too) would cancel her paid task. Refused before it is forwarded, whoever sends it."""
    await held_task(gw, task_id="123")
    for method in ("tasks/get", "tasks/cancel", "tasks/result"):
        probe = make_flow(PATH, token=BOB, body=rpc(method, 5, taskId=spelt))
        await gw.addon.request(probe)
        assert probe.response is not None and not forwarded(probe), method
        assert probe.response.status_code == 400 and refusal(probe.response)["error"] == "invalid_request"
    own = make_flow(PATH, body=rpc("tasks/get", 6, taskId="123"))  # the string passes, for its owner
    await gw.addon.request(own)
    assert forwarded(own)
