"""Adversarial review 4: calls that outlive their POST (pending.py, stream_watch.py, deferred.py).

Each test states the money rule it checks: a consumer never keeps a result it was refunded for, and is
never billed for an answer withheld from it."""

from __future__ import annotations

import json

import pytest
from mitmproxy import http

from addon.billing import Failure
from addon.call import Call, Wait
from tests.test_gateway_hooks import (  # noqa: F401  (fixtures)
    ALICE, BOB, OPENING, PRICE, RESULT, Gw, gw, isolated, make_flow, sent, sse_response, tool_call,
)
from tests.test_pending_hooks import PRIMING, SESSION, post_primed, resumed_get, usage_reasons

pytestmark = pytest.mark.timeout(30)

ERROR_1 = json.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "Method not found"}})


def delivered_results(out: bytes) -> int:
    """How many tool results for id 1 the client can read from these stream bytes."""
    return out.count(b'"text": "done"')


async def test_an_unpriced_request_reusing_a_running_calls_id_cannot_refund_it(gw: Gw) -> None:
    """Call A (priced, id 1) runs; the client POSTs an unpriced request under the same id in the session
    (here an unknown method), which the upstream answers with an error on that request's own stream.
    The meter took that error for A's answer and refunded A; A's result then reached the client on A's
    own stream: a result kept, its price refunded."""
    post_a, call_a = await post_primed(gw)
    other = make_flow(headers=SESSION, body={"jsonrpc": "2.0", "id": 1, "method": "x/unknown"})
    await gw.addon.request(other)
    delivered = 0
    if other.response is None:  # forwarded: the upstream answers it on its own stream
        other.response = sse_response()
        await gw.addon.responseheaders(other)
        sent(other.response.stream(b"data: " + ERROR_1.encode() + b"\n\n"))
        other.response.stream(b"")
        await gw.addon.response(other)
    out = sent(post_a.response.stream(b"id: 2\ndata: " + RESULT.encode() + b"\n\n"))
    delivered += delivered_results(out)
    post_a.response.stream(b"")
    await gw.addon.response(post_a)
    await gw.addon.drain()
    billed = [r for r in usage_reasons(gw) if r[1] == 0]
    assert delivered <= len(billed), f"{delivered} result(s) delivered, {len(billed)} billed: {usage_reasons(gw)}"
    gw.db.assert_reconciled()


async def test_two_parked_calls_under_one_id_cannot_deliver_two_results_for_one_price(gw: Gw) -> None:
    """Calls A and B (priced, both id 1) in one session; the server closes both POST streams after their
    priming events. B's parking replaced A's under the id: A's answer, resumed, settled B (billed), B's
    answer, resumed, passed (B already settled), and A was refunded at its timeout: two results, one price."""
    post_a, call_a = await post_primed(gw)
    post_a.response.stream(b"")
    await gw.addon.response(post_a)
    assert call_a.waits is Wait.RESUMPTION
    post_b = make_flow(headers=SESSION, body=tool_call(rpc_id=1))
    await gw.addon.request(post_b)
    if post_b.response is None:  # forwarded and charged
        post_b.response = sse_response()
        await gw.addon.responseheaders(post_b)
        sent(post_b.response.stream(PRIMING))
        post_b.response.stream(b"")
        await gw.addon.response(post_b)
    answers = [RESULT.replace("done", "result of A")]  # what the upstream has for each call it ran
    if post_b.response is not None and post_b.response.status_code == 200:
        answers.append(RESULT.replace("done", "result of B"))
    seen: set[bytes] = set()
    for text in answers:  # each call's stream resumed in turn
        get = await resumed_get(gw)
        out = sent(get.response.stream(b"id: 2\ndata: " + text.encode() + b"\n\n"))
        seen |= {name for name in (b"result of A", b"result of B") if name in out}
        get.response.stream(b"")
        await gw.addon.response(get)
    delivered = len(seen)
    gw.addon.streams.on_deadline(post_a, call_a)  # A's timeout
    await gw.addon.drain()
    billed = [r for r in usage_reasons(gw) if r[1] == 0]
    assert delivered <= len(billed), f"{delivered} result(s) delivered, {len(billed)} billed: {usage_reasons(gw)}"
    gw.db.assert_reconciled()


