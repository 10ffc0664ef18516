"""addon/compat.py: the few mitmproxy 12.3 internals the gateway relies on, checked directly.

If a mitmproxy upgrade moves any of them, these tests fail (and `install()` refuses to start).
"""

from __future__ import annotations

import json
import logging

import pytest
from mitmproxy import http, version
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import http1
from mitmproxy.options import Options
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import ErrorCode, RequestHeaders, ResponseProtocolError, _base, _http1, _http2, _http3
from mitmproxy.test import taddons, tflow

from addon import compat
from addon.errors import ERRORS
from addon.redaction import REDACTED
from tests.mitm_fakes import FakeHandler, FakeProxyserver


@pytest.fixture(autouse=True)
def installed() -> None:
    compat.install()


def parse(raw: bytes) -> tuple[http.Response, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep
    return http1.read_response_head(head.split(b"\r\n")), body


def http1_server() -> _http1.Http1Server:
    """mitmproxy's own HTTP/1 server layer for one client connection, as the proxy builds it."""
    return _http1.Http1Server(Context(tflow.tclient_conn(), Options()))


def failure(code: ErrorCode = ErrorCode.CONNECT_FAILED, message: str = "Connection refused") -> ResponseProtocolError:
    return ResponseProtocolError(1, message, code)


def answer(status: int = 502) -> http.Response:
    return http.Response.make(status, json.dumps({"error": "upstream_failed", "request_id": "r-1"}).encode(),
                              {"Content-Type": "application/json", "X-Mcpmeter-Request-Id": "r-1"})


def test_tested_version_is_the_installed_one() -> None:
    assert version.VERSION.startswith(compat.TESTED_VERSIONS)


def test_install_is_idempotent() -> None:
    send, make_error = _http1.Http1Server.send, _http1.make_error_response
    compat.install()
    compat.install()
    assert _http1.Http1Server.send is send  # not wrapped twice
    assert _http1.make_error_response is make_error is compat._json_error_response
    assert _http2.format_error is compat._json_error_body
    assert _base.format_error is compat._json_error_body
    assert _http3.format_error is compat._json_error_body


@pytest.mark.parametrize("owner, name", compat._INTERNALS)
def test_install_refuses_when_any_patched_internal_moved(monkeypatch: pytest.MonkeyPatch, owner: object,
                                                         name: str) -> None:
    monkeypatch.setattr(compat, "_installed", False)
    monkeypatch.delattr(owner, name)
    with pytest.raises(RuntimeError, match=name):
        compat.install()


def test_patched_internals_are_the_ones_mitmproxy_calls() -> None:
    """The wrappers only work if mitmproxy looks these names up at call time, as 12.3 does."""
    import inspect

    from mitmproxy.proxy import layers

    assert "yield from format_h2_request_headers(self.context, event)" in inspect.getsource(_http2.Http2Client)
    assert "self.handle_protocol_error(" in inspect.getsource(layers.http.HttpStream)
    assert "format_error(status, event.message)" in inspect.getsource(_http2.Http2Connection)
    assert "raw = http1.assemble_request_head(request)" in inspect.getsource(_http1)


def test_install_refuses_an_untested_mitmproxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_installed", False)
    monkeypatch.setattr(version, "VERSION", "13.0.0")
    with pytest.raises(RuntimeError, match="13.0.0"):
        compat.install()


def test_install_refuses_when_internals_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_installed", False)
    monkeypatch.delattr(_http2, "format_error")
    with pytest.raises(RuntimeError, match="format_error"):
        compat.install()


def test_patched_send_sends_the_registered_answer_instead_of_the_error_page() -> None:
    server = http1_server()
    flow = tflow.tflow(client_conn=server.conn)
    compat.answer_failed_flow(flow, answer())

    sent = list(server.send(failure()))

    assert [type(c) for c in sent] == [commands.SendData, commands.CloseConnection]
    assert all(c.connection is server.conn for c in sent)
    response, body = parse(sent[0].data)
    assert response.status_code == 502
    assert response.headers["Connection"] == "close"
    assert response.headers["Content-Length"] == str(len(body))
    assert response.headers["X-Mcpmeter-Request-Id"] == "r-1"
    assert json.loads(body) == {"error": "upstream_failed", "request_id": "r-1"}
    assert server.conn.id not in compat._pending  # consumed: a later failure gets the generic answer


def test_patched_send_answers_a_killed_flow() -> None:
    """A flow killed in requestheaders reports ErrorCode.KILL, which has no status of its own."""
    server = http1_server()
    compat.answer_failed_flow(tflow.tflow(client_conn=server.conn), answer(413))
    sent = list(server.send(failure(ErrorCode.KILL, "Connection killed.")))
    assert parse(sent[0].data)[0].status_code == 413
    assert isinstance(sent[1], commands.CloseConnection)


def test_unregistered_failures_get_a_json_error_page() -> None:
    server = http1_server()
    sent = list(server.send(failure()))
    assert [type(c) for c in sent] == [commands.SendData, commands.CloseConnection]
    response, body = parse(sent[0].data)
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"] == "proxy_error"
    assert b"<html" not in sent[0].data.lower()


def test_no_answer_once_the_response_has_started() -> None:
    server = http1_server()
    server.response = http.Response.make(200)
    compat.answer_failed_flow(tflow.tflow(client_conn=server.conn), answer())
    sent = list(server.send(failure(ErrorCode.GENERIC_SERVER_ERROR, "peer closed")))
    assert [type(c) for c in sent] == [commands.CloseConnection]  # headers are out: just close
    compat._pending.pop(server.conn.id, None)


def test_nothing_is_sent_to_a_client_that_is_gone() -> None:
    server = http1_server()
    server.conn.state = ConnectionState.CAN_READ
    compat.answer_failed_flow(tflow.tflow(client_conn=server.conn), answer())
    assert list(server.send(failure())) == []


def test_forget_drops_a_registered_answer() -> None:
    flow = tflow.tflow()
    compat.answer_failed_flow(flow, answer())
    assert flow.client_conn.id in compat._pending
    compat.forget(flow)
    assert flow.client_conn.id not in compat._pending
    compat.forget(flow)  # twice is fine


def test_keys_in_logged_client_bytes_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy's messages quote the line of a head it cannot read, in its own log and in the gateway's
    proxy-error line: a bearer key on it keeps its prefix and loses the rest."""
    compat.install()
    caplog.set_level("INFO")
    key = "mcpm_live_SECRETkey0123456789"
    line = f"Invalid header line: b'Authorization Bearer {key}'"
    compat._json_error_response(400, line)
    logging.getLogger("mitmproxy.proxy.server").info(f"127.0.0.1:5000: {line}")
    logging.getLogger("mcpmeter").warning("mcpmeter: refusing %s", f"/slug?key={key}")
    assert caplog.text.count("mcpm_live_SECR… (redacted)") == 3
    assert "SECRETkey0123456789" not in caplog.text


def test_json_error_response_and_body(caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy's message names the upstream (or echoes client bytes): logged under the request id, never sent."""
    caplog.set_level("INFO", logger="mcpmeter")
    raw = compat._json_error_response(502, "Connection refused (10.9.8.7:4113)")
    response, body = parse(raw)
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == str(len(body))
    answer = json.loads(body)
    assert answer["error"] == "proxy_error" and answer["message"] == ERRORS["proxy_error"].message
    assert response.headers["X-Mcpmeter-Request-Id"] == answer["request_id"]
    assert b"10.9.8.7" not in raw and b"4113" not in raw
    assert answer["request_id"] in caplog.text and "10.9.8.7:4113" in caplog.text
    # The HTTP/2 and HTTP/3 paths format only a body: the same JSON, a fresh request id each time.
    for format_error in (_http2.format_error, _base.format_error, _http3.format_error):
        h2_body = json.loads(format_error(504, "timeout talking to 10.9.8.7"))
        assert h2_body["error"] == "proxy_error" and "10.9.8.7" not in json.dumps(h2_body)
        assert h2_body["request_id"] != answer["request_id"]
    assert json.loads(parse(compat._json_error_response(400, '<b>"x"</b>'))[1])["error"] == "proxy_error"


def test_malformed_request_gets_a_json_400() -> None:
    """mitmproxy's own 400 for an unparseable request goes through the patched make_error_response."""
    from mitmproxy.proxy import events

    server = http1_server()
    server.state = server.read_headers
    sent = list(server._handle_event(events.DataReceived(server.conn, b"GARBAGE\r\n\r\n")))
    data = next(c for c in sent if isinstance(c, commands.SendData)).data
    response, body = parse(data)
    assert response.status_code == 400 and json.loads(body)["error"] == "proxy_error"


# --- abort_upstream and client_gone --------------------------------------------------------------


def server_conn(address: tuple[str, int]) -> Server:
    return Server(address=address)


def test_abort_upstream_without_a_proxyserver_is_false() -> None:
    with taddons.context():
        assert compat.abort_upstream(tflow.tflow()) is False


def test_abort_upstream_closes_the_flows_connection_or_the_one_it_is_opening() -> None:
    proxyserver = FakeProxyserver()
    with taddons.context(proxyserver):
        flow = tflow.tflow()
        flow.request.url = "http://127.0.0.1:4000/mcp"
        assert compat.abort_upstream(flow) is False  # no handler for this client

        connecting = server_conn(("127.0.0.1", 4000))  # not yet flow.server_conn, found by address
        other = server_conn(("127.0.0.1", 4001))
        handler = proxyserver.connections[flow.client_conn.id] = FakeHandler(flow.client_conn, other, connecting)
        assert compat.abort_upstream(flow) is True
        assert handler.closed == [connecting]

        handler = proxyserver.connections[flow.client_conn.id] = FakeHandler(flow.server_conn, other)
        assert compat.abort_upstream(flow) is True
        assert handler.closed == [flow.server_conn]

        handler = proxyserver.connections[flow.client_conn.id] = FakeHandler(flow.client_conn, other)
        assert compat.abort_upstream(flow) is False and handler.closed == []


def test_abort_upstream_of_an_http2_stream_spares_the_other_streams_connections() -> None:
    proxyserver = FakeProxyserver()
    with taddons.context(proxyserver):
        flow = tflow.tflow()
        flow.request.url = "http://127.0.0.1:4000/mcp"
        flow.request.http_version = "HTTP/2.0"
        other_stream = server_conn(("127.0.0.1", 4000))
        other_stream.state = ConnectionState.OPEN  # another stream's call, in flight
        connecting = server_conn(("127.0.0.1", 4000))
        handler = proxyserver.connections[flow.client_conn.id] = FakeHandler(other_stream, connecting)
        assert compat.abort_upstream(flow) is True
        assert handler.closed == [connecting]


def test_client_gone() -> None:
    flow = tflow.tflow()
    flow.error = tflow.terr("Client disconnected.")
    assert compat.client_gone(flow)
    flow.error = tflow.terr("Connection refused")
    assert not compat.client_gone(flow)
    flow.client_conn.state = ConnectionState.CLOSED
    assert compat.client_gone(flow)


def test_proxyserver_still_has_the_attributes_abort_upstream_uses() -> None:
    """The real proxyserver keeps handlers by client id; handlers keep transports and close_connection."""
    import inspect

    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.proxy import mode_servers
    from mitmproxy.proxy.server import ConnectionHandler

    assert isinstance(Proxyserver().connections, dict)
    assert "register_connection(handler.layer.context.client.id" in inspect.getsource(mode_servers)
    assert "transports" in ConnectionHandler.__annotations__
    assert list(inspect.signature(ConnectionHandler.close_connection).parameters)[:2] == ["self", "connection"]


# --- publisher headers: on the wire only --------------------------------------------------------


def forwarded_request() -> http.Request:
    request = tflow.treq(headers=http.Headers(host="upstream", x_api_key="consumer-sent", accept="*/*"))
    request.headers["X-Api-Key"] = "pub-secret-1"
    request.headers.add("X-Second", "pub-secret-2")
    return request


def test_hidden_headers_reach_the_http1_wire_and_not_the_flow() -> None:
    request = forwarded_request()
    compat.hide_upstream_headers(request, ["X-Api-Key", "x-second", "X-Absent"])
    assert request.headers["x-api-key"] == REDACTED and request.headers["x-second"] == REDACTED
    assert b"pub-secret" not in bytes(str(request.headers), "utf8")

    client = _http1.Http1Client(Context(tflow.tclient_conn(), Options()))
    sent = list(client.send(RequestHeaders(1, request, end_stream=True)))
    wire = b"".join(c.data for c in sent if isinstance(c, commands.SendData))
    assert b"x-api-key: pub-secret-1\r\n" in wire.lower() and b"x-second: pub-secret-2\r\n" in wire.lower()
    assert REDACTED.encode() not in wire
    assert request.headers["x-api-key"] == REDACTED  # the flow's request still shows the marker
    assert request not in compat._hidden  # the secret left the registry with the bytes


def test_hidden_headers_reach_the_http2_wire() -> None:
    request = forwarded_request()
    request.http_version = "HTTP/2.0"
    compat.hide_upstream_headers(request, ["X-Api-Key"])
    from mitmproxy.addons.proxyserver import Proxyserver

    with taddons.context(Proxyserver()) as tctx:
        gen = _http2.format_h2_request_headers(Context(tflow.tclient_conn(), tctx.options),
                                               RequestHeaders(1, request, end_stream=True))
        try:
            while True:
                next(gen)
        except StopIteration as done:
            headers = dict(done.value)
    assert headers[b"x-api-key"] == b"pub-secret-1"
    assert request.headers["x-api-key"] == REDACTED


def test_nothing_hidden_sends_the_request_as_it_is() -> None:
    request = forwarded_request()
    compat.hide_upstream_headers(request, ["X-Absent"])
    assert request not in compat._hidden
    client = _http1.Http1Client(Context(tflow.tclient_conn(), Options()))
    wire = list(client.send(RequestHeaders(1, request, end_stream=True)))[0].data
    assert b"x-api-key: pub-secret-1" in wire.lower()


# --- HTTP/2 clients: per-stream answers -----------------------------------------------------------


def proxy_options() -> Options:
    """Options with the proxy core's (HTTP/2 settings...), as a running mitmproxy has them."""
    from mitmproxy.addons.proxyserver import Proxyserver

    with taddons.context(Proxyserver()) as tctx:
        options = tctx.options
    # Outside a running loop, taddons closes the loop it made but leaves its master's log handler on the
    # root logger: a later log line in this test (compat logs proxy errors) would hit the closed loop.
    for handler in list(logging.getLogger().handlers):
        if getattr(handler, "master", None) is tctx.master:
            logging.getLogger().removeHandler(handler)
    return options


def h2_server_with_open_stream() -> tuple[_http2.Http2Server, object]:
    """mitmproxy's HTTP/2 server layer, with stream 1 opened by a real h2 client."""
    import h2.config
    import h2.connection
    from mitmproxy.proxy import events

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", "gw"), (":path", "/s")],
                        end_stream=True)
    server = _http2.Http2Server(Context(tflow.tclient_conn(), proxy_options()))
    list(server.handle_event(events.Start()))
    list(server.handle_event(events.DataReceived(server.conn, client.data_to_send())))
    return server, client


