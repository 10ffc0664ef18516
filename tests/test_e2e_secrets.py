"""End to end, issue 7 classes 5 and 8: what a running gateway keeps secret, and that it fails closed.

- no bearer key, cookie or publisher header value in flows saved with `-w` (even for a flow whose
  client hung up mid-upload, before the `request` hook);
- X-Mcpmeter-* headers reach the client only from the gateway;
- HTTP/2 clients get the gateway's JSON 502/504 with a request id, never an upstream address;
- a script that stops loading under a running mitmdump leaves the guard refusing every request.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mitmproxy import io

from tests.backends import Backend, SqliteBackend, TestConsumer
from tests.fault_server import start_hang_up_server
from tests.gateway_proc import ROOT, Gateway, closed_port, start_gateway
from tests.refusals import refusal

pytestmark = pytest.mark.timeout(120)

MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
FORGED = {"X-Mcpmeter-Billed": "0", "X-Mcpmeter-Refunded": "1", "X-Mcpmeter-Balance": "123456789"}


class Recorder(ThreadingHTTPServer):
    """An upstream that records every request it gets and answers any POST with a JSON-RPC result.

    A POST whose tool name is `forge` is answered with the FORGED gateway headers; `slow` after 5 s."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), _RecorderHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _RecorderHandler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers), b""))
        self._answer(200, {"ok": True})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.path, dict(self.headers), body))
        message = json.loads(body)
        tool = message.get("params", {}).get("name")
        if tool == "slow":
            time.sleep(5)
        result = {"jsonrpc": "2.0", "id": message.get("id"), "result": {"content": [{"type": "text", "text": "ok"}]}}
        self._answer(200, result, FORGED if tool == "forge" else {})

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.stop()


def tools_call(tool: str = "echo", rpc_id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
                       "params": {"name": tool, "arguments": {}}}).encode()


def listing(backend: Backend, upstream_url: str, **kwargs: Any) -> str:
    slug = f"s-{uuid.uuid4().hex[:8]}"
    backend.add_listing(slug, upstream_url, price=1000, **kwargs)
    return slug


def saved(path: Path) -> tuple[bytes, list[Any]]:
    raw = path.read_bytes()
    with path.open("rb") as f:
        return raw, list(io.FlowReader(f).stream())


def start(backend: Backend, workdir: Path, **kwargs: Any) -> Gateway:
    return start_gateway(backend.config(), workdir, env=backend.env(), **kwargs)


# --- saved flows ------------------------------------------------------------------------------------


def test_saved_flows_hold_no_credential_and_no_publisher_secret(
        backend: Backend, recorder: Recorder, tmp_path: Path) -> None:
    secret = f"pub-secret-{uuid.uuid4().hex}"
    slug = listing(backend, recorder.url + "/mcp", headers={"X-Publisher-Key": secret})
    consumer = backend.add_consumer(credit=1_000_000)
    cookie = f"cookie-secret-{uuid.uuid4().hex}"
    flows_file = tmp_path / "flows.mitm"
    gw = start(backend, tmp_path, extra_args=["-w", str(flows_file)])
    try:
        r = httpx2.post(f"{gw.url}/{slug}", content=tools_call(), timeout=10, headers={
            **MCP_HEADERS, **consumer.auth, "Cookie": cookie, "Proxy-Authorization": f"Basic {cookie}"})
        assert r.status_code == 200 and r.headers["X-Mcpmeter-Billed"] == "1000"
        upstream_headers = {k.lower(): v for k, v in recorder.requests[-1][1].items()}
        assert upstream_headers["x-publisher-key"] == secret  # the upstream got the real value
        assert "authorization" not in upstream_headers and "cookie" not in upstream_headers
    finally:
        gw.stop()
    raw, flows = saved(flows_file)
    forwarded = [f for f in flows if f.request.path == "/mcp"]  # the flow was saved, retargeted...
    assert len(forwarded) == 1 and forwarded[0].request.headers["x-publisher-key"] == "(redacted)"
    for value in (secret, consumer.key, cookie):
        assert value.encode() not in raw  # ...without any secret, anywhere in the file
        assert value not in gw.log()


