"""The HTTP layer, attacked: protocol edges a client or a hostile upstream can reach through mitmproxy
(upgrades and 1xx answers, chunked framing, trailers, folded header lines), against a real mitmdump
on both backends. The fixtures and the suite's two invariants (confined, every run paid) are
tests/test_adversarial.py's.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest

from tests.backends import Backend
from tests.gateway_proc import Gateway, closed_port, start_gateway
from tests.hostile_upstream import Canary, HostileUpstream, RawClient, rss_bytes
from tests.test_adversarial import (CREDIT, MAX_BODY, PRICES, _canary_starts_clean, canary, check, client, confined,  # noqa: F401
                                    gateway, gateway_settings, hostile, launch, make_listing, rpc)


def _balance_back(backend: Backend, user_id: int, expected: int, wait: float = 10.0) -> int:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and backend.balance(user_id) != expected:
        time.sleep(0.1)
    return backend.balance(user_id)


# === upstream answers that are not final ===========================================================


def test_an_upstream_switching_protocols_unasked_opens_no_tunnel(
        backend: Backend, hostile: HostileUpstream, canary: Canary, gateway: Gateway) -> None:
    """The gateway never asks for an upgrade (Upgrade is hop-by-hop, stripped). A 101 anyway would make
    mitmproxy a raw TCP pipe between the client and the upstream: calls sent down it unmetered."""
    listing = make_listing(backend, hostile)
    host, port = gateway.url.removeprefix("http://").split(":")
    body = rpc(name="cheap")
    head = (f"POST {listing.path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in listing.auth(**{"X-Hostile": "switch_protocols"})) + "\r\n")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer and (more := sock.recv(65536)):
            answer += more
        try:  # what the client sends next must not reach the upstream
            sock.sendall(rpc(name="pricey"))
            time.sleep(1.5)
        except OSError:
            pass
    assert [s.body for s in hostile.records() if s.method == "TUNNEL"] == [], "bytes went down a tunnel"
    assert [s.method for s in hostile.records(listing.slug)] == ["POST"]
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert _balance_back(backend, listing.consumer.user_id, CREDIT) == CREDIT  # refunded: not answered
    assert confined(listing, hostile, canary) == []


def test_an_informational_answer_is_a_failed_call_not_a_hung_client(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """mitmproxy reads the first head as the answer: a 1xx would be sent as the final answer and the
    client would wait for ever for the one after it. The gateway answers 502, refunded."""
    listing = make_listing(backend, hostile)
    started = time.monotonic()
    r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "informational_first"}), rpc(name="cheap"))
    assert r.status == 502 and r.error == "upstream_failed", (r.status, r.body[:300])
    assert r.header("X-Mcpmeter-Refunded") == "1"
    assert time.monotonic() - started < 5
    assert _balance_back(backend, listing.consumer.user_id, CREDIT) == CREDIT
    rows = backend.query("SELECT status, billed_micro_cents FROM usage_events WHERE mcp_id = %s", (listing.mcp_id,))
    assert [(int(s), int(b)) for s, b in rows] == [(502, 0)]


# === bytes mitmproxy buffers between heads ===========================================================


def _flood(addr: tuple[str, int], first: bytes, total: int = 64 << 20) -> tuple[int, bytes]:
    """Send `first`, then up to `total` bytes of 'a' (a line that never ends), until the gateway stops
    reading; returns how much was sent and what came back."""
    sent, answer = 0, b""
    with socket.create_connection(addr, timeout=10) as sock:
        try:
            sock.sendall(first)
            block = b"a" * (1 << 20)
            while sent < total:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass
        try:
            sock.settimeout(3)
            while more := sock.recv(65536):
                answer += more
        except OSError:
            pass
    return sent, answer


def _grown(gateway: Gateway, before: int) -> int:
    return rss_bytes(gateway.proc.pid) - before


@pytest.mark.parametrize("what", ["chunk extension", "trailer"])
def test_an_endless_line_inside_a_chunked_request_is_cut_before_authentication(
        backend: Backend, hostile: HostileUpstream, gateway: Gateway, client: RawClient, what: str) -> None:
    """mitmproxy's chunked reader buffers a chunk-size line, or a trailer section, until it ends."""
    listing = make_listing(backend, hostile)
    client.request("GET", "/health")
    before = rss_bytes(gateway.proc.pid)
    opening = b"5;x=" if what == "chunk extension" else b"2\r\n{}\r\n0\r\nX-Trailer: "
    sent, answer = _flood(client.addr, f"POST {listing.path} HTTP/1.1\r\nHost: gateway.test\r\n"
                          "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + opening)
    assert _grown(gateway, before) < 24 << 20, f"RSS grew by {_grown(gateway, before) >> 20} MB"
    assert sent < 64 << 20, "the gateway read the whole line"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert hostile.records(listing.slug) == []


def test_bytes_sent_ahead_of_an_answer_are_bounded(
        backend: Backend, hostile: HostileUpstream, gateway: Gateway, client: RawClient) -> None:
    """While a call is answered, mitmproxy keeps every byte the client sends (pipelining) for later."""
    listing = make_listing(backend, hostile, timeout=30)
    body = rpc(name="cheap", seconds=4)
    head = (f"POST {listing.path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in listing.auth(**{"X-Hostile": "slow"})) + "\r\n").encode()
    client.request("GET", "/health")
    before = rss_bytes(gateway.proc.pid)
    sent, _ = _flood(client.addr, head + body)
    assert _grown(gateway, before) < 24 << 20, f"RSS grew by {_grown(gateway, before) >> 20} MB"
    assert sent < 64 << 20, "the gateway kept reading"
    # The client walked away (it broke its own connection): billed if its call had left, as any such call.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not backend.usage(listing.consumer):
        time.sleep(0.1)
    ran = len(hostile.ran(listing.slug))
    assert [(u["status"], u["billed"]) for u in backend.usage(listing.consumer)] == [(499, ran)]


def test_an_upstream_chunk_line_that_never_ends_is_cut_and_refunded(
        backend: Backend, hostile: HostileUpstream, gateway: Gateway, client: RawClient) -> None:
    listing = make_listing(backend, hostile, timeout=30)
    client.request("GET", "/health")
    before = rss_bytes(gateway.proc.pid)
    started = time.monotonic()
    r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "endless_chunk_header"}), rpc(name="cheap"))
    assert r.status == 502, (r.status, r.body[:200])
    assert time.monotonic() - started < 5  # cut at the limit, not at the upstream's pause nor the timeout
    assert _grown(gateway, before) < 24 << 20, f"RSS grew by {_grown(gateway, before) >> 20} MB"
    assert _balance_back(backend, listing.consumer.user_id, CREDIT) == CREDIT


