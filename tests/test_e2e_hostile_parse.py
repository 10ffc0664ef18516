"""End to end, both backends: issue 7 classes 2-4 through a real mitmdump.

Methods and ambiguous bodies never reach the upstream; answers of any size or depth settle;
a chunked upload is cut at max_body_bytes before authentication.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from tests import fault_server
from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.refusals import refusal
from tests.test_e2e_gateway import MCP_HEADERS, assert_meter_headers, call, eventually, fault_listing, post  # noqa: F401
from tests.test_e2e_mcp_client import client as sdk_client

pytestmark = pytest.mark.timeout(120)

MAX_BODY = 1024 * 1024
MAX_EVENT = 64 * 1024


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"max_body_bytes": MAX_BODY, "max_event_bytes": MAX_EVENT}


@pytest.mark.parametrize("method", ["PUT", "PATCH", "PROPFIND"])
async def test_a_call_sent_with_another_method_is_405_and_never_forwarded(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]], method: str) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    before = fault_server.calls["ok"]
    async with httpx2.AsyncClient(timeout=20) as client:
        r = await client.request(method, f"{gateway.url}/{s}", content=json.dumps(call("ok")).encode(),
                                 headers={**MCP_HEADERS, **c.auth})
    assert r.status_code == 405 and refusal(r)["error"] == "method_not_allowed"
    assert r.headers["Allow"] == "GET, POST, DELETE, HEAD, OPTIONS"
    assert_meter_headers(r)
    assert fault_server.calls["ok"] == before and backend.balance(c.user_id) == 10_000


async def test_a_call_in_a_get_body_is_400_and_never_forwarded(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    before = fault_server.calls["ok"]
    async with httpx2.AsyncClient(timeout=20) as client:
        r = await client.request("GET", f"{gateway.url}/{s}", content=json.dumps(call("ok")).encode(),
                                 headers={**MCP_HEADERS, **c.auth})
    assert r.status_code == 400 and refusal(r)["error"] == "invalid_request"
    assert fault_server.calls["ok"] == before and backend.balance(c.user_id) == 10_000


@pytest.mark.parametrize("raw", [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","name":"http500"}}',
    b'{"jsonrpc":"2.0","id":1.0,"method":"tools/call","params":{"name":"ok"}}',
    b'{"jsonrpc":"2.0","id":Infinity,"method":"tools/call","params":{"name":"ok"}}',
])
async def test_ambiguous_bodies_are_400_and_never_forwarded(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]], raw: bytes) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    before = dict(fault_server.calls)
    async with httpx2.AsyncClient(timeout=20) as client:
        r = await client.post(f"{gateway.url}/{s}", content=raw, headers={**MCP_HEADERS, **c.auth})
    assert r.status_code == 400 and refusal(r)["error"] in ("invalid_json", "invalid_request")
    assert dict(fault_server.calls) == before and backend.balance(c.user_id) == 10_000


async def test_an_sse_result_far_over_max_event_bytes_is_billed(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("sse_big", {"size": 40 * MAX_EVENT}), c, timeout=60)
    assert r.status_code == 200 and len(r.content) > 40 * MAX_EVENT  # delivered whole
    assert r.headers["X-Mcpmeter-Billed"] == "1000"
    await eventually(lambda: [(u["status"], u["billed"]) for u in backend.usage(c)] == [(200, 1000)])
    assert backend.balance(c.user_id) == 9_000


async def test_an_sse_tool_error_over_max_event_bytes_is_refunded(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("sse_big", {"size": 4 * MAX_EVENT, "is_error": True}), c, timeout=60)
    assert r.status_code == 200
    await eventually(lambda: backend.balance(c.user_id) == 10_000)
    assert [(u["status"], u["billed"]) for u in backend.usage(c)] == [(200, 0)]


async def test_a_deeply_nested_json_result_is_billed_with_headers(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("deep", {"depth": 100_000}), c, timeout=60)
    assert r.status_code == 200
    assert_meter_headers(r, balance=9_000)  # the old hook crashed: no headers, settled by the sweeper
    assert r.headers["X-Mcpmeter-Billed"] == "1000"
    await eventually(lambda: [(u["status"], u["billed"]) for u in backend.usage(c)] == [(200, 1000)])


def _chunked_upload(url: str, path: str, total: int) -> tuple[bytes, int]:
    """Send a chunked body without Content-Length until the gateway answers or hangs up."""
    parts = urlsplit(url)
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"x" * 65536
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        try:
            while sent < total:
                sock.sendall(chunk)
                sent += len(piece)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the gateway answered and closed while we were still sending
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except OSError:
            pass
    return answer, sent


async def test_an_unauthenticated_chunked_upload_is_cut_at_the_limit(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    total = 64 * MAX_BODY
    answer, sent = await asyncio.to_thread(_chunked_upload, gateway.url, f"/{s}", total)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert refusal(body)["error"] == "payload_too_large"
    assert sent < total  # refused while the upload was still going, not after buffering it all


async def test_an_sse_answer_with_a_content_length_reaches_the_client_whole_with_its_receipt(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    # The meter writes the receipt into the answer's event, so the stream's length changes: the
    # upstream's Content-Length must not go on (the client would read a cut event, and the bytes
    # past it as the next response on the connection). The stream goes chunked instead.
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    async with httpx2.AsyncClient(timeout=20) as client:
        for i in (1, 2):  # two calls on one kept-alive connection
            r = await client.post(f"{gateway.url}/{s}", content=json.dumps(call("sse_whole", rpc_id=i)).encode(),
                                  headers={**MCP_HEADERS, **c.auth})
            assert r.status_code == 200 and "content-length" not in r.headers
            assert r.headers["transfer-encoding"] == "chunked"
            events = [block for block in r.text.replace("\r\n", "\n").split("\n\n") if "event: message" in block]
            answer = json.loads(events[-1].split("data: ", 1)[1])
            assert answer["id"] == i and answer["result"]["content"][0]["text"] == "whole"
            assert answer["result"]["_meta"]["mcpmeter/receipt"]["decision"] == "billed"
    assert backend.balance(c.user_id) == 10_000 - 2 * 1000


# --- an event MCP clients cannot read, before the answer ---------------------------------------------


async def test_a_stream_with_an_unreadable_event_before_the_answer_ends_there_and_is_refunded(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    started, content = time.monotonic(), b""
    async with httpx2.AsyncClient(timeout=20) as client:
        async with client.stream("POST", f"{gateway.url}/{s}", content=json.dumps(call("sse_unreadable")).encode(),
                                 headers={**MCP_HEADERS, **c.auth}) as r:
            with pytest.raises(httpx2.RemoteProtocolError):  # cut, as a stream a timeout ends
                async for piece in r.aiter_bytes():
                    content += piece
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and b"notifications/progress" in content  # what came before it
    assert b'"params":[]' not in content and b"never read" not in content  # nothing from it on
    last = json.loads(content.replace(b"\r\n", b"\n").split(b"\n\n")[-2].partition(b"data: ")[2])
    assert (last["id"], last["error"]["data"]["error"]) == (1, "upstream_unreadable")  # in its place
    assert elapsed < 4, elapsed  # the upstream (open ~7 s) was closed, not waited for
    await eventually(lambda: [(u["status"], u["billed"]) for u in backend.usage(c)] == [(200, 0)])
    assert backend.balance(c.user_id) == 10_000
    reasons = backend.query("SELECT reason FROM mcpmeter_calls WHERE request_id = %s",
                            (r.headers["X-Mcpmeter-Request-Id"],))
    assert [str(why) for why, in reasons] == ["unreadable_event"]


async def test_the_python_sdk_client_gets_an_error_and_pays_nothing(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    http, mcp = sdk_client(gateway, f"/{s}", c)
    async with http, mcp:
        started = time.monotonic()
        with pytest.raises(MCPError, match="a message MCP clients cannot read"):
            await mcp.call_tool("sse_unreadable", {})
        assert time.monotonic() - started < 4  # ended by the error, not left resuming the stream
    await eventually(lambda: [(u["status"], u["billed"]) for u in backend.usage(c)] == [(200, 0)])
    assert backend.balance(c.user_id) == 10_000
