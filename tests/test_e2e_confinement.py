"""Issue 7 end to end, on both backends: no path escapes its listing, legacy sessions are matched by
identity and refunded at their timeout, foreign browser origins and hostile Hosts are refused.

A recording upstream and a canary (another port no listing names) see every request that reaches
them; hostile requests are sent as raw bytes so no client library normalises them first.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest

from tests.backends import Backend, TestConsumer
from tests.gateway_proc import Gateway
from tests.refusals import refusal
from tests.test_e2e_gateway import call, eventually, post, slug
from tests.test_e2e_legacy_sse import legacy_url  # noqa: F401  (a fixture: the SDK's legacy server)

APP = "https://app.example"


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"allowed_origins": [APP]}


LATE_ANSWER = (b'event: message\ndata: {"jsonrpc": "2.0", "id": "1", "result": {"content": '
               b'[{"type": "text", "text": "late"}]}}\n\n')


class Recorder(http.server.ThreadingHTTPServer):
    """Records every request; a legacy server whose POSTs are accepted (202) and never answered (under
    /late/, the stream carries an answer to call 1 at 2.5 s, its id spelled "1")."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def log_message(self, *args: Any) -> None:
        pass

    def _record(self) -> None:
        self.server.seen.append((self.command, self.path))
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)

    def do_GET(self) -> None:
        self._record()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        late = self.path.startswith("/late/")
        try:
            base = b"/late" if late else b"/legacy"
            self.wfile.write(b"event: endpoint\ndata: " + base + b"/messages/?session_id=s-1\n\n")
            self.wfile.flush()
            for tick in range(100):  # open for 20 s at most, never answering a call
                time.sleep(0.2)
                if late and tick == 12:
                    self.wfile.write(LATE_ANSWER)
                self.wfile.write(b": ping\n\n")
                self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True

    def do_POST(self) -> None:
        self._record()
        self.send_response(202)
        self.send_header("Content-Length", "8")
        self.end_headers()
        self.wfile.write(b"Accepted")

    do_PUT = do_DELETE = do_PATCH = do_POST


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Recorder, Recorder]]:
    upstream, canary = Recorder(), Recorder()
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (upstream, canary)]
    for t in threads:
        t.start()
    yield upstream, canary
    for s in (upstream, canary):
        s.shutdown()
        s.server_close()


def raw_request(gateway: Gateway, target: bytes, headers: dict[bytes, bytes] | None = None,
                body: bytes = b"", method: bytes = b"POST") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with exactly these bytes in its request line; the answer's status, headers, body."""
    parts = urlsplit(gateway.url)
    head = {b"Host": parts.netloc.encode(), b"Content-Type": b"application/json",
            b"Content-Length": str(len(body)).encode(), b"Connection": b"close", **(headers or {})}
    request = method + b" " + target + b" HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in head.items())
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(request + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
        raw_head, _, content = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
        while len(content) < int(fields.get("content-length", 0)) and (chunk := s.recv(65536)):
            content += chunk
    return int(lines[0].split()[1]), fields, content


def auth(consumer: TestConsumer) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in consumer.auth.items()}


def test_hostile_paths_never_leave_the_listing(gateway: Gateway, backend: Backend,
                                               servers: tuple[Recorder, Recorder]) -> None:
    upstream, canary = servers
    legacy, streamable = slug("conf-sse"), slug("conf-mcp")
    backend.add_listing(legacy, f"{upstream.url}/legacy/sse", price=1000, transport="sse",
                        headers={"X-Publisher-Key": "pub-secret"})
    backend.add_listing(streamable, f"{upstream.url}/mcp", price=1000)
    c = backend.add_consumer(credit=100_000)
    canary_authority = urlsplit(canary.url).netloc.encode()
    tails = [
        b"http://" + canary_authority + b"/x", b"//" + canary_authority + b"/x", b"/" + canary_authority + b"/x",
        b"http:%2f%2f" + canary_authority + b"/x", b"..", b"../x", b"%2e%2e/x", b"%2E./x", b"..%2f..%2fx",
        b".%2e%2Fadmin", b"a%5cb", b"a\\b", b"a//b", b"x%00", b"x%zz", b"x%4", b"caf\xc3\xa9", b"\xff",
        b"..;/x", b"x?a=\x01", b"x?a=\x7f",
    ]
    upstream.seen.clear()
    body = json.dumps(call("echo", {"text": "x"})).encode()
    for s in (legacy, streamable):
        for tail in tails:
            status, headers, content = raw_request(gateway, f"/{s}/".encode() + tail, auth(c), body)
            assert 400 <= status < 500, (tail, status, content)
            if status == 400 and headers.get("content-type") == "application/json":
                assert refusal(content)["error"] in ("invalid_path", "invalid_request"), (tail, content)
    assert canary.seen == [] and upstream.seen == []
    assert backend.balance(c.user_id) == 100_000 and backend.usage(c) == []


async def test_a_legacy_call_without_answer_is_refunded_at_the_timeout_while_the_stream_stays_open(
        gateway: Gateway, backend: Backend, servers: tuple[Recorder, Recorder]) -> None:
    upstream, _ = servers
    s = slug("conf-timeout")
    backend.add_listing(s, f"{upstream.url}/legacy/sse", price=1000, transport="sse", timeout=1)
    c = backend.add_consumer(credit=10_000)
    async with httpx2.AsyncClient(timeout=20) as client:
        async with client.stream("GET", f"{gateway.url}/{s}", headers=c.auth) as stream:
            lines = stream.aiter_lines()
            route = await _endpoint(lines)
            assert route == f"/{s}/messages/?session_id=s-1"
            r = await post(gateway, route + "&extra=1", call("echo", {"text": "x"}), c)  # a variant
            assert r.status_code == 202 and backend.balance(c.user_id) == 9_000
            await eventually(lambda: backend.balance(c.user_id) == 10_000, timeout=8)
            [row] = backend.usage(c)
            assert row["billed"] == 0 and row["status"] == 504
            assert await _next_nonblank(lines) == ": ping"  # the stream is still open