# === trailers ==========================================================================================


def test_a_chunked_call_with_trailer_fields_is_metered_and_answered(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """mitmproxy raised on HTTP/1 trailers (its connection crashed: no answer). They are dropped, as
    RFC 9110 lets a recipient do: the upstream gets only what the gateway checked."""
    listing = make_listing(backend, hostile)
    body = rpc(name="cheap")
    head = (f"POST {listing.path} HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\n"
            "Trailer: Mcp-Session-Id\r\n" + "".join(f"{k}: {v}\r\n" for k, v in listing.auth()) + "\r\n").encode()
    with socket.create_connection(client.addr, timeout=10) as sock:
        sock.sendall(head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nMcp-Session-Id: other\r\n\r\n")
        answer = b""
        while b"ran cheap" not in answer and (more := sock.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    [seen] = hostile.records(listing.slug)
    assert seen.header("mcp-session-id") is None
    check(backend, listing, hostile, canary)
    assert _balance_back(backend, listing.consumer.user_id, CREDIT - 1) == CREDIT - 1  # "cheap" costs 1


def test_an_answer_with_trailer_fields_is_delivered_and_billed(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """It crashed the connection after the call was forwarded: no answer, the call unsettled until swept."""
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "json_trailers"}), rpc(name="cheap"))
    assert r.status == 200 and b"ran cheap" in r.body, (r.status, r.body[:300])
    assert r.header("X-Mcpmeter-Billed") == "1"
    check(backend, listing, hostile, canary)


# === HTTP/2 clients ====================================================================================


@pytest.fixture(scope="module")
def tls_gateway(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Serves TLS to clients, so HTTP/2 (mitmproxy speaks HTTP/2 only after ALPN)."""
    workdir = tmp_path_factory.mktemp("tls-gateway")
    gw = start_gateway(backend.config(), workdir, env=backend.env(),
                       reverse_target=f"https://127.0.0.1:{closed_port()}",
                       extra_args=["--set", f"confdir={workdir / 'mitmproxy'}"])
    yield gw
    gw.stop()


@dataclass
class H2Answer:
    status: int | None
    headers: dict[bytes, bytes]
    body: bytes
    reset: bool


def h2_request(gw: Gateway, path: str, headers: list[tuple[str, str]], body: bytes,
               trailers: list[tuple[str, str]] | None = None, validate: bool = True) -> H2Answer:
    """One HTTP/2 request on its own connection, framed as given: no content-length unless in `headers`.
    `validate`: False sends the fields as given, names h2 would refuse to send included."""
    host, port = gw.url.split("://")[1].split(":")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    with tls.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname="localhost") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate,
            normalize_outbound_headers=validate))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", path), (":scheme", "https"),
                              (":authority", "gateway.test"), *headers], end_stream=not body and not trailers)
        if body:
            conn.send_data(1, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(1, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        answer = H2Answer(None, {}, b"", False)
        try:
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        answer.headers = {bytes(k): bytes(v) for k, v in event.headers or []}
                        answer.status = int(answer.headers[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        answer.body += event.data or b""
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.StreamReset):
                        answer.reset = True
                        return answer
                    elif isinstance(event, h2.events.StreamEnded):
                        return answer
                sock.sendall(conn.data_to_send())
        except OSError:
            pass
        return answer


def test_an_http2_call_without_content_length_reaches_an_http1_upstream_framed(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tls_gateway: Gateway) -> None:
    """HTTP/2 needs no content-length. mitmproxy sent such a body to an HTTP/1 upstream after a head with
    neither Content-Length nor Transfer-Encoding: the upstream read an empty request, then the body as
    the next one on the connection."""
    listing = make_listing(backend, hostile)
    answer = h2_request(tls_gateway, listing.path, [(k.lower(), v) for k, v in listing.auth()], rpc(name="cheap"))
    assert answer.status == 200 and b"ran cheap" in answer.body, (answer.status, answer.body[:300])
    [seen] = hostile.records(listing.slug)
    assert seen.body == rpc(name="cheap") and seen.header("content-length") == str(len(rpc(name="cheap")))
    check(backend, listing, hostile, canary)


def test_http2_request_trailers_are_not_forwarded(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tls_gateway: Gateway) -> None:
    """mitmproxy hands request trailers to the upstream connection; an HTTP/1 one cannot send them, and
    the client's connection crashed ("Unexpected event: RequestTrailers")."""
    listing = make_listing(backend, hostile)
    crashes = tls_gateway.log().count("mitmproxy has crashed")
    answer = h2_request(tls_gateway, listing.path, [(k.lower(), v) for k, v in listing.auth()], rpc(name="cheap"),
                        trailers=[("mcp-session-id", "other"), ("content-type", "text/plain")])
    assert answer.status == 200 and b"ran cheap" in answer.body, (answer.status, answer.body[:300])
    time.sleep(0.5)
    assert tls_gateway.log().count("mitmproxy has crashed") == crashes
    check(backend, listing, hostile, canary)


def _reset_after_forwarding(gw: Gateway, listing: Any, **extra: str) -> None:
    """An HTTP/2 client that sends a slow call and resets its stream (RST_STREAM CANCEL) while it runs upstream:
    what an HTTP/2 client does when it walks away, its connection left open."""
    host, port = gw.url.split("://")[1].split(":")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    with tls.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname="localhost") as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", listing.path), (":scheme", "https"),
                              (":authority", "gateway.test"), *[(k.lower(), v) for k, v in listing.auth(**extra)]])
        conn.send_data(1, rpc(name="slow", seconds=2), end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(1.0)  # admitted, forwarded, running upstream
        conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())
        time.sleep(2.0)  # the upstream finishes; the connection stays open meanwhile


