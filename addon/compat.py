"""Every touch of mitmproxy internals, in one place, pinned to mitmproxy 12.3.

mitmproxy has no upstream timeout and answers upstream failures with its own HTML
page, decided deep in its HTTP layers with no flow in reach. Two small patches let the
gateway close both gaps:

- `Http1Server.send` answers a failed flow with the response the addon registered for
  that client connection (a JSON 502/504 with the metering headers) instead of HTML;
- `abort_upstream` closes a flow's server connection, connecting or connected, through
  the proxyserver's connection handler, which mitmproxy turns into the flow's `error`.

- `Http2Server._handle_event` does the same for HTTP/2 clients, per stream (the stream of a
  failed flow is learnt in `HttpStream.handle_protocol_error`, and whether the client's side failed:
  an HTTP/2 client walks away by resetting its stream), and answers failures the addon did not
  register with a JSON body instead of mitmproxy's text/html page;
- `Http1Server.read_headers` / `Http1Client.read_headers` bound an HTTP/1 head at MAX_HEAD_BYTES:
  mitmproxy buffers a head until its blank line, however long ("FIXME: protect against header size
  DoS"), before any hook runs; HTTP/2 heads are bounded by h2 at the same 64 KiB;
- `Http1Connection._handle_event` bounds what an HTTP/1 connection buffers between heads: a
  chunk-size line or trailer section (MAX_HEAD_BYTES), and what a client sends ahead of its answer
  (MAX_AHEAD_BYTES); mitmproxy holds both, however long;
- `HttpStream.state_consume_response_body` fails a flow whose buffered (not streamed) answer passes
  its limit (`limit_answer_body`): mitmproxy holds it whole, however long;
- `_http1.make_body_reader` reads chunked bodies with their trailer section dropped: mitmproxy
  raises on HTTP/1 trailers, which crashes the connection;
- `BufferedH2Connection` counts what it holds for an HTTP/2 client whose flow-control windows are closed,
  and `ConnectionHandler.handle_connection` reads that client's upstreams only while it holds less than
  MAX_BACKLOG_BYTES: mitmproxy keeps reading them and holds every byte, however many (an HTTP/1 client
  that does not read stops the upstream: mitmproxy reads no more than it can write);
- `HttpLayer.get_connection` never gives a call an upstream connection that carries another call in flight:
  mitmproxy multiplexes an HTTP/2 client's calls onto one HTTP/2 upstream connection, and the gateway fails
  a call by closing its connection (`abort_upstream`, an answer over its limit), which failed the others;
- `Http1Client.send` / `_http2.format_h2_request_headers` put the publisher's upstream headers
  into the bytes sent upstream, so the flow (saved with `-w`, shown by mitmweb) only ever holds
  a redacted marker for them (`hide_upstream_headers`).

`install()` checks the internals it relies on and raises if they moved, so a mitmproxy
upgrade fails at start instead of silently serving HTML, leaking secrets or never timing out.
mitmproxy's own error messages name upstream addresses: they are logged with a request id
and never sent to the client; a bearer key they quote (a malformed head's line) is shown by its
prefix only, in mitmproxy's connection log as in the gateway's (`redaction.KeyFilter`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import Any

import h11
from h2 import events as h2_events
from cachetools import TTLCache
from h11._readers import ChunkedReader
from mitmproxy import ctx, http, version
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, server
from mitmproxy.proxy import layers as _layers
from mitmproxy.proxy.layers.http import (ErrorCode, HttpStream, RequestData, RequestHeaders, RequestProtocolError,
                                          ResponseData, ResponseProtocolError, _base, _http1, _http2, _http3,
                                          _http_h2)

from .budget import HOLDING, READING
from .errors import ERRORS
from .redaction import REDACTED, KeyFilter

log = logging.getLogger("mcpmeter")

TESTED_VERSIONS = ("12.3.",)

# client connection id -> raw HTTP/1 response to send instead of mitmproxy's error page.
# Entries are consumed at once; the TTL only bounds what a vanished connection leaves behind.
_pending: TTLCache[str, bytes] = TTLCache(maxsize=100_000, ttl=120)
# (client connection id, stream id) -> the response an HTTP/2 client gets for a failed stream.
_pending_h2: TTLCache[tuple[str, int], http.Response] = TTLCache(maxsize=100_000, ttl=120)
# A failed HTTP/2 flow -> its stream id on the client connection, learnt as the failure is handled.
_h2_streams: weakref.WeakKeyDictionary[http.HTTPFlow, int] = weakref.WeakKeyDictionary()
# A request on its way upstream -> the publisher's header values the flow shows as REDACTED.
_hidden: weakref.WeakKeyDictionary[http.Request, list[tuple[str, str]]] = weakref.WeakKeyDictionary()
# Flows that failed on the client's side: an HTTP/2 client resetting its stream leaves its connection open,
# and mitmproxy's message ("stream reset by client") is the same for an upstream's reset.
_client_failed: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
_installed = False

_INTERNALS: tuple[tuple[Any, str], ...] = (
    (_http1.Http1Server, "send"), (_http1.Http1Client, "send"), (_http1, "make_error_response"),
    (_http2, "format_error"), (_http2.Http2Server, "_handle_event"), (_http2, "format_h2_request_headers"),
    (_http3, "format_error"), (_layers.http.HttpStream, "handle_protocol_error"),
    (_http1.Http1Server, "read_headers"), (_http1.Http1Client, "read_headers"), (_http1.Http1Connection, "done"),
    (_http1.Http1Connection, "_handle_event"), (_http1.Http1Connection, "read_body"), (_http1.Http1Connection, "wait"),
    (_http1, "make_body_reader"), (_http_h2.BufferedH2Connection, "send_data"),
    (_http_h2.BufferedH2Connection, "stream_window_updated"), (_http_h2.BufferedH2Connection, "reset_stream"),
    (_http_h2.BufferedH2Connection, "receive_data"), (server.ConnectionHandler, "handle_connection"),
    (_layers.http.HttpLayer, "get_connection"),
)
# An HTTP/1 head (request or status line and the header fields) longer than this is refused: a
# client's with a 431 and a closed connection, before any hook (no flow is made); an upstream's as
# a failed answer (the call is refunded, a 502). h2 bounds an HTTP/2 header list at 64 KiB too.
MAX_HEAD_BYTES = 64 * 1024
# What an HTTP/1 client may send ahead of the answer it waits for (pipelined requests, held for later);
# past it the connection is closed, as if the client had hung up. MCP clients never pipeline.
MAX_AHEAD_BYTES = 1024 * 1024
# What mitmproxy may hold for an HTTP/2 client that does not read (its flow-control windows closed), all its
# streams together; past it, that client's upstream connections are not read until it reads some.
MAX_BACKLOG_BYTES = 1024 * 1024


def install() -> None:
    global _installed
    if _installed:
        return
    if not version.VERSION.startswith(TESTED_VERSIONS):
        raise RuntimeError(
            f"mcpmeter was tested with mitmproxy {', '.join(TESTED_VERSIONS)}x, not {version.VERSION}; "
            "its upstream timeouts and JSON error pages depend on mitmproxy internals"
        )
    for owner, name in _INTERNALS:
        if not callable(vars(owner).get(name)):
            raise RuntimeError(f"mitmproxy internals changed: {owner.__name__}.{name} is missing")
    if [f.name for f in dataclasses.fields(RequestHeaders)][:3] != ["stream_id", "request", "end_stream"]:
        raise RuntimeError("mitmproxy internals changed: RequestHeaders fields")
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
    _install_http2_answers()
    _install_upstream_headers()
    # Errors the addon did not answer itself (malformed requests...) still get a JSON body.
    _http1.make_error_response = _json_error_response
    _http2.format_error = _json_error_body
    _http3.format_error = _json_error_body
    _base.format_error = _json_error_body
    _install_request_body_limit()
    _install_answer_body_limit()
    READING.closer, HOLDING.closer = _close_client, _close_upstream  # a stalled holder closed to make room
    _install_head_limit()
    _install_buffer_limit()
    _install_trailer_drop()
    _install_h2_backlog()
    _install_connection_per_call()
    # mitmproxy's connection log quotes client bytes it cannot parse; so may the gateway's own lines.
    for logger in ("mitmproxy.proxy.server", "mcpmeter"):
        logging.getLogger(logger).addFilter(KeyFilter())
    _installed = True


def _install_http2_answers() -> None:
    original_protocol_error = _layers.http.HttpStream.handle_protocol_error
    original_h2_event = _http2.Http2Server._handle_event

    def handle_protocol_error(self: Any, event: Any) -> Generator[commands.Command, Any, None]:
        flow = getattr(self, "flow", None)
        if flow is not None:  # a body cut off (a side gone): mitmweb may keep its flow for ever
            READING.release(flow)
            HOLDING.release(flow)
        if flow is not None and isinstance(event, RequestProtocolError):
            _client_failed.add(flow)
        if flow is not None and flow.request.is_http2:
            _h2_streams[flow] = self.stream_id  # read by answer_failed_flow, from the error hook
        return (yield from original_protocol_error(self, event))

    def h2_event(self: _http2.Http2Server, event: Any) -> Generator[commands.Command, Any, None]:
        if self.conn.id not in _client_backlogs:  # what paces this client's upstreams
            _client_backlogs[self.conn.id] = _backlog(self.h2_conn)
        if isinstance(event, ResponseProtocolError) and self.is_open_for_us(event.stream_id):
            stream = self.h2_conn.streams[event.stream_id]
            answer = _pending_h2.pop((self.conn.id, event.stream_id), None)
            status = event.code.http_status_code()
            if not stream.state_machine.headers_sent and (answer is not None or status is not None):
                response = answer or _proxy_error(status or 502, event.message)
                headers = [(b":status", b"%d" % response.status_code)] + [
                    (k.lower(), v) for k, v in response.headers.fields
                    if k.lower() not in (b"connection", b"content-length")]
                self.h2_conn.send_headers(event.stream_id, headers)
                self.h2_conn.send_data(event.stream_id, response.raw_content or b"", end_stream=True)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
                return
        yield from original_h2_event(self, event)

    _layers.http.HttpStream.handle_protocol_error = handle_protocol_error  # type: ignore[method-assign]
    _http2.Http2Server._handle_event = h2_event  # type: ignore[method-assign]


def _install_upstream_headers() -> None:
    original_h1_send = _http1.Http1Client.send
    original_h2_headers = _http2.format_h2_request_headers

    def h1_send(self: _http1.Http1Client, event: Any) -> Generator[commands.Command, Any, None]:
        if isinstance(event, RequestHeaders) and event.request in _hidden:
            event = dataclasses.replace(event, request=_revealed(event.request))
        yield from original_h1_send(self, event)

    def h2_headers(context: Any, event: RequestHeaders) -> Generator[commands.Command, Any, Any]:
        if event.request in _hidden:
            event = dataclasses.replace(event, request=_revealed(event.request))
        return (yield from original_h2_headers(context, event))

    _http1.Http1Client.send = h1_send  # type: ignore[method-assign]
    _http2.format_h2_request_headers = h2_headers


def hide_upstream_headers(request: http.Request, names: Iterable[str]) -> None:
    """Show the named headers as REDACTED on the flow; their values go only into the bytes sent upstream."""
    hidden: list[tuple[str, str]] = []
    for name in dict.fromkeys(n.lower() for n in names):
        values = request.headers.get_all(name)
        if values:
            hidden.extend((name, v) for v in values)
            request.headers.set_all(name, [REDACTED] * len(values))
    if hidden:
        _hidden[request] = hidden


def _revealed(request: http.Request) -> http.Request:
    """A copy of `request` with the hidden values back, for the wire only; the secret leaves the registry."""
    hidden = _hidden.pop(request, [])
    real = request.copy()
    for name in dict.fromkeys(n for n, _ in hidden):
        real.headers.set_all(name, [v for n, v in hidden if n == name])
    return real


def _proxy_error(status_code: int, message: str) -> http.Response:
    """mitmproxy's own failure, answered as gateway JSON: the detail (it may name an upstream
    address or echo client bytes) goes to the log under the request id, never to the client."""
    request_id = str(uuid.uuid4())
    log.info("mcpmeter: proxy error %d %s: %s", status_code, request_id, message)
    spec = ERRORS["proxy_error"]
    body = json.dumps({"error": spec.code, "message": spec.message, "request_id": request_id}).encode()
    return http.Response.make(status_code, body, {
        "Server": "mcpmeter", "Content-Type": "application/json",
        "X-Mcpmeter-Request-Id": request_id, "X-Mcpmeter-Billed": "0"})


def _json_error_body(status_code: int, message: str) -> bytes:
    return _proxy_error(status_code, message).raw_content or b""


def _json_error_response(status_code: int, message: str = "") -> bytes:
    resp = _proxy_error(status_code, message)
    resp.headers["Connection"] = "close"
    return http1.assemble_response(resp)


def answer_failed_flow(flow: http.HTTPFlow, response: http.Response) -> None:
    """Have the client receive `response` when this flow's upstream failure is reported."""
    if flow.request.is_http2:
        stream_id = _h2_streams.pop(flow, None)
        if stream_id is not None:
            _pending_h2[(flow.client_conn.id, stream_id)] = response
        return  # no stream known (a kill in requestheaders): the stream is reset
    response.headers["Connection"] = "close"
    response.headers["Content-Length"] = str(len(response.raw_content or b""))
    _pending[flow.client_conn.id] = http1.assemble_response(response)


