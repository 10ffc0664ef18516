"""A refunded call's answer is never delivered, however big, however encoded (fail closed), through the hooks.

The upstream here is the test: every byte of its streams is chosen, chunk by chunk. An answer the meter
cannot hold whole to blank (bigger than its hold limit, or begun before its call was refunded) cuts the
stream instead; an event stream the meter cannot read (compressed) on a session is refused at its head.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import http

from addon import compat, stream_edit
from addon.billing import Failure
from addon.scan import MAX_MESSAGES
from addon.sse import SseParser
from tests.mitm_fakes import FakeHandler, FakeProxyserver
from tests.test_confinement_hooks import _gw, accepted, open_session, post, settled
from tests.test_gateway_hooks import (  # noqa: F401  (isolated: an autouse fixture)
    OPENING, PRICE, Gw, isolated, make_flow, sent, sse_response, tool_call, upstream_answers, upstream_fails,
)
from tests.test_pending_hooks import PRIMING, SESSION, cancellation, resumed_get, usage_reasons

pytestmark = pytest.mark.timeout(30)
MAX_EVENT = 4096
HOLD = stream_edit.hold_limit(MAX_EVENT, blanking=True)
CHUNK = 64 * 1024


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path, max_event_bytes=MAX_EVENT):
        yield g


def big_answer(rpc_id: int, size: int) -> bytes:
    """An event answering `rpc_id` with a result of about `size` bytes, as one data line."""
    text = "x" * size
    return (b"id: 9\nevent: message\ndata: "
            + json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {"content": [{"type": "text", "text": text}]}})
            .encode() + b"\n\n")


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def answers_in(out: bytes) -> list[object]:
    """The ids a client reading `out` gets answers for (oversized events too: the parser's scanner reads them)."""
    ids: list[object] = []
    for event in SseParser(64 * 1024 * 1024).feed(out) + SseParser().feed(b""):
        try:
            message = json.loads(event.data)
        except ValueError:
            continue  # (a client cannot read it either: no answer)
        ids.append(message.get("id"))
    return ids


def proxied(gw: Gw, flow: http.HTTPFlow) -> FakeHandler:
    """mitmproxy's connection handler for the flow, so that cutting its upstream can be seen."""
    proxyserver = gw.tctx.master.addons.get("proxyserver")
    if proxyserver is None:
        proxyserver = FakeProxyserver()
        gw.tctx.master.addons.add(proxyserver)
    handler = proxyserver.connections[flow.client_conn.id] = FakeHandler(flow.server_conn)
    return handler


async def post_primed(gw: Gw, rpc_id: int = 1) -> tuple[http.HTTPFlow, FakeHandler]:
    flow = make_flow(headers=SESSION, body=tool_call(rpc_id=rpc_id))
    handler = proxied(gw, flow)
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    assert sent(flow.response.stream(PRIMING)) == PRIMING
    return flow, handler


async def cancel(gw: Gw, rpc_id: int) -> None:
    notice = make_flow(headers=SESSION, body=cancellation(rpc_id))
    await gw.addon.request(notice)
    await gw.addon.drain()


def stream(flow: http.HTTPFlow, pieces: list[bytes]) -> bytes:
    assert flow.response is not None and callable(flow.response.stream)
    return b"".join(sent(flow.response.stream(piece)) for piece in pieces)


# --- streamable HTTP ------------------------------------------------------------------------------

async def test_a_cancelled_calls_answer_bigger_than_the_hold_limit_is_not_delivered(gw: Gw) -> None:
    post_flow, handler = await post_primed(gw)
    await cancel(gw, 1)
    answer = big_answer(1, HOLD + 100_000)
    out = stream(post_flow, chunks(answer))
    assert answers_in(PRIMING + out) == [] and b'"id": 1' not in out
    assert handler.closed == [post_flow.server_conn]  # the stream is cut: nothing more of it comes
    assert stream(post_flow, [b'data: {"jsonrpc": "2.0", "method": "notifications/progress"}\n\n', b""]) == b""
    await upstream_fails(gw, post_flow, "Connection killed.")
    await gw.addon.drain()
    assert usage_reasons(gw) == [(499, 1, "cancelled")] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_a_big_answer_begun_before_its_call_was_cancelled_never_ends(gw: Gw) -> None:
    """Its start went out (too big to hold while nothing could be blanked); its end never does."""
    post_flow, handler = await post_primed(gw)
    answer = big_answer(1, 3 * HOLD)
    pieces = chunks(answer)
    half = len(pieces) // 2
    first = stream(post_flow, pieces[:half])
    await cancel(gw, 1)
    rest = stream(post_flow, pieces[half:] + [b""])
    assert answers_in(PRIMING + first + rest) == []
    assert handler.closed == [post_flow.server_conn]
    await upstream_fails(gw, post_flow, "Connection killed.")
    await gw.addon.drain()
    assert usage_reasons(gw) == [(499, 1, "cancelled")] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_an_answer_the_meter_scans_but_holds_whole_is_blanked_when_refunded(gw: Gw) -> None:
    """Data over max_event_bytes (read by the scanner, not kept) but the event under the hold limit."""
    post_flow, handler = await post_primed(gw)
    await cancel(gw, 1)
    answer = big_answer(1, MAX_EVENT * 4)
    out = stream(post_flow, chunks(answer))
    assert out == b"id: 9\nevent: message\n\n" and handler.closed == []


async def test_while_a_session_holds_a_refund_a_big_answer_to_another_call_cuts_the_stream_and_is_refunded(
        gw: Gw) -> None:
    """Fail closed: the meter cannot tell whom an event answers before it is whole, so it cannot let it
    out. The stream's own call is refunded (its answer never reached the client), never billed."""
    refunded_flow, _ = await post_primed(gw, rpc_id=1)
    await cancel(gw, 1)
    post_flow, handler = await post_primed(gw, rpc_id=2)
    out = stream(post_flow, chunks(big_answer(2, HOLD + 100_000)))
    assert answers_in(out) == [] and handler.closed == [post_flow.server_conn]
    await upstream_fails(gw, post_flow, "Connection killed.")
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(499, 1, "cancelled"), (502, 1, "upstream_failed")]
    assert gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_without_a_refund_in_the_session_a_big_answer_passes_and_is_billed(gw: Gw) -> None:
    post_flow, handler = await post_primed(gw)
    answer = big_answer(1, HOLD + 100_000)
    out = stream(post_flow, chunks(answer) + [b""])
    assert answers_in(out) == [1] and handler.closed == []
    await gw.addon.response(post_flow)
    await gw.addon.drain()
    assert usage_reasons(gw) == [(200, 0, "result")] and gw.db.balance(1) == OPENING - PRICE


