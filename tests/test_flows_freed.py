"""A flow is freed once its call is over: nothing the meter keeps per flow holds it; and what it
keeps per call or per session is bounded in size, not only in count.

The meter keeps per-flow state in weak maps keyed by the flow (compat's body limits, the
credentials between requestheaders and request, the task facts). A value that refers back to its
flow keeps the entry, and so the flow with its bodies, alive for ever: measured before the fix,
every call's flow stayed (about 7 KB a call through the bench, 200 MB over 30,000 calls; a large
upstream answer would have stayed whole). Each case runs the hooks mitmproxy runs, then checks with
a weak reference that the flow is gone. So does a call held after its answer (a task, an
input_required round): it is settled later without its flow (see the held calls below).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from addon import commands, compat, deferred, pending
from addon.cache.base import MISS
from addon.call import META, Label
from addon.gateway import Mcpmeter
from tests.refusals import refusal
from tests.test_gateway_hooks import (  # noqa: F401  (gw and isolated are fixtures)
    ALICE,
    OPENING,
    PRICE,
    USERS,
    Db,
    Gw,
    forwarded,
    gw,
    isolated,
    json_response,
    make_flow,
    meta,
    rpc,
    upstream_answers,
    upstream_fails,
    write_config,
)


def gone(ref: weakref.ref[object]) -> bool:
    gc.collect()
    return ref() is None


async def test_a_billed_call_frees_its_flow(gw: Gw) -> None:
    flow = make_flow()
    gw.addon.requestheaders(flow)  # registers the body limit (compat) and the credential
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)
    gw.db.assert_reconciled()


async def test_a_refunded_call_frees_its_flow(gw: Gw) -> None:
    flow = make_flow()
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "connection refused")
    await gw.addon.drain()
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)
    gw.db.assert_reconciled()


async def test_a_refused_request_frees_its_flow(gw: Gw) -> None:
    flow = make_flow(token="mcpm_live_not-a-key")
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 401
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)


async def test_an_internal_error_after_admission_leaves_nothing_tracked(gw: Gw, monkeypatch: Any) -> None:
    """A call in a session is tracked for its answers; an internal error after admission (500,
    refunded) used to leave it tracked, its flow with it, for ever. (Whether the flow itself is
    freed is not checked here: pytest keeps the logged traceback, whose frames refer to it.)"""
    def broken(*_: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(compat, "close_idle_upstream", broken)
    flow = make_flow(headers={"Mcp-Session-Id": "session-1"})
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    await gw.addon.drain()
    assert flow.response is not None and flow.response.status_code == 500
    assert not any(gw.addon.pending.tracked.values()) and flow.id not in gw.addon.calls
    gw.db.assert_reconciled()


async def test_a_session_id_or_slug_too_long_to_keep_is_refused_unkept(gw: Gw) -> None:
    """What the meter keeps per call or per session is bounded by size, not only by count: an
    Mcp-Session-Id over 512 characters is refused (400) before anything is charged, and a slug over
    255 characters (no listing has one) is not looked up, nor remembered as unknown."""
    flow = make_flow(headers={"Mcp-Session-Id": "s" * 513})
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert refusal(flow.response.content)["error"] == "invalid_request"
    flow = make_flow(headers={"Mcp-Session-Id": "s" * 512})
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    assert flow.response.status_code == 200
    slug = "x" * 256
    flow = make_flow(path=f"/{slug}")
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 404
    assert refusal(flow.response.content)["error"] == "no_such_mcp"
    assert gw.addon.cache is not None and await gw.addon.cache.get_listing(slug) is MISS
    gw.db.assert_reconciled()


async def test_the_call_history_keeps_a_tool_name_bounded(gw: Gw) -> None:
    flow = make_flow(body={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": "t" * 1_000, "arguments": {}}})
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "connection refused")  # refunded: in the history, as billed calls are
    await gw.addon.drain()
    recent = list(gw.addon.results.recent.values())
    assert [len(r.tool) for r in recent] == [commands.TOOL_CHARS]


def test_refund_markers_expire_as_new_ones_come() -> None:
    """Markers of refunded answers (not delivered if they come later) live marker_seconds; an
    expired one used to stay until max_markers newer ones pushed it out."""
    markers = pending.Pending(max_markers=1000, marker_seconds=60)
    clock = [1000.0]
    with mock.patch.object(pending.time, "monotonic", lambda: clock[0]):
        for i in range(500):
            markers.mark_refunded(("l", "s"), i)
        clock[0] += 61
        markers.mark_refunded(("l", "s"), "new")
        assert list(markers.refunded) == [(("l", "s"), pending.id_key("new"))]
        assert markers.is_refunded(("l", "s"), "new") and not markers.is_refunded(("l", "s"), 3)


# --- held calls (addon/deferred.py) -------------------------------------------------------------
# A task-augmented call answered with a CreateTaskResult, or a call answered input_required, is held
# until a later message settles it: up to MAX_HELD of them, for up to task_settle_seconds. Held, it
# used to keep its flow, request body and buffered answer included (10,000 x 10 MB). It keeps a
# bodiless stand-in now, and its flow only weakly: settled on the flow while something else keeps it
# (mitmweb's view), on the stand-in once it is gone (mitmdump).

BIG = 1_000_000  # of padding in the held call's request body


@pytest.fixture
async def roomy(tmp_path: Path) -> AsyncIterator[Gw]:
    """The gateway, with a body limit that lets a 1 MB request through."""
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, max_body_bytes=2 * BIG)))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


def settled(gw: Gw) -> list[tuple[int, int, str | None]]:
    """(refunded, settled, reason) of each journal row."""
    return gw.db.rows("SELECT refunded, settled_at IS NOT NULL, reason FROM mcpmeter_calls ORDER BY rowid")


async def held_call(gw: Gw, answer: dict[str, Any], **params: Any) -> tuple[http.HTTPFlow, deferred.Held]:
    """Alice's tools/call with a 1 MB argument, charged, answered with `answer`'s result and held."""
    flow = make_flow(body=rpc("tools/call", 1, name="echo", arguments={"text": "x" * BIG}, **params))
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": answer}))
    assert flow.response is not None and flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)
    [held] = [*gw.addon.deferred.tasks.values(), *gw.addon.deferred.rounds.values()]
    assert meta(flow)["decision"] == "held" and settled(gw)[0][1] == 0
    return flow, held


async def held_task(gw: Gw) -> tuple[http.HTTPFlow, deferred.Held]:
    return await held_call(gw, {"task": {"taskId": "T1", "status": "working"}}, task={"ttl": 60_000})


async def held_round(gw: Gw) -> tuple[http.HTTPFlow, deferred.Held]:
    return await held_call(gw, {"resultType": "input_required", "requestState": "S1", "inputRequests": {}})


async def task_ends(gw: Gw) -> None:
    """Alice polls the task; the upstream says it completed."""
    poll = make_flow(body=rpc("tasks/get", 2, taskId="T1"))
    await gw.addon.request(poll)
    assert forwarded(poll)
    await upstream_answers(gw, poll, json_response(
        {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T1", "status": "completed"}}))
    await gw.addon.drain()


async def round_ends(gw: Gw) -> None:
    """Alice's retry carries the state: forwarded free, its result settles the held round."""
    retry = make_flow(body=rpc("tools/call", 2, name="echo", arguments={"text": "hi"}, requestState="S1",
                               inputResponses={}))
    await gw.addon.request(retry)
    assert forwarded(retry)
    await upstream_answers(gw, retry, json_response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
    assert retry.response is not None and retry.response.headers["X-Mcpmeter-Billed"] == "0"
    await gw.addon.drain()


HELD = [pytest.param(held_task, task_ends, "task_completed", id="task"),
        pytest.param(held_round, round_ends, "result", id="round")]


@pytest.mark.parametrize(("hold", "end", "reason"), HELD)
async def test_a_held_call_frees_its_flow_and_settles_on_its_stand_in(
        roomy: Gw, hold: Any, end: Any, reason: str) -> None:
    gw = roomy
    flow, held = await hold(gw)
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)  # its 1 MB request body with it, though the call is still held
    assert held in [*gw.addon.deferred.tasks.values(), *gw.addon.deferred.rounds.values()]
    stand_in = held.flow  # what the settlement gets now
    assert stand_in.request.raw_content == b"" and stand_in.response is None
    assert stand_in.metadata[META]["decision"] == "held"  # what was noted on the flow is shared
    await end(gw)
    assert gw.addon.deferred.tasks == {} and gw.addon.deferred.rounds == {}
    assert settled(gw) == [(0, 1, reason)]  # billed as before: one charge, its row settled
    assert gw.db.ledger(USERS[ALICE])[1:] == [("usage", -PRICE)] and gw.db.balance(USERS[ALICE]) == OPENING - PRICE
    [row] = gw.db.usage()
    assert row["client"] == "claude-code" and row["user_agent"] == "claude-code/1.0"  # read off the stand-in
    annotated = stand_in.metadata[META]
    assert annotated["decision"] == Label.BILLED and annotated["reason"] == reason
    assert f"billed ({PRICE} µ¢; {reason})" in stand_in.comment and stand_in.marked
    gw.db.assert_reconciled()