def forget(flow: http.HTTPFlow) -> None:
    _pending.pop(flow.client_conn.id, None)
    stream_id = _h2_streams.pop(flow, None)
    if stream_id is not None:
        _pending_h2.pop((flow.client_conn.id, stream_id), None)


def _connection_handler(flow: http.HTTPFlow) -> Any:
    """mitmproxy's handler of the flow's client connection (it holds its server connections), or None."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(flow.client_conn.id) if proxyserver else None


def abort_upstream(flow: http.HTTPFlow) -> bool:
    """Close the server connection(s) this flow is using or opening. True if one was closed."""
    handler = _connection_handler(flow)
    if handler is None:
        return False
    target = (flow.request.host, flow.request.port)
    closed = False
    for conn in list(handler.transports):
        # While connecting, the flow does not hold its server connection yet: find it by address.
        # HTTP/1 clients have one request in flight per connection, so the match is this flow's.
        # An HTTP/2 client's other streams hold their own connections to the same upstream once
        # connected: only a connection still being opened can be this flow's.
        if not isinstance(conn, Server):
            continue
        if conn is flow.server_conn or (conn.address == target and not (flow.request.is_http2 and conn.connected)):
            handler.close_connection(conn)
            closed = True
    return closed


# Upstream connections -> when their last answer came in whole (weak: gone with the connection).
_answered_at: weakref.WeakKeyDictionary[Server, float] = weakref.WeakKeyDictionary()


def upstream_answered(flow: http.HTTPFlow) -> None:
    """The flow's answer came in whole: its upstream connection is idle from now."""
    conn = flow.server_conn
    if conn is not None and conn.connected:
        _answered_at[conn] = time.monotonic()