def _reason(backend: Backend, listing: Any, wait: float = 10.0) -> tuple[Any, ...]:
    deadline = time.monotonic() + wait
    while not (rows := backend.query("SELECT u.status, u.billed_micro_cents, c.reason FROM usage_events u JOIN "
                                     "mcpmeter_calls c ON c.request_id = u.request_id WHERE u.mcp_id = %s",
                                     (listing.mcp_id,))) and time.monotonic() < deadline:
        time.sleep(0.1)
    [row] = rows
    return int(row[0]), int(row[1]), row[2]


def test_an_http2_client_resetting_its_stream_after_forwarding_walked_away(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tls_gateway: Gateway) -> None:
    """The stream reset reached the error hook as a failure of the upstream's: the call ran upstream and was
    refunded (502 upstream_failed, counted by the circuit breaker), where an HTTP/1 client closing its
    connection pays (499 client_disconnected). An HTTP/2 client walks away by resetting its stream."""
    listing = make_listing(backend, hostile, timeout=30)
    _reset_after_forwarding(tls_gateway, listing)
    assert [s.ran for s in hostile.ran(listing.slug)] == ["slow"]
    assert _reason(backend, listing) == (499, 1000, "client_disconnected")
    assert _balance_back(backend, listing.consumer.user_id, CREDIT - 1000) == CREDIT - 1000
    check(backend, listing, hostile, canary)


def test_an_http2_stream_reset_cancels_a_2026_call(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tls_gateway: Gateway) -> None:
    """From 2026-07-28 closing the POST stream cancels the call: refunded as cancelled, not as an upstream failure."""
    listing = make_listing(backend, hostile, timeout=30)
    revision = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "slow"}
    _reset_after_forwarding(tls_gateway, listing, **revision)
    assert _reason(backend, listing) == (499, 0, "cancelled")
    assert _balance_back(backend, listing.consumer.user_id, CREDIT) == CREDIT
    assert confined(listing, hostile, canary) == []  # it ran, unpaid by design: the client cancelled it


# === obsolete line folding ==========================================================================


def test_a_request_with_a_folded_header_line_is_refused(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """mitmproxy keeps an obs-fold in the value and forwarded it as sent: an upstream that reads the
    continuation as a field of its own (a second Content-Length here) reads another request than the
    meter did. RFC 9112 §5.2: reject it (400) or replace it with a space before forwarding."""
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, [*listing.auth(), ("X-Note", "a\r\n Content-Length: 5")],
                       rpc(name="pricey"))
    assert (r.status, r.error) == (400, "invalid_request"), (r.status, r.body[:300])
    assert hostile.records(listing.slug) == []
    assert backend.balance(listing.consumer.user_id) == CREDIT
    check(backend, listing, hostile, canary)


def test_an_answer_with_a_folded_header_line_reaches_the_client_unfolded(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "folded_header"}), rpc(name="cheap"))
    assert r.status == 200
    assert [v for k, v in r.headers if k.lower() == "x-mcpmeter-billed"] == ["1"], r.headers
    assert r.header("X-Note") == "a X-Mcpmeter-Billed: 0"
    check(backend, listing, hostile, canary)


# === request targets ================================================================================


def test_an_absolute_form_request_reaches_the_upstream_in_origin_form(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """`POST http://other-host/<slug>`: routed by its path like any request, and sent on in origin-form
    (the path the confinement rule checked), not as an absolute URL the upstream must route again."""
    listing = make_listing(backend, hostile)
    r = client.request("POST", f"http://127.0.0.1:{canary.port}{listing.path}/tools?x=1", listing.auth(),
                       rpc(name="cheap"))
    assert r.status == 200, (r.status, r.body[:300])
    [seen] = hostile.records(listing.slug)
    assert seen.target == f"{listing.base}/tools?x=1"
    check(backend, listing, hostile, canary)


# === a head read, then the answer fails ================================================================


@pytest.mark.parametrize("mode", ["short_body", "bad_chunked", "length_and_chunked"])
def test_an_answer_that_fails_after_its_head_is_the_calls_own_502(
        backend: Backend, hostile: HostileUpstream, client: RawClient, mode: str) -> None:
    """The head was read, nothing sent yet: the client gets the gateway's 502 for its call (its request id,
    refunded), not mitmproxy's anonymous proxy_error under an id no call has."""
    listing = make_listing(backend, hostile, timeout=10)
    c = RawClient(f"http://{client.addr[0]}:{client.addr[1]}")
    try:
        r = c.request("POST", listing.path, listing.auth(**{"X-Hostile": mode}), rpc(name="cheap"))
    finally:
        c.close()
    assert (r.status, r.error) == (502, "upstream_failed"), (r.status, r.body[:300])
    assert r.header("X-Mcpmeter-Refunded") == "1"
    assert _balance_back(backend, listing.consumer.user_id, CREDIT) == CREDIT
    [row] = backend.usage(listing.consumer)
    assert row["request_id"] == r.header("X-Mcpmeter-Request-Id") and (row["status"], row["billed"]) == (502, 0)


# === answers mitmproxy buffers ========================================================================


def test_a_buffered_answer_is_held_up_to_a_ceiling_then_refunded(
        backend: Backend, hostile: HostileUpstream, gateway: Gateway, client: RawClient) -> None:
    """mitmproxy buffers a JSON (not streamed) answer whole before any hook: a 300 MB one cost the
    gateway 300 MB. Past 4 x max_body_bytes it is not delivered: a failed call, refunded."""
    listing = make_listing(backend, hostile, timeout=30)
    client.request("GET", "/health")
    before = rss_bytes(gateway.proc.pid)
    r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "huge_json"}), rpc(name="cheap", mb=64))
    assert _grown(gateway, before) < 24 << 20, f"RSS grew by {_grown(gateway, before) >> 20} MB"
    assert (r.status, r.error) == (502, "upstream_failed"), (r.status, r.body[:200])
    assert r.header("X-Mcpmeter-Refunded") == "1"
    assert _balance_back(backend, listing.consumer.user_id, CREDIT) == CREDIT
    # Under the ceiling, as before: delivered and billed.
    r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "huge_json"}), rpc(name="cheap", mb=3))
    assert r.status == 200 and len(r.body) > 3 << 20 and r.header("X-Mcpmeter-Billed") == "1"


