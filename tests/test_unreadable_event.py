"""An event the MCP Python SDK client cannot read, on a call's stream before its answer, through the hooks.

That client ends the call at it (a parse error) and reads no further; the TypeScript SDK reports it and
reads on. So the call is refunded (`unreadable_event`) and its stream ends for every client at that
event, which is replaced by a JSON-RPC error answering the call: no client pays for an answer it could
not read, none gets one unpaid (README, What counts as an answer). Whether an event is readable is
checked against the SDK itself in tests/test_answer_outcome.py.
"""

from __future__ import annotations

import json
import zlib

import pytest
from mitmproxy import http

from addon import pending
from tests.test_adversarial4 import VERSION, end, sessionless_get
from tests.test_gateway_hooks import (  # noqa: F401  (fixtures)
    OPENING, PRICE, PROGRESS, RESULT, Gw, gw, isolated, make_flow, meta, sent, sse_response, tool_call,
)
from tests.test_pending_hooks import PRIMING, SESSION, resumed_get, usage_reasons

pytestmark = pytest.mark.timeout(30)

NOTE = b"data: " + PROGRESS.encode() + b"\n\n"
UNREADABLE = b'id: 2\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":[]}\n\n'
ANSWER = b"id: 3\ndata: " + RESULT.encode() + b"\n\n"


async def post_stream(gw: Gw, headers: dict[str, str]) -> http.HTTPFlow:
    flow = make_flow(headers=headers, body=tool_call())
    await gw.addon.request(flow)
    assert flow.response is None  # forwarded, charged
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    return flow


def stream(flow: http.HTTPFlow, data: bytes, size: int) -> bytes:
    assert flow.response is not None and callable(flow.response.stream)
    return b"".join(sent(flow.response.stream(data[i : i + size])) for i in range(0, len(data), size))


def the_error(flow: http.HTTPFlow, rest: bytes) -> None:
    """`rest` is one event: the JSON-RPC error answering the call (id 1) in place of the unreadable event."""
    assert rest.startswith(b"data: ") and rest.endswith(b"\n\n") and rest.count(b"\n") == 2, rest
    message = json.loads(rest[6:])
    assert (message["id"], message["error"]["code"]) == (1, -32011)
    assert message["error"]["data"] == {"error": "upstream_unreadable", "request_id": meta(flow)["request_id"]}


async def refunded_once(gw: Gw, flow: http.HTTPFlow) -> None:
    await gw.addon.drain()
    assert (meta(flow)["decision"], meta(flow)["reason"]) == ("refunded", "unreadable_event")
    assert usage_reasons(gw) == [(200, 1, "unreadable_event")]
    assert gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


@pytest.mark.parametrize("headers", [SESSION, VERSION], ids=["session", "sessionless"])
@pytest.mark.parametrize("size", [1, 7, 10_000])
async def test_the_stream_ends_before_the_unreadable_event_and_the_call_is_refunded(
        gw: Gw, headers: dict[str, str], size: int) -> None:
    flow = await post_stream(gw, headers)
    out = stream(flow, PRIMING + NOTE + UNREADABLE + ANSWER, size)
    assert out.startswith(PRIMING + NOTE)  # what came before it, as it came
    the_error(flow, out[len(PRIMING + NOTE):])  # in its place an error answering the call; nothing after
    assert stream(flow, ANSWER, size) == b""  # nor anything the upstream sends after
    assert sent(flow.response.stream(b"")) == b""
    await gw.addon.response(flow)
    await refunded_once(gw, flow)


async def test_an_answer_under_an_id_the_sdk_rejects_is_not_delivered_either(gw: Gw) -> None:
    """`"id": 1.0` for the call 1: the Python SDK cannot read it, the TypeScript SDK takes it for the answer."""
    flow = await post_stream(gw, VERSION)
    answer = b'data: {"jsonrpc":"2.0","id":1.0,"result":{"content":[]}}\n\n'
    out = stream(flow, NOTE + answer + ANSWER, 10_000)
    assert out.startswith(NOTE)
    the_error(flow, out[len(NOTE):])
    await end(gw, flow)
    await refunded_once(gw, flow)


