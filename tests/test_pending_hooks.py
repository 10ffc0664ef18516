"""Resumption and cancellation through the hooks (addon/pending.py's state in the gateway), no sockets."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http

from addon import gateway as gateway_module
from addon.call import Wait
from addon.gateway import Mcpmeter
from addon.scan import MAX_MESSAGES
from tests.test_lifecycle import reloaded
from tests.test_gateway_hooks import (  # noqa: F401  (fixtures)
    OPENING, PRICE, RESULT, Gw, gw, isolated, make_flow, meta, sent, sse_response, tool_call, upstream_answers,
    upstream_fails,
)

pytestmark = pytest.mark.timeout(30)
SESSION = {"Mcp-Session-Id": "s-1", "MCP-Protocol-Version": "2025-11-25"}
PRIMING = b"id: 1\ndata:\n\n"


async def post_primed(gw: Gw):
    """A priced call whose POST stream has sent its priming event."""
    flow = make_flow(headers=SESSION)
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    assert sent(flow.response.stream(PRIMING)) == PRIMING
    return flow, gw.addon.calls[flow.id]


async def resumed_get(gw: Gw):
    flow = make_flow(method="GET", headers={**SESSION, "Last-Event-ID": "1"})
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    return flow


def usage_reasons(gw: Gw) -> list[tuple[int, int, str]]:
    return [(int(s), int(r), why) for s, r, why in gw.db.rows("SELECT status, refunded, reason FROM mcpmeter_calls"
                                                               " WHERE settled_at IS NOT NULL")]


async def test_an_answer_overtaking_the_end_of_its_post_stream_is_billed_once(gw: Gw) -> None:
    post, call = await post_primed(gw)
    get = await resumed_get(gw)
    answer = b"id: 2\ndata: " + RESULT.encode() + b"\n\n"
    assert sent(get.response.stream(answer)) == answer
    assert call.settlement is not None  # settled by the GET stream while the POST stream was still open
    post.response.stream(b"")
    await gw.addon.response(post)
    await gw.addon.drain()
    assert usage_reasons(gw) == [(200, 0, "result")] and len(gw.db.usage()) == 1
    assert gw.db.balance(1) == OPENING - PRICE
    assert sent(get.response.stream(answer)) == answer  # a replay: delivered again, never billed again
    await gw.addon.drain()
    assert len(gw.db.usage()) == 1
    gw.db.assert_reconciled()


async def test_a_parked_call_is_refunded_when_the_gateway_stops(gw: Gw) -> None:
    post, call = await post_primed(gw)
    post.response.stream(b"")
    await gw.addon.response(post)
    assert call.waits is Wait.RESUMPTION and meta(post)["decision"] == "pending" and gw.db.usage() == []
    await gw.addon.stop(grace=0.1)
    assert usage_reasons(gw) == [(500, 1, "internal_error")] and gw.db.balance(1) == OPENING
    assert not gw.addon.pending.parked and not gw.addon.pending.tracked


async def test_another_session_or_an_unknown_id_cancels_nothing(gw: Gw) -> None:
    post, call = await post_primed(gw)
    for headers, request_id in (({**SESSION, "Mcp-Session-Id": "s-2"}, 1), (SESSION, 2), (SESSION, "1")):
        notice = make_flow(headers=headers, body={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                  "params": {"requestId": request_id}})
        await gw.addon.request(notice)
        assert notice.response is None  # forwarded
    assert call.failure is None and call.settlement is None
    answer = b"data: " + RESULT.encode() + b"\n\n"
    out = sent(post.response.stream(answer))
    assert json.loads(out.partition(b"data: ")[2])["result"]["content"][0]["text"] == "done"
    await gw.addon.drain()
    assert usage_reasons(gw) == [(200, 0, "result")]


async def test_a_2026_client_closing_before_the_answer_cancels_and_is_refunded(gw: Gw) -> None:
    flow = make_flow(headers={**SESSION, "MCP-Protocol-Version": "2026-07-28"})
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    await gw.addon.drain()
    assert usage_reasons(gw) == [(499, 1, "cancelled")] and gw.db.balance(1) == OPENING
    assert meta(flow)["reason"] == "cancelled"


def cancellation(request_id: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id}}


async def test_a_cancelled_calls_answer_stays_blanked_when_a_later_call_reuses_its_id(gw: Gw) -> None:
    post_a, call_a = await post_primed(gw)  # call A, id 1, its POST stream open
    notice = make_flow(headers=SESSION, body=cancellation(1))
    await gw.addon.request(notice)
    await gw.addon.drain()
    assert call_a.failure is not None  # refunded
    # Call B under the same id (ids must not be reused, but may be): it takes the session's marker over.
    post_b = make_flow(headers=SESSION, body=tool_call(rpc_id=1))
    await gw.addon.request(post_b)
    assert post_b.response is None  # forwarded, charged
    # The upstream finishes A anyway, on A's own stream: its answer must still not reach the client.
    answer = b"id: 2\ndata: " + RESULT.encode() + b"\n\n"
    assert sent(post_a.response.stream(answer)) == b"id: 2\n\n"
    post_a.response.stream(b"")
    await gw.addon.response(post_a)
    # B's own answer is B's: delivered and billed.
    post_b.response = sse_response()
    await gw.addon.responseheaders(post_b)
    assert b'"text": "done"' in sent(post_b.response.stream(answer))  # (with its receipt)
    post_b.response.stream(b"")
    await gw.addon.response(post_b)
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(200, 0, "result"), (499, 1, "cancelled")]
    assert gw.db.balance() == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_a_cancellation_naming_a_float_id_refunds_nothing(gw: Gw) -> None:
    # The Python SDK's server ignores a requestId of 1.0 and runs call 1 to its end: refunding it
    # would deliver the call's side effects for free.
    post, call = await post_primed(gw)
    notice = make_flow(headers=SESSION, body=cancellation(1.0))
    await gw.addon.request(notice)
    assert notice.response is None  # the notification goes on to the upstream, unchanged
    await gw.addon.drain()
    assert call.failure is None
    answer = b"id: 2\ndata: " + RESULT.encode() + b"\n\n"
    assert b'"text": "done"' in sent(post.response.stream(answer))
    post.response.stream(b"")
    await gw.addon.response(post)
    await gw.addon.drain()
    assert usage_reasons(gw) == [(200, 0, "result")]
    gw.db.assert_reconciled()


# --- a script reload: parked calls and refund markers are the process's --------------------------

async def stopped(gw: Gw) -> None:
    """The old meter's stop (left running as a task by the reload), to its end."""
    await asyncio.wait_for(asyncio.gather(*list(gateway_module._closing)), 5)