async def test_an_error_resumed_for_an_earlier_request_under_the_id_cannot_refund_a_running_call(gw: Gw) -> None:
    """The id's earlier request (unpriced, here an unknown method) has its stream cut after priming; the
    priced call A reuses the id; the client resumes the earlier stream by GET and gets its error, which
    the meter took for A's answer: A refunded, and A's result then reached the client on A's own stream."""
    earlier = make_flow(headers=SESSION, body={"jsonrpc": "2.0", "id": 1, "method": "x/unknown"})
    await gw.addon.request(earlier)
    assert earlier.response is None
    earlier.response = sse_response()
    await gw.addon.responseheaders(earlier)
    sent(earlier.response.stream(PRIMING))
    earlier.response.stream(b"")
    await gw.addon.response(earlier)
    post_a, call_a = await post_primed(gw)  # A: tools/call id 1
    get = await resumed_get(gw)
    assert b"Method not found" in sent(get.response.stream(b"id: 2\ndata: " + ERROR_1.encode() + b"\n\n"))
    await gw.addon.drain()
    out = sent(post_a.response.stream(b"id: 3\ndata: " + RESULT.encode() + b"\n\n"))
    delivered = delivered_results(out)
    post_a.response.stream(b"")
    await gw.addon.response(post_a)
    await gw.addon.drain()
    again = await resumed_get(gw)  # A's result, resumed on another stream of the session
    delivered += delivered_results(sent(again.response.stream(b"id: 3\ndata: " + RESULT.encode() + b"\n\n")))
    billed = [r for r in usage_reasons(gw) if r[1] == 0]
    assert delivered <= len(billed), f"{delivered} result(s) delivered, {len(billed)} billed: {usage_reasons(gw)}"
    gw.db.assert_reconciled()


async def test_a_parked_call_is_not_billed_for_an_answer_blanked_on_the_resumed_stream(gw: Gw) -> None:
    """A (id 1) is cancelled and refunded; B (id 2) is parked. On the resumed GET stream the upstream
    answers both in one batch event. The event answers a refunded call, so it went out blanked, yet the
    meter billed B for it: billed for an answer withheld."""
    post_a, call_a = await post_primed(gw)
    notice = make_flow(headers=SESSION, body={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                              "params": {"requestId": 1}})
    await gw.addon.request(notice)
    await gw.addon.drain()
    post_a.response.stream(b"")
    await gw.addon.response(post_a)
    post_b = make_flow(headers=SESSION, body=tool_call(rpc_id=2))
    await gw.addon.request(post_b)
    post_b.response = sse_response()
    await gw.addon.responseheaders(post_b)
    sent(post_b.response.stream(PRIMING))
    post_b.response.stream(b"")
    await gw.addon.response(post_b)
    call_b = next(c for c in [*gw.addon.pending.parked_calls()] if c[0] is post_b)[1]
    batch = json.dumps([json.loads(RESULT), {**json.loads(RESULT), "id": 2}])
    get = await resumed_get(gw)
    out = sent(get.response.stream(b"id: 2\ndata: " + batch.encode() + b"\n\n"))
    b_delivered = b'"id": 2' in out
    get.response.stream(b"")
    await gw.addon.response(get)
    if call_b.settlement is None:
        gw.addon.streams.on_deadline(post_b, call_b)
    await gw.addon.drain()
    b_row = [r for r in usage_reasons(gw) if r[2] != "cancelled"]
    assert b_delivered or b_row == [(504, 1, "no_answer_by_timeout")], (out, usage_reasons(gw))
    gw.db.assert_reconciled()