# === a client gone before its call left ===============================================================


def test_a_client_gone_while_its_call_is_admitted_pays_only_for_calls_that_left(
        backend: Backend, hostile: HostileUpstream, gateway: Gateway) -> None:
    """A client that sends its call and closes its side at once is gone before the charge is done:
    mitmproxy then never forwards the call. It was billed all the same, as a walk-away (499)."""
    listing = make_listing(backend, hostile)
    host, port = gateway.url.removeprefix("http://").split(":")
    body = rpc(name="cheap")
    head = (f"POST {listing.path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in listing.auth()) + "\r\n").encode()
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(backend.usage(listing.consumer)) < 3:
        time.sleep(0.1)
    rows = backend.usage(listing.consumer)
    assert len(rows) == 3 and all(row["status"] == 499 for row in rows)
    ran = len(hostile.ran(listing.slug))
    assert sum(1 for row in rows if row["billed"]) == ran, f"{ran} forwarded, billed {rows}"
    assert backend.balance(listing.consumer.user_id) == CREDIT - ran


def _upload(addr: tuple[str, int], path: str, length: int, send: int) -> socket.socket:
    """A connection that declares a `length`-byte body and sends `send` bytes of it, then waits."""
    sock = socket.create_connection(addr, timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + b" " * send)
    return sock


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    answer = b""
    try:
        while b"\r\n\r\n" not in answer and (more := sock.recv(65536)):
            answer += more
    except OSError:
        pass
    return answer


def test_bodies_being_read_are_bounded_all_connections_together(
        backend: Backend, hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """max_body_bytes bounds one body, and mitmproxy holds a body whole before any hook can
    authenticate it: N connections uploading slowly, no key needed, held N times the limit. The
    bodies being read are bounded all together (max_reading_bytes): past it a body is refused 503
    gateway_busy, and what a finished, failed or abandoned upload held is counted no more."""
    listing = make_listing(backend, hostile)
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY, "max_reading_bytes": 3 * MAX_BODY},
                tmp_path_factory.mktemp("reading"), backend.env())
    host, _, port = gw.url.removeprefix("http://").partition(":")
    addr = (host, int(port))
    holding: list[socket.socket] = []
    try:
        holding = [_upload(addr, listing.path, MAX_BODY - 1000, MAX_BODY - 10_000) for _ in range(3)]
        time.sleep(1.0)  # read by the gateway: 2.97 MB held of the 3 MB
        late = _upload(addr, listing.path, 200_000, 100_000)
        answer = _answer(late)
        late.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
        assert b"gateway_busy" in answer and b"Retry-After: 1" in answer
        holding.pop().close()  # an upload abandoned: what it held is free again
        time.sleep(0.5)
        for _ in range(30):  # whole bodies, no key: read, then refused 401; 3 MB in all, counted no more once read
            done = _upload(addr, listing.path, 100_000, 100_000)
            answer = _answer(done)
            done.close()
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
        assert hostile.records(listing.slug) == []
    finally:
        for sock in holding:
            sock.close()
        gw.stop()


def test_bodies_announced_too_large_count_among_the_bodies_being_read(
        backend: Backend, hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A body whose Content-Length passes max_body_bytes (up to 4x) is read and dropped before its 413; it was
    held whole uncounted, so N such uploads, no key needed (an HTTP/2 connection carries a hundred), held
    N x 4 x max_body_bytes past max_reading_bytes. Counted, it is refused once the budget is spent."""
    listing = make_listing(backend, hostile)
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY, "max_reading_bytes": 3 * MAX_BODY},
                tmp_path_factory.mktemp("reading-413"), backend.env())
    host, _, port = gw.url.removeprefix("http://").partition(":")
    holding: list[socket.socket] = []
    try:
        holding = [_upload((host, int(port)), listing.path, 4 * MAX_BODY, 1_400_000) for _ in range(2)]
        time.sleep(1.0)  # read by the gateway: 2.8 MB held of the 3 MB
        late = _upload((host, int(port)), listing.path, 4 * MAX_BODY, 400_000)
        answer = _answer(late)
        late.close()
        assert answer.startswith(b"HTTP/1.1 413 ") and b"payload_too_large" in answer, answer[:300]
        r = RawClient(gw.url).request("POST", listing.path, listing.auth(), rpc(name="cheap", padding="x" * 300_000))
        assert (r.status, r.error) == (503, "gateway_busy"), (r.status, r.body[:200])
        assert hostile.records(listing.slug) == []
    finally:
        for sock in holding:
            sock.close()
        gw.stop()


def test_answers_being_read_are_bounded_all_calls_together(
        backend: Backend, hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An answer not streamed is held whole before any hook, up to 4 x max_body_bytes; an upstream
    that sends most of such answers and stalls made the gateway hold that much per call in flight, for
    every listing. They are bounded all together (max_holding_bytes): past it an answer fails as the
    upstream's (refunded 502), and what a finished or failed one held is counted no more."""
    import concurrent.futures
    listing = make_listing(backend, hostile, timeout=30)
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY, "max_holding_bytes": 5 * MAX_BODY},
                tmp_path_factory.mktemp("holding"), backend.env())
    stalled = rpc(name="stalled_json", mb=3.5, sent=3, seconds=6)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(RawClient(gw.url).request, "POST", listing.path, listing.auth(), stalled)
            time.sleep(1.5)  # 3 MB of its answer held
            started = time.monotonic()
            second = RawClient(gw.url).request("POST", listing.path, listing.auth(), stalled)
            assert time.monotonic() - started < 4 and not first.done(), "the second answer waited for the first"
            assert (second.status, second.error) == (502, "upstream_failed"), (second.status, second.body[:200])
            assert second.header("X-Mcpmeter-Refunded") == "1"
            r = first.result(timeout=20)  # cut by its upstream: refunded too
            assert r.status == 502 and r.header("X-Mcpmeter-Refunded") == "1"
        for _ in range(3):  # 9 MB held one after another: what each held is given back
            r = RawClient(gw.url).request("POST", listing.path, listing.auth(**{"X-Hostile": "huge_json"}),
                                          rpc(name="cheap", mb=3))
            assert r.status == 200 and r.header("X-Mcpmeter-Billed") == "1", (r.status, r.body[:200])
        billed = 3 * PRICES["cheap"]  # the stalled calls were refunded
        assert _balance_back(backend, listing.consumer.user_id, CREDIT - billed) == CREDIT - billed
    finally:
        gw.stop()