async def test_answers_before_the_cut_are_delivered_and_billed_those_after_it_are_not(gw: Gw) -> None:
    """One chunk: a whole answer to the stream's call, then a big answer to a refunded one, then more."""
    await post_primed(gw, rpc_id=1)
    await cancel(gw, 1)
    post_flow, handler = await post_primed(gw, rpc_id=2)
    own = b'event: message\ndata: {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}\n\n'
    chunk = own + big_answer(1, HOLD + 10)[:HOLD + 5]
    out = stream(post_flow, [chunk, b"\n\n" + own])
    assert answers_in(out) == [2] and b'"id": 1' not in out and handler.closed == [post_flow.server_conn]
    await upstream_fails(gw, post_flow, "Connection killed.")
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(200, 0, "result"), (499, 1, "cancelled")]
    assert gw.db.balance(1) == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_an_answer_after_a_cut_in_the_same_chunk_settles_nothing(gw: Gw) -> None:
    """A big answer to call 1 began on call 2's stream before call 1 was cancelled (nothing to blank then:
    it went out as it came); its end and call 2's own answer come in one chunk after the cancellation.
    The stream is cut at the first: call 2's answer never reaches the client, so it is refunded, not billed."""
    await post_primed(gw, rpc_id=1)
    post_flow, handler = await post_primed(gw, rpc_id=2)
    answer = big_answer(1, HOLD + 50_000)
    head = stream(post_flow, chunks(answer[:HOLD + 10]))
    assert head == answer[:HOLD + 10]  # too big to hold, nothing to blank: out as it came
    await cancel(gw, 1)
    own = b'event: message\ndata: {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}\n\n'
    assert stream(post_flow, [answer[HOLD + 10:] + own]) == b""
    assert handler.closed == [post_flow.server_conn]
    await upstream_fails(gw, post_flow, "Connection killed.")
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(499, 1, "cancelled"), (502, 1, "upstream_failed")]
    assert gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


