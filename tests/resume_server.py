"""A streamable-HTTP upstream that outlives its POSTs (2025-11-25 resumption, SEP-1699), fully scripted.

Every SSE event it sends carries an id and is kept in its session's log; a GET with `Last-Event-ID`
replays the session's events after that id (waiting up to 8 s for one), then ends. Tools:

- `closes` {delay, spell}: a priming event (id, empty data), then the POST stream ends; the answer joins
  the session's log after `delay` s, for a resumed GET to deliver (with `spell`, under the request's id
  written as a string: `"8"` for `8`, which the SDK clients take for 8's answer).
- `closes_twice` {delay}: as `closes`, with a progress notification logged half way: a GET resuming
  before the answer gets that event and ends, and the client resumes after it in turn.
- `slow` {delay}: priming, then the answer on the POST stream after `delay` s (also logged). It ignores
  cancellation on purpose: the gateway must keep a cancelled call's answer from the client.
- `json_slow` {delay}: a JSON answer after `delay` s.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

logs: dict[str, list[tuple[int, bytes]]] = {}  # session -> [(event id, data)]; empty data: priming
cancelled: list[tuple[str, Any]] = []  # (session, requestId) of each notifications/cancelled received
closed_early: list[Any] = []  # ids of POST streams whose client left before the answer


def _event(session: str, data: bytes) -> bytes:
    log = logs.setdefault(session, [])
    event_id = len(log) + 1
    log.append((event_id, data))
    return f"id: {event_id}\ndata: ".encode() + data + b"\n\n"


def _answer(rpc_id: Any, text: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id,
                       "result": {"content": [{"type": "text", "text": text}], "isError": False}}).encode()


async def mcp(request: Request) -> Response:
    session = request.headers.get("mcp-session-id", "")
    if request.method == "GET" and "last-event-id" not in request.headers:
        return StreamingResponse(_idle(), media_type="text/event-stream")  # the standalone stream: nothing to say
    if request.method == "GET":
        return StreamingResponse(_replay(session, int(request.headers.get("last-event-id", "0") or 0)),
                                 media_type="text/event-stream")
    if request.method == "DELETE":
        return Response(status_code=200)
    body = await request.json()
    method, rpc_id = body.get("method"), body.get("id")
    if method == "initialize":
        return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "result": {
            "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
            "serverInfo": {"name": "resume", "version": "1"}}}, headers={"Mcp-Session-Id": uuid.uuid4().hex})
    if method == "notifications/cancelled":
        cancelled.append((session, body.get("params", {}).get("requestId")))
    if rpc_id is None:
        return Response(status_code=202)
    if method != "tools/call":
        return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "result": {"tools": []}})
    name, args = body["params"]["name"], body["params"].get("arguments") or {}
    delay = float(args.get("delay", 0))
    if name == "json_slow":
        await asyncio.sleep(delay)
        return Response(_answer(rpc_id, "json result"), media_type="application/json")

    async def later() -> None:
        if name == "closes_twice":
            await asyncio.sleep(delay / 2)
            _event(session, json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                        "params": {"progressToken": rpc_id, "progress": 1}}).encode())
        await asyncio.sleep(delay / 2 if name == "closes_twice" else delay)
        _event(session, _answer(str(rpc_id) if args.get("spell") else rpc_id, "resumed result"))

    async def closes():
        yield _event(session, b"")
        asyncio.get_running_loop().create_task(later())

    async def slow():
        yield _event(session, b"")
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            closed_early.append(rpc_id)
            _event(session, _answer(rpc_id, "slow result"))  # still logged: a resume could fetch it
            raise
        yield _event(session, _answer(rpc_id, "slow result"))

    return StreamingResponse(closes() if name in ("closes", "closes_twice") else slow(),
                             media_type="text/event-stream")


async def _idle():
    yield b": open\n\n"
    await asyncio.sleep(60)


async def _replay(session: str, after: int):
    for _ in range(160):
        if any(i > after for i, _ in logs.get(session, [])):
            break
        await asyncio.sleep(0.05)
    for event_id, data in list(logs.get(session, [])):
        if event_id > after:
            yield f"id: {event_id}\ndata: ".encode() + data + b"\n\n"


def build_app() -> Starlette:
    return Starlette(routes=[Route("/mcp", mcp, methods=["GET", "POST", "DELETE"])])


# --- the same behaviour from the official Python SDK: an event store and ctx.close_sse_stream() --------

def build_sdk_app() -> Starlette:
    """An mcp 2.3 server that closes a call's POST stream and answers on the resumed stream (SEP-1699).

    Tool `long_task` {seconds}: closes its SSE stream at once, then answers after `seconds`.
    """
    class MemoryEventStore(EventStore):
        def __init__(self) -> None:
            self.events: list[tuple[str, str, Any]] = []  # (event id, stream id, message)

        async def store_event(self, stream_id: str, message: Any) -> str:
            event_id = str(len(self.events) + 1)
            self.events.append((event_id, stream_id, message))
            return event_id

        async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
            found = next((s for e, s, _ in self.events if e == last_event_id), None)
            if found is None:
                return None
            for event_id, stream_id, message in self.events[int(last_event_id):]:
                if stream_id == found and message is not None:
                    await send_callback(EventMessage(message, event_id))
            return found

    server = MCPServer("resumable")

    @server.tool()
    async def long_task(ctx: Context, seconds: float = 0.5) -> str:
        """Close the POST stream, then answer after `seconds` (the client resumes to get it)."""
        await ctx.close_sse_stream()
        await asyncio.sleep(seconds)
        return f"done after {seconds}s"

    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return server.streamable_http_app(event_store=MemoryEventStore(), retry_interval=200, transport_security=security)