async def test_a_call_parked_before_a_script_reload_is_billed_once_by_its_answer_after_it(gw: Gw) -> None:
    post, call = await post_primed(gw)
    post.response.stream(b"")
    await gw.addon.response(post)
    assert call.waits is Wait.RESUMPTION
    new = Gw(reloaded(gw), gw.tctx, gw.db)
    try:
        # The client resumes through the meter loaded now: the answer settles the call the old one charged.
        get = await resumed_get(new)
        answer = b"id: 2\ndata: " + RESULT.encode() + b"\n\n"
        assert sent(get.response.stream(answer)) == answer
        await stopped(gw)  # not left to the old meter's grace, then refunded with its result out
        assert sent(get.response.stream(answer)) == answer  # a replay: delivered again, never billed again
        await new.addon.drain()
        assert usage_reasons(gw) == [(200, 0, "result")] and len(gw.db.usage()) == 1
        assert gw.db.balance(1) == OPENING - PRICE
        gw.db.assert_reconciled()
    finally:
        new.addon.done()


async def test_a_refund_marker_written_before_a_script_reload_still_withholds_the_answer(gw: Gw) -> None:
    post, call = await post_primed(gw)
    notice = make_flow(headers=SESSION, body=cancellation(1))
    await gw.addon.request(notice)
    await gw.addon.drain()
    assert call.failure is not None  # refunded
    post.response.stream(b"")
    await gw.addon.response(post)
    new = Gw(reloaded(gw), gw.tctx, gw.db)
    try:
        get = await resumed_get(new)
        assert sent(get.response.stream(b"id: 2\ndata: " + RESULT.encode() + b"\n\n")) == b"id: 2\n\n"
        await stopped(gw)
        await new.addon.drain()
        assert usage_reasons(gw) == [(499, 1, "cancelled")] and gw.db.balance(1) == OPENING
    finally:
        new.addon.done()


