"""End to end, both backends: tasks settle on their terminal state; input_required rounds cost one call
(issue 11 items 5 and 3). Raw JSON-RPC over HTTP: the mcp 2.3 SDK client runs neither tasks nor
input_required retries for a caller; tests/deferred_server.py is the upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ElicitRequest, ElicitRequestFormParams, ElicitResult, InputRequiredResult

from tests import deferred_server
from tests.backends import Backend, TestConsumer
from tests.demo_servers import serve_in_thread
from tests.refusals import refusal
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import MCP_HEADERS, eventually, slug

PRICE = 1000


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    # Short limits, to watch the sweeper: a plain stale call would be refunded at 4 s, a held task
    # only at task_settle_seconds (10 s), a held round billed at round_settle_seconds (6 s).
    return {"max_upstream_timeout_ms": 3000, "stale_call_seconds": 4, "task_settle_seconds": 10,
            "round_settle_seconds": 6}


@pytest.fixture(scope="module")
def deferred_url() -> Iterator[str]:
    url, stop = serve_in_thread(deferred_server.build_app())
    yield url
    stop()


def sdk_rounds_server() -> MCPServer:
    """The official SDK's own multi-round tool: asks for a name, then greets it (or fails)."""
    server = MCPServer("rounds")

    @server.tool()
    async def greet(ctx: Context) -> str | InputRequiredResult:
        if not ctx.input_responses:
            schema = {"type": "object", "properties": {"name": {"type": "string"}}}
            return InputRequiredResult(input_requests={"who": ElicitRequest(params=ElicitRequestFormParams(
                message="Your name?", requested_schema=schema))}, request_state="asked")
        answer = ctx.input_responses["who"]
        name = answer.content["name"] if isinstance(answer, ElicitResult) and answer.content else "?"
        if name == "fail":
            raise RuntimeError("cannot greet")
        return f"hello {name}"

    return server


@pytest.fixture(scope="module")
def sdk_url() -> Iterator[str]:
    url, stop = serve_in_thread(sdk_rounds_server().streamable_http_app(host="127.0.0.1"))
    yield url
    stop()