def test_client_gone_mid_upload_leaves_no_key_in_saved_flows(backend: Backend, tmp_path: Path) -> None:
    """The flow dies before `request`: only requestheaders ran, and it already redacted."""
    consumer = backend.add_consumer(credit=1_000_000)
    flows_file = tmp_path / "flows.mitm"
    gw = start(backend, tmp_path, extra_args=["-w", str(flows_file)])
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /some-slug HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n"
                         + f"Authorization: Bearer {consumer.key}\r\nCookie: c={consumer.key}\r\n\r\n".encode()
                         + b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"')
            time.sleep(0.5)  # let the gateway read the headers and part of the body
        time.sleep(0.5)
    finally:
        gw.stop()
    raw, flows = saved(flows_file)
    [died] = [f for f in flows if f.request.path == "/some-slug"]
    assert died.error is not None and died.response is None
    assert consumer.key.encode() not in raw
    assert died.request.headers["authorization"].endswith("(redacted)")


@pytest.mark.parametrize("strict", [True, False], ids=["validating", "lax"])
def test_credentials_under_a_name_that_is_not_a_token_are_not_in_saved_flows(
        backend: Backend, tmp_path: Path, strict: bool) -> None:
    """`Cookie : x` is refused (by mitmproxy's validate_inbound_headers, or with it off by the gateway), but
    the flow is saved with what requestheaders left of it: a server that trims the name reads a credential."""
    consumer = backend.add_consumer(credit=1_000_000)
    secrets = [f"secret-{uuid.uuid4().hex}" for _ in range(3)]
    flows_file = tmp_path / "flows.mitm"
    gw = start(backend, tmp_path, extra_args=["-w", str(flows_file),
                                              *([] if strict else ["--set", "validate_inbound_headers=false"])])
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /some-slug HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n"
                         + f"Authorization: Bearer {consumer.key}\r\nCookie : {secrets[0]}\r\n"
                           f"X-Forward-Authorization\t: {secrets[1]}\r\nAuthorization : Bearer {secrets[2]}\r\n"
                           "\r\n{}".encode())
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        time.sleep(0.3)
    finally:
        gw.stop()
    raw, flows = saved(flows_file)
    assert [f for f in flows if f.request.path == "/some-slug"], "the refused flow was not saved"
    for value in (consumer.key, *secrets):
        assert value.encode() not in raw and value not in gw.log()


def test_a_malformed_head_quoted_in_the_log_shows_no_key(tmp_path: Path) -> None:
    """mitmproxy refuses a head it cannot read and logs the offending line, as does the gateway with its
    JSON 400: a key on that line (a header with its colon missing) is shown by its prefix only."""
    backend = SqliteBackend(tmp_path / "mcpmeter.db")
    key = f"mcpm_live_{uuid.uuid4().hex}"
    gw = start(backend, tmp_path)
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"POST /some-slug HTTP/1.1\r\nHost: gw\r\nAuthorization Bearer {key}\r\n\r\n".encode())
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400") and key.encode() not in answer
        deadline = time.monotonic() + 5
        while "Invalid header line" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gw.stop()
        backend.close()
    assert "Invalid header line" in gw.log() and key[:14] in gw.log()
    assert key not in gw.log()


# --- gateway headers ---------------------------------------------------------------------------------


def test_upstream_cannot_forge_metering_headers(backend: Backend, recorder: Recorder, tmp_path: Path) -> None:
    slug = listing(backend, recorder.url + "/mcp")
    consumer = backend.add_consumer(credit=1_000_000)
    gw = start(backend, tmp_path)
    try:
        r = httpx2.post(f"{gw.url}/{slug}", content=tools_call("forge"), headers={**MCP_HEADERS, **consumer.auth},
                        timeout=10)
    finally:
        gw.stop()
    assert r.status_code == 200
    assert r.headers["X-Mcpmeter-Billed"] == "1000"
    assert "X-Mcpmeter-Refunded" not in r.headers
    assert r.headers.get_list("X-Mcpmeter-Balance") == [str(backend.balance(consumer.user_id))]


# --- HTTP/2 clients ----------------------------------------------------------------------------------


@pytest.fixture
def h2_gateway(backend: Backend, tmp_path: Path) -> Iterator[Gateway]:
    gw = start(backend, tmp_path, reverse_target=f"https://127.0.0.1:{closed_port()}",
               extra_args=["--set", f"confdir={tmp_path / 'mitmproxy'}"])
    yield gw
    gw.stop()


def h2_post(gw: Gateway, slug: str, consumer: TestConsumer, tool: str = "echo") -> httpx2.Response:
    with httpx2.Client(http2=True, verify=False, timeout=20) as client:
        r = client.post(f"{gw.url}/{slug}", content=tools_call(tool), headers={**MCP_HEADERS, **consumer.auth})
    assert r.http_version == "HTTP/2"
    return r