async def test_a_call_the_replaced_meter_refunds_at_the_end_of_its_grace_has_its_answer_withheld(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    stop = Mcpmeter.stop
    monkeypatch.setattr(Mcpmeter, "stop", lambda self, grace=0.2: stop(self, grace))
    post, call = await post_primed(gw)
    post.response.stream(b"")
    await gw.addon.response(post)
    new = Gw(reloaded(gw), gw.tctx, gw.db)
    try:
        await stopped(gw)  # nobody answered it within the grace: refunded
        assert usage_reasons(gw) == [(500, 1, "internal_error")] and gw.db.balance(1) == OPENING
        get = await resumed_get(new)
        assert sent(get.response.stream(b"id: 2\ndata: " + RESULT.encode() + b"\n\n")) == b"id: 2\n\n"
        await new.addon.drain()
        assert len(gw.db.usage()) == 1
        assert not new.addon.pending.parked and not new.addon.pending.tracked
    finally:
        new.addon.done()


def result_under(rpc_id: str) -> bytes:
    """An answer to call 1 with its id spelled `rpc_id` (JSON), as a hostile upstream may send it."""
    return b'id: 2\ndata: {"jsonrpc": "2.0", "id": ' + rpc_id.encode() + b', "result": {"content": []}}\n\n'


@pytest.mark.parametrize("spelled", ['"1"', '"01"', '" 1"', '"1.0"', '"0x1"', "1.0"])
async def test_a_cancelled_calls_answer_is_withheld_however_its_id_is_spelled(gw: Gw, spelled: str) -> None:
    """The SDK clients take an answer under "1" for call 1's (int(), Number()): on the call's own stream and
    on a resumed one, such an answer to a refunded call goes out blanked, and settles nothing."""
    post, call = await post_primed(gw)
    notice = make_flow(headers=SESSION, body=cancellation(1))
    await gw.addon.request(notice)
    await gw.addon.drain()
    assert call.failure is not None  # refunded
    assert sent(post.response.stream(result_under(spelled))) == b"id: 2\n\n"
    post.response.stream(b"")
    await gw.addon.response(post)
    get = await resumed_get(gw)
    assert sent(get.response.stream(result_under(spelled))) == b"id: 2\n\n"
    other = result_under('"2"')  # another id's answer passes
    assert sent(get.response.stream(other)) == other
    await gw.addon.drain()
    assert usage_reasons(gw) == [(499, 1, "cancelled")] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_a_parked_call_refunded_at_its_timeout_has_a_misspelled_answer_withheld(gw: Gw) -> None:
    post, call = await post_primed(gw)
    post.response.stream(b"")
    await gw.addon.response(post)
    assert call.waits is Wait.RESUMPTION
    gw.addon.streams.on_deadline(post, call)  # its timeout
    await gw.addon.drain()
    get = await resumed_get(gw)
    assert sent(get.response.stream(result_under('"1"'))) == b"id: 2\n\n"
    await gw.addon.drain()
    assert usage_reasons(gw) == [(504, 1, "no_answer_by_timeout")] and gw.db.balance(1) == OPENING


@pytest.mark.parametrize("late", [True, False])
async def test_a_cancelled_calls_json_answer_in_a_batch_not_read_whole_is_withheld(gw: Gw, late: bool) -> None:
    """A JSON answer too deep for json is read by the scanner, MAX_MESSAGES answers at most: the cancelled
    call's answer past them cannot be told absent, so the client gets the cancellation error instead."""
    flow = make_flow(headers=SESSION, body=tool_call(rpc_id=1))
    await gw.addon.request(flow)
    notice = make_flow(headers=SESSION, body=cancellation(1))
    await gw.addon.request(notice)
    await gw.addon.drain()
    ids = [*range(100, 100 + MAX_MESSAGES), 1] if late else [*range(100, 99 + MAX_MESSAGES)]
    batch = (b"[" + b"[" * 100_000 + b"]" * 100_000 + b","
             + b",".join(b'{"jsonrpc":"2.0","id":%d,"result":{}}' % i for i in ids) + b"]")
    await upstream_answers(gw, flow, http.Response.make(200, batch, {"Content-Type": "application/json"}))
    assert flow.response is not None
    assert (flow.response.content == batch) is not late
    if late:
        assert json.loads(flow.response.content or b"")["error"]["code"] == -32800
    assert usage_reasons(gw) == [(499, 1, "cancelled")] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


@pytest.mark.parametrize("spelled", ['"1"', '"01"', '" 1 "', "1.0"])
async def test_a_cancelled_calls_json_answer_is_withheld_under_any_spelling_of_its_id(gw: Gw, spelled: str) -> None:
    """An SDK client takes "1", "01" or 1.0 for the answer to its request 1 (rpc_ids.py): a cancelled call's
    JSON answer under any of them is withheld as on its stream, and the call stays refunded."""
    flow = make_flow(headers=SESSION, body=tool_call(rpc_id=1))
    await gw.addon.request(flow)
    notice = make_flow(headers=SESSION, body=cancellation(1))
    await gw.addon.request(notice)
    await gw.addon.drain()
    body = ('{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"done"}]}}' % spelled).encode()
    await upstream_answers(gw, flow, http.Response.make(200, body, {"Content-Type": "application/json"}))
    assert flow.response is not None and b"done" not in (flow.response.content or b"")
    answer = json.loads(flow.response.content or b"")
    assert answer["id"] == 1 and answer["error"]["code"] == -32800 and "result" not in answer
    assert usage_reasons(gw) == [(499, 1, "cancelled")] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()