class Session:
    def __init__(self, gateway: Gateway, path: str, consumer: TestConsumer) -> None:
        self.url, self.consumer, self.session = gateway.url + path, consumer, ""
        self.ids = iter(range(1, 10_000))

    async def send(self, method: str, params: dict[str, Any]) -> httpx2.Response:
        headers = {**MCP_HEADERS, **self.consumer.auth}
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        message = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}
        async with httpx2.AsyncClient(timeout=20) as client:
            r = await client.post(self.url, content=json.dumps(message).encode(), headers=headers)
        if method == "initialize":
            self.session = r.headers["Mcp-Session-Id"]
        return r

    async def open(self) -> Session:
        await self.send("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                       "clientInfo": {"name": "t", "version": "1"}})
        return self

    async def task(self, tool: str, **arguments: Any) -> str:
        r = await self.send("tools/call", {"name": tool, "arguments": arguments, "task": {"ttl": 60000}})
        assert r.status_code == 200 and r.headers["X-Mcpmeter-Billed"] == str(PRICE), r.text
        return str(r.json()["result"]["task"]["taskId"])


def journal(backend: Backend, c: TestConsumer) -> list[tuple[str, int, str | None, bool]]:
    rows = backend.query("SELECT tool_name, refunded, reason, settled_at FROM mcpmeter_calls WHERE user_id = %s"
                         " ORDER BY created_at, request_id", (c.user_id,))
    return [(t, int(r or 0), why, settled is not None) for t, r, why, settled in rows]


def settled(backend: Backend, c: TestConsumer, n: int) -> Any:
    return lambda: sum(row[3] for row in journal(backend, c)) == n and journal(backend, c)


@pytest.fixture
def listing(backend: Backend, deferred_url: str) -> str:
    s = slug("deferred")
    backend.add_listing(s, f"{deferred_url}/mcp", price=PRICE)
    return f"/{s}"


# --- tasks ----------------------------------------------------------------------------------------


async def test_a_completed_task_is_billed_once_on_its_terminal_state(
        gateway: Gateway, backend: Backend, listing: str) -> None:
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    task_id = await s.task("finish")
    await asyncio.sleep(0.3)
    assert journal(backend, c) == [("finish", 0, "task_pending", False)]  # held, the money claimed
    assert backend.balance(c.user_id) == 9_000
    r = await s.send("tasks/get", {"taskId": task_id})
    assert r.json()["result"]["status"] == "completed"
    r = await s.send("tasks/result", {"taskId": task_id})
    assert r.json()["result"]["content"][0]["text"] == "done"
    assert await eventually(settled(backend, c, 1)) == [("finish", 0, "task_completed", True)]
    assert [(u["tool_name"], u["billed"]) for u in backend.usage(c)] == [("finish", PRICE)]
    assert backend.balance(c.user_id) == 9_000


async def test_a_failed_task_is_refunded_from_tasks_result(gateway: Gateway, backend: Backend, listing: str) -> None:
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    task_id = await s.task("crash")
    r = await s.send("tasks/result", {"taskId": task_id})
    assert "error" in r.json()
    assert await eventually(settled(backend, c, 1)) == [("crash", 1, "task_failed", True)]
    assert backend.balance(c.user_id) == 10_000
    assert [(u["tool_name"], u["billed"]) for u in backend.usage(c)] == [("crash", 0)]


async def test_a_tasks_result_the_upstream_calls_invalid_settles_nothing(
        gateway: Gateway, backend: Backend, listing: str) -> None:
    """This upstream answers a tasks/result for a task still working with -32600 (invalid request):
    that says nothing of the task, which a client could otherwise have refunded at will."""
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    task_id = await s.task("linger")
    r = await s.send("tasks/result", {"taskId": task_id})
    assert r.json()["error"]["code"] == -32600
    await asyncio.sleep(0.5)
    assert journal(backend, c) == [("linger", 0, "task_pending", False)]  # still held, still claimed
    assert backend.balance(c.user_id) == 9_000


async def test_a_cancelled_task_is_refunded(gateway: Gateway, backend: Backend, listing: str) -> None:
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    task_id = await s.task("linger")
    assert (await s.send("tasks/get", {"taskId": task_id})).json()["result"]["status"] == "working"
    assert (await s.send("tasks/cancel", {"taskId": task_id})).json()["result"]["status"] == "cancelled"
    assert await eventually(settled(backend, c, 1)) == [("linger", 1, "task_cancelled", True)]
    assert backend.balance(c.user_id) == 10_000


@pytest.mark.parametrize("order", ["before", "after"])
async def test_a_status_notification_on_the_get_stream_settles(
        gateway: Gateway, backend: Backend, listing: str, order: str) -> None:
    """Whether the task's end passes on the GET stream after its CreateTaskResult is held, or
    before (the answer still on its way to the gateway's response hook)."""
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": s.session, **c.auth}
    seen: list[str] = []

    async def listen() -> None:
        async with httpx2.AsyncClient(timeout=20) as client:
            async with client.stream("GET", s.url, headers=headers) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        seen.append(line)
                        return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.3)
    await s.task("announce", fate="failed", order=order)
    await asyncio.wait_for(listener, 10)
    assert "notifications/tasks/status" in seen[0]
    assert await eventually(settled(backend, c, 1)) == [("announce", 1, "task_failed", True)]
    assert backend.balance(c.user_id) == 10_000


async def test_another_user_can_neither_poll_nor_cancel_the_task(
        gateway: Gateway, backend: Backend, listing: str) -> None:
    owner, other = backend.add_consumer(credit=10_000), backend.add_consumer(credit=10_000)
    mine = await Session(gateway, listing, owner).open()
    task_id = await mine.task("crash")
    theirs = await Session(gateway, listing, other).open()
    for method in ("tasks/get", "tasks/cancel"):  # the careless upstream would answer anyone
        r = await theirs.send(method, {"taskId": task_id})
        assert r.status_code == 403 and refusal(r)["error"] == "task_forbidden", r.text
    await asyncio.sleep(0.5)
    assert journal(backend, owner) == [("crash", 0, "task_pending", False)]
    assert backend.balance(owner.user_id) == 9_000 and backend.balance(other.user_id) == 10_000
    await mine.send("tasks/get", {"taskId": task_id})
    assert await eventually(settled(backend, owner, 1)) == [("crash", 1, "task_failed", True)]
    assert backend.balance(owner.user_id) == 10_000