def assert_gateway_error(r: httpx2.Response, status: int, code: str, secret_address: str) -> None:
    assert r.status_code == status, r.text
    body = refusal(r)
    assert body["error"] == code
    assert r.headers["X-Mcpmeter-Request-Id"] == body["request_id"]
    assert uuid.UUID(body["request_id"]).version == 4
    assert r.headers["Content-Type"] == "application/json"
    assert secret_address not in r.text and "127.0.0.1" not in r.text


def test_http2_upstream_failure_is_the_gateways_502(backend: Backend, h2_gateway: Gateway) -> None:
    port, stop = start_hang_up_server()
    try:
        slug = listing(backend, f"http://127.0.0.1:{port}/mcp")
        consumer = backend.add_consumer(credit=1_000_000)
        r = h2_post(h2_gateway, slug, consumer)
    finally:
        stop()
    assert_gateway_error(r, 502, "upstream_failed", str(port))
    assert r.headers["X-Mcpmeter-Refunded"] == "1"
    assert backend.balance(consumer.user_id) == 1_000_000


def test_http2_upstream_refused_is_the_gateways_502(backend: Backend, h2_gateway: Gateway) -> None:
    port = closed_port()
    slug = listing(backend, f"http://127.0.0.1:{port}/mcp")
    consumer = backend.add_consumer(credit=1_000_000)
    assert_gateway_error(h2_post(h2_gateway, slug, consumer), 502, "upstream_failed", str(port))
    assert backend.balance(consumer.user_id) == 1_000_000


def test_http2_upstream_timeout_is_the_gateways_504(backend: Backend, recorder: Recorder,
                                                    h2_gateway: Gateway) -> None:
    slug = listing(backend, recorder.url + "/mcp", timeout=1)
    consumer = backend.add_consumer(credit=1_000_000)
    r = h2_post(h2_gateway, slug, consumer, tool="slow")
    assert_gateway_error(r, 504, "upstream_timeout", str(recorder.server_address[1]))
    assert backend.balance(consumer.user_id) == 1_000_000


# --- fail closed across reloads ----------------------------------------------------------------------


def wait_for(check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        time.sleep(0.2)


def rewrite(path: Path, text: str) -> None:
    """Change the script so that mitmproxy's watcher (mtime, polled each second) reloads it."""
    before = path.stat().st_mtime
    path.write_text(text)
    future = max(time.time(), before + 1.5)
    import os

    os.utime(path, (future, future))


def test_a_script_that_stops_loading_leaves_every_request_refused(recorder: Recorder, tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "mcpmeter.db")
    try:
        script = tmp_path / "script" / "mcpmeter_addon.py"
        script.parent.mkdir()
        shutil.copy(ROOT / "mcpmeter_addon.py", script)
        original = script.read_text()
        flows_file = tmp_path / "flows.mitm"
        key = f"mcpm_live_{uuid.uuid4().hex}"
        gw = start_gateway(backend.config(), tmp_path, env={**backend.env(), "PYTHONPATH": str(ROOT)},
                           script=script, reverse_target=recorder.url,  # the reverse target is a live server
                           extra_args=["-w", str(flows_file)])
        try:
            def health() -> int:
                return httpx2.get(gw.url + "/health", timeout=5).status_code

            def unauthenticated_call() -> httpx2.Response:  # an unknown key: 401 when metered
                return httpx2.post(gw.url + "/some-slug", content=tools_call(), timeout=5,
                                   headers={**MCP_HEADERS, "Authorization": f"Bearer {key}"})

            seen = len(recorder.requests)
            assert health() == 200 and unauthenticated_call().status_code == 401  # metered

            for broken in (original + "\ndef broken(:\n", "import mcpmeter_no_such_dependency\n" + original):
                rewrite(script, broken)
                wait_for(lambda: health() == 503)
                for r in (httpx2.get(gw.url + "/health", timeout=5), unauthenticated_call()):
                    assert r.status_code == 503
                    assert r.json()["error"] == "meter_unavailable"
                    assert r.headers["X-Mcpmeter-Request-Id"] == r.json()["request_id"]
                assert len(recorder.requests) == seen  # nothing reached the reverse-mode target

                rewrite(script, original)
                wait_for(lambda: health() == 200)
                assert unauthenticated_call().status_code == 401  # metered again
                assert len(recorder.requests) == seen
            assert gw.proc.poll() is None
        finally:
            gw.stop()
        raw, flows = saved(flows_file)
        refused = [f for f in flows if f.response is not None and f.response.status_code == 503
                   and f.request.path == "/some-slug"]
        assert len(refused) == 2 and key.encode() not in raw  # the guard redacted what it refused
    finally:
        backend.close()