def close_idle_upstream(flow: http.HTTPFlow, idle_seconds: float) -> bool:
    """Before a request is forwarded: close the client's kept-alive connection to its upstream if it has
    been idle longer than `idle_seconds`, so mitmproxy opens a new one. A server closes idle connections
    on its own clock; a request written the moment it does is lost (a 502, refunded, and a failed call
    for the consumer), and mitmproxy retries nothing. HTTP/1 clients only: one request in flight per
    client connection, so an idle connection of theirs has no other flow on it. True if one was closed."""
    if idle_seconds <= 0 or flow.request.is_http2:
        return False
    handler = _connection_handler(flow)
    if handler is None:
        return False
    target, now, closed = (flow.request.host, flow.request.port), time.monotonic(), False
    for conn in list(handler.transports):
        if isinstance(conn, Server) and conn.address == target and conn.connected and conn.alpn != b"h2":
            answered = _answered_at.get(conn)
            if answered is not None and now - answered > idle_seconds:
                handler.close_connection(conn)
                closed = True
    return closed


def request_sent(flow: http.HTTPFlow) -> bool:
    """Whether mitmproxy sent the flow's request upstream. It opens (or reuses) the upstream connection
    after the `request` hook and writes at once; until then the flow's server connection is the
    reverse-mode placeholder, never opened (connection_strategy=lazy)."""
    return flow.server_conn is not None and flow.server_conn.timestamp_start is not None