async def test_a_sessionless_call_refunded_at_the_end_of_its_primed_stream_is_not_delivered_by_resumption(
        gw: Gw) -> None:
    """2025-11-25, a stateless server (no Mcp-Session-Id) with an event store: it closes the POST stream
    after the priming event (SEP-1699) and replays the answer to a GET carrying Last-Event-ID. The meter
    refunded the call as no_answer when the POST stream ended (only calls of a session are parked), and
    the resumed GET delivered the result: a result kept, refunded."""
    version = {"MCP-Protocol-Version": "2025-11-25"}
    post = make_flow(headers=version)
    await gw.addon.request(post)
    post.response = sse_response()
    await gw.addon.responseheaders(post)
    sent(post.response.stream(PRIMING))
    post.response.stream(b"")
    await gw.addon.response(post)
    await gw.addon.drain()
    get = make_flow(method="GET", headers={**version, "Last-Event-ID": "1"})
    await gw.addon.request(get)
    get.response = sse_response()
    await gw.addon.responseheaders(get)
    delivered = delivered_results(sent(get.response.stream(b"id: 2\ndata: " + RESULT.encode() + b"\n\n")))
    get.response.stream(b"")
    await gw.addon.response(get)
    await gw.addon.drain()
    billed = [r for r in usage_reasons(gw) if r[1] == 0]
    assert delivered <= len(billed), f"{delivered} result(s) delivered, {len(billed)} billed: {usage_reasons(gw)}"


# --- calls without a session, resumed by Last-Event-ID (a stateless server that keeps events) ---------

VERSION = {"MCP-Protocol-Version": "2025-11-25"}


async def sessionless_parked(gw: Gw, rpc_id: int = 1, token: str = ALICE) -> tuple[http.HTTPFlow, Call]:
    """A priced call without Mcp-Session-Id whose POST stream the server ended after its priming event (id 1)."""
    post = make_flow(headers=VERSION, body=tool_call(rpc_id=rpc_id), token=token)
    await gw.addon.request(post)
    assert post.response is None  # forwarded, charged
    call = gw.addon.calls[post.id]
    post.response = sse_response()
    await gw.addon.responseheaders(post)
    sent(post.response.stream(PRIMING))
    post.response.stream(b"")
    await gw.addon.response(post)
    return post, call


async def sessionless_get(gw: Gw, event_id: str = "1", token: str = ALICE) -> http.HTTPFlow:
    get = make_flow(method="GET", headers={**VERSION, "Last-Event-ID": event_id}, token=token)
    await gw.addon.request(get)
    assert get.response is None  # forwarded
    get.response = sse_response()
    await gw.addon.responseheaders(get)
    return get


async def end(gw: Gw, flow: http.HTTPFlow) -> None:
    flow.response.stream(b"")
    await gw.addon.response(flow)
    await gw.addon.drain()


ANSWER = b"id: 2\ndata: " + RESULT.encode() + b"\n\n"


async def test_a_sessionless_call_parked_is_billed_once_however_often_its_stream_is_resumed(gw: Gw) -> None:
    """The answer on the first GET resuming the call's event settles it; a second GET resuming the same event
    (the client retrying) gets it again, already paid: one price, and the parked call is released."""
    post, call = await sessionless_parked(gw)
    assert call.waits is Wait.RESUMPTION and usage_reasons(gw) == []
    delivered = 0
    for _ in range(2):
        get = await sessionless_get(gw)
        out = sent(get.response.stream(ANSWER))
        assert out == ANSWER  # delivered as sent
        delivered += delivered_results(out)
        await end(gw, get)
    assert delivered == 2 and usage_reasons(gw) == [(200, 0, "result")]
    assert gw.db.balance(1) == OPENING - PRICE
    assert not gw.addon.pending.parked and post.id not in gw.addon.calls
    gw.db.assert_reconciled()


