"""Issue 7, classes 2-4 at the hooks: the call the gateway prices is the call the upstream reads,
settlement does not depend on the answer's size or shape, and every body is read with a ceiling."""

from __future__ import annotations

import dataclasses
import gzip
import tracemalloc
from typing import Any

import pytest
from mitmproxy import http

from addon import compat
from tests.refusals import refusal
from tests.test_gateway_hooks import (  # noqa: F401  # gw and isolated are fixtures
    ALICE, MAX_BODY, OPENING, PRICE, Gw, forwarded, gw, is_uuid4, isolated, make_flow, meta, sse_response,
    upstream_answers, upstream_fails,
)

pytestmark = pytest.mark.timeout(60)

CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}'


def refused_with(flow: http.HTTPFlow, status: int, code: str) -> dict[str, Any]:
    assert flow.response is not None and flow.response.status_code == status, flow.response
    body = refusal(flow.response)
    assert body["error"] == code and is_uuid4(body["request_id"])
    assert flow.response.headers["X-Mcpmeter-Billed"] == "0"
    assert not forwarded(flow)
    return body


# --- class 2: one reading of the call ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["PUT", "PATCH", "TRACE", "PROPFIND", "post", "Get"])
async def test_other_methods_are_refused_405_with_allow_and_never_forwarded(gw: Gw, method: str) -> None:
    flow = make_flow(body=CALL, method=method)
    await gw.addon.request(flow)
    refused_with(flow, 405, "method_not_allowed")
    assert flow.response.headers["Allow"] == "GET, POST, DELETE, HEAD, OPTIONS"
    assert gw.db.balance(1) == OPENING and gw.db.journal() == []


@pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD", "OPTIONS"])
async def test_a_body_on_a_method_that_carries_none_is_refused(gw: Gw, method: str) -> None:
    flow = make_flow(body=CALL, method=method)
    await gw.addon.request(flow)
    body = refused_with(flow, 400, "invalid_request")
    assert method in body["reason"]
    assert gw.db.balance(1) == OPENING and gw.db.journal() == []


@pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD", "OPTIONS"])
async def test_those_methods_pass_with_an_empty_body(gw: Gw, method: str) -> None:
    flow = make_flow(method=method)
    await gw.addon.request(flow)
    assert flow.response is None and forwarded(flow)
    assert gw.db.journal() == []


@pytest.mark.parametrize("raw, code", [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"echo"}}',
     "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"freebie","name":"echo"}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":NaN,"method":"tools/call","params":{"name":"echo"}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1.0,"method":"tools/call","params":{"name":"echo"}}', "invalid_request"),
    (b'{"jsonrpc":"2.0","id":9007199254740993,"method":"tools/call","params":{"name":"echo"}}',
     "invalid_request"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\ud800"}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":'
     + b"[" * 70 + b"]" * 70 + b"}}", "invalid_json"),
])
async def test_bodies_parsers_read_differently_are_refused(gw: Gw, raw: bytes, code: str) -> None:
    flow = make_flow(body=raw)
    await gw.addon.request(flow)
    refused_with(flow, 400, code)
    assert gw.db.balance(1) == OPENING and gw.db.journal() == []


# --- class 3: settlement whatever the answer's size or shape ----------------------------------------

async def test_a_deeply_nested_json_result_is_billed_and_stamped(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    nested = b"[" * 100_000 + b"]" * 100_000
    answer = http.Response.make(200, b'{"jsonrpc":"2.0","id":1,"result":{"content":' + nested + b"}}",
                                {"Content-Type": "application/json"})
    await upstream_answers(gw, flow, answer)
    assert flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)
    assert meta(flow)["decision"] == "billed"
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]
    gw.db.assert_reconciled()


async def test_an_sse_event_over_max_event_bytes_is_billed(gw: Gw) -> None:
    gw.addon.config = dataclasses.replace(gw.addon.config, max_event_bytes=1024)
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    call = gw.addon.calls[flow.id]
    event = (b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"'
             + b"r" * 3_000_000 + b'"}]}}\n\n')
    sent = []  # the receipt writer may hold back up to one event of 1 MiB; past that it lets bytes out
    for i in range(0, len(event), 16384):
        out = flow.response.stream(event[i : i + 16384])
        sent.append(out if isinstance(out, bytes) else b"".join(out))
    assert call.parser is not None and len(call.parser._buf) < 200_000
    assert call.settlement is not None
    await call.settlement
    out = flow.response.stream(b"")
    sent.append(out if isinstance(out, bytes) else b"".join(out))
    assert b"".join(sent) == event  # delivered whole, unchanged (too big to carry a receipt)
    await gw.addon.response(flow)
    assert meta(flow)["decision"] == "billed"
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]


async def test_an_sse_tool_error_over_the_limit_is_refunded(gw: Gw) -> None:
    gw.addon.config = dataclasses.replace(gw.addon.config, max_event_bytes=1024)
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    flow.response.stream(b'data: {"jsonrpc":"2.0","id":1,"result":{"content":[' + b"[]," * 10_000
                         + b'[]],"isError":true}}\n\n')
    await gw.addon.calls[flow.id].settlement
    assert gw.db.balance(1) == OPENING


