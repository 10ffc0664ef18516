"""Stand-ins for mitmproxy's proxyserver addon, for tests of compat.abort_upstream without sockets."""

from __future__ import annotations

from typing import Any


class FakeHandler:
    """A connection handler: its open transports, and which of them were closed."""

    def __init__(self, *transports: Any) -> None:
        self.transports = {t: None for t in transports}
        self.closed: list[Any] = []

    def close_connection(self, conn: Any) -> None:
        self.closed.append(conn)


class FakeProxyserver:
    """Stands in for mitmproxy's proxyserver addon: client connection id -> connection handler."""

    name = "proxyserver"

    def __init__(self) -> None:
        self.connections: dict[str, FakeHandler] = {}