def client_gone(flow: http.HTTPFlow) -> bool:
    """Whether the flow failed because the client went away (as opposed to the upstream): its connection
    closed, or (HTTP/2) its stream reset by the client."""
    msg = flow.error.msg if flow.error else ""
    return ("Client disconnected" in msg or flow in _client_failed
            or not (flow.client_conn.state & ConnectionState.CAN_WRITE))


# --- request bodies read with a ceiling, whatever their framing -----------------------------------

# flow -> (limit, what makes the answer to send when the body passes it, the budget of all bodies being
# read, what makes the answer when that is spent). Weak: gone with the flow, as long as the values hold no
# reference to the flow (a closure over it would keep every flow alive).
_Refuse = Callable[[http.HTTPFlow, int], http.Response]
_body_limits: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[int, _Refuse, int, _Refuse]] = (
    weakref.WeakKeyDictionary())


def _http_layer(stream: HttpStream) -> Any:
    """The HTTP layer a stream belongs to (its client connection's), found in its context's layer stack."""
    return next((layer for layer in reversed(stream.context.layers) if isinstance(layer, _layers.http.HttpLayer)), None)


def _close_client(owner: Any, layer: Any) -> Callable[[], None] | None:
    """What closes the connection a stalled request body comes on, if every request on it is still being
    read (an HTTP/2 client's other calls may be forwarded, paid for: they must not fail with it)."""
    if not isinstance(owner, http.HTTPFlow) or layer is None:
        return None
    flow, handler = owner, _connection_handler(owner)
    if handler is None or flow.client_conn not in handler.transports or any(
            stream.client_state != stream.state_consume_request_body for stream in layer.streams.values()):
        return None

    def close() -> None:
        log.warning("mcpmeter: closing %s, a request body read too slowly while the bodies being read are at "
                    "max_reading_bytes", flow.client_conn.peername)
        handler.close_connection(flow.client_conn)
    return close


