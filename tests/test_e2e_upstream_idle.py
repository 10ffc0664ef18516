"""Kept-alive upstream connections idle past `upstream_idle_seconds` are not reused.

A server closes idle connections on its own clock (uvicorn, which the MCP Python SDK serves with,
after 5 s). A call the gateway writes on such a connection the moment the server closes it never
reaches the server: mitmproxy answers 502 and the meter refunds it, a failed call for the consumer
and a lost one for the publisher (measured: 2 in 36 pairs of calls 4.94-4.96 s apart). The gateway
therefore opens a new connection when the old one has been idle longer than the limit, below the
usual server timeouts. Seen from the upstream: which client port each call came from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from tests import fault_server
from tests.backends import Backend
from tests.demo_servers import serve_in_thread
from tests.test_e2e_gateway import MCP_HEADERS, call, eventually, slug

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"upstream_idle_seconds": 0.6}


@pytest.fixture(scope="module")
def ports_upstream() -> Iterator[tuple[str, list[int]]]:
    """The fault upstream, noting the client port of each POST it is sent (its keep-alive: 120 s)."""
    ports: list[int] = []
    app = fault_server.build_app()

    async def noting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            ports.append(scope["client"][1])
        await app(scope, receive, send)

    url, stop = serve_in_thread(noting)
    yield url, ports
    stop()


async def test_an_idle_upstream_connection_is_replaced_and_a_busy_one_reused(
        gateway: Any, backend: Backend, ports_upstream: tuple[str, list[int]]) -> None:
    url, ports = ports_upstream
    s = slug("idle")
    backend.add_listing(s, url + "/mcp", price=10)
    c = backend.add_consumer(credit=1_000)
    # One client connection, kept alive as long as the test runs (httpx's own expiry is 5 s).
    limits = httpx2.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=600)
    with httpx2.Client(timeout=20, limits=limits) as client:
        def paid() -> int:
            n = len(ports)
            r = client.post(f"{gateway.url}/{s}", content=json.dumps(call("ok")).encode(),
                            headers={**MCP_HEADERS, **c.auth})
            assert r.status_code == 200, r.text
            assert len(ports) == n + 1
            return ports[-1]

        first = paid()
        assert paid() == first  # back to back: the same upstream connection
        time.sleep(0.3)
        assert paid() == first  # idle less than the limit: still reused
        time.sleep(1.0)
        fresh = paid()  # idle past the limit: a new connection
        assert fresh != first
        assert paid() == fresh
    # A billed answer's usage row is written just after the answer leaves.
    assert await eventually(lambda: [u["billed"] for u in backend.usage(c)] == [10] * 5)