async def test_a_sessionless_call_refunded_at_its_timeout_is_not_delivered_by_a_later_resumption(gw: Gw) -> None:
    post, call = await sessionless_parked(gw)
    gw.addon.streams.on_deadline(post, call)  # the listing's timeout, no resumed stream having answered
    await gw.addon.drain()
    assert usage_reasons(gw) == [(504, 1, "no_answer_by_timeout")] and gw.db.balance(1) == OPENING
    get = await sessionless_get(gw)
    assert sent(get.response.stream(ANSWER)) == b"id: 2\n\n"  # its id kept, its data dropped
    await end(gw, get)
    assert usage_reasons(gw) == [(504, 1, "no_answer_by_timeout")] and not gw.addon.pending.parked
    gw.db.assert_reconciled()


async def test_a_sessionless_call_refunded_while_its_stream_is_resumed_is_not_delivered_there(gw: Gw) -> None:
    post, call = await sessionless_parked(gw)
    get = await sessionless_get(gw)  # resumed, the answer not there yet
    gw.addon.streams.on_deadline(post, call)
    await gw.addon.drain()
    assert sent(get.response.stream(ANSWER)) == b"id: 2\n\n"
    await end(gw, get)
    assert usage_reasons(gw) == [(504, 1, "no_answer_by_timeout")]


async def test_a_parked_call_refunded_at_its_timeout_is_blanked_before_its_settlement_runs(gw: Gw) -> None:
    """The timeout decides the refund at once; its settlement runs later (a task, which awaits the circuit
    breaker's record first: a Redis round trip in production). The marker was written only there: an
    answer passing on a resumed stream in between went out whole, and the call was refunded."""
    post, call = await sessionless_parked(gw)
    get = await sessionless_get(gw)
    gw.addon.streams.on_deadline(post, call)  # no await after it: the settlement has not run yet
    assert sent(get.response.stream(ANSWER)) == b"id: 2\n\n"
    await gw.addon.drain()
    await end(gw, get)
    assert usage_reasons(gw) == [(504, 1, "no_answer_by_timeout")]
    gw.db.assert_reconciled()


async def test_a_sessionless_call_cut_at_its_timeout_is_not_delivered_by_resumption(gw: Gw) -> None:
    """Its POST stream still open at the timeout: cut and refunded (upstream_timeout); a GET resuming after
    the last event it carried gets the answer blanked."""
    post = make_flow(headers=VERSION)
    await gw.addon.request(post)
    call = gw.addon.calls[post.id]
    post.response = sse_response()
    await gw.addon.responseheaders(post)
    sent(post.response.stream(PRIMING))
    call.failure = Failure.TIMEOUT  # what on_deadline sets before it aborts the upstream
    await gw.addon.error(post)
    await gw.addon.drain()
    assert usage_reasons(gw) == [(504, 1, "upstream_timeout")]
    get = await sessionless_get(gw)
    assert delivered_results(sent(get.response.stream(ANSWER))) == 0
    await end(gw, get)
    gw.db.assert_reconciled()


async def test_a_resumption_naming_another_event_or_another_id_settles_nothing(gw: Gw) -> None:
    """A GET naming an event no call is parked under is forwarded and passes as sent; on the call's own
    resumed stream, an answer under another id is not its answer: it passes, and the call stays parked."""
    post, call = await sessionless_parked(gw)
    other = await sessionless_get(gw, event_id="77")
    assert sent(other.response.stream(ANSWER)) == ANSWER
    await end(gw, other)
    get = await sessionless_get(gw)
    foreign = b"id: 3\ndata: " + RESULT.replace('"id": 1', '"id": 2').encode() + b"\n\n"
    assert sent(get.response.stream(foreign)) == foreign
    await gw.addon.drain()
    assert call.settlement is None and call.waits is Wait.RESUMPTION and usage_reasons(gw) == []
    assert sent(get.response.stream(ANSWER)) == ANSWER  # its own answer settles it
    await end(gw, get)
    assert usage_reasons(gw) == [(200, 0, "result")]
    gw.db.assert_reconciled()


