"""Idempotency-Key in the addon's hooks (taddons, embedded store): what is claimed, stored and released."""

from __future__ import annotations

import json
import time
from typing import Any
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addon import idempotency
from addon.gateway import META, Mcpmeter
from tests.test_gateway_hooks import (MAX_BODY, OPENING, POOR, PRICE, Gw, forwarded, gw, isolated, json_response,  # noqa: F401
                                      make_flow, tool_call, upstream_answers, upstream_fails)

pytestmark = pytest.mark.timeout(30)

KEY = {"Idempotency-Key": "agent-retry-1"}


def claims(gw: Gw) -> dict[str, tuple[float, str]]:
    return dict(gw.addon.cache._idem().items())  # type: ignore[union-attr]


async def test_a_crashed_call_locks_its_key_only_for_the_timeout_plus_a_margin(gw: Gw) -> None:
    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    assert forwarded(flow) and "idempotency-key" not in flow.request.headers
    [(until, record)] = claims(gw).values()
    assert idempotency.judge(record, idempotency.fingerprint(flow.request.raw_content or b"")).kind == "in_flight"
    # echo-test's timeout is 10 s: the claim frees itself after 10 + IN_FLIGHT_MARGIN_SECONDS
    assert until - time.time() == pytest.approx(10 + idempotency.IN_FLIGHT_MARGIN_SECONDS, abs=1)
    retry = make_flow(headers=KEY)
    await gw.addon.request(retry)
    assert retry.response is not None and retry.response.status_code == 409 and not forwarded(retry)
    assert retry.response.headers["Retry-After"] == idempotency.IN_FLIGHT_RETRY_AFTER
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    assert gw.db.balance() == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_an_upstream_failure_releases_the_key(gw: Gw) -> None:
    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "connection refused")
    await gw.addon.drain()
    assert claims(gw) == {} and gw.db.balance() == OPENING  # refunded, nothing kept
    retry = make_flow(headers=KEY)
    await gw.addon.request(retry)
    assert forwarded(retry) and retry.response is None  # runs again, and pays once
    await upstream_answers(gw, retry, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    assert gw.db.balance() == OPENING - PRICE
    again = make_flow(headers=KEY)
    await gw.addon.request(again)
    assert again.response is not None and again.response.headers[idempotency.REPLAYED] == "true"
    assert again.metadata[META]["decision"] == "replayed" and gw.db.balance() == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_a_call_refused_for_credit_releases_its_claim(gw: Gw) -> None:
    cache = gw.addon.cache
    released: list[str] = []
    release = cache.idem_release  # type: ignore[union-attr]

    async def spy(key: str, claim: str) -> bool:
        released.append(key)
        return await release(key, claim)

    cache.idem_release = spy  # type: ignore[union-attr]
    flow = make_flow(token=POOR, headers=KEY)  # 100 µ¢, the call costs 1000: claimed, then refused
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    await gw.addon.drain()
    assert len(released) == 1 and claims(gw) == {}  # a retry after topping up runs normally
    gw.db.assert_reconciled()


async def test_an_answer_header_that_is_not_utf8_is_replayed_as_its_bytes(gw: Gw) -> None:
    # mitmproxy hands header bytes that are not UTF-8 over as surrogate escapes: the replay sends the
    # upstream's own bytes back, rather than failing every retry with a 500 for the record's 24 hours.
    from mitmproxy import http

    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    body = b'{"jsonrpc": "2.0", "id": 1, "result": {"content": []}}'
    await upstream_answers(gw, flow, http.Response.make(200, body, [
        (b"Content-Type", b"application/json; x=\xff"), (b"Mcp-Session-Id", b"s-\xe9")]))
    retry = make_flow(headers=KEY)
    await gw.addon.request(retry)
    assert retry.response is not None and retry.response.status_code == 200 and not forwarded(retry)
    assert retry.response.headers[idempotency.REPLAYED] == "true"
    assert flow.response is not None and retry.response.raw_content == flow.response.raw_content
    fields = dict(retry.response.headers.fields)
    assert fields[b"Content-Type"] == b"application/json; x=\xff" and fields[b"Mcp-Session-Id"] == b"s-\xe9"
    assert gw.db.balance() == OPENING - PRICE
    gw.db.assert_reconciled()


async def test_streamed_answers_kept_for_replays_count_against_max_holding_bytes(tmp_path: Path) -> None:
    # A streamed answer passes as it comes; only its copy for a replay (up to 1 MiB) stays in memory
    # until the stream ends. Calls in flight are not bounded in number: the copies are, all together,
    # with what else is held of answers. Past the budget a copy is given up (its answer still passes,
    # not stored: a retry runs again, as one over MAX_STORED_BYTES does), and what one held comes back.
    from mitmproxy import http

    from addon import budget
    from tests.test_gateway_hooks import Db, write_config

    limit = 4 * MAX_BODY  # the least max_holding_bytes may be (4 x max_body_bytes)
    progress = b"data: " + json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                       "params": {"progressToken": "t", "progress": 1}}).encode() + b"\n\n"
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, max_holding_bytes=limit)))
        gw = Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        held_before = budget.HOLDING.held
        flows = [make_flow(headers={"Idempotency-Key": f"stream-{i}"}) for i in range(3)]
        for flow in flows:
            await addon.request(flow)
            flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
            await addon.responseheaders(flow)
        calls = [addon.calls[f.id] for f in flows]
        for flow in flows:
            assert flow.response is not None and callable(flow.response.stream)
            for _ in range(limit * 2 // 5 // len(progress)):  # 40% of the budget each: no room for a third
                assert flow.response.stream(progress) == progress  # the answer passes, copy or not
        kept = sum(len(c.idempotency.captured or b"") for c in calls if c.idempotency is not None)
        assert kept <= limit and budget.HOLDING.held - held_before <= limit
        assert [c.idempotency.overflow for c in calls if c.idempotency is not None] == [False, False, True]
        answer = b"data: " + json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}).encode() + b"\n\n"
        for flow in flows:
            assert flow.response is not None and callable(flow.response.stream)
            flow.response.stream(answer)
            await addon.response(flow)
        await addon.drain()
        assert budget.HOLDING.held == held_before  # what the copies held is given back
        replays = []
        for i in range(3):
            retry = make_flow(headers={"Idempotency-Key": f"stream-{i}"})
            await addon.request(retry)
            replays.append(retry.response is not None and retry.response.headers.get(idempotency.REPLAYED) == "true")
        assert replays == [True, True, False]  # the copy given up was not stored: that retry runs
        gw.db.assert_reconciled()
        addon.done()