def long_batch(ids: list[int]) -> bytes:
    """One event answering every id in `ids` (a JSON-RPC batch as one data line): over MAX_EVENT, held whole."""
    batch = json.dumps([{"jsonrpc": "2.0", "id": i, "result": {"content": []}} for i in ids]).encode()
    assert MAX_EVENT < len(batch) < HOLD - 1000
    return b"id: 9\nevent: message\ndata: " + batch + b"\n\n"


async def test_a_batch_answering_more_calls_than_the_meter_reads_cuts_a_stream_that_may_carry_a_refund(
        gw: Gw) -> None:
    """Past MAX_MESSAGES answers the scanner keeps no summary, so a refunded call's answer there could not
    be found: the event cannot be judged, and is cut as one too big to hold would be. What came before it
    was delivered and is billed; the refunded call stays refunded."""
    await post_primed(gw, rpc_id=1)
    await cancel(gw, 1)
    post_flow, handler = await post_primed(gw, rpc_id=2)
    own = b'event: message\ndata: {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}\n\n'
    batch = long_batch([*range(100, 100 + MAX_MESSAGES), 1])  # the refunded call's answer last
    out = stream(post_flow, [own + batch[:1000], *chunks(batch[1000:])])
    assert answers_in(out) == [2] and b'"id": 100' not in out and handler.closed == [post_flow.server_conn]
    await upstream_fails(gw, post_flow, "Connection killed.")
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(200, 0, "result"), (499, 1, "cancelled")]
    assert gw.db.balance(1) == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_a_batch_answering_more_calls_than_the_meter_reads_passes_while_nothing_may_be_withheld(
        gw: Gw) -> None:
    post_flow, handler = await post_primed(gw, rpc_id=2)
    own = b'event: message\ndata: {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}\n\n'
    batch = long_batch([*range(100, 101 + MAX_MESSAGES)])
    out = stream(post_flow, [own, *chunks(batch), b""])
    assert out.endswith(b"\n\n" + batch) and answers_in(out[:-len(batch)]) == [2] and handler.closed == []
    await gw.addon.response(post_flow)
    await gw.addon.drain()
    assert usage_reasons(gw) == [(200, 0, "result")] and gw.db.balance(1) == OPENING - PRICE


async def test_a_parked_call_is_not_billed_for_a_scanned_batch_blanked_on_the_resumed_stream(gw: Gw) -> None:
    """Call 1 is cancelled, call 2 parked; a resumed GET stream answers both in one batch whose data is over
    max_event_bytes (judged by the scanner's summaries, held whole). It goes out blanked, so it settles no
    call: call 2 is refunded at its timeout, never billed for an answer withheld."""
    await post_primed(gw, rpc_id=1)
    await cancel(gw, 1)
    post_2, _ = await post_primed(gw, rpc_id=2)
    assert post_2.response is not None and sent(post_2.response.stream(b"")) == b""
    await gw.addon.response(post_2)
    [(_, call_2)] = gw.addon.pending.parked_calls()
    text = "x" * MAX_EVENT
    batch = json.dumps([{"jsonrpc": "2.0", "id": i, "result": {"content": [{"type": "text", "text": text}]}}
                        for i in (1, 2)]).encode()
    get = await resumed_get(gw)
    out = stream(get, [b"id: 2\nevent: message\ndata: " + batch + b"\n\n", b""])
    assert out == b"id: 2\nevent: message\n\n" and call_2.settlement is None
    await gw.addon.response(get)
    gw.addon.streams.on_deadline(post_2, call_2)
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(499, 1, "cancelled"), (504, 1, "no_answer_by_timeout")]
    assert gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