async def test_a_task_never_seen_ending_outlives_the_stale_sweep_then_is_refunded_as_expired(
        gateway: Gateway, backend: Backend, listing: str) -> None:
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    task_id = await s.task("linger")
    started = time.monotonic()
    await asyncio.sleep(7)  # past stale_call_seconds (4 s) and one sweep: a plain call would be refunded
    assert journal(backend, c) == [("linger", 0, "task_pending", False)]
    assert backend.balance(c.user_id) == 9_000
    assert await eventually(settled(backend, c, 1), timeout=12) == [("linger", 1, "task_expired", True)]
    assert time.monotonic() - started >= 10 - 0.5
    assert backend.balance(c.user_id) == 10_000
    # Refunded: its result is not delivered afterwards (its status still is).
    r = await s.send("tasks/result", {"taskId": task_id})
    assert r.status_code == 410 and "task_expired" in r.text and r.headers["X-Mcpmeter-Billed"] == "0"
    assert (await s.send("tasks/get", {"taskId": task_id})).json()["result"]["status"] == "working"


# --- input_required rounds ------------------------------------------------------------------------


def answer_of(name: str) -> dict[str, Any]:
    return {"name": {"action": "accept", "content": {"name": name}}}


async def test_rounds_of_one_call_cost_one_price(gateway: Gateway, backend: Backend, listing: str) -> None:
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    before = deferred_server.calls["ask"]
    r = await s.send("tools/call", {"name": "ask", "arguments": {}})
    assert r.json()["result"]["resultType"] == "input_required" and r.headers["X-Mcpmeter-Billed"] == str(PRICE)
    state = r.json()["result"]["requestState"]
    r = await s.send("tools/call", {"name": "ask", "arguments": {}, "requestState": state,
                                    "inputResponses": answer_of("again")})
    assert r.json()["result"]["resultType"] == "input_required" and r.headers["X-Mcpmeter-Billed"] == "0"
    r = await s.send("tools/call", {"name": "ask", "arguments": {}, "requestState": r.json()["result"]["requestState"],
                                    "inputResponses": answer_of("Ann")})
    assert r.json()["result"]["content"][0]["text"] == "hello Ann" and r.headers["X-Mcpmeter-Billed"] == "0"
    assert deferred_server.calls["ask"] == before + 3
    assert await eventually(settled(backend, c, 1)) == [("ask", 0, "result", True)]
    assert [(u["tool_name"], u["billed"]) for u in backend.usage(c)] == [("ask", PRICE)]
    assert backend.balance(c.user_id) == 9_000


async def test_a_failed_final_round_refunds_the_one_charge(gateway: Gateway, backend: Backend, listing: str) -> None:
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    r = await s.send("tools/call", {"name": "ask", "arguments": {}})
    r = await s.send("tools/call", {"name": "ask", "arguments": {}, "requestState": r.json()["result"]["requestState"],
                                    "inputResponses": answer_of("fail")})
    assert "error" in r.json()
    assert await eventually(settled(backend, c, 1)) == [("ask", 1, "rpc_error", True)]
    assert backend.balance(c.user_id) == 10_000


async def test_a_state_not_issued_to_this_key_is_charged(gateway: Gateway, backend: Backend, listing: str) -> None:
    c, other = backend.add_consumer(credit=10_000), backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    r = await s.send("tools/call", {"name": "ask", "arguments": {}})
    state = r.json()["result"]["requestState"]
    forged = await s.send("tools/call", {"name": "ask", "arguments": {}, "requestState": "st-forged",
                                         "inputResponses": answer_of("Bob")})
    assert forged.headers["X-Mcpmeter-Billed"] == str(PRICE)  # the upstream accepts it; the meter charges it
    stolen = await (await Session(gateway, listing, other).open()).send(
        "tools/call", {"name": "ask", "arguments": {}, "requestState": state, "inputResponses": answer_of("Eve")})
    assert stolen.headers["X-Mcpmeter-Billed"] == str(PRICE)
    mine = await s.send("tools/call", {"name": "ask", "arguments": {}, "requestState": state,
                                       "inputResponses": answer_of("Ann")})
    assert mine.headers["X-Mcpmeter-Billed"] == "0"
    replay = await s.send("tools/call", {"name": "ask", "arguments": {}, "requestState": state,
                                         "inputResponses": answer_of("Ann")})
    assert replay.headers["X-Mcpmeter-Billed"] == str(PRICE)  # a state continues one retry only
    assert await eventually(settled(backend, c, 3))
    assert backend.balance(c.user_id) == 7_000 and backend.balance(other.user_id) == 9_000


