"""An upstream on an IPv6 literal (`http://[::1]:PORT/mcp`), end to end through the real gateway.

What the upstream receives as its authority must be bracketed, `[::1]:PORT`: the Host header on
HTTP/1, the `:authority` pseudo-header on HTTP/2 (which mitmproxy's own `url.hostport` writes
without brackets, `::1:PORT`, which no server can parse as an authority).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx2
import pytest

from tests.backends import Backend
from tests.gateway_proc import Gateway, closed_port, start_gateway
from tests.test_e2e_gateway import MCP_HEADERS, call, slug
from tests.test_tls import make_pki


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")

PRICE = 1000


def answer(body: bytes) -> bytes:
    rpc_id = json.loads(body).get("id")
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id,
                       "result": {"content": [{"type": "text", "text": "ok"}]}}).encode()


# --- upstreams on ::1 that record the authority they were sent --------------------------------------

class Http1Upstream(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def __init__(self) -> None:
        self.hosts: list[str | None] = []
        super().__init__(("::1", 0), _Http1Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://[::1]:{self.server_address[1]}/mcp"


class _Http1Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Http1Upstream

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.hosts.append(self.headers.get("Host"))
        raw = answer(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class Http2Upstream:
    """HTTP/2 over TLS (ALPN h2 only) on ::1, on the h2 library: records each request's headers."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.requests: list[dict[bytes, bytes]] = []
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols(["h2"])
        self.sock = socket.socket(socket.AF_INET6)
        self.sock.bind(("::1", 0))
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://[::1]:{self.sock.getsockname()[1]}/mcp"

    def stop(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self.tls.wrap_socket(conn, server_side=True) as tls:
                h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
                h2c.initiate_connection()
                tls.sendall(h2c.data_to_send())
                headers: dict[int, dict[bytes, bytes]] = {}
                bodies: dict[int, bytearray] = {}
                while data := tls.recv(65536):
                    try:
                        events = h2c.receive_data(data)
                    except h2.exceptions.ProtocolError:  # a malformed request: GOAWAY, as h2 queued it
                        tls.sendall(h2c.data_to_send())
                        return
                    for event in events:
                        if isinstance(event, h2.events.RequestReceived):
                            headers[event.stream_id] = {bytes(k): bytes(v) for k, v in event.headers or []}
                            bodies[event.stream_id] = bytearray()
                        elif isinstance(event, h2.events.DataReceived):
                            bodies[event.stream_id] += event.data or b""
                            h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamEnded):
                            self.requests.append(headers[event.stream_id])
                            raw = answer(bytes(bodies[event.stream_id]))
                            h2c.send_headers(event.stream_id, [(b":status", b"200"),
                                                               (b"content-type", b"application/json"),
                                                               (b"content-length", str(len(raw)).encode())])
                            h2c.send_data(event.stream_id, raw, end_stream=True)
                    tls.sendall(h2c.data_to_send())
        except (OSError, ssl.SSLError):
            pass


@pytest.fixture(scope="module")
def http1_upstream() -> Iterator[Http1Upstream]:
    server = Http1Upstream()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def http2_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Http2Upstream]:
    pki = make_pki(tmp_path_factory.mktemp("pki-ipv6"), "upstream")
    server = Http2Upstream(pki.cert, pki.key)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_gateway(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Serves TLS (so HTTP/2) to clients; the upstream's test certificate is not verified."""
    workdir = tmp_path_factory.mktemp("ipv6-gateway")
    gw = start_gateway(backend.config(), workdir, env=backend.env(),
                       reverse_target=f"https://127.0.0.1:{closed_port()}",
                       extra_args=["--set", f"confdir={workdir / 'mitmproxy'}", "--set", "ssl_insecure=true"])
    yield gw
    gw.stop()


def paid_call(backend: Backend, gw: Gateway, upstream_url: str, http2: bool) -> None:
    """One priced call to a fresh listing on `upstream_url`: answered, and billed once."""
    s = slug("v6")
    backend.add_listing(s, upstream_url, price=PRICE)
    consumer = backend.add_consumer(credit=10_000)
    with httpx2.Client(http2=http2, verify=False, timeout=20) as client:
        r = client.post(f"{gw.url}/{s}", content=json.dumps(call("echo")).encode(),
                        headers={**MCP_HEADERS, **consumer.auth})
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert r.status_code == 200, r.text
    assert r.json()["result"]["content"][0]["text"] == "ok"
    assert r.headers["X-Mcpmeter-Billed"] == str(PRICE)
    assert backend.balance(consumer.user_id) == 10_000 - PRICE


@pytest.mark.parametrize("http2", [False, True], ids=["http1-client", "http2-client"])
def test_an_http1_upstream_on_ipv6_loopback_gets_a_bracketed_host(
        backend: Backend, tls_gateway: Gateway, http1_upstream: Http1Upstream, http2: bool) -> None:
    before = len(http1_upstream.hosts)
    paid_call(backend, tls_gateway, http1_upstream.url, http2)
    assert http1_upstream.hosts[before:] == [f"[::1]:{http1_upstream.server_address[1]}"]


def test_an_http2_upstream_on_ipv6_loopback_gets_a_bracketed_authority(
        backend: Backend, tls_gateway: Gateway, http2_upstream: Http2Upstream) -> None:
    before = len(http2_upstream.requests)
    paid_call(backend, tls_gateway, http2_upstream.url, http2=True)
    [request] = http2_upstream.requests[before:]
    expected = f"[::1]:{http2_upstream.sock.getsockname()[1]}".encode()
    assert request[b":authority"] == expected
    assert request.get(b"host", expected) == expected  # a Host sent beside :authority must agree (RFC 9113 §8.3.1)
