"""A refunded call's answer is never delivered, however big, however encoded: a real mitmdump in front of
tests.hostile_upstream, which chooses every byte, on both backends.

The gateway here holds events up to 4 KiB of data (`max_event_bytes`), so its hold limit is 1 MiB + 4 KiB
and a 2 MiB answer cannot be held whole to be blanked: the stream that carries it is cut instead.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.hostile_upstream import HostileUpstream, RawClient

pytestmark = pytest.mark.timeout(120)
CREDIT = 1_000_000
PRICE = 1000


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"max_event_bytes": 4096}


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


def tool_call(name: str, rpc_id: int = 1, **arguments: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
                       "params": {"name": name, "arguments": arguments}}).encode()


class EventStream:
    """An event stream (a GET's, or a POST's answer) read as it comes, byte for byte (framing included),
    on its own socket."""

    def __init__(self, gateway: Gateway, path: str, key: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> None:
        host, _, port = gateway.url.removeprefix("http://").partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        fields = {"Host": "gateway.test", "Accept": "application/json, text/event-stream",
                  "Authorization": f"Bearer {key}", **(headers or {})}
        if body is not None:
            fields |= {"Content-Type": "application/json", "Content-Length": str(len(body))}
        head = f"{'GET' if body is None else 'POST'} {path} HTTP/1.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        self.sock.sendall(head.encode() + (body or b""))
        self.got = b""

    def until(self, marker: bytes) -> bytes:
        while marker not in self.got:
            data = self.sock.recv(1 << 16)
            assert data, self.got
            self.got += data
        return self.got

    def to_the_end(self, seconds: float) -> bool:
        """Read until the gateway closes the connection (True) or `seconds` pass (False)."""
        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except ConnectionError:
                return True
            if not data:
                return True
            self.got += data
        return False


def test_a_legacy_calls_big_answer_after_its_refund_cuts_the_session_stream(
        gateway: Gateway, backend: Backend, hostile: HostileUpstream) -> None:
    slug = f"blank-{uuid.uuid4().hex[:8]}"
    backend.add_listing(slug, f"{hostile.url}/L-{slug}/sse", price=PRICE, transport="sse", timeout=1)
    consumer = backend.add_consumer(credit=CREDIT)
    stream = EventStream(gateway, f"/{slug}", consumer.key)
    head = stream.until(b"session_id=")
    route = head.split(b"data: ", 1)[1].split(b"\n", 1)[0].decode().strip()
    assert route.startswith(f"/{slug}/")
    client = RawClient(gateway.url)
    r = client.request("POST", route, [("Authorization", f"Bearer {consumer.key}"),
                                       ("Content-Type", "application/json")], tool_call("late_big", mb=2, seconds=2))
    assert r.status == 202
    assert stream.to_the_end(15)  # refunded at 1 s; its 2 MiB answer at 2 s cuts the stream
    assert b"big:" not in stream.got and b'"id": 1' not in stream.got
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(backend.usage(consumer)) < 1:
        time.sleep(0.1)
    assert [u["billed"] for u in backend.usage(consumer)] == [0]
    assert backend.balance(consumer.user_id) == CREDIT
    client.close()


def test_a_cancelled_calls_big_answer_cuts_its_post_stream(
        gateway: Gateway, backend: Backend, hostile: HostileUpstream) -> None:
    slug = f"blank-{uuid.uuid4().hex[:8]}"
    backend.add_listing(slug, f"{hostile.url}/L-{slug}/mcp", price=PRICE)
    consumer = backend.add_consumer(credit=CREDIT)
    session = {"Mcp-Session-Id": f"s-{uuid.uuid4().hex}", "MCP-Protocol-Version": "2025-11-25"}
    stream = EventStream(gateway, f"/{slug}", consumer.key, tool_call("late_big_sse", mb=2, seconds=2), session)
    stream.until(b"id: 0")  # the priming event: the call is running
    client = RawClient(gateway.url)
    cancel = json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
    r = client.request("POST", f"/{slug}", [("Authorization", f"Bearer {consumer.key}"),
                                            ("Content-Type", "application/json"), *session.items()], cancel.encode())
    assert r.status == 202
    assert stream.to_the_end(15)  # its 2 MiB answer at 2 s cuts the stream
    assert b"big:" not in stream.got and b'"id": 1' not in stream.got
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(backend.usage(consumer)) < 1:
        time.sleep(0.1)
    assert [(u["billed"], u["status"]) for u in backend.usage(consumer)] == [(0, 499)]
    assert backend.balance(consumer.user_id) == CREDIT
    client.close()


def test_a_compressed_event_stream_is_refused_on_a_session_and_read_without_one(
        gateway: Gateway, backend: Backend, hostile: HostileUpstream) -> None:
    slug = f"blank-{uuid.uuid4().hex[:8]}"
    backend.add_listing(slug, f"{hostile.url}/L-{slug}/mcp", price=PRICE)
    consumer = backend.add_consumer(credit=CREDIT)
    client = RawClient(gateway.url)
    headers = [("Authorization", f"Bearer {consumer.key}"), ("Content-Type", "application/json"),
               ("Accept", "application/json, text/event-stream")]
    r = client.request("POST", f"/{slug}", [*headers, ("Mcp-Session-Id", f"s-{uuid.uuid4().hex}")],
                       tool_call("gzip_sse"))
    assert r.status == 502 and r.error == "upstream_failed"
    r = client.request("POST", f"/{slug}", headers, tool_call("gzip_sse", rpc_id=2))
    assert r.status == 200 and r.header("content-encoding") == "gzip"  # nothing to withhold: passed, read
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(backend.usage(consumer)) < 2:
        time.sleep(0.1)
    assert sorted(u["billed"] for u in backend.usage(consumer)) == [0, PRICE]
    assert backend.balance(consumer.user_id) == CREDIT - PRICE
    client.close()
