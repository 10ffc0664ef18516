"""addon/compat.py: the few mitmproxy 12.3 internals the gateway relies on, checked directly.

If a mitmproxy upgrade moves any of them, these tests fail (and `install()` refuses to start).
"""

from __future__ import annotations

import json

import pytest
from mitmproxy import http, version
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import http1
from mitmproxy.options import Options
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import ErrorCode, ResponseProtocolError, _base, _http1, _http2
from mitmproxy.test import taddons, tflow

from addon import compat
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
    assert json.loads(body) == {"error": "proxy_error", "message": "Connection refused"}
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


def test_json_error_response_and_body() -> None:
    response, body = parse(compat._json_error_response(502, "Connection refused"))
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == str(len(body))
    assert json.loads(body) == {"error": "proxy_error", "message": "Connection refused"}
    # The HTTP/2 path formats only a body.
    assert json.loads(_http2.format_error(504, "timeout")) == {"error": "proxy_error", "message": "timeout"}
    # A message with quotes or markup stays valid JSON.
    assert json.loads(parse(compat._json_error_response(400, '<b>"x"</b>'))[1])["message"] == '<b>"x"</b>'


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
