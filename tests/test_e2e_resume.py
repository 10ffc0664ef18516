"""Calls that outlive their POST (issue 11 items 1, 2, 4), end to end on both backends.

The rule: a result delivered, or retrievable by resumption until the listing's timeout, is paid for;
a call that failed, was cancelled before its answer, or whose timeout passed with no deliverable answer
is refunded, and a refunded call's answer is never delivered afterwards (its event reaches the client
with empty data, which clients do not dispatch).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests import resume_server
from tests.backends import Backend, TestConsumer
from tests.demo_servers import serve_in_thread
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import MCP_HEADERS, call, eventually, post, slug


@pytest.fixture(scope="module")
def resume_url() -> Iterator[str]:
    url, stop = serve_in_thread(resume_server.build_app())
    yield url + "/mcp"
    stop()


def journal(backend: Backend, c: TestConsumer) -> list[tuple[str, int, int, str | None]]:
    rows = backend.query("SELECT tool_name, status, refunded, reason FROM mcpmeter_calls WHERE user_id = %s"
                         " AND settled_at IS NOT NULL ORDER BY request_id", (c.user_id,))
    return [(t, int(st), int(r), why) for t, st, r, why in rows]


async def session(gw: Gateway, path: str, c: TestConsumer, version: str = "2025-11-25") -> dict[str, str]:
    r = await post(gw, path, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}, c)
    assert r.status_code == 200, r.text
    return {**c.auth, "Mcp-Session-Id": r.headers["mcp-session-id"], "MCP-Protocol-Version": version}


def events(text: str) -> list[tuple[str | None, str]]:
    """(id, data) of each event of an SSE body, the way a client reads them."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                      for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            out.append((fields.get("id"), fields.get("data", "")))
    return out


def answers(text: str) -> list[dict[str, Any]]:
    """The messages a client dispatches: events with data."""
    return [json.loads(data) for _, data in events(text) if data]


async def resume(gw: Gateway, path: str, headers: dict[str, str], last_event_id: str) -> str:
    async with httpx2.AsyncClient(timeout=20) as client:
        r = await client.get(gw.url + path, headers={**headers, "Accept": "text/event-stream",
                                                     "Last-Event-ID": last_event_id})
        assert r.status_code == 200, r.text
        return r.text