def _close_upstream(owner: Any, layer: Any) -> Callable[[], None] | None:
    """What fails an answer held whole that comes too slowly (its call is refunded, as an upstream failure).
    Other holders (an SSE parser's event, an editor's) are not closed: they are bounded their own way."""
    if not isinstance(owner, http.HTTPFlow):
        return None
    flow = owner

    def close() -> None:
        log.warning("mcpmeter: closing the upstream of %s, an answer read too slowly while the answers held are "
                    "at max_holding_bytes", flow.request.host)
        abort_upstream(flow)
    return close


def limit_request_body(flow: http.HTTPFlow, limit: int, refuse: _Refuse, budget: int, busy: _Refuse) -> None:
    """Stop reading `flow`'s request body once it passes `limit` bytes, and answer `refuse(flow, limit)`;
    or once the bodies being read, all flows together, would pass `budget` bytes, and answer
    `busy(flow, budget)`. The callables must not hold the flow (the entry is weak on the flow only):
    bound methods, say.

    mitmproxy buffers a request body whole before the `request` hook; only a Content-Length
    can be checked earlier. A chunked (or HTTP/2) body has none, so the check is made as
    each piece arrives: the body buffered never passes the limit by more than one read.
    """
    _body_limits[flow] = (limit, refuse, budget, busy)


def _install_request_body_limit() -> None:
    for name in ("state_consume_request_body", "check_killed"):
        if not callable(getattr(HttpStream, name, None)):
            raise RuntimeError(f"mitmproxy internals changed: HttpStream.{name} is missing")
    original = HttpStream.state_consume_request_body

    def state_consume_request_body(self: HttpStream, event: Any) -> Generator[commands.Command, Any, None]:
        bound = _body_limits.get(self.flow) if isinstance(event, RequestData) else None
        if bound is not None:
            limit, refuse, budget, busy = bound
            over = len(self.request_body_buf) + len(event.data) > limit
            if over or not READING.take(self.flow, len(event.data), budget, _http_layer(self)):
                del _body_limits[self.flow]
                READING.release(self.flow)
                self.request_body_buf.clear()
                if self.flow.request.is_http2:  # the stream its answer goes to (no protocol error tells it here)
                    _h2_streams[self.flow] = self.stream_id
                answer_failed_flow(self.flow, refuse(self.flow, limit) if over else busy(self.flow, budget))
                self.flow.kill()
                yield from self.check_killed(True)
                return
        elif not isinstance(event, RequestData):
            READING.release(self.flow)  # the body is whole (or its trailers come): its hook comes next
        yield from original(self, event)

    HttpStream.state_consume_request_body = state_consume_request_body  # type: ignore[method-assign]