async def test_a_failing_response_hook_still_settles_and_stamps(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    flow = make_flow()
    await gw.addon.request(flow)

    def boom(*_: Any) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(gw.addon.streams, "body_outcome", boom)
    await upstream_answers(gw, flow, http.Response.make(200, b'{"jsonrpc":"2.0","id":1,"result":{}}',
                                                        {"Content-Type": "application/json"}))
    h = flow.response.headers
    assert is_uuid4(h["X-Mcpmeter-Request-Id"]) and h["X-Mcpmeter-Billed"] == str(PRICE)  # delivered: billed
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]
    assert len(gw.db.usage()) == 1 and gw.addon.calls == {}


async def test_a_failing_response_hook_refunds_an_error_answer(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    monkeypatch.setattr(gw.addon.streams, "body_outcome", lambda *_: 1 / 0)
    await upstream_answers(gw, flow, http.Response.make(500, b"oops", {"Content-Type": "text/plain"}))
    assert flow.response.headers["X-Mcpmeter-Refunded"] == "1"
    assert gw.db.balance(1) == OPENING and len(gw.db.usage()) == 1


async def test_a_failing_error_hook_still_refunds(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    monkeypatch.setattr(compat, "client_gone", lambda _: 1 / 0)
    await upstream_fails(gw, flow, "Connection refused")
    assert gw.db.balance(1) == OPENING
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE), ("refund", PRICE)]
    assert gw.addon.calls == {}


# --- class 4: bounded reading ------------------------------------------------------------------------

async def test_a_gzip_bomb_answer_is_never_inflated_past_the_limit(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    bomb = gzip.compress(b'{"jsonrpc":"2.0","id":1,"result":{"content":"' + b" " * (64 * 1024 * 1024) + b'"}}')
    answer = http.Response.make(200, b"", {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    answer.raw_content = bomb
    tracemalloc.start()
    try:
        await upstream_answers(gw, flow, answer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the old hook inflated all 64 MB
    assert flow.response.raw_content == bomb  # passed on as sent
    # not readable within max_body_bytes, but delivered: billed (SPEC I5), under its own reason
    assert (meta(flow)["decision"], meta(flow)["reason"]) == ("billed", "unread_delivered")
    await gw.addon.drain()
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]
    gw.db.assert_reconciled()


async def test_a_small_gzip_answer_is_read_and_billed(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    answer = http.Response.make(200, b"", {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    answer.raw_content = gzip.compress(b'{"jsonrpc":"2.0","id":1,"result":{"isError":true}}')
    await upstream_answers(gw, flow, answer)
    assert meta(flow)["decision"] == "refunded" and meta(flow)["reason"] == "tool_error"


async def test_requestheaders_bounds_a_body_without_content_length(gw: Gw) -> None:
    flow = make_flow()
    del flow.request.headers["content-length"]
    flow.request.headers["Transfer-Encoding"] = "chunked"
    flow.request.content = None
    gw.addon.requestheaders(flow)
    assert flow.response is None and flow.live  # nothing to decide before the body comes
    limit, refuse, budget, busy = compat._body_limits[flow]
    assert limit == MAX_BODY and budget == gw.addon.config.max_reading_bytes
    answer = refuse(flow, limit)
    assert answer.status_code == 413 and refusal(answer.content)["error"] == "payload_too_large"
    answer = busy(flow, budget)
    assert answer.status_code == 503 and refusal(answer.content)["error"] == "gateway_busy"
    assert answer.headers["Retry-After"] == "1"
    assert ALICE not in flow.request.headers["authorization"]  # the flow dies before `request` redacts


def test_install_bounds_request_bodies_in_mitmproxy() -> None:
    from mitmproxy.proxy.layers.http import HttpStream

    compat.install()
    assert "_install_request_body_limit" in HttpStream.state_consume_request_body.__qualname__


@pytest.mark.parametrize("coding", ["gzip", "br"])
async def test_a_compressed_sse_stream_is_read_through_a_bounded_decoder(gw: Gw, coding: str) -> None:
    import brotli

    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    flow.response.headers["Content-Encoding"] = coding
    await gw.addon.responseheaders(flow)
    stream = b'data: {"jsonrpc":"2.0","id":1,"result":{"content":[]}}\n\n'
    raw = gzip.compress(stream) if coding == "gzip" else brotli.compress(stream)
    for i in range(0, len(raw), 5):
        assert flow.response.stream(raw[i : i + 5]) == raw[i : i + 5]  # passed on as sent
    await gw.addon.calls[flow.id].settlement
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]


async def test_a_compressed_sse_bomb_stops_the_meter_reading_and_bills_the_delivered_stream(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    flow.response.headers["Content-Encoding"] = "gzip"
    await gw.addon.responseheaders(flow)
    bomb = gzip.compress(b": " + b"x" * (32 * 1024 * 1024) + b'\n\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n')
    tracemalloc.start()
    try:
        for i in range(0, len(bomb), 16384):
            flow.response.stream(bomb[i : i + 16384])
        flow.response.stream(b"")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_BODY + 1024 * 1024
    await gw.addon.response(flow)
    assert (meta(flow)["decision"], meta(flow)["reason"]) == ("billed", "unread_delivered")