async def test_a_server_closed_stream_is_billed_once_when_a_resumed_stream_delivers_the_answer(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("resume")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    c = backend.add_consumer(credit=10_000)
    h = await session(gateway, f"/{s}", c)
    r = await post(gateway, f"/{s}", call("closes", {"delay": 0.5}, rpc_id=7), headers=h)
    assert r.status_code == 200 and answers(r.text) == []  # the POST stream ended after its priming event
    primed = events(r.text)[0][0]
    assert primed is not None
    await asyncio.sleep(0.3)
    assert journal(backend, c) == []  # pending: not refunded as "no answer"
    text = await resume(gateway, f"/{s}", h, primed)
    assert [m["id"] for m in answers(text)] == [7]
    await eventually(lambda: journal(backend, c) == [("closes", 200, 0, "result")])
    again = await resume(gateway, f"/{s}", h, primed)  # a replayed event never bills twice
    assert [m["id"] for m in answers(again)] == [7]
    await asyncio.sleep(0.3)
    assert journal(backend, c) == [("closes", 200, 0, "result")]
    assert len(backend.usage(c)) == 1 and backend.balance(c.user_id) == 9_000


async def test_a_server_closed_stream_unanswered_by_its_timeout_is_refunded_and_its_answer_never_delivered(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("resume-late")
    backend.add_listing(s, resume_url, price=1000, timeout=1)
    c = backend.add_consumer(credit=10_000)
    h = await session(gateway, f"/{s}", c)
    r = await post(gateway, f"/{s}", call("closes", {"delay": 1.6}, rpc_id="late"), headers=h)
    primed = events(r.text)[0][0]
    assert primed is not None and answers(r.text) == []
    await eventually(lambda: journal(backend, c) == [("closes", 504, 1, "no_answer_by_timeout")], timeout=5)
    assert backend.balance(c.user_id) == 10_000
    text = await resume(gateway, f"/{s}", h, primed)
    assert answers(text) == []  # dropped: the event comes with empty data, never dispatched
    assert any(i is not None for i, _ in events(text))  # its id still advances the client's resumption point
    assert journal(backend, c) == [("closes", 504, 1, "no_answer_by_timeout")]


async def test_a_refunded_calls_answer_spelled_as_a_string_is_never_delivered_either(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    """The upstream answers call 8 under "8", which the SDK clients take for 8's answer: not 8's to bill
    (refunded at its timeout), and withheld from the resumed stream as 8's."""
    s = slug("resume-spelled")
    backend.add_listing(s, resume_url, price=1000, timeout=1)
    c = backend.add_consumer(credit=10_000)
    h = await session(gateway, f"/{s}", c)
    r = await post(gateway, f"/{s}", call("closes", {"delay": 1.6, "spell": True}, rpc_id=8), headers=h)
    primed = events(r.text)[0][0]
    assert primed is not None and answers(r.text) == []
    await eventually(lambda: journal(backend, c) == [("closes", 504, 1, "no_answer_by_timeout")], timeout=5)
    text = await resume(gateway, f"/{s}", h, primed)
    assert answers(text) == []  # its event comes with empty data, never dispatched
    assert any(i is not None for i, _ in events(text))
    assert journal(backend, c) == [("closes", 504, 1, "no_answer_by_timeout")]
    assert backend.balance(c.user_id) == 10_000


async def test_a_call_cut_at_its_timeout_is_refunded_and_a_resumed_stream_does_not_deliver_it(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("resume-cut")
    backend.add_listing(s, resume_url, price=1000, timeout=1)
    c = backend.add_consumer(credit=10_000)
    h = await session(gateway, f"/{s}", c)
    async with httpx2.AsyncClient(timeout=20) as client:
        got = b""
        with pytest.raises(httpx2.HTTPError):
            async with client.stream("POST", gateway.url + f"/{s}", headers={**MCP_HEADERS, **h},
                                     content=json.dumps(call("slow", {"delay": 2.5}, rpc_id=9))) as r:
                async for chunk in r.aiter_bytes():
                    got += chunk
    primed = events(got.decode())[0][0]
    assert primed is not None
    await eventually(lambda: journal(backend, c) == [("slow", 504, 1, "upstream_timeout")], timeout=5)
    await asyncio.sleep(1.0)  # the upstream has logged its answer by now
    assert answers(await resume(gateway, f"/{s}", h, primed)) == []
    assert backend.balance(c.user_id) == 10_000


async def test_notifications_cancelled_refunds_a_pending_call_and_withholds_its_answer(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("cancel")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    c, other = backend.add_consumer(credit=10_000), backend.add_consumer(credit=10_000)
    h = await session(gateway, f"/{s}", c)
    notice = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 11, "reason": "t"}}
    async with httpx2.AsyncClient(timeout=20) as client:
        async with client.stream("POST", gateway.url + f"/{s}", headers={**MCP_HEADERS, **h},
                                 content=json.dumps(call("slow", {"delay": 1.5}, rpc_id=11))) as r:
            chunks = r.aiter_bytes()
            got = await anext(chunks)  # the priming event: the call is running
            # Another key naming the call in the same session is refused by the session check, not obeyed.
            foreign = await post(gateway, f"/{s}", notice, other,
                                 headers={"Mcp-Session-Id": h["Mcp-Session-Id"]})
            assert foreign.status_code == 403
            sent = await post(gateway, f"/{s}", notice, headers=h)
            assert sent.status_code == 202  # forwarded to the upstream
            async for chunk in chunks:
                got += chunk
    assert (h["Mcp-Session-Id"], 11) in resume_server.cancelled
    assert answers(got.decode()) == []  # the upstream still answered: the client never gets it
    await eventually(lambda: journal(backend, c) == [("slow", 499, 1, "cancelled")])
    assert backend.balance(c.user_id) == 10_000

    # Cancelled after its answer was delivered: billed, and the notification still reaches the upstream.
    r = await post(gateway, f"/{s}", call("slow", {"delay": 0}, rpc_id=12), headers=h)
    assert [m["id"] for m in answers(r.text)] == [12]
    late = {**notice, "params": {"requestId": 12}}
    assert (await post(gateway, f"/{s}", late, headers=h)).status_code == 202
    await asyncio.sleep(0.3)
    assert sorted(journal(backend, c)) == [("slow", 200, 0, "result"), ("slow", 499, 1, "cancelled")]
    assert backend.balance(c.user_id) == 9_000


async def test_notifications_cancelled_refunds_a_parked_call_and_a_json_answer_is_withheld(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("cancel-parked")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    c = backend.add_consumer(credit=10_000)
    h = await session(gateway, f"/{s}", c)
    r = await post(gateway, f"/{s}", call("closes", {"delay": 0.5}, rpc_id=21), headers=h)
    primed = events(r.text)[0][0]
    assert primed is not None
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 21}}
    assert (await post(gateway, f"/{s}", cancel, headers=h)).status_code == 202
    await eventually(lambda: journal(backend, c) == [("closes", 499, 1, "cancelled")])
    assert answers(await resume(gateway, f"/{s}", h, primed)) == []

    pending = asyncio.ensure_future(post(gateway, f"/{s}", call("json_slow", {"delay": 1.0}, rpc_id=22), headers=h))
    await asyncio.sleep(0.5)
    cancel["params"] = {"requestId": 22}
    assert (await post(gateway, f"/{s}", cancel, headers=h)).status_code == 202
    answer = (await pending).json()
    assert answer["id"] == 22 and "error" in answer and "result" not in answer
    await eventually(lambda: sorted(journal(backend, c)) == [("closes", 499, 1, "cancelled"),
                                                             ("json_slow", 499, 1, "cancelled")])
    assert backend.balance(c.user_id) == 10_000


@pytest.mark.parametrize("version, expected", [("2026-07-28", (499, 1, "cancelled")),
                                               ("2025-11-25", (499, 0, "client_disconnected"))])
async def test_closing_the_post_stream_cancels_from_2026_07_28_and_is_billed_before(
        gateway: Gateway, backend: Backend, resume_url: str, version: str, expected: tuple[int, int, str]) -> None:
    s = slug("close")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    c = backend.add_consumer(credit=10_000)
    h = await session(gateway, f"/{s}", c, version)
    async with httpx2.AsyncClient(timeout=20) as client:
        async with client.stream("POST", gateway.url + f"/{s}", headers={**MCP_HEADERS, **h},
                                 content=json.dumps(call("slow", {"delay": 3}, rpc_id=31))) as r:
            await anext(r.aiter_bytes())  # primed, then the client walks away
    await eventually(lambda: journal(backend, c) == [("slow", *expected)])
    assert backend.balance(c.user_id) == (10_000 if expected[1] else 9_000)


async def test_a_call_without_a_session_is_settled_by_the_get_resuming_its_event(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    """A stateless server keeping events (no Mcp-Session-Id): the GET naming the POST stream's last event
    delivers the answer and bills it once; a call refunded at its timeout is never delivered by one, to its
    key or another's."""
    s, late = slug("stateless"), slug("stateless-late")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    backend.add_listing(late, resume_url, price=1000, timeout=1)
    c, other = backend.add_consumer(credit=10_000), backend.add_consumer(credit=10_000)
    h = {**c.auth, "MCP-Protocol-Version": "2025-11-25"}
    r = await post(gateway, f"/{s}", call("closes", {"delay": 0.3}, rpc_id=1), headers=h)
    primed = events(r.text)[0][0]
    assert r.status_code == 200 and primed is not None and answers(r.text) == []
    await asyncio.sleep(0.2)
    assert journal(backend, c) == []  # pending, not refunded as "no answer"
    assert [m["id"] for m in answers(await resume(gateway, f"/{s}", h, primed))] == [1]
    await eventually(lambda: journal(backend, c) == [("closes", 200, 0, "result")])
    assert backend.balance(c.user_id) == 9_000

    r = await post(gateway, f"/{late}", call("closes", {"delay": 1.6}, rpc_id=1), headers=h)
    primed = events(r.text)[0][0]
    assert primed is not None
    await eventually(lambda: sorted(journal(backend, c)) == [("closes", 200, 0, "result"),
                                                             ("closes", 504, 1, "no_answer_by_timeout")], timeout=5)
    assert answers(await resume(gateway, f"/{late}", h, primed)) == []  # dropped
    other_h = {**other.auth, "MCP-Protocol-Version": "2025-11-25"}
    assert answers(await resume(gateway, f"/{late}", other_h, primed)) == []
    assert backend.balance(c.user_id) == 9_000 and backend.balance(other.user_id) == 10_000


async def test_a_call_without_a_session_is_followed_through_a_resumed_stream_the_server_ends_again(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("stateless-twice")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    c = backend.add_consumer(credit=10_000)
    h = {**c.auth, "MCP-Protocol-Version": "2025-11-25"}
    r = await post(gateway, f"/{s}", call("closes_twice", {"delay": 0.6}, rpc_id=1), headers=h)
    primed = events(r.text)[0][0]
    assert primed is not None and answers(r.text) == []
    first = events(await resume(gateway, f"/{s}", h, primed))  # the progress notification, then the end
    assert [json.loads(data).get("method") for _, data in first] == ["notifications/progress"]
    assert journal(backend, c) == []
    assert [m["id"] for m in answers(await resume(gateway, f"/{s}", h, str(first[-1][0])))] == [1]
    await eventually(lambda: journal(backend, c) == [("closes_twice", 200, 0, "result")])
    assert backend.balance(c.user_id) == 9_000


# --- the official Python SDK on both sides: the client resumes by itself (GET + Last-Event-ID) --------

@pytest.fixture(scope="module")
def sdk_resume_url() -> Iterator[str]:
    url, stop = serve_in_thread(resume_server.build_sdk_app())
    yield url + "/mcp"
    stop()


def sdk_client(gw: Gateway, path: str, c: TestConsumer) -> tuple[httpx2.AsyncClient, Client]:
    http = httpx2.AsyncClient(headers=c.auth, timeout=httpx2.Timeout(10.0, read=30.0))
    # legacy: the initialize handshake, so the session speaks 2025-11-25 (auto mode would discover 2026-07-28,
    # where the server keeps the POST stream open)
    return http, Client(streamable_http_client(gw.url + path, http_client=http), mode="legacy")


async def test_sdk_server_closing_its_stream_is_billed_once_through_the_sdk_clients_resumption(
        gateway: Gateway, backend: Backend, sdk_resume_url: str) -> None:
    s = slug("sdk-resume")
    backend.add_listing(s, sdk_resume_url, price=1000, timeout=10)
    c = backend.add_consumer(credit=10_000)
    http, mcp = sdk_client(gateway, f"/{s}", c)
    async with http, mcp:
        result = await mcp.call_tool("long_task", {"seconds": 0.5})
    assert not result.is_error and "done after 0.5s" in result.content[0].text
    await eventually(lambda: journal(backend, c) == [("long_task", 200, 0, "result")])
    assert backend.balance(c.user_id) == 9_000 and len(backend.usage(c)) == 1


async def test_sdk_client_resuming_a_scripted_server_is_billed_once(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("sdk-scripted")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    c = backend.add_consumer(credit=10_000)
    http, mcp = sdk_client(gateway, f"/{s}", c)
    async with http, mcp:
        result = await mcp.call_tool("closes", {"delay": 0.3})
    assert result.content[0].text == "resumed result"
    await eventually(lambda: journal(backend, c) == [("closes", 200, 0, "result")])
    assert backend.balance(c.user_id) == 9_000


async def test_sdk_client_timing_out_sends_notifications_cancelled_and_is_refunded(
        gateway: Gateway, backend: Backend, resume_url: str) -> None:
    s = slug("sdk-cancel")
    backend.add_listing(s, resume_url, price=1000, timeout=10)
    c = backend.add_consumer(credit=10_000)
    http, mcp = sdk_client(gateway, f"/{s}", c)
    async with http, mcp:
        with pytest.raises(MCPError):  # REQUEST_TIMEOUT
            await mcp.call_tool("slow", {"delay": 2.0}, read_timeout_seconds=0.5)
        await eventually(lambda: journal(backend, c) == [("slow", 499, 1, "cancelled")])
        assert any(request_id is not None for _, request_id in resume_server.cancelled)
    assert backend.balance(c.user_id) == 10_000