async def test_a_keyed_call_whose_client_walked_away_is_neither_run_nor_charged_again(gw: Gw) -> None:
    """The client left after its call was forwarded (billed: the upstream ran the tool), so it never
    got the answer, which the gateway did not read either. A retry with the same key must not run the
    tool a second time nor pay twice: it is told, every time, that the billed answer was lost."""
    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    await gw.addon.drain()
    assert gw.db.balance() == OPENING - PRICE  # a walk-away is billed
    first = flow.metadata[META]["request_id"]
    for _ in range(2):
        retry = make_flow(headers=KEY)
        await gw.addon.request(retry)
        assert retry.response is not None and not forwarded(retry)
        assert retry.response.status_code == 410 and retry.response.headers[idempotency.REPLAYED] == "true"
        assert retry.response.headers["X-Mcpmeter-Billed"] == str(PRICE)  # what the first call was billed
        assert retry.response.headers["X-Mcpmeter-Request-Id"] == first
        error = json.loads(retry.response.content)["error"]
        assert error["data"]["error"] == "idempotency_answer_lost" and error["code"] == -32017
        assert error["data"]["request_id"] == first
    assert gw.db.balance() == OPENING - PRICE and len(gw.db.usage()) == 1
    other = make_flow(headers={"Idempotency-Key": "agent-retry-2"})  # a new key calls again
    await gw.addon.request(other)
    assert forwarded(other)
    gw.db.assert_reconciled()


async def test_a_keyed_call_cancelled_by_its_client_releases_its_key(gw: Gw) -> None:
    """Gone before its call left (cancelled, refunded): nothing ran, so a retry runs and pays once."""
    flow = make_flow(headers=KEY)
    flow.server_conn.timestamp_start = None
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    await gw.addon.drain()
    assert gw.db.balance() == OPENING and claims(gw) == {}
    retry = make_flow(headers=KEY)
    await gw.addon.request(retry)
    assert forwarded(retry)
    gw.db.assert_reconciled()


async def _retry_is_answer_lost(gw: Gw, first: str) -> None:
    retry = make_flow(headers=KEY)
    await gw.addon.request(retry)
    assert retry.response is not None and not forwarded(retry)
    assert retry.response.status_code == 410, (retry.response.status_code, retry.response.content)
    assert retry.response.headers[idempotency.REPLAYED] == "true"
    assert retry.response.headers["X-Mcpmeter-Billed"] == str(PRICE)
    assert retry.response.headers["X-Mcpmeter-Request-Id"] == first
    message = json.loads(retry.response.content)
    assert message["id"] == 1 and message["error"]["data"]["error"] == "idempotency_answer_lost"


