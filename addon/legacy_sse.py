"""The legacy HTTP+SSE transport (MCP 2024-11-05) behind `/<slug>`. Pure.

The client GETs an event stream whose first event, `endpoint`, names the URL to POST
messages to; each POST is answered 202 and its result arrives later on the GET stream.
Behind the gateway the endpoint must point back under `/<slug>/`, so the stream's first
event is rewritten, and subpaths of a `sse` listing go under the directory of its URL
(`http://h/sse` + `messages/` = `http://h/messages/`), by concatenation after the checks of
`paths` (a client's subpath is never resolved as a relative link).
"""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

from . import paths

_ENDPOINT_EVENT = re.compile(rb"event: ?endpoint\r?\ndata: ?([^\r\n]*)(\r?\n)")
MAX_HELD_BYTES = 64 * 1024


def target_url(upstream_url: str, subpath: str, query: str) -> str:
    """The directory of the listing URL plus the subpath (no subpath: the listing URL), plus the query.

    Built by concatenation and checked (paths.InvalidPath), never resolved from client data."""
    return paths.target_url(upstream_url, "sse", subpath, query)


def gateway_endpoint(endpoint: str, upstream_url: str, slug: str) -> str | None:
    """The upstream's POST endpoint as a path under /<slug>/, or None if it lies outside the listing.

    The endpoint is the upstream's, so it is resolved as its clients would; the route it becomes
    must then pass the same checks as a client's path, and lead back to the same upstream URL."""
    absolute = urlsplit(urljoin(upstream_url, endpoint))
    base = paths.base_of(upstream_url, "sse")
    if (absolute.scheme, absolute.netloc) != (base.scheme, base.netloc) or absolute.fragment:
        return None
    if not absolute.path.startswith(base.prefix) or absolute.path == base.prefix:
        return None  # outside the listing's directory, or its directory itself (not routable)
    subpath = absolute.path[len(base.prefix):]
    try:
        if paths.target_url(upstream_url, "sse", subpath, absolute.query) != absolute.geturl():
            return None
        paths.session_identity(subpath, absolute.query)  # one session id at most
    except paths.InvalidPath:
        return None
    route = f"/{slug}/{subpath}"
    return f"{route}?{absolute.query}" if absolute.query else route


class EndpointRewriter:
    """Holds the stream back until its `endpoint` event has passed, rewritten; then passes all."""

    def __init__(self, upstream_url: str, slug: str) -> None:
        self.upstream_url, self.slug = upstream_url, slug
        self.route: str | None = None  # the rewritten endpoint: where this session's POSTs arrive
        self._held = b""
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return chunk
        self._held += chunk
        match = _ENDPOINT_EVENT.search(self._held)
        if match is None:
            if chunk and len(self._held) < MAX_HELD_BYTES:
                return b""
            self._done = True  # no endpoint event to rewrite: pass the stream through as it is
            held, self._held = self._held, b""
            return held
        self._done = True
        route = gateway_endpoint(match.group(1).decode("utf-8", "replace"), self.upstream_url, self.slug)
        held, self._held = self._held, b""
        if route is None:
            return held
        self.route = route
        return held[: match.start(1)] + route.encode() + held[match.end(1):]