# flow -> (the most bytes of its answer mitmproxy may buffer (an answer not streamed), the budget of all
# such answers being read). Weak: gone with the flow.
_answer_limits: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[int, int]] = weakref.WeakKeyDictionary()


def limit_answer_body(flow: http.HTTPFlow, limit: int, budget: int) -> None:
    """Fail `flow` once the answer mitmproxy buffers for it (one not streamed) passes `limit` bytes, or
    the answers being read, all flows together, would pass `budget` bytes.

    mitmproxy holds such an answer whole before the `response` hook, however long. Past the limit the
    upstream connection is closed and the flow fails as an upstream failure: the `error` hook runs
    (nothing reached the client yet: a refund and the gateway's 502)."""
    _answer_limits[flow] = (limit, budget)


def _install_answer_body_limit() -> None:
    if not callable(getattr(HttpStream, "state_consume_response_body", None)):
        raise RuntimeError("mitmproxy internals changed: HttpStream.state_consume_response_body is missing")
    original = HttpStream.state_consume_response_body

    def state_consume_response_body(self: HttpStream, event: Any) -> Generator[commands.Command, Any, None]:
        bound = _answer_limits.get(self.flow) if isinstance(event, ResponseData) else None
        if bound is not None:
            limit, budget = bound
            over = len(self.response_body_buf) + len(event.data) > limit
            if over or not HOLDING.take(self.flow, len(event.data), budget):
                del _answer_limits[self.flow]
                HOLDING.release(self.flow)
                self.response_body_buf.clear()
                yield commands.CloseConnection(self.flow.server_conn)
                why = (f"an answer over {limit} bytes, not streamed" if over else
                       f"answers being read, not streamed, over {budget} bytes in all")
                yield from self.handle_protocol_error(ResponseProtocolError(
                    self.stream_id, why, ErrorCode.GENERIC_SERVER_ERROR))
                return
        elif not isinstance(event, ResponseData):
            HOLDING.release(self.flow)  # the answer is whole (or its trailers come): its hook comes next
        yield from original(self, event)

    HttpStream.state_consume_response_body = state_consume_response_body  # type: ignore[method-assign]


Commands = Generator[commands.Command, Any, None]


def _install_head_limit() -> None:
    if not hasattr(_http1, "ReceiveBuffer"):
        raise RuntimeError("mitmproxy internals changed: _http1.ReceiveBuffer is missing")
    server_read, client_read = _http1.Http1Server.read_headers, _http1.Http1Client.read_headers

    def request_head(self: _http1.Http1Server, event: events.ConnectionEvent) -> Commands:
        yield from server_read(self, event)
        if self.state == self.read_headers and len(self.buf) > MAX_HEAD_BYTES:  # no blank line yet
            self.buf, self.state = _http1.ReceiveBuffer(), self.done
            log.info("mcpmeter: a request head over %d bytes from %s refused", MAX_HEAD_BYTES, self.conn.peername)
            yield commands.SendData(self.conn, _json_error_response(431, "request head too large"))
            yield commands.CloseConnection(self.conn)

    def response_head(self: _http1.Http1Client, event: events.ConnectionEvent) -> Commands:
        yield from client_read(self, event)
        if self.state == self.read_headers and self.stream_id is not None and len(self.buf) > MAX_HEAD_BYTES:
            self.buf, self.state = _http1.ReceiveBuffer(), self.done
            yield commands.CloseConnection(self.conn)
            yield _http1.ReceiveHttp(ResponseProtocolError(
                self.stream_id, f"response head over {MAX_HEAD_BYTES} bytes", ErrorCode.GENERIC_SERVER_ERROR))

    _http1.Http1Server.read_headers = request_head  # type: ignore[method-assign]
    _http1.Http1Client.read_headers = response_head  # type: ignore[method-assign]


