"""Prices and receipts in `_meta`, end to end through the official MCP SDK client (both backends)."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import eventually, slug
from tests.test_e2e_mcp_client import echo_listing, gateway_settings  # noqa: F401  (fixtures)


async def test_sdk_client_sees_prices_and_receipts_even_on_a_refunded_stream(
        gateway: Gateway, backend: Backend, echo_listing: Callable[..., str]) -> None:  # noqa: F811
    s = echo_listing(price=1000, tool_prices={"slow_count": 5000}, free=1)
    c = backend.add_consumer(credit=100_000)
    answers: list[httpx2.Response] = []

    async def seen(response: httpx2.Response) -> None:
        if response.request.method == "POST":
            answers.append(response)

    http = httpx2.AsyncClient(headers=c.auth, timeout=httpx2.Timeout(10.0, read=30.0),
                              event_hooks={"response": [seen]})
    mcp = Client(streamable_http_client(gateway.url + f"/{s}", http_client=http))
    async with http, mcp:
        tools = {t.name: t.meta["mcpmeter/price"] for t in (await mcp.list_tools()).tools}
        assert tools["slow_count"] == {"micro_cents": 5000, "free_calls_left": 1, "currency": "USD micro-cents"}
        assert tools["echo"]["micro_cents"] == 1000 and tools["fail"]["micro_cents"] == 1000  # the default

        free = (await mcp.call_tool("echo", {"text": "a"})).meta["mcpmeter/receipt"]
        assert free["decision"] == "free" and free["amount_micro_cents"] == 0
        assert free["balance_micro_cents"] == 100_000

        result = await mcp.call_tool("echo", {"text": "b"})
        billed = result.meta["mcpmeter/receipt"]
        assert billed["decision"] == "billed" and billed["reason"] == "result"
        assert billed["amount_micro_cents"] == 1000 and billed["balance_micro_cents"] == 99_000
        assert billed["request_id"] == answers[-1].headers["X-Mcpmeter-Request-Id"]

        result = await mcp.call_tool("fail", {})  # a JSON answer, refunded
        assert result.is_error and result.meta["mcpmeter/receipt"]["decision"] == "refunded"
        assert result.meta["mcpmeter/receipt"]["balance_micro_cents"] == 99_000
    await eventually(lambda: len(backend.usage(c)) == 3)
    assert backend.balance(c.user_id) == 99_000


async def test_sdk_client_gets_the_receipt_of_a_refunded_sse_stream(
        gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug()
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    answers: list[httpx2.Response] = []

    async def seen(response: httpx2.Response) -> None:
        if response.request.method == "POST":
            answers.append(response)

    http = httpx2.AsyncClient(headers=c.auth, timeout=httpx2.Timeout(10.0, read=30.0),
                              event_hooks={"response": [seen]})
    async with http, Client(streamable_http_client(gateway.url + f"/{s}", http_client=http)) as mcp:
        # Progress, then `isError: true`, on an SSE stream whose headers left saying "billed 1000".
        result = await mcp.call_tool("sse_tool_error", {})
        streamed = answers[-1]
        assert result.is_error and streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers["X-Mcpmeter-Billed"] == "1000"
        receipt = result.meta["mcpmeter/receipt"]  # the only place the final billing can reach the client
        assert receipt == {"request_id": streamed.headers["X-Mcpmeter-Request-Id"], "decision": "refunded",
                           "reason": "tool_error", "amount_micro_cents": 0, "refunded_micro_cents": 1000,
                           "balance_micro_cents": 10_000}

        # A JSON-RPC error inside the stream: the receipt is in error.data, which the SDK hands over.
        with pytest.raises(MCPError) as failed:
            await mcp.call_tool("sse_rpc_error", {})
        assert answers[-1].headers["X-Mcpmeter-Billed"] == "1000"
        receipt = failed.value.data["mcpmeter/receipt"]
        assert receipt["decision"] == "refunded" and receipt["reason"] == "rpc_error"
        assert receipt["balance_micro_cents"] == 10_000
    await eventually(lambda: len(backend.usage(c)) == 2)
    assert backend.balance(c.user_id) == 10_000