def _tls_gateway(backend: Backend, workdir: Path, config: dict[str, Any]) -> Gateway:
    """A gateway serving TLS (so HTTP/2) with `config` over the backend's."""
    return start_gateway({**backend.config(), **config}, workdir, env=backend.env(),
                         reverse_target=f"https://127.0.0.1:{closed_port()}",
                         extra_args=["--set", f"confdir={workdir / 'mitmproxy'}"])


def test_an_http2_body_refused_while_read_gets_its_json_answer(
        backend: Backend, hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A body refused as it is read (503 gateway_busy, 413 payload_too_large) answers an HTTP/2 client with
    the JSON error and its Retry-After, as an HTTP/1 one, not with a bare stream reset it cannot tell
    from a failure (the stream of the flow was not known yet when its answer was registered)."""
    listing = make_listing(backend, hostile)
    gw = _tls_gateway(backend, tmp_path_factory.mktemp("h2-busy"),
                      {"max_body_bytes": MAX_BODY, "max_reading_bytes": MAX_BODY})
    host, _, port = gw.url.removeprefix("http://").removeprefix("https://").partition(":")
    holding = _upload((host, int(port)), listing.path, MAX_BODY, MAX_BODY - 500)
    try:
        time.sleep(1.0)  # read: the budget is spent for a while
        auth = [(k.lower(), v) for k, v in listing.auth()]
        late = h2_request(gw, listing.path, auth, rpc(name="cheap", padding="x" * 1000))
        assert late.status == 503 and json.loads(late.body)["error"] == "gateway_busy", late
        assert late.headers.get(b"retry-after") == b"1"
        assert hostile.records(listing.slug) == []
    finally:
        holding.close()
        gw.stop()


def test_a_body_over_stream_large_bodies_is_still_metered_whole(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tmp_path_factory: pytest.TempPathFactory) -> None:
    """mitmproxy's stream_large_bodies sends a body over it upstream as it comes, before the `request`
    hook: to the reverse-mode target, with no key checked. The gateway turns it off, so such a body is
    read whole and metered like any other."""
    listing = make_listing(backend, hostile)
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY}, tmp_path_factory.mktemp("stream-large"),
                backend.env(), extra=["--set", "stream_large_bodies=1k"], reverse=canary.url)
    body = rpc(name="cheap", padding="x" * 5000)
    try:
        c = RawClient(gw.url)
        r = c.request("POST", listing.path, [("Content-Type", "application/json")], body)  # no key
        assert r.status == 401, (r.status, r.body[:200])
        r = c.request("POST", listing.path, listing.auth(), body)
        assert r.status == 200 and r.header("X-Mcpmeter-Billed") == str(PRICES["cheap"]), (r.status, r.body[:200])
        c.close()
        assert canary.records() == [], "a body reached the reverse target unmetered"
        assert [seen.body for seen in hostile.records(listing.slug)] == [body]
    finally:
        gw.stop()


def test_stalled_uploads_do_not_keep_every_later_body_out(
        backend: Backend, hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Uploads that stall just under max_body_bytes, no key needed, spent max_reading_bytes until
    mitmproxy closed their idle connections (10 minutes): every call meanwhile was refused 503. Once
    they have gone on for EVICT_AFTER seconds below MIN_RATE, a body that finds the budget spent has
    them closed instead, and is read, forwarded and billed as usual."""
    from addon import budget
    listing = make_listing(backend, hostile)
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY, "max_reading_bytes": 3 * MAX_BODY},
                tmp_path_factory.mktemp("stalled"), backend.env())
    host, _, port = gw.url.removeprefix("http://").partition(":")
    holding: list[socket.socket] = []
    body = rpc(name="cheap", padding="x" * 3000)
    try:
        holding = [_upload((host, int(port)), listing.path, MAX_BODY, MAX_BODY - 500) for _ in range(3)]
        time.sleep(1.0)  # read: 2,998,500 bytes held of 3,000,000, a call's body does not fit
        r = RawClient(gw.url).request("POST", listing.path, listing.auth(), body)
        assert (r.status, r.error) == (503, "gateway_busy"), (r.status, r.body[:200])  # not stalled long yet
        time.sleep(budget.EVICT_AFTER)
        r = RawClient(gw.url).request("POST", listing.path, listing.auth(), body)
        assert r.status == 200 and r.header("X-Mcpmeter-Billed") == str(PRICES["cheap"]), (r.status, r.body[:200])
        closed = 0
        for sock in holding:
            sock.settimeout(1)
            try:
                closed += sock.recv(65536) == b""
            except TimeoutError:
                pass  # still open: the one closed made room enough
            except ConnectionResetError:
                closed += 1
        assert closed == 1, f"{closed} stalled uploads closed, one is room enough"
        assert len(hostile.records(listing.slug)) == 1  # only the call: no stalled body was forwarded
    finally:
        for sock in holding:
            sock.close()
        gw.stop()