async def _walks_away_and_its_answer_is_lost(gw: Gw, flow: Any) -> None:
    """The client leaves: billed once, and its retries are told the answer was lost, never charged."""
    await upstream_fails(gw, flow, "Client disconnected.")
    await gw.addon.drain()
    assert gw.db.balance() == OPENING - PRICE  # a walk-away is billed
    await _retry_is_answer_lost(gw, flow.metadata[META]["request_id"])
    assert gw.db.balance() == OPENING - PRICE and len(gw.db.usage()) == 1
    gw.db.assert_reconciled()


async def test_a_walk_away_after_a_buffered_answers_head_is_not_replayed_as_an_empty_answer(gw: Gw) -> None:
    """The upstream's head came (200, application/json) and its body was still being read when the client
    left: billed, no answer. Its retry must be told the answer was lost, not be replayed a 200 with an
    empty JSON body (which no client can read) as if it were the answer paid for."""
    from mitmproxy import http

    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    flow.response = http.Response.make(200, b"", {"Content-Type": "application/json"})
    flow.response.content = None  # mitmproxy's buffered answer before its body came
    await gw.addon.responseheaders(flow)
    await _walks_away_and_its_answer_is_lost(gw, flow)


async def test_a_walk_away_mid_stream_before_the_answer_is_not_replayed_as_a_stream_without_it(gw: Gw) -> None:
    """An SSE answer's head and a progress event went out, then the client left before the answer: billed,
    answer lost. Replaying the bytes that passed (a 200 stream that ends without the answer) leaves the
    retrying SDK waiting for an answer that never comes: its retry is told the answer was lost."""
    from mitmproxy import http

    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
    await gw.addon.responseheaders(flow)
    assert flow.response is not None and callable(flow.response.stream)
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "t", "progress": 1}}
    flow.response.stream(b"id: 1\ndata: " + json.dumps(progress).encode() + b"\n\n")
    await _walks_away_and_its_answer_is_lost(gw, flow)


async def test_a_walk_away_mid_stream_after_the_answer_is_replayed_with_it(gw: Gw) -> None:
    """The answer's event passed before the client left: what was streamed holds the answer, replayed."""
    from mitmproxy import http

    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
    await gw.addon.responseheaders(flow)
    assert flow.response is not None and callable(flow.response.stream)
    answer = b"data: " + json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}).encode() + b"\n\n"
    flow.response.stream(answer)
    await upstream_fails(gw, flow, "Client disconnected.")
    await gw.addon.drain()
    assert gw.db.balance() == OPENING - PRICE
    retry = make_flow(headers=KEY)
    await gw.addon.request(retry)
    assert retry.response is not None and not forwarded(retry) and retry.response.status_code == 200
    assert b'"result"' in (retry.response.content or b"") and retry.response.headers[idempotency.REPLAYED] == "true"
    assert gw.db.balance() == OPENING - PRICE and len(gw.db.usage()) == 1
    gw.db.assert_reconciled()


@pytest.mark.parametrize("streamed", [False, True], ids=["no-answer", "mid-stream"])
async def test_a_walk_away_whose_settlement_did_not_land_does_not_lock_its_key_as_billed(
        gw: Gw, monkeypatch: pytest.MonkeyPatch, streamed: bool) -> None:
    """The walk-away's settlement cannot be written (the database down through every attempt): its journal
    row stays unsettled, and the sweeper refunds it. A record saying it was billed (410, X-Mcpmeter-Billed:
    the price) would be wrong about the money and keep the key from a retry for 24 hours, the consumer
    paying nothing and getting nothing: the key is released, as for a call refunded without an answer."""
    from addon import settlement
    from addon.store import StoreUnavailable

    async def down(*_: object, **__: object) -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(settlement, "SETTLE_BACKOFF", (0.0,) * len(settlement.SETTLE_BACKOFF))
    from mitmproxy import http

    flow = make_flow(headers=KEY)
    await gw.addon.request(flow)
    assert forwarded(flow)
    if streamed:  # a stream begun, the answer not yet: not replayed either
        flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
        await gw.addon.responseheaders(flow)
        assert flow.response is not None and callable(flow.response.stream)
        flow.response.stream(b": keep-alive\n\n")
    with monkeypatch.context() as patched:
        patched.setattr(gw.addon.store, "settle", down)
        await upstream_fails(gw, flow, "Client disconnected.")
        await gw.addon.drain()
    assert claims(gw) == {}  # released: nothing says what the call cost yet
    retry = make_flow(headers=KEY)
    await gw.addon.request(retry)
    assert forwarded(retry)