async def test_an_abandoned_round_is_billed_by_the_sweeper(gateway: Gateway, backend: Backend, listing: str) -> None:
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    r = await s.send("tools/call", {"name": "ask", "arguments": {}})
    assert r.json()["result"]["resultType"] == "input_required"
    await asyncio.sleep(0.3)
    assert journal(backend, c) == [("ask", 0, "input_pending", False)]
    assert backend.balance(c.user_id) == 9_000
    assert await eventually(settled(backend, c, 1), timeout=12) == [("ask", 0, "input_abandoned", True)]
    assert backend.balance(c.user_id) == 9_000
    assert [(u["tool_name"], u["billed"]) for u in backend.usage(c)] == [("ask", PRICE)]


@pytest.mark.parametrize("name, billed, reason", [("Ann", PRICE, "result"), ("fail", 0, "tool_error")])
async def test_sdk_client_and_server_rounds_cost_one_call(
        gateway: Gateway, backend: Backend, sdk_url: str, name: str, billed: int, reason: str) -> None:
    """mcp 2.3's Client drives the input_required loop itself against its MCPServer (sealed requestState)."""
    s = slug("sdk-rounds")
    backend.add_listing(s, f"{sdk_url}/mcp", price=PRICE)
    c = backend.add_consumer(credit=10_000)
    asked: list[str] = []

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"name": name})

    http = httpx2.AsyncClient(headers=c.auth, timeout=20)
    transport = streamable_http_client(f"{gateway.url}/{s}", http_client=http)
    async with Client(transport, elicitation_callback=elicit) as mcp:
        result = await mcp.call_tool("greet", {})
    assert asked == ["Your name?"]
    assert result.is_error == (name == "fail")
    rows = await eventually(settled(backend, c, 1))
    assert rows == [("greet", int(billed == 0), reason, True)]
    assert [(u["tool_name"], u["billed"]) for u in backend.usage(c)] == [("greet", billed)]
    assert backend.balance(c.user_id) == 10_000 - billed


async def test_streamed_task_creation_and_rounds_are_held_too(gateway: Gateway, backend: Backend, listing: str) -> None:
    """The CreateTaskResult and the input_required answers read from SSE streams, as from JSON bodies."""
    c = backend.add_consumer(credit=10_000)
    s = await Session(gateway, listing, c).open()
    r = await s.send("tools/call", {"name": "crash", "arguments": {"stream": True}, "task": {}})
    assert r.headers["content-type"].startswith("text/event-stream") and '"taskId"' in r.text
    task_id = json.loads(r.text.strip().split("data: ")[-1])["result"]["task"]["taskId"]
    r = await s.send("tools/call", {"name": "ask", "arguments": {"stream": True}})
    state = json.loads(r.text.strip().split("data: ")[-1])["result"]["requestState"]
    await asyncio.sleep(0.3)
    assert sorted(journal(backend, c)) == [("ask", 0, "input_pending", False), ("crash", 0, "task_pending", False)]
    assert backend.balance(c.user_id) == 8_000  # both claimed
    r = await s.send("tools/call", {"name": "ask", "arguments": {"stream": True}, "requestState": state,
                                    "inputResponses": answer_of("Ann")})
    assert "hello Ann" in r.text and r.headers["X-Mcpmeter-Billed"] == "0"
    await s.send("tasks/get", {"taskId": task_id})
    rows = await eventually(settled(backend, c, 2))
    assert sorted(rows) == [("ask", 0, "result", True), ("crash", 1, "task_failed", True)]
    assert backend.balance(c.user_id) == 9_000