async def test_another_key_resuming_a_sessionless_calls_event_neither_settles_it_nor_gets_its_answer(
        gw: Gw) -> None:
    """A stateless server replays a stream to whoever names its event. Bob, naming Alice's, must not get the
    result while Alice's call waits (it would be refunded at its timeout, the result out), nor bill her."""
    post, call = await sessionless_parked(gw)
    bob = await sessionless_get(gw, token=BOB)
    assert sent(bob.response.stream(ANSWER)) == b"id: 2\n\n"
    await end(gw, bob)
    assert call.settlement is None and usage_reasons(gw) == []
    alice = await sessionless_get(gw)
    assert sent(alice.response.stream(ANSWER)) == ANSWER
    await end(gw, alice)
    assert usage_reasons(gw) == [(200, 0, "result")] and gw.db.balance(2) == OPENING
    gw.db.assert_reconciled()


async def test_another_key_cannot_get_a_refunded_sessionless_calls_answer_either(gw: Gw) -> None:
    post, call = await sessionless_parked(gw)
    gw.addon.streams.on_deadline(post, call)
    await gw.addon.drain()
    bob = await sessionless_get(gw, token=BOB)
    assert sent(bob.response.stream(ANSWER)) == b"id: 2\n\n"
    await end(gw, bob)


async def test_two_sessionless_calls_parked_under_one_event_and_id_deliver_nothing_unpaid(gw: Gw) -> None:
    """Stateless clients of one key all number their calls from 1; a server whose event ids repeat across
    streams primes both with id 1. Nothing tells their answers apart: both refunded, no answer delivered."""
    post_a, call_a = await sessionless_parked(gw)
    post_b, call_b = await sessionless_parked(gw)
    assert call_a.waits is Wait.RESUMPTION and call_b.waits is None  # B refunded at once
    delivered = 0
    for text in ("result of A", "result of B"):
        get = await sessionless_get(gw)
        delivered += text.encode() in sent(get.response.stream(b"id: 2\ndata: " + RESULT.replace(
            "done", text).encode() + b"\n\n"))
        await end(gw, get)
    gw.addon.streams.on_deadline(post_a, call_a)
    await gw.addon.drain()
    billed = [r for r in usage_reasons(gw) if r[1] == 0]
    assert delivered <= len(billed), (delivered, usage_reasons(gw))
    gw.db.assert_reconciled()


async def test_a_sessionless_cancellation_refunds_nothing(gw: Gw) -> None:
    """Without a session, a notifications/cancelled cannot name a call (every client's ids start at 1)."""
    post, call = await sessionless_parked(gw)
    notice = make_flow(headers=VERSION, body={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                              "params": {"requestId": 1}})
    await gw.addon.request(notice)
    assert notice.response is None  # forwarded
    await gw.addon.drain()
    assert call.failure is None and call.settlement is None
    get = await sessionless_get(gw)
    assert sent(get.response.stream(ANSWER)) == ANSWER
    await end(gw, get)
    assert usage_reasons(gw) == [(200, 0, "result")]


PROGRESS_5 = b'id: 5\ndata: {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}\n\n'


@pytest.mark.parametrize("refunded", [False, True])
async def test_a_sessionless_call_is_followed_through_a_resumed_stream_the_server_closes_again(
        gw: Gw, refunded: bool) -> None:
    """SEP-1699 lets a server close a resumed GET too: the client resumes after the last event it got
    there (5), not the POST's (1). That GET resumes the same call: it settles it, or, the call refunded,
    gets its answer blanked."""
    post, call = await sessionless_parked(gw)
    first = await sessionless_get(gw)
    assert sent(first.response.stream(PROGRESS_5)) == PROGRESS_5
    await end(gw, first)
    assert call.settlement is None
    if refunded:
        gw.addon.streams.on_deadline(post, call)
        await gw.addon.drain()
    again = await sessionless_get(gw, event_id="5")
    out = sent(again.response.stream(b"id: 6\ndata: " + RESULT.encode() + b"\n\n"))
    await end(gw, again)
    if refunded:
        assert out == b"id: 6\n\n" and usage_reasons(gw) == [(504, 1, "no_answer_by_timeout")]
    else:
        assert delivered_results(out) == 1 and usage_reasons(gw) == [(200, 0, "result")]
    later = await sessionless_get(gw, event_id="6")  # and on: the call settled and paid, nothing carried
    await end(gw, later)
    gw.db.assert_reconciled()


