"""The legacy HTTP+SSE transport (MCP 2024-11-05) behind `/<slug>`. Pure, but for a log line when a stream is dropped.

The client GETs an event stream whose first event, `endpoint`, names the URL to POST
messages to; each POST is answered 202 and its result arrives later on the GET stream.
Behind the gateway the endpoint must point back under `/<slug>/`, so the stream's first
event is rewritten, and subpaths of a `sse` listing go under the directory of its URL
(`http://h/sse` + `messages/` = `http://h/messages/`), by concatenation after the checks of
`paths` (a client's subpath is never resolved as a relative link).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urljoin

from . import paths

MAX_HELD_BYTES = 64 * 1024
log = logging.getLogger("mcpmeter")


def target_url(upstream_url: str, subpath: str, query: str) -> str:
    """The directory of the listing URL plus the subpath (no subpath: the listing URL), plus the query.

    Built by concatenation and checked (paths.InvalidPath), never resolved from client data."""
    return paths.target_url(upstream_url, "sse", subpath, query)


def gateway_endpoint(endpoint: str, upstream_url: str, slug: str) -> str | None:
    """The upstream's POST endpoint as a path under /<slug>/, or None if it lies outside the listing.

    The endpoint is the upstream's, so it is resolved as its clients would; the route it becomes
    must then pass the same checks as a client's path, and lead back to the same upstream URL."""
    route = paths.gateway_route(urljoin(upstream_url, endpoint), upstream_url, "sse", slug)
    if route is None:
        return None
    subpath, _, query = route.removeprefix(f"/{slug}/").partition("?")
    try:
        paths.session_identity(subpath, query)  # one session id at most
    except paths.InvalidPath:
        return None
    return route