def h2_answer(server: _http2.Http2Server, client: object, event: ResponseProtocolError) -> tuple[dict, bytes]:
    import h2.events

    sent = list(server.handle_event(event))
    received = client.receive_data(b"".join(c.data for c in sent if isinstance(c, commands.SendData)))
    headers = next(e.headers for e in received if isinstance(e, h2.events.ResponseReceived))
    body = b"".join(e.data for e in received if isinstance(e, h2.events.DataReceived))
    return dict(headers), body


def test_http2_failed_stream_gets_the_registered_answer() -> None:
    server, client = h2_server_with_open_stream()
    flow = tflow.tflow(client_conn=server.conn)
    flow.request.http_version = "HTTP/2.0"
    compat._h2_streams[flow] = 1  # what the patched HttpStream.handle_protocol_error records
    compat.answer_failed_flow(flow, answer(504))

    headers, body = h2_answer(server, client, failure(message="Connection refused (10.9.8.7:4113)"))
    assert headers[b":status"] == b"504"
    assert headers[b"content-type"] == b"application/json" and headers[b"x-mcpmeter-request-id"] == b"r-1"
    assert b"connection" not in headers
    assert json.loads(body) == {"error": "upstream_failed", "request_id": "r-1"}
    assert not compat._pending_h2 and server.conn.id not in compat._pending


def test_http2_unregistered_failure_is_json_without_the_address() -> None:
    server, client = h2_server_with_open_stream()
    headers, body = h2_answer(server, client, failure(message="Connection refused (10.9.8.7:4113)"))
    assert headers[b":status"] == b"502" and headers[b"content-type"] == b"application/json"
    answer_ = json.loads(body)
    assert answer_["error"] == "proxy_error" and headers[b"x-mcpmeter-request-id"] == answer_["request_id"].encode()
    assert b"10.9.8.7" not in body


def test_http2_flow_without_a_known_stream_registers_nothing() -> None:
    flow = tflow.tflow()
    flow.request.http_version = "HTTP/2.0"
    compat.answer_failed_flow(flow, answer())
    assert flow.client_conn.id not in compat._pending and not compat._pending_h2