async def test_a_resumed_stream_of_nothing_pending_leaves_nothing_behind(gw: Gw) -> None:
    get = await sessionless_get(gw, event_id="41")
    sent(get.response.stream(PROGRESS_5))
    await end(gw, get)
    assert not gw.addon.pending.resumes and not gw.addon.pending.parked and get.id not in gw.addon.calls


async def test_a_get_naming_two_last_event_ids_is_refused(gw: Gw) -> None:
    get = make_flow(method="GET", headers=VERSION)
    get.request.headers.add("Last-Event-ID", "1")
    get.request.headers.add("Last-Event-ID", "2")
    await gw.addon.request(get)
    assert get.response is not None and get.response.status_code == 400
    assert json.loads(get.response.content)["error"] == "invalid_request"


@pytest.mark.parametrize("in_session", [True, False])
@pytest.mark.parametrize("answered", [True, False])
async def test_a_continuation_whose_stream_ends_primed_is_not_refunded_while_resumption_delivers_it(
        gw: Gw, answered: bool, in_session: bool) -> None:
    """A round held on its input_required answer (with a session); the retry carrying its requestState is
    forwarded free, and the server closes the retry's POST stream after its priming event (SEP-1699), the
    answer to come on a resumed GET. Only charged calls were parked: the uncharged retry was settled at
    once as no_answer, which refunded the held first round, and the resumed GET delivered the result.
    Without a session too (2026-07-28 has none): the retry is parked under its event id."""
    headers = SESSION if in_session else VERSION
    first = make_flow(headers=headers, body={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                             "params": {"name": "echo", "arguments": {}}})
    await gw.addon.request(first)
    first.response = http.Response.make(200, json.dumps({"jsonrpc": "2.0", "id": 1, "result": {
        "resultType": "input_required", "requestState": "S1", "inputRequests": {}}}).encode(),
        {"Content-Type": "application/json"})
    await gw.addon.responseheaders(first)
    await gw.addon.response(first)
    await gw.addon.drain()
    assert usage_reasons(gw) == []  # held
    retry = make_flow(headers=headers, body={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "echo", "arguments": {}, "requestState": "S1", "inputResponses": {}}})
    await gw.addon.request(retry)
    assert retry.response is None  # forwarded, free
    retry.response = sse_response()
    await gw.addon.responseheaders(retry)
    sent(retry.response.stream(PRIMING))
    retry.response.stream(b"")
    await gw.addon.response(retry)
    await gw.addon.drain()
    if not answered:  # no answer within the listing's timeout: the round refunded, the late answer dropped
        call = gw.addon.pending.parked_calls()[0][1] if gw.addon.pending.parked_calls() else None
        if call is not None:
            gw.addon.streams.on_deadline(retry, call)
        await gw.addon.drain()
    get = await (resumed_get(gw) if in_session else sessionless_get(gw))
    result_2 = RESULT.replace('"id": 1', '"id": 2')
    delivered = delivered_results(sent(get.response.stream(b"id: 2\ndata: " + result_2.encode() + b"\n\n")))
    get.response.stream(b"")
    await gw.addon.response(get)
    await gw.addon.drain()
    billed = [r for r in usage_reasons(gw) if r[1] == 0]
    assert delivered <= len(billed), f"{delivered} result(s) delivered, {len(billed)} billed: {usage_reasons(gw)}"
    gw.db.assert_reconciled()