def deep_batch(ids: list[int]) -> bytes:
    """One event answering each of `ids` after an element nested 100,000 deep (json.loads gives up: the
    scanner reads it, MAX_MESSAGES summaries at most), about 240 KB: held whole under DEEP_MAX_EVENT."""
    answers = b",".join(b'{"jsonrpc": "2.0", "id": %d, "result": {"content": []}}' % i for i in ids)
    return b"id: 2\nevent: message\ndata: [" + b"[" * 100_000 + b"]" * 100_000 + b"," + answers + b"]\n\n"


DEEP_MAX_EVENT = 1 << 20


@pytest.fixture
async def gw_deep(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path, max_event_bytes=DEEP_MAX_EVENT):
        yield g


async def test_a_parked_call_is_not_billed_for_a_held_batch_not_read_whole(gw_deep: Gw) -> None:
    """Call 1 is cancelled, call 2 parked; a resumed stream answers 2 among the answers the scanner keeps and
    1 past them, in one batch under max_event_bytes, too deep for json: it cannot be told not to answer a
    refunded call, so it goes out blanked (held whole) and settles no call: 2 is refunded at its timeout."""
    gw = gw_deep
    await post_primed(gw, rpc_id=1)
    await cancel(gw, 1)
    post_2, _ = await post_primed(gw, rpc_id=2)
    assert post_2.response is not None and sent(post_2.response.stream(b"")) == b""
    await gw.addon.response(post_2)
    [(_, call_2)] = gw.addon.pending.parked_calls()
    get = await resumed_get(gw)
    out = stream(get, [*chunks(deep_batch([2, *range(100, 99 + MAX_MESSAGES), 1])), b""])
    assert out == b"id: 2\nevent: message\n\n" and call_2.settlement is None
    await gw.addon.response(get)
    gw.addon.streams.on_deadline(post_2, call_2)
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(499, 1, "cancelled"), (504, 1, "no_answer_by_timeout")]
    assert gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_a_calls_answer_in_a_held_batch_not_read_whole_is_withheld_and_not_billed(gw_deep: Gw) -> None:
    """On call 2's own stream, with call 1 refunded: a batch answering 2 (read) and 1 (past what the scanner
    keeps) goes out blanked, so 2 is not billed for it; the answer that reaches the client bills it, once."""
    gw = gw_deep
    await post_primed(gw, rpc_id=1)
    await cancel(gw, 1)
    post_2, handler = await post_primed(gw, rpc_id=2)
    own = b'event: message\ndata: {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}\n\n'
    out = stream(post_2, [*chunks(deep_batch([2, *range(100, 99 + MAX_MESSAGES), 1]))])
    assert out == b"id: 2\nevent: message\n\n" and handler.closed == []
    assert gw.addon.calls[post_2.id].outcome is None
    assert answers_in(stream(post_2, [own, b""])) == [2]
    await gw.addon.response(post_2)
    await gw.addon.drain()
    assert sorted(usage_reasons(gw)) == [(200, 0, "result"), (499, 1, "cancelled")]
    assert gw.db.balance(1) == OPENING - PRICE
    gw.db.assert_reconciled()


def deep_json_batch(ids: list[int]) -> bytes:
    """deep_batch's batch as a JSON answer's body."""
    return deep_batch(ids).partition(b"data: ")[2].removesuffix(b"\n\n")