def test_a_stalled_answer_does_not_keep_other_answers_out(
        backend: Backend, hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An upstream that sends most of its answers and stalls (a publisher calling its own listing, every
    call refunded) spent max_holding_bytes for its listing's timeout, up to 300 s, failing every other
    listing's large answers meanwhile. Silent for EVICT_AFTER seconds, such an answer is cut when another
    needs the room: its call fails as the upstream's (refunded 502), the other is delivered and billed."""
    import concurrent.futures

    from addon import budget
    listing = make_listing(backend, hostile, timeout=60)
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY, "max_holding_bytes": 5 * MAX_BODY},
                tmp_path_factory.mktemp("stalled_answer"), backend.env())
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(RawClient(gw.url).request, "POST", listing.path, listing.auth(),
                                rpc(name="stalled_json", mb=3.5, sent=3, seconds=30))
            time.sleep(1.0 + budget.EVICT_AFTER)  # 3 MB of its answer held, then nothing
            r = RawClient(gw.url).request("POST", listing.path, listing.auth(**{"X-Hostile": "huge_json"}),
                                          rpc(name="cheap", mb=3))
            assert r.status == 200 and r.header("X-Mcpmeter-Billed") == str(PRICES["cheap"]), (r.status, r.body[:200])
            stalled = first.result(timeout=10)  # cut, long before its upstream's 30 s
            assert (stalled.status, stalled.error) == (502, "upstream_failed")
            assert stalled.header("X-Mcpmeter-Refunded") == "1"
        assert _balance_back(backend, listing.consumer.user_id, CREDIT - PRICES["cheap"]) == CREDIT - PRICES["cheap"]
    finally:
        gw.stop()


def test_a_stalled_http2_upload_is_not_closed_with_a_paid_call_on_its_connection(
        backend: Backend, hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Closing a stalled upload's connection to make room must not fail what else runs on it: an HTTP/2
    client's other streams may be calls forwarded and paid for (a client gone after forwarding pays).
    Such a connection stays open; the body that needed the room is refused 503, as before."""
    from addon import budget
    listing = make_listing(backend, hostile, timeout=60)
    gw = _tls_gateway(backend, tmp_path_factory.mktemp("h2-stalled"),
                      {"max_body_bytes": MAX_BODY, "max_reading_bytes": MAX_BODY})
    host, port = gw.url.split("://")[1].split(":")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    auth = [(k.lower(), v) for k, v in listing.auth()]
    head = [(":method", "POST"), (":path", listing.path), (":scheme", "https"), (":authority", "gateway.test"), *auth]
    try:
        with tls.wrap_socket(socket.create_connection((host, int(port)), timeout=20),
                             server_hostname="localhost") as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            conn.initiate_connection()
            paid = rpc(name="slow", seconds=budget.EVICT_AFTER + 4)
            conn.send_headers(1, head)
            conn.send_data(1, paid, end_stream=True)  # forwarded and paid, its answer comes in ~9 s
            conn.send_headers(3, [*head, ("content-length", str(MAX_BODY))])
            sock.sendall(conn.data_to_send())
            events: list[Any] = []
            left = MAX_BODY - 500
            while left:  # as the flow-control windows allow
                if (room := min(left, conn.local_flow_control_window(3), conn.max_outbound_frame_size)) > 0:
                    conn.send_data(3, b" " * room)
                    left -= room
                else:
                    events += conn.receive_data(sock.recv(65536))
                sock.sendall(conn.data_to_send())
            time.sleep(1.0 + budget.EVICT_AFTER)  # stream 3 stalled past EVICT_AFTER, the budget spent
            late = h2_request(gw, listing.path, auth, rpc(name="cheap", padding="x" * 1000))
            assert late.status == 503 and json.loads(late.body)["error"] == "gateway_busy", late
            answer = b""
            while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events):
                data = sock.recv(65536)
                assert data, "the connection of a paid call was closed"
                for event in conn.receive_data(data):
                    events.append(event)
                    if isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                        answer += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                sock.sendall(conn.data_to_send())
            [status] = [dict(e.headers)[b":status"] for e in events
                        if isinstance(e, h2.events.ResponseReceived) and e.stream_id == 1]
            assert status == b"200" and b"ran slow" in answer, (status, answer[:300])
    finally:
        gw.stop()


# === field names that are not tokens =================================================================
# mitmproxy keeps a field's name as sent (`Mcp-Session-Id `, its space too). Its validate_inbound_headers
# option (on by default) refuses such a request (400 proxy_error) and fails such an answer (502); with it
# off, the gateway's own checks must hold.


@pytest.fixture(scope="module")
def lax_gateway(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose operator turned mitmproxy's validate_inbound_headers off."""
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY}, tmp_path_factory.mktemp("lax-gateway"),
                backend.env(), ["--set", "validate_inbound_headers=false"])
    yield gw
    gw.stop()


@pytest.mark.parametrize("strict", [True, False], ids=["validating", "lax"])
@pytest.mark.parametrize("name", ["Mcp-Session-Id ", "Cookie\t", "X-Forward-Authorization ", "Content\x0bLength",
                                  "X-Note\rContent-Length", "Authorizatión"])