class _TrailerDroppingReader(ChunkedReader):
    """mitmproxy's chunked body reader, with the trailer section dropped (RFC 9110 §6.5.1 lets a recipient
    discard it): mitmproxy raises NotImplementedError on an HTTP/1 trailer, which crashes the connection
    (a client's request got no answer; an upstream's answer never reached the client, its call left
    unsettled). The gateway forwards only fields it checked, and MCP carries nothing in trailers."""

    def __call__(self, buf: _http1.ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        event = super().__call__(buf)
        return h11.EndOfMessage() if isinstance(event, h11.EndOfMessage) and event.headers else event


def _install_trailer_drop() -> None:
    original = _http1.make_body_reader

    def make_body_reader(expected_size: int | None) -> Any:
        return _TrailerDroppingReader() if expected_size is None else original(expected_size)

    _http1.make_body_reader = make_body_reader


def _install_buffer_limit() -> None:
    """Bound what an HTTP/1 connection buffers between heads. mitmproxy appends every byte received
    to the connection's buffer; the body readers take data out as it comes, so what stays is a
    chunk-size line or a trailer section not ended yet (held until its CRLF, however long), or, while
    a client waits for its answer, whatever it sends ahead (kept for the next request)."""
    original = _http1.Http1Connection._handle_event

    def handle_event(self: _http1.Http1Connection, event: events.Event) -> Commands:
        yield from original(self, event)
        if self.state == self.read_body and len(self.buf) > MAX_HEAD_BYTES:
            self.buf, self.state = _http1.ReceiveBuffer(), self.done
            message = f"a chunk-size line or trailer section over {MAX_HEAD_BYTES} bytes"
            if isinstance(self, _http1.Http1Server):
                log.info("mcpmeter: %s from %s refused", message, self.conn.peername)
                yield commands.SendData(self.conn, _json_error_response(400, message))
            yield commands.CloseConnection(self.conn)
            assert self.stream_id is not None
            yield _http1.ReceiveHttp(self.ReceiveProtocolError(self.stream_id, message,
                                                              code=self.ReceiveProtocolError.code))
        elif isinstance(self, _http1.Http1Server) and self.state == self.wait and len(self.buf) > MAX_AHEAD_BYTES:
            # As if the client had hung up (mitmproxy's own `wait` on a close): its call goes on as a walk-away.
            self.buf, self.state = _http1.ReceiveBuffer(), self.done
            yield commands.CloseConnection(self.conn)
            yield _http1.ReceiveHttp(RequestProtocolError(
                self.stream_id, f"Client disconnected: over {MAX_AHEAD_BYTES} bytes sent ahead of the answer",
                code=ErrorCode.CLIENT_DISCONNECTED))

    _http1.Http1Connection._handle_event = handle_event  # type: ignore[method-assign]



class _Backlog:
    """What an HTTP/2 connection holds for its peer because the peer's flow-control windows are closed, per
    stream and in all; `room` is set while that is at most MAX_BACKLOG_BYTES."""

    def __init__(self) -> None:
        self.streams: dict[int, int] = {}
        self.total = 0
        self.room = asyncio.Event()
        self.room.set()

    def add(self, stream_id: int, n: int) -> None:
        if n:
            self.streams[stream_id] = self.streams.get(stream_id, 0) + n
            self._changed(n)

    def drop(self, stream_id: int) -> None:
        self._changed(-self.streams.pop(stream_id, 0))

    def _changed(self, n: int) -> None:
        self.total += n
        if self.total > MAX_BACKLOG_BYTES:
            self.room.clear()
        else:
            self.room.set()


# HTTP/2 connections (both sides) -> their backlog; client connection ids -> their HTTP/2 connection's.
_backlogs: weakref.WeakKeyDictionary[Any, _Backlog] = weakref.WeakKeyDictionary()
_client_backlogs: weakref.WeakValueDictionary[str, _Backlog] = weakref.WeakValueDictionary()


def _backlog(h2_conn: Any) -> _Backlog:
    if (backlog := _backlogs.get(h2_conn)) is None:
        backlog = _backlogs[h2_conn] = _Backlog()
    return backlog


def _window(h2_conn: Any, stream_id: int) -> int | None:
    """What the peer lets be sent on the stream now (None: the stream is gone)."""
    try:
        return int(h2_conn.local_flow_control_window(stream_id))
    except Exception:
        return None


class _PacedReader:
    """An upstream connection's reader that reads nothing while its client holds a full backlog."""

    def __init__(self, reader: asyncio.StreamReader, client_id: str) -> None:
        self.reader, self.client_id = reader, client_id

    async def read(self, n: int = -1) -> bytes:
        while (backlog := _client_backlogs.get(self.client_id)) is not None and not backlog.room.is_set():
            await backlog.room.wait()
        return await self.reader.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


def _install_h2_backlog() -> None:
    """Count what a BufferedH2Connection buffers (each change O(1): from the stream's window before and after
    sending), and pace the client's upstream connections by it."""
    h2c = _http_h2.BufferedH2Connection
    send_data, window_updated, reset_stream, receive_data = (
        h2c.send_data, h2c.stream_window_updated, h2c.reset_stream, h2c.receive_data)

    def send(self: Any, stream_id: int, data: bytes, end_stream: bool = False, pad_length: None = None) -> None:
        if len(data) > self.max_outbound_frame_size:  # split into frames, each sent through this function
            return send_data(self, stream_id, data, end_stream, pad_length)
        before = _window(self, stream_id)
        send_data(self, stream_id, data, end_stream, pad_length)
        if stream_id in self.stream_buffers and before is not None:
            after = _window(self, stream_id)
            _backlog(self).add(stream_id, len(data) - (before - after if after is not None else 0))

    def updated(self: Any, stream_id: int) -> bool:
        before = _window(self, stream_id)
        sent = bool(window_updated(self, stream_id))
        if (backlog := _backlogs.get(self)) is not None and stream_id in backlog.streams:
            after = _window(self, stream_id)
            if stream_id not in self.stream_buffers or before is None or after is None:
                backlog.drop(stream_id)
            else:
                backlog.add(stream_id, after - before)
        return sent

    def reset(self: Any, stream_id: int, error_code: int = 0) -> None:
        reset_stream(self, stream_id, error_code)
        if (backlog := _backlogs.get(self)) is not None:
            backlog.drop(stream_id)

    def receive(self: Any, data: Any) -> Any:
        received = receive_data(self, data)
        if (backlog := _backlogs.get(self)) is not None and backlog.streams:
            for event in received:  # a stream reset or the connection ended: its buffers are dropped
                if isinstance(event, h2_events.StreamReset):
                    backlog.drop(event.stream_id)
                elif isinstance(event, h2_events.ConnectionTerminated):
                    for stream_id in list(backlog.streams):
                        backlog.drop(stream_id)
        return received

    h2c.send_data, h2c.stream_window_updated, h2c.reset_stream, h2c.receive_data = (  # type: ignore[method-assign]
        send, updated, reset, receive)
    handle_connection = server.ConnectionHandler.handle_connection

    async def paced(self: server.ConnectionHandler, connection: Any) -> None:
        io = self.transports.get(connection)
        if isinstance(connection, Server) and io is not None and isinstance(io.reader, asyncio.StreamReader):
            io.reader = _PacedReader(io.reader, self.client.id)  # type: ignore[assignment]
        await handle_connection(self, connection)

    server.ConnectionHandler.handle_connection = paced  # type: ignore[method-assign]


def _carrying(layer: Any, conn: Any) -> bool:
    """Whether an upstream connection is being opened for a call, or carries one in flight (O(streams))."""
    return conn in layer.waiting_for_establishment or any(
        (flow := getattr(stream, "flow", None)) is not None and flow.live and flow.server_conn is conn
        for stream in layer.streams.values())


def _install_connection_per_call() -> None:
    """One upstream connection per call in flight: an idle one is reused, a busy HTTP/2 one is not shared."""
    original = _layers.http.HttpLayer.get_connection

    def get_connection(self: Any, event: Any, *, reuse: bool = True) -> Commands:
        matches = event.connection_spec_matches
        event.connection_spec_matches = lambda conn: matches(conn) and not _carrying(self, conn)
        return (yield from original(self, event, reuse=reuse))

    _layers.http.HttpLayer.get_connection = get_connection  # type: ignore[method-assign]
