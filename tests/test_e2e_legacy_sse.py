"""The legacy HTTP+SSE transport (2024-11-05) through the gateway, with the SDK's own server and client.

POSTs are answered 202 and their results arrive on the session's GET stream; the gateway
rewrites the stream's `endpoint` under /<slug>/ and settles each call from that stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from mcp import Client
from mcp.client.sse import sse_client
from starlette.applications import Starlette
from starlette.routing import Mount

from demos import echo
from tests.refusals import refusal
from tests.backends import Backend
from tests.demo_servers import serve_in_thread
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import call, eventually, post, slug


@pytest.fixture(scope="module")
def legacy_url() -> Iterator[str]:
    """The echo demo served with the legacy SSE transport: GET {url}/legacy/sse."""
    app = Starlette(routes=[Mount("/legacy", app=echo.create_server().sse_app())])
    url, stop = serve_in_thread(app)
    yield url
    stop()


async def test_legacy_sse_calls_are_billed_and_refunded_from_the_stream(
        gateway: Gateway, backend: Backend, legacy_url: str) -> None:
    s = slug("legacy")
    backend.add_listing(s, f"{legacy_url}/legacy/sse", price=1000, transport="sse")
    c = backend.add_consumer(credit=10_000)
    async with Client(sse_client(f"{gateway.url}/{s}", headers=c.auth)) as mcp:
        for i in range(3):
            result = await mcp.call_tool("echo", {"text": f"over the old transport {i}"})
            assert not result.is_error and result.content[0].text == f"over the old transport {i}"
            result = await mcp.call_tool("fail", {})
            assert result.is_error
    await eventually(lambda: len(backend.usage(c)) == 6)
    assert sorted((u["tool_name"], u["billed"]) for u in backend.usage(c)) == [("echo", 1000)] * 3 + [("fail", 0)] * 3
    assert backend.balance(c.user_id) == 7_000


async def test_legacy_session_route_belongs_to_its_key(gateway: Gateway, backend: Backend, legacy_url: str) -> None:
    s = slug("legacy")
    backend.add_listing(s, f"{legacy_url}/legacy/sse", price=1000, transport="sse")
    owner, other = backend.add_consumer(credit=10_000), backend.add_consumer(credit=10_000)
    routes: list[str] = []
    async with Client(sse_client(f"{gateway.url}/{s}", headers=owner.auth,
                                 on_session_created=routes.append)) as mcp:
        await mcp.list_tools()
        route = await _session_route(gateway, s, owner)
        r = await post(gateway, route, call("echo", {"text": "x"}), other)
        assert r.status_code == 403 and refusal(r)["error"] == "session_forbidden"
    assert backend.balance(other.user_id) == 10_000


async def _session_route(gateway: Gateway, s: str, consumer: object) -> str:
    """Open a second stream for the owner just to learn what a rewritten endpoint looks like."""
    import httpx2

    async with httpx2.AsyncClient(timeout=10) as http:
        async with http.stream("GET", f"{gateway.url}/{s}", headers=consumer.auth) as r:  # type: ignore[attr-defined]
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    route = line[5:].strip()
                    assert route.startswith(f"/{s}/"), route
                    return route
    raise AssertionError("no endpoint event")


async def test_a_legacy_call_refunded_at_its_timeout_gets_no_result(
        gateway: Gateway, backend: Backend, legacy_url: str) -> None:
    """A tool made to outlast the listing's timeout: refunded, and its answer, when it comes on the
    session's stream, is not delivered (else slowing a tool down would get results free)."""
    s = slug("legacy")
    backend.add_listing(s, f"{legacy_url}/legacy/sse", price=1000, transport="sse", timeout=1)
    c = backend.add_consumer(credit=10_000)
    async with Client(sse_client(f"{gateway.url}/{s}", headers=c.auth)) as mcp:
        with pytest.raises(TimeoutError):  # the answer comes at 2 s, on the still open stream: blanked
            await asyncio.wait_for(mcp.call_tool("sleep", {"seconds": 2}), 4)
        result = await mcp.call_tool("echo", {"text": "after"})  # the session still works
        assert not result.is_error and result.content[0].text == "after"
    await eventually(lambda: len(backend.usage(c)) == 2)
    assert sorted((u["tool_name"], u["billed"]) for u in backend.usage(c)) == [("echo", 1000), ("sleep", 0)]
    assert backend.balance(c.user_id) == 9_000