async def test_the_answer_replayed_on_a_resumed_stream_of_the_session_is_withheld(gw: Gw) -> None:
    flow = await post_stream(gw, SESSION)
    assert stream(flow, PRIMING + UNREADABLE, 10_000).startswith(PRIMING + b"data: ")
    await end(gw, flow)
    get = await resumed_get(gw)  # the TypeScript SDK resumes after the last event it got
    assert sent(get.response.stream(UNREADABLE + ANSWER)) == UNREADABLE + b"id: 3\n\n"  # the answer's data dropped
    await end(gw, get)
    await refunded_once(gw, flow)


async def test_without_a_session_the_answer_is_withheld_where_the_client_resumes(gw: Gw) -> None:
    """A stateless server's call is found by the last event id its client got: the one before the cut (1),
    not the unreadable event's own (2), which never reached the client."""
    flow = await post_stream(gw, VERSION)
    call = gw.addon.calls[flow.id]
    assert stream(flow, PRIMING + UNREADABLE, 10_000).startswith(PRIMING + b"data: ")
    assert call.scope == pending.resume_key(call.listing.id, "1")
    await end(gw, flow)
    get = await sessionless_get(gw, "1")
    assert sent(get.response.stream(UNREADABLE + ANSWER)) == UNREADABLE + b"id: 3\n\n"
    await end(gw, get)
    await refunded_once(gw, flow)


async def test_a_compressed_stream_is_ended_before_the_chunk_that_completes_the_event(gw: Gw) -> None:
    """The meter reads a compressed stream decoded: its events' places are not the chunk's bytes, and
    nothing can be written into it."""
    flow = make_flow(headers=VERSION, body=tool_call())
    await gw.addon.request(flow)
    flow.response = sse_response()
    flow.response.headers["Content-Encoding"] = "gzip"
    await gw.addon.responseheaders(flow)
    gz = zlib.compressobj(wbits=31)  # one gzip stream, flushed after each piece: each chunk decodes whole
    first = gz.compress(PRIMING + NOTE) + gz.flush(zlib.Z_SYNC_FLUSH)
    second = gz.compress(UNREADABLE + ANSWER) + gz.flush()
    assert sent(flow.response.stream(first)) == first
    assert sent(flow.response.stream(second)) == b""
    await end(gw, flow)
    await refunded_once(gw, flow)


async def test_readable_events_before_the_answer_leave_it_billed(gw: Gw) -> None:
    flow = await post_stream(gw, VERSION)
    server_request = b'data: {"jsonrpc":"2.0","id":"s1","method":"roots/list"}\n\n'
    other_type = b"event: other\ndata: not json\n\n"
    out = stream(flow, PRIMING + NOTE + server_request + other_type + ANSWER, 7)
    assert out.startswith(PRIMING + NOTE + server_request + other_type) and b'"text": "done"' in out
    await end(gw, flow)
    assert (meta(flow)["decision"], meta(flow)["reason"]) == ("billed", "result")
    assert gw.db.balance(1) == OPENING - PRICE


async def test_an_unreadable_event_too_big_to_hold_is_ended_before_the_error(gw: Gw) -> None:
    """Part of an event over the editor's limit has gone out before it is complete: the error in its place
    starts with the end of that event (dispatched by the client as the garbage it is), then answers."""
    flow = await post_stream(gw, VERSION)
    big = b'data: {"jsonrpc":"2.0","method":"notifications/message","params":"' + b"x" * 3_000_000 + b'"}\n\n'
    out = stream(flow, NOTE + big + ANSWER, 65_536)
    partial, ended, error = out.rpartition(b"\n\ndata: ")  # the event's bytes that went out, ended, the error
    assert ended and partial.startswith(NOTE) and big.startswith(partial[len(NOTE):]) and len(partial) > 65_536
    the_error(flow, b"data: " + error)
    await end(gw, flow)
    await refunded_once(gw, flow)