def test_a_request_with_a_field_name_that_is_not_a_token_is_refused(
        backend: Backend, hostile: HostileUpstream, canary: Canary, gateway: Gateway, lax_gateway: Gateway,
        name: str, strict: bool) -> None:
    """Forwarded as sent, the gateway's checks (exact names) passed it by: an upstream that trims the name
    (RFC 9112 §5.1 forbids the whitespace) read a session, a cookie or a credential the meter never checked.
    RFC 9112 §5.1: a server MUST reject it (400); nothing is charged or forwarded."""
    listing = make_listing(backend, hostile)
    client = RawClient((gateway if strict else lax_gateway).url)
    try:
        r = client.request("POST", listing.path, [*listing.auth(), (name, "other-session")], rpc(name="pricey"))
    finally:
        client.close()
    assert (r.status, r.error) == (400, "proxy_error" if strict else "invalid_request"), (r.status, r.body[:300])
    assert b"other-session" not in r.body
    assert hostile.records(listing.slug) == []
    assert backend.balance(listing.consumer.user_id) == CREDIT
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("strict", [True, False], ids=["validating", "lax"])
def test_an_answer_field_name_that_is_not_a_token_never_reaches_the_client(
        backend: Backend, hostile: HostileUpstream, canary: Canary, gateway: Gateway, lax_gateway: Gateway,
        strict: bool) -> None:
    """A client that trims the name would take a session the gateway never bound to the consumer (or a
    cookie); one that refuses the name would refuse the whole answer, paid for. mitmproxy's check fails
    the call (refunded); with it off, the gateway drops the fields and delivers what the meter read."""
    listing = make_listing(backend, hostile)
    client = RawClient((gateway if strict else lax_gateway).url)
    try:
        r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "bad_names"}), rpc(name="cheap"))
    finally:
        client.close()
    if strict:
        assert (r.status, r.error) == (502, "upstream_failed"), (r.status, r.body[:300])
        assert _balance_back(backend, listing.consumer.user_id, CREDIT) == CREDIT
        assert [(u["status"], u["billed"]) for u in backend.usage(listing.consumer)] == [(502, 0)]
        assert confined(listing, hostile, canary) == []  # ran upstream, refunded: `check` would call it unpaid
    else:
        assert r.status == 200 and b"ran cheap" in r.body, (r.status, r.body[:300])
        assert [k for k, _ in r.headers if k.lower() in ("mcp-session-id", "x-note", "set-cookie")] == [], r.headers
        assert not any(k.startswith("X-N") and k != "X-Kept" for k, _ in r.headers), r.headers
        assert r.header("X-Kept") == "c" and r.header("X-Mcpmeter-Billed") == "1"
        assert _balance_back(backend, listing.consumer.user_id, CREDIT - 1) == CREDIT - 1
        deadline = time.monotonic() + 10  # the usage row is written after the answer
        while not backend.usage(listing.consumer) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [(u["status"], u["billed"]) for u in backend.usage(listing.consumer)] == [(200, 1)]
        check(backend, listing, hostile, canary)
    assert backend.unreconciled() == []