class EndpointRewriter:
    """Passes a legacy session's GET stream on, with its first `endpoint` event's data rewritten
    to the gateway route (`route`).

    Until that event has passed, the stream is read as server-sent events, as MCP clients read it
    (LF, CRLF or CR line ends split anywhere, fields in any order, comments, multi-line data, the
    last `event:` field naming the type): complete events before it pass unchanged, the event being
    received is held, at most MAX_HELD_BYTES. The endpoint event goes out with the same lines and
    line ends, its `data` lines replaced by one `data: <route>` line. After it, all passes, line by
    line as it comes, except that a later event's `event: endpoint` line is renamed
    (`RENAMED_ENDPOINT`, a type clients ignore): the session has one endpoint, the gateway's.

    Fails closed: when the endpoint lies outside the listing, the event being received outgrows
    MAX_HELD_BYTES, or the stream ends before an endpoint, the held bytes and the rest of the stream
    are dropped (`closed`): the client sees no endpoint and nothing more until the upstream ends the
    stream, so the upstream's own address never reaches it and no POST can bypass the meter.

    `feed` returns the chunks to send now: `[]` when there is nothing to send, never `b""`, which
    mitmproxy would send as an empty chunk (the `0\\r\\n\\r\\n` that ends a chunked answer early).
    """

    def __init__(self, upstream_url: str, slug: str) -> None:
        self.upstream_url, self.slug = upstream_url, slug
        self.route: str | None = None  # the rewritten endpoint: where this session's POSTs arrive
        self.closed = False  # failed closed: nothing more of this stream reaches the client
        self._held = bytearray()  # from the first byte of the event being received
        self._line_start = 0  # in _held: where the line being received starts
        self._cr_pending = False  # the last chunk ended with a CR: a LF starting the next belongs to it
        self._line_head = b""  # after the endpoint: a line start that may yet be `event: endpoint`
        self._mid_line = False  # after the endpoint: inside a line that is not

    def feed(self, chunk: bytes) -> list[bytes]:
        """A chunk of the upstream's stream (b"": its end) in, the chunks to send the client now out."""
        if self.closed:
            return []
        if self.route is not None:
            return self._pass(chunk)
        if not chunk:
            return self._close("the stream ended before its endpoint event")
        out = bytearray()
        held = self._held
        if self._cr_pending and chunk[:1] == b"\n":  # the LF of a CRLF split across two chunks
            if held:
                held += b"\n"
                self._line_start += 1
            else:
                out += b"\n"  # it ends the blank line of an event that has gone out
            chunk = chunk[1:]
        self._cr_pending = False
        searched = len(held)  # no line end in _held before this
        held += chunk
        event_start, start = 0, self._line_start
        lf = cr = -2  # the next LF / CR at or after start; -1 none, -2 not looked for yet
        while True:
            at = max(start, searched)
            if lf < at and lf != -1:
                lf = held.find(b"\n", at)
            if cr < at and cr != -1:
                cr = held.find(b"\r", at)
            if lf == -1 and cr == -1:
                break
            end = lf if cr == -1 or (lf != -1 and lf < cr) else cr
            nxt = end + 1
            if held[end] == 0x0D:
                if nxt < len(held):
                    nxt += held[nxt] == 0x0A
                else:
                    self._cr_pending = True
            if end == start:  # a blank line: the event ends here
                event = self._event(bytes(held[event_start:nxt]))
                if event is None:
                    return self._close("its endpoint lies outside the listing")
                out += event
                event_start = nxt
                if self.route is not None:  # the endpoint has passed: so does the rest
                    rest = bytes(held[nxt:])
                    held.clear()
                    return [bytes(out) + b"".join(self._pass(rest) if rest else ())]
            start = nxt
        del held[:event_start]
        self._line_start = start - event_start
        if len(held) > MAX_HELD_BYTES:
            return self._close(f"an event before its endpoint exceeds {MAX_HELD_BYTES} bytes")
        return [bytes(out)] if out else []

    def _event(self, raw: bytes) -> bytes | None:
        """A complete event as it goes out: an endpoint event rewritten (None: it cannot be)."""
        lines = _LINE.findall(raw)  # (content, line end) pairs; the last is the blank line
        kind, data = b"", []
        for line, _ in lines:
            name, value = _field(line)
            if name == b"event":
                kind = value
            elif name == b"data":
                data.append(value)
        if kind != b"endpoint":
            return raw
        if not data:  # never dispatched by WHATWG clients (httpx would, as the stream's URL): dropped
            return b""
        route = gateway_endpoint(b"\n".join(data).decode("utf-8", "replace"), self.upstream_url, self.slug)
        if route is None:
            return None
        self.route = route
        out, placed = bytearray(), False
        for line, end in lines[:-1]:
            if _field(line)[0] != b"data":
                out += line + end
            elif not placed:  # the first data line carries the route, the others go
                out += b"data: " + route.encode() + end
                placed = True
        return bytes(out + lines[-1][0] + lines[-1][1])

    def _pass(self, chunk: bytes) -> list[bytes]:
        """After the endpoint: the chunk as it goes out, a later endpoint event's type renamed."""
        data = self._line_head + chunk
        self._line_head = b""
        out = bytearray()
        pos, n = 0, len(data)
        while pos < n:
            if self._cr_pending:
                self._cr_pending = False
                if data[pos] == 0x0A:  # the LF of a CRLF split across two chunks
                    out.append(0x0A)
                    pos += 1
                    continue
            eol = _EOL.search(data, pos)
            end = eol.start() if eol else n
            line = data[pos:end]
            if not self._mid_line:
                if eol is None and any(form.startswith(line) for form in _ENDPOINT_TYPE_LINES):
                    self._line_head = line  # it may yet be one: held until its end shows (a few bytes)
                    break
                if line in _ENDPOINT_TYPE_LINES:
                    line = RENAMED_ENDPOINT
            out += line
            if eol is None:
                self._mid_line = True
                break
            self._mid_line = False
            out.append(data[end])
            pos = end + 1
            if data[end] == 0x0D:
                if pos == n:
                    self._cr_pending = True
                elif data[pos] == 0x0A:
                    out.append(0x0A)
                    pos += 1
        return [bytes(out)] if out else []

    def cut(self, why: str = "the meter watching it stopped") -> None:
        """Nothing more of this stream reaches the client (its meter stopped: see LegacySessions.cut; or
        its editor cut it: LegacySessions._sever)."""
        self._close(why)

    def _close(self, why: str) -> list[bytes]:
        log.warning("mcpmeter: legacy SSE stream to %s dropped: %s", self.slug, why)
        self.closed = True
        self._held.clear()
        return []


_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")
_EOL = re.compile(rb"[\r\n]")
_ENDPOINT_TYPE_LINES = (b"event: endpoint", b"event:endpoint")
RENAMED_ENDPOINT = b"event: mcpmeter-ignored-endpoint"
_BOM = b"\xef\xbb\xbf"


def _field(line: bytes) -> tuple[bytes, bytes]:
    """An event-stream line's field name and value (a comment's name is empty)."""
    name, _, value = line.partition(b":")
    # The stream's first line may start with a byte order mark that clients strip; strip it anywhere.
    return name.removeprefix(_BOM), value[1:] if value[:1] == b" " else value
