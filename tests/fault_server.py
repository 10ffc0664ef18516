"""An MCP-shaped upstream that fails on demand, for the gateway's refund and streaming tests.

The tool name of a tools/call picks the behaviour, so one server serves every scenario
without shared state. Built on Starlette directly (not the SDK) to produce faults an SDK
server never would: 5xx, protocol errors inside SSE, streams that die, answers that hang.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from collections.abc import Callable
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# How many tools/call requests reached the server, per tool: proves refused calls never arrive.
calls: Counter[str] = Counter()
# The headers of the last request per tool, to check what the gateway forwards.
seen_headers: dict[str, dict[str, str]] = {}
seen_paths: dict[str, str] = {}


def _result(rpc_id: Any, text: str, is_error: bool = False) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id,
            "result": {"content": [{"type": "text", "text": text}], "isError": is_error}}


def _sse(*messages: Any, prime: bool = True) -> list[bytes]:
    events = [b"id: 0\r\ndata:\r\n\r\n"] if prime else []
    events.append(b": keep-alive comment\n\n")
    for i, m in enumerate(messages, 1):
        events.append(f"id: {i}\nevent: message\ndata: {json.dumps(m)}\n\n".encode())
    return events


async def mcp(request: Request) -> Response:
    if request.method == "GET":
        return StreamingResponse(_stream([b": stream open\n\n"], delay=0.05), media_type="text/event-stream")
    if request.method == "DELETE":
        return Response(status_code=200)
    body = await request.json()
    if isinstance(body, list):
        return JSONResponse([_result(m.get("id"), "batch") for m in body if "id" in m])
    method, rpc_id = body.get("method"), body.get("id")
    if method == "initialize":
        return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "result": {"protocolVersion": "2025-06-18",
                             "capabilities": {"tools": {}}, "serverInfo": {"name": "fault", "version": "1"}}},
                            headers={"Mcp-Session-Id": uuid.uuid4().hex})
    if rpc_id is None:
        return Response(status_code=202)
    if method != "tools/call":
        return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "result": {"tools": []}})
    name = body["params"]["name"]
    args = body["params"].get("arguments") or {}
    calls[name] += 1
    seen_headers[name] = dict(request.headers)
    seen_paths[name] = request.url.path + ("?" + request.url.query if request.url.query else "")
    progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": 1, "progress": 1, "total": 2}}
    match name:
        case "ok" | "headers":
            return JSONResponse(_result(rpc_id, "ok"))
        case "tool_error":
            return JSONResponse(_result(rpc_id, "bad arguments", is_error=True))
        case "rpc_error":
            return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32603, "message": "boom"}})
        case "http500":
            return JSONResponse({"detail": "internal"}, status_code=500)
        case "http400":
            return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32600, "message": "no"}},
                                status_code=400)
        case "no_answer":
            return JSONResponse({"jsonrpc": "2.0", "id": "someone-else", "result": {}})
        case "slow":
            await asyncio.sleep(float(args.get("seconds", 5)))
            return JSONResponse(_result(rpc_id, "slow"))
        case "sse_ok":
            return _sse_response(_sse(progress, _result(rpc_id, "streamed")), delay=float(args.get("delay", 0.3)))
        case "sse_rpc_error":
            return _sse_response(_sse(progress, {"jsonrpc": "2.0", "id": rpc_id,
                                                 "error": {"code": -32603, "message": "failed mid-stream"}}))
        case "sse_tool_error":
            return _sse_response(_sse(progress, _result(rpc_id, "nope", is_error=True)))
        case "sse_die":
            return _sse_response(_sse(progress), die=True)
        case "sse_slow":
            return _sse_response(_sse(progress), delay=float(args.get("seconds", 5)))
        case "sse_unreadable":  # before the answer, an event the Python SDK client cannot read; then open ~6 s
            unreadable = (b'id: 2\nevent: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
                          b'"params":[]}\n\n')
            answer = f"id: 3\nevent: message\ndata: {json.dumps(_result(rpc_id, 'never read'))}\n\n".encode()
            return _sse_response([*_sse(progress), unreadable, answer, *[b": still open\n\n"] * 24], delay=0.25)
        case "sse_whole":  # the whole stream at once, with a Content-Length (as a buffering server sends it)
            return Response(b"".join(_sse(progress, _result(rpc_id, "whole"))), media_type="text/event-stream")
        case "sse_big":  # one result event far over the gateway's max_event_bytes
            return _sse_response(_sse(_result(rpc_id, "b" * int(args.get("size", 1 << 20)),
                                              is_error=bool(args.get("is_error")))))
        case "deep":  # a result nested deeper than any recursive parser goes
            depth = int(args.get("depth", 100_000))
            return Response(b'{"jsonrpc":"2.0","id":' + json.dumps(rpc_id).encode() + b',"result":{"content":'
                            + b"[" * depth + b"]" * depth + b"}}", media_type="application/json")
    return JSONResponse(_result(rpc_id, f"unknown tool {name}", is_error=True))


def _sse_response(events: list[bytes], delay: float = 0.05, die: bool = False) -> StreamingResponse:
    return StreamingResponse(_stream(events, delay, die), media_type="text/event-stream")


async def _stream(events: list[bytes], delay: float, die: bool = False):
    for event in events:
        yield event
        await asyncio.sleep(delay)
    if die:
        raise ConnectionAbortedError("the fault server dies mid-stream")


def build_app() -> Starlette:
    return Starlette(routes=[Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]),
                             Route("/mcp/{rest:path}", mcp, methods=["GET", "POST", "DELETE"])])


def start_hang_up_server() -> tuple[int, Callable[[], None]]:
    """A TCP server that reads a request and closes without answering: 'dies before answering'."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stopped = threading.Event()

    def serve() -> None:
        while not stopped.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join(2)
        sock.close()

    return sock.getsockname()[1], stop
