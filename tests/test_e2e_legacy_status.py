"""What a legacy HTTP+SSE (2024-11-05) call is recorded with (issue 11 item 6).

Each POST is answered 202 (accepted); the call's answer arrives on the session's GET stream.
The usage row records how the call was answered (200, as streamable HTTP does), not the 202.
"""

from __future__ import annotations

from mcp import Client
from mcp.client.sse import sse_client

from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import eventually, slug
from tests.test_e2e_legacy_sse import legacy_url  # noqa: F401  (a fixture: the SDK's legacy server)


async def test_answered_legacy_calls_are_recorded_as_answered_not_202(
        gateway: Gateway, backend: Backend, legacy_url: str) -> None:
    s = slug("legacy-status")
    backend.add_listing(s, f"{legacy_url}/legacy/sse", price=1000, transport="sse")
    c = backend.add_consumer(credit=10_000)
    async with Client(sse_client(f"{gateway.url}/{s}", headers=c.auth)) as mcp:
        assert not (await mcp.call_tool("echo", {"text": "hello"})).is_error
        assert (await mcp.call_tool("fail", {})).is_error
    await eventually(lambda: len(backend.usage(c)) == 2)
    assert sorted((u["tool_name"], u["status"], u["billed"]) for u in backend.usage(c)) == [
        ("echo", 200, 1000), ("fail", 200, 0)]
    journal = backend.query("SELECT tool_name, status, refunded, reason FROM mcpmeter_calls WHERE user_id = %s"
                            " ORDER BY tool_name", (c.user_id,))
    assert [(t, int(st), int(r), why) for t, st, r, why in journal] == [
        ("echo", 200, 0, "result"), ("fail", 200, 1, "tool_error")]
    assert backend.balance(c.user_id) == 9_000