@pytest.fixture(scope="module")
def lax_tls_gateway(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """tls_gateway (HTTP/2 clients) with mitmproxy's validate_inbound_headers off."""
    workdir = tmp_path_factory.mktemp("lax-tls-gateway")
    gw = start_gateway(backend.config(), workdir, env=backend.env(),
                       reverse_target=f"https://127.0.0.1:{closed_port()}",
                       extra_args=["--set", f"confdir={workdir / 'mitmproxy'}",
                                   "--set", "validate_inbound_headers=false"])
    yield gw
    gw.stop()


@pytest.mark.parametrize("strict", [True, False], ids=["validating", "lax"])
@pytest.mark.parametrize("name", ["mcp-session-id ", "cookie\t", "x(y)", "x-note\r\ncontent-length", "authorizatión"])
def test_an_http2_request_with_a_field_name_that_is_not_a_token_is_refused(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tls_gateway: Gateway, lax_tls_gateway: Gateway,
        name: str, strict: bool) -> None:
    """HPACK carries any bytes in a name. Under validate_inbound_headers h2 refuses whitespace, control and
    non-ASCII bytes (the connection is closed) and mitmproxy other non-tokens (400 proxy_error); with it off,
    `x-note<CRLF>content-length` reached an HTTP/1 upstream as two header lines."""
    listing = make_listing(backend, hostile)
    answer = h2_request(tls_gateway if strict else lax_tls_gateway, listing.path,
                        [*((k.lower(), v) for k, v in listing.auth()), (name, "other-session")], rpc(name="pricey"),
                        validate=False)
    refused = json.loads(answer.body) if answer.body else {}
    code = (refused.get("error") or {}).get("data", {}).get("error") if "jsonrpc" in refused else refused.get("error")
    if strict and name != "x(y)":
        assert answer.status is None and not answer.body, answer
    else:
        assert (answer.status, code) == (400, "proxy_error" if strict else "invalid_request"), answer
    assert hostile.records(listing.slug) == []
    assert backend.balance(listing.consumer.user_id) == CREDIT


def test_answers_an_http2_client_does_not_read_are_not_held_without_bound(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tls_gateway: Gateway) -> None:
    """An HTTP/1 client that reads nothing stops the upstream's answer (the gateway reads no more of it than it
    can write). An HTTP/2 client that leaves its flow-control windows closed did not: mitmproxy read the
    upstream on and kept every byte for the client, 3 x 60 MB event streams held whole in the gateway.
    Past a backlog of compat.MAX_BACKLOG_BYTES for the client, its upstreams are not read until it reads."""
    listing = make_listing(backend, hostile, timeout=60)
    host, port = tls_gateway.url.split("://")[1].split(":")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    before = rss_bytes(tls_gateway.proc.pid)
    with tls.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname="localhost") as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.local_settings.initial_window_size = 0  # reads nothing of any answer
        conn.initiate_connection()
        head = [(":method", "POST"), (":path", listing.path), (":scheme", "https"), (":authority", "gateway.test"),
                *[(k.lower(), v) for k, v in listing.auth(**{"X-Hostile": "huge_sse"})]]
        for stream_id in (1, 3, 5):
            conn.send_headers(stream_id, head)
            conn.send_data(stream_id, rpc(name="cheap", mb=60), end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(6.0)  # the upstream writes as fast as the gateway reads
        grown = rss_bytes(tls_gateway.proc.pid) - before
    assert grown < 60 * 2**20, f"the gateway grew {grown / 2**20:.0f} MB for answers nobody read"
    check(backend, listing, hostile, canary)


# === HTTP/2 upstreams ================================================================================


class SlowH2Upstream:
    """HTTP/2 over TLS (ALPN h2 only): answers each tools/call after its `seconds` argument, streams in parallel."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.sock.getsockname()[1]}/mcp"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        lock = threading.Lock()

        def answer(sock: ssl.SSLSocket, h2c: h2.connection.H2Connection, stream_id: int, body: bytes) -> None:
            call = json.loads(body)
            time.sleep(float(call["params"]["arguments"].get("seconds", 0)))
            result = {"content": [{"type": "text", "text": f"ran {call['params']['name']}"}], "isError": False}
            with lock:
                try:
                    h2c.send_headers(stream_id, [(":status", "200"), ("content-type", "application/json")])
                    message = json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}).encode()
                    h2c.send_data(stream_id, message, end_stream=True)
                    sock.sendall(h2c.data_to_send())
                except Exception:  # the stream or the connection is gone
                    pass

        try:
            with self.tls.wrap_socket(raw, server_side=True) as sock:
                h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
                with lock:
                    h2c.initiate_connection()
                    sock.sendall(h2c.data_to_send())
                bodies: dict[int, bytes] = {}
                while data := sock.recv(65536):
                    with lock:
                        events = h2c.receive_data(data)
                        sock.sendall(h2c.data_to_send())
                    for event in events:
                        if isinstance(event, h2.events.DataReceived):
                            bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                            with lock:
                                h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamEnded):
                            body = bodies.pop(event.stream_id)
                            args = (sock, h2c, event.stream_id, body)
                            threading.Thread(target=answer, args=args, daemon=True).start()
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass


def test_a_call_failed_on_an_http2_upstream_fails_no_other_call(
        backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> None:
    """mitmproxy multiplexed an HTTP/2 client's calls to one upstream onto one HTTP/2 connection, and the gateway
    fails a call by closing its upstream connection (its timeout, an answer over its limit): one listing's call
    timing out failed another's healthy call beside it (502, refunded, its result never delivered). Each call
    in flight has an upstream connection of its own; an idle one is reused."""
    from tests.test_tls import make_pki
    workdir = tmp_path_factory.mktemp("h2-upstream")
    pki = make_pki(workdir, "upstream")
    upstream = SlowH2Upstream(pki.cert, pki.key)
    gw = start_gateway(backend.config(), workdir, env=backend.env(), reverse_target=f"https://127.0.0.1:{closed_port()}",
                       extra_args=["--set", f"confdir={workdir / 'mitmproxy'}",
                                   "--set", f"ssl_verify_upstream_trusted_ca={pki.ca}"])
    consumer = backend.add_consumer(credit=CREDIT)
    slugs = {}
    for name, timeout in (("quick", 1), ("patient", 30)):
        slugs[name] = f"h2up-{name}-{uuid.uuid4().hex[:6]}"
        backend.add_listing(slugs[name], upstream.url, price=1000, timeout=timeout)
    host, port = gw.url.split("://")[1].split(":")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    auth = [("authorization", f"Bearer {consumer.key}"), ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream")]
    statuses: dict[int, bytes] = {}
    bodies: dict[int, bytes] = {1: b"", 3: b"", 5: b""}

    def call(sock: ssl.SSLSocket, conn: h2.connection.H2Connection, *calls: tuple[int, str, float]) -> None:
        for stream_id, name, seconds in calls:
            conn.send_headers(stream_id, [(":method", "POST"), (":path", f"/{slugs[name]}"), (":scheme", "https"),
                                          (":authority", "gateway.test"), *auth])
            conn.send_data(stream_id, rpc(name="slow", seconds=seconds), end_stream=True)
        sock.sendall(conn.data_to_send())
        ended: set[int] = set()
        while ended != {stream_id for stream_id, _, _ in calls}:
            data = sock.recv(65536)
            assert data, "the gateway closed the client's connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended.add(event.stream_id)
            sock.sendall(conn.data_to_send())

    try:
        with tls.wrap_socket(socket.create_connection((host, int(port)), timeout=20),
                             server_hostname="localhost") as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            conn.initiate_connection()
            call(sock, conn, (1, "patient", 3), (3, "quick", 6))  # "quick" times out after 1 s
            assert statuses[3] == b"504", (statuses, bodies[3][:200])
            assert statuses[1] == b"200" and b"ran slow" in bodies[1], (statuses, bodies[1][:200])
            call(sock, conn, (5, "patient", 0))  # on the idle connection of the first
            assert statuses[5] == b"200", (statuses, bodies[5][:200])
        assert upstream.connections == 2
        assert _balance_back(backend, consumer.user_id, CREDIT - 2000) == CREDIT - 2000
    finally:
        gw.stop()
        upstream.sock.close()


@pytest.mark.parametrize("revision", [{}, {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
                                           "Mcp-Name": "slow"}], ids=["walked-away", "2026-cancelled"])
def test_an_http2_stream_reset_with_an_idempotency_key(
        backend: Backend, hostile: HostileUpstream, canary: Canary, tls_gateway: Gateway,
        revision: dict[str, str]) -> None:
    """A reset after forwarding is a walk-away (billed): the key keeps that, and a retry is answered 410
    idempotency_answer_lost as a JSON-RPC error, neither run nor charged. From 2026-07-28 the reset cancels
    (refunded): the key is released, and the retry runs and pays once."""
    listing = make_listing(backend, hostile, timeout=30)
    key = {"Idempotency-Key": f"h2-{uuid.uuid4().hex}", **revision}
    _reset_after_forwarding(tls_gateway, listing, **key)
    cancelled = bool(revision)
    assert _reason(backend, listing) == ((499, 0, "cancelled") if cancelled else (499, 1000, "client_disconnected"))
    retry = h2_request(tls_gateway, listing.path, [(k.lower(), v) for k, v in listing.auth(**key)],
                       rpc(name="slow", seconds=2))
    if cancelled:
        assert retry.status == 200 and b"ran slow" in retry.body, (retry.status, retry.body[:300])
        assert [s.ran for s in hostile.ran(listing.slug)] == ["slow", "slow"]
        assert _balance_back(backend, listing.consumer.user_id, CREDIT - 1000) == CREDIT - 1000
    else:
        assert retry.status == 410, (retry.status, retry.body[:300])
        message = json.loads(retry.body)
        assert message["id"] == 1 and message["error"]["code"] == -32017
        assert message["error"]["data"]["error"] == "idempotency_answer_lost"
        assert retry.headers[b"x-mcpmeter-billed"] == b"1000" and retry.headers[b"idempotent-replayed"] == b"true"
        assert [s.ran for s in hostile.ran(listing.slug)] == ["slow"]
        assert _balance_back(backend, listing.consumer.user_id, CREDIT - 1000) == CREDIT - 1000