@pytest.mark.parametrize("status", [200, 202, 302])
async def test_a_json_answer_not_read_whole_without_the_calls_answer_is_not_delivered(gw: Gw, status: int) -> None:
    """A JSON answer too deep for json is read by the scanner, MAX_MESSAGES answers at most: the call's
    answer past them cannot be read, so the call is refunded, and the client must not get it unpaid. It
    gets the gateway's answer to an upstream that failed instead (502 upstream_failed)."""
    flow = make_flow(body=tool_call(rpc_id=1))
    await gw.addon.request(flow)
    batch = deep_json_batch([*range(100, 100 + MAX_MESSAGES), 1])
    await upstream_answers(gw, flow, http.Response.make(status, batch, {"Content-Type": "application/json"}))
    assert flow.response is not None and flow.response.status_code == 502
    answer = json.loads(flow.response.content or b"")
    assert answer["id"] == 1 and answer["error"]["data"]["error"] == "upstream_failed" and "result" not in answer
    assert flow.response.headers["X-Mcpmeter-Billed"] == "0" and flow.response.headers["X-Mcpmeter-Refunded"] == "1"
    assert usage_reasons(gw) == [(502, 1, "upstream_failed")] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_a_json_answer_not_read_whole_with_the_calls_answer_read_is_delivered_and_billed(gw: Gw) -> None:
    flow = make_flow(body=tool_call(rpc_id=1))
    await gw.addon.request(flow)
    batch = deep_json_batch([1, *range(100, 100 + MAX_MESSAGES)])
    await upstream_answers(gw, flow, http.Response.make(200, batch, {"Content-Type": "application/json"}))
    assert flow.response is not None and flow.response.status_code == 200 and flow.response.content == batch
    assert usage_reasons(gw) == [(200, 0, "result")] and gw.db.balance(1) == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_an_error_status_json_answer_not_read_whole_passes_refunded(gw: Gw) -> None:
    """A 4xx or 5xx answer is refunded whatever its body says, and passed through (the refund table)."""
    flow = make_flow(body=tool_call(rpc_id=1))
    await gw.addon.request(flow)
    batch = deep_json_batch([*range(100, 100 + MAX_MESSAGES), 1])
    await upstream_answers(gw, flow, http.Response.make(500, batch, {"Content-Type": "application/json"}))
    assert flow.response is not None and flow.response.status_code == 500 and flow.response.content == batch
    assert usage_reasons(gw) == [(500, 1, "upstream_5xx")] and gw.db.balance(1) == OPENING


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate", "zstd", "gzip, identity"])
async def test_a_compressed_event_stream_of_a_session_is_refused_and_refunded(gw: Gw, coding: str) -> None:
    flow = make_flow(headers=SESSION)
    handler = proxied(gw, flow)
    await gw.addon.request(flow)
    flow.response = sse_response()
    flow.response.headers["Content-Encoding"] = coding
    await gw.addon.responseheaders(flow)
    assert handler.closed == [flow.server_conn] and flow.error is not None
    await upstream_fails(gw, flow, "Connection killed.")
    answer, _ = compat._pending[flow.client_conn.id].split(b"\r\n\r\n", 1)
    assert b" 502 " in answer.split(b"\r\n")[0]
    await gw.addon.drain()
    assert usage_reasons(gw) == [(502, 1, "upstream_failed")] and gw.db.balance(1) == OPENING
    compat.forget(flow)