async def test_a_held_task_whose_flow_is_gone_expires_on_its_stand_in(roomy: Gw) -> None:
    gw = roomy
    flow, held = await held_task(gw)
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)
    held.expires = 0.0  # past its limit: the sweeper's next turn refunds it
    gw.addon.deferred.expire()
    await gw.addon.drain()
    assert settled(gw) == [(1, 1, "task_expired")] and gw.db.balance(USERS[ALICE]) == OPENING
    assert held.flow.metadata[META]["decision"] == Label.REFUNDED
    gw.db.assert_reconciled()


@pytest.mark.parametrize(("hold", "end", "reason"), HELD)
async def test_a_held_call_whose_flow_is_kept_settles_on_it(roomy: Gw, hold: Any, end: Any, reason: str) -> None:
    """mitmweb's view keeps every flow: the final settlement is shown on it."""
    gw = roomy
    flow, held = await hold(gw)
    comment = flow.comment
    gc.collect()
    assert held.flow is flow
    await end(gw)
    assert settled(gw) == [(0, 1, reason)]
    assert meta(flow)["decision"] == Label.BILLED and meta(flow)["reason"] == reason
    assert flow.comment != comment and f"billed ({PRICE} µ¢; {reason})" in flow.comment
    assert flow.request.content is not None and len(flow.request.content) > BIG  # the flow itself is untouched
    gw.db.assert_reconciled()
