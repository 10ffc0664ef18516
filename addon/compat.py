"""Every touch of mitmproxy internals, in one place, pinned to mitmproxy 12.3.

mitmproxy has no upstream timeout and answers upstream failures with its own HTML
page, decided deep in its HTTP layers with no flow in reach. Two small patches let the
gateway close both gaps:

- `Http1Server.send` answers a failed flow with the response the addon registered for
  that client connection (a JSON 502/504 with the metering headers) instead of HTML;
- `abort_upstream` closes a flow's server connection, connecting or connected, through
  the proxyserver's connection handler, which mitmproxy turns into the flow's `error`.

`install()` checks the internals it relies on and raises if they moved, so a mitmproxy
upgrade fails at start instead of silently serving HTML or never timing out.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Generator
from typing import Any

from cachetools import TTLCache
from mitmproxy import ctx, http, version
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import HttpStream, RequestData, ResponseProtocolError, _base, _http1, _http2

TESTED_VERSIONS = ("12.3.",)

# client connection id -> raw HTTP/1 response to send instead of mitmproxy's error page.
# Entries are consumed at once; the TTL only bounds what a vanished connection leaves behind.
_pending: TTLCache[str, bytes] = TTLCache(maxsize=100_000, ttl=120)
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    if not version.VERSION.startswith(TESTED_VERSIONS):
        raise RuntimeError(
            f"mcpmeter was tested with mitmproxy {', '.join(TESTED_VERSIONS)}x, not {version.VERSION}; "
            "its upstream timeouts and JSON error pages depend on mitmproxy internals"
        )
    for owner, name in ((_http1.Http1Server, "send"), (_http1, "make_error_response"), (_http2, "format_error")):
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(f"mitmproxy internals changed: {owner.__name__}.{name} is missing")
    original_send = _http1.Http1Server.send

    def send(self: _http1.Http1Server, event: Any) -> Generator[commands.Command, Any, None]:
        if isinstance(event, ResponseProtocolError) and self.response is None:
            raw = _pending.pop(self.conn.id, None)
            if raw is not None and self.conn.state & ConnectionState.CAN_WRITE:
                yield commands.SendData(self.conn, raw)
                yield commands.CloseConnection(self.conn)
                return
        yield from original_send(self, event)

    _http1.Http1Server.send = send  # type: ignore[method-assign]
    # Errors the addon did not answer itself (malformed requests...) still get a JSON body.
    _http1.make_error_response = _json_error_response
    _http2.format_error = _json_error_body
    _base.format_error = _json_error_body
    _install_request_body_limit()
    _installed = True


def _json_error_body(status_code: int, message: str) -> bytes:
    return json.dumps({"error": "proxy_error", "message": message}).encode()


def _json_error_response(status_code: int, message: str = "") -> bytes:
    resp = http.Response.make(
        status_code,
        _json_error_body(status_code, message),
        {"Server": "mcpmeter", "Connection": "close", "Content-Type": "application/json"},
    )
    return http1.assemble_response(resp)


def answer_failed_flow(flow: http.HTTPFlow, response: http.Response) -> None:
    """Have the client receive `response` when this flow's upstream failure is reported."""
    response.headers["Connection"] = "close"
    response.headers["Content-Length"] = str(len(response.raw_content or b""))
    _pending[flow.client_conn.id] = http1.assemble_response(response)


def forget(flow: http.HTTPFlow) -> None:
    _pending.pop(flow.client_conn.id, None)


def abort_upstream(flow: http.HTTPFlow) -> bool:
    """Close the server connection(s) this flow is using or opening. True if one was closed."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
    if handler is None:
        return False
    target = (flow.request.host, flow.request.port)
    closed = False
    for conn in list(handler.transports):
        # While connecting, the flow does not hold its server connection yet: find it by address.
        # HTTP/1 clients have one request in flight per connection, so the match is this flow's.
        if isinstance(conn, Server) and (conn is flow.server_conn or conn.address == target):
            handler.close_connection(conn)
            closed = True
    return closed


def client_gone(flow: http.HTTPFlow) -> bool:
    """Whether the flow failed because the client went away (as opposed to the upstream)."""
    msg = flow.error.msg if flow.error else ""
    return "Client disconnected" in msg or not (flow.client_conn.state & ConnectionState.CAN_WRITE)


# --- request bodies read with a ceiling, whatever their framing -----------------------------------

# flow -> (limit, the answer to send when the body passes it). Weak: gone with the flow.
_body_limits: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[int, Callable[[], http.Response]]] = (
    weakref.WeakKeyDictionary())


def limit_request_body(flow: http.HTTPFlow, limit: int, refuse: Callable[[], http.Response]) -> None:
    """Stop reading `flow`'s request body once it passes `limit` bytes, and answer `refuse()`.

    mitmproxy buffers a request body whole before the `request` hook; only a Content-Length
    can be checked earlier. A chunked (or HTTP/2) body has none, so the check is made as
    each piece arrives: the body buffered never passes the limit by more than one read.
    """
    _body_limits[flow] = (limit, refuse)


def _install_request_body_limit() -> None:
    for name in ("state_consume_request_body", "check_killed"):
        if not callable(getattr(HttpStream, name, None)):
            raise RuntimeError(f"mitmproxy internals changed: HttpStream.{name} is missing")
    original = HttpStream.state_consume_request_body

    def state_consume_request_body(self: HttpStream, event: Any) -> Generator[commands.Command, Any, None]:
        bound = _body_limits.get(self.flow) if isinstance(event, RequestData) else None
        if bound is not None and len(self.request_body_buf) + len(event.data) > bound[0]:
            del _body_limits[self.flow]
            self.request_body_buf.clear()
            answer_failed_flow(self.flow, bound[1]())
            self.flow.kill()
            yield from self.check_killed(True)
            return
        yield from original(self, event)

    HttpStream.state_consume_request_body = state_consume_request_body  # type: ignore[method-assign]