async def test_a_compressed_event_stream_without_a_session_is_read_and_passes(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    flow.response.headers["Content-Encoding"] = "gzip"
    await gw.addon.responseheaders(flow)
    assert flow.error is None
    body = gzip.compress(b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}\n\n')
    assert stream(flow, [body, b""]) == body  # nothing to blank there: read as it passes, billed
    await gw.addon.response(flow)
    await gw.addon.drain()
    assert usage_reasons(gw) == [(200, 0, "result")]


# --- legacy HTTP+SSE ------------------------------------------------------------------------------

async def refunded_legacy_call(gw: Gw) -> tuple[http.HTTPFlow, FakeHandler]:
    """A session stream whose call 1 the upstream failed (refunded: its answer must never come out)."""
    session = await open_session(gw)
    handler = proxied(gw, session)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    flow.response = http.Response.make(500, b"boom", {"Content-Type": "text/plain"})
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    await settled(gw)
    return session, handler


async def test_a_legacy_refunded_calls_big_answer_cuts_the_session_stream(gw: Gw) -> None:
    session, handler = await refunded_legacy_call(gw)
    waiting = await post(gw, "/legacy-one/messages/?session_id=abc", rpc_id=2)
    await accepted(gw, waiting)
    out = stream(session, chunks(big_answer(1, HOLD + 100_000)))
    assert answers_in(out) == [] and handler.closed == [session.server_conn]
    # Nothing more of the stream reaches the client; the call still waiting there is refunded.
    assert stream(session, [b'event: message\ndata: {"jsonrpc": "2.0", "id": 2, "result": {}}\n\n', b""]) == b""
    await upstream_fails(gw, session, "Connection killed.")
    await settled(gw)
    assert [r["billed_micro_cents"] for r in gw.db.usage()] == [0, 0] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_a_legacy_answer_begun_before_its_call_was_refunded_never_ends(gw: Gw) -> None:
    session = await open_session(gw)
    handler = proxied(gw, session)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    await accepted(gw, flow)
    pieces = chunks(big_answer(1, 3 * HOLD)[:-2])  # the event, all but its blank line
    first = stream(session, pieces[:2])
    assert first  # no refund in the session: it passes as it comes
    [(_, call)] = gw.addon.legacy.calls()
    gw.addon.legacy.refund(flow, call, Failure.TIMEOUT)  # its deadline, as the timeout would
    await settled(gw)
    rest = stream(session, pieces[2:] + [b"\n\n"])
    assert answers_in(first + rest) == [] and handler.closed == [session.server_conn]
    assert gw.db.usage()[0]["billed_micro_cents"] == 0 and gw.db.balance(1) == OPENING


async def test_a_legacy_scanned_answer_held_whole_is_blanked(gw: Gw) -> None:
    session, handler = await refunded_legacy_call(gw)
    out = stream(session, chunks(big_answer(1, MAX_EVENT * 4)))
    assert out == b"id: 9\nevent: message\n\n" and handler.closed == []


async def test_a_legacy_batch_answering_more_calls_than_the_meter_reads_cuts_the_session_stream(gw: Gw) -> None:
    """Call 2's answer is among those read, the refunded call 1's is past them: nothing of it goes out, so
    call 2 is refunded (never billed for an answer not delivered)."""
    session, handler = await refunded_legacy_call(gw)
    waiting = await post(gw, "/legacy-one/messages/?session_id=abc", rpc_id=2)
    await accepted(gw, waiting)
    out = stream(session, chunks(long_batch([2, *range(100, 100 + MAX_MESSAGES), 1])))
    assert b'"id": 2' not in out and b'"id": 1,' not in out and handler.closed == [session.server_conn]
    await upstream_fails(gw, session, "Connection killed.")
    await settled(gw)
    assert [r["billed_micro_cents"] for r in gw.db.usage()] == [0, 0] and gw.db.balance(1) == OPENING
    gw.db.assert_reconciled()


async def test_a_compressed_legacy_session_stream_is_refused(gw: Gw) -> None:
    session = make_flow("/legacy-one", method="GET")
    handler = proxied(gw, session)
    await gw.addon.request(session)
    session.response = sse_response()
    session.response.headers["Content-Encoding"] = "gzip"
    await gw.addon.responseheaders(session)
    assert handler.closed == [session.server_conn] and session.error is not None
    compat.forget(session)