async def test_a_refunded_legacy_calls_late_answer_spelled_as_a_string_is_not_delivered(
        gateway: Gateway, backend: Backend, servers: tuple[Recorder, Recorder]) -> None:
    """Call 1, refunded at its timeout; the upstream's answer comes later under "1", which the SDK clients
    take for call 1's: it goes out blanked (its data line dropped), and settles nothing."""
    upstream, _ = servers
    s = slug("conf-late")
    backend.add_listing(s, f"{upstream.url}/late/sse", price=1000, transport="sse", timeout=1)
    c = backend.add_consumer(credit=10_000)
    async with httpx2.AsyncClient(timeout=20) as client:
        async with client.stream("GET", f"{gateway.url}/{s}", headers=c.auth) as stream:
            lines = stream.aiter_lines()
            route = await _endpoint(lines)
            r = await post(gateway, route, call("echo", {"text": "x"}, rpc_id=1), c)
            assert r.status_code == 202 and backend.balance(c.user_id) == 9_000
            await eventually(lambda: backend.balance(c.user_id) == 10_000, timeout=8)  # before the answer
            seen = []
            async for line in lines:
                seen.append(line)
                if seen[-3:] == ["event: message", "", ": ping"]:
                    break
            assert not any(line.startswith("data:") for line in seen), seen  # blanked
    [row] = backend.usage(c)
    assert row["billed"] == 0 and row["status"] == 504 and backend.balance(c.user_id) == 10_000


async def test_a_legacy_session_is_matched_by_identity_not_by_spelling(
        gateway: Gateway, backend: Backend, legacy_url: str) -> None:  # noqa: F811
    s = slug("conf-legacy")
    backend.add_listing(s, f"{legacy_url}/legacy/sse", price=1000, transport="sse")
    owner, other = backend.add_consumer(credit=10_000), backend.add_consumer(credit=10_000)
    async with httpx2.AsyncClient(timeout=20) as client:
        async with client.stream("GET", f"{gateway.url}/{s}", headers=owner.auth) as stream:
            lines = stream.aiter_lines()
            route = await _endpoint(lines)
            for variant in (route + "&x=1", route + "&", route.replace("/messages/?", "/messages/?y=2&")):
                r = await post(gateway, variant, call("echo", {"text": "x"}), other)
                assert r.status_code == 403 and refusal(r)["error"] == "session_forbidden", variant
            await post(gateway, route, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
                owner)
            await _message(lines, 0)
            await post(gateway, route, {"jsonrpc": "2.0", "method": "notifications/initialized"}, owner)
            r = await post(gateway, route + "&extra=1", call("echo", {"text": "variant"}, rpc_id=7), owner)
            assert r.status_code == 202
            answer = await _message(lines, 7)
            assert answer["result"]["content"][0]["text"] == "variant"
    await eventually(lambda: len(backend.usage(owner)) == 1)
    [row] = backend.usage(owner)
    assert row["billed"] == 1000 and row["status"] == 200
    assert backend.balance(owner.user_id) == 9_000 and backend.balance(other.user_id) == 10_000


async def _endpoint(lines: Any) -> str:
    async for line in lines:
        if line.startswith("data:"):
            return line[5:].strip()
    raise AssertionError("no endpoint event")


async def _next_nonblank(lines: Any) -> str:
    async for line in lines:
        if line:
            return line
    raise AssertionError("the stream ended")


async def _message(lines: Any, rpc_id: int) -> dict[str, Any]:
    async for line in lines:
        if line.startswith("data:") and (message := json.loads(line[5:])).get("id") == rpc_id:
            return message
    raise AssertionError(f"no answer to {rpc_id}")


# --- Origin and Host ------------------------------------------------------------------------------

async def test_a_foreign_origin_is_refused_and_an_allowed_one_passes(
        gateway: Gateway, backend: Backend, servers: tuple[Recorder, Recorder]) -> None:
    upstream, _ = servers
    s = slug("conf-origin")
    backend.add_listing(s, f"{upstream.url}/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    upstream.seen.clear()
    for origin in ("http://localhost:1", "null", "https://app.example.evil"):
        for consumer in (c, None):
            r = await post(gateway, f"/{s}", call("echo"), consumer, headers={"Origin": origin})
            assert r.status_code == 403 and refusal(r)["error"] == "origin_forbidden"
            assert "WWW-Authenticate" not in r.headers
    assert upstream.seen == [] and backend.balance(c.user_id) == 10_000
    r = await post(gateway, f"/{s}", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, c, headers={"Origin": APP})
    assert r.status_code == 202 and upstream.seen == [("POST", "/mcp")]  # the recorder accepts everything


@pytest.mark.parametrize("host", [b'gw.example", error="x', b"gw.example/evil", b"evil@gw.example",
                                  b"gw.example, evil.example"])
def test_a_hostile_host_is_reflected_nowhere(gateway: Gateway, backend: Backend, host: bytes) -> None:
    for target, method in ((b"/some-slug", b"POST"), (b"/.well-known/oauth-protected-resource", b"GET")):
        status, headers, content = raw_request(gateway, target, {b"Host": host}, method=method)
        assert 400 <= status < 500, (host, status)
        assert host.decode() not in headers.get("www-authenticate", "")
        assert host not in content
