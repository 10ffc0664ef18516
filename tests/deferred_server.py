"""An upstream that speaks 2025-11-25 tasks and 2026-07-28 input_required rounds (issue 11 items 3, 5).

The mcp 2.3 SDK has the types of both but no server that runs a tool as a task or answers
input_required over HTTP, so this is Starlette, raw JSON-RPC, as the spec's examples write it.

Tasks (tools/call with params.task answers a CreateTaskResult; the tool's name picks its fate):
  finish   completed at once (tasks/get says completed; tasks/result answers the CallToolResult)
  crash    failed at once (tasks/result answers a JSON-RPC error)
  linger   working until tasks/cancel (then cancelled), or forever
  announce completes or fails (arguments.fate) and says so only in notifications/tasks/status,
           on the session's GET stream: sent before the CreateTaskResult answer (arguments.order
           "before": the answer waits until the GET stream carried it) or after it ("after")
Tasks are the receiver's, not the session's: any caller may poll any taskId (a careless server),
so the gateway must not let one key's poll settle another key's task.

Any tools/call with arguments.stream answers as an SSE stream (a progress event, then the answer).

Rounds (tools/call "ask"): without requestState, an InputRequiredResult with an elicitation and
a fresh requestState; with one the server issued, the final result (inputResponses.name.content
.name == "fail": a JSON-RPC error; == "again": another input_required with a new state). A state
the server never issued is accepted too (a careless server): the gateway must charge that call.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

calls: Counter[str] = Counter()  # tools/call requests that reached the server, per tool
tasks: dict[str, dict[str, Any]] = {}  # taskId -> {"status", "tool", "session"}
issued: set[str] = set()
notices: dict[str, list[dict[str, Any]]] = {}  # session -> notifications for its GET stream
NOW = "2025-11-25T00:00:00Z"


def _task(task_id: str) -> dict[str, Any]:
    t = tasks[task_id]
    return {"taskId": task_id, "status": t["status"], "createdAt": NOW, "lastUpdatedAt": NOW, "ttl": 60000,
            "pollInterval": 100}


def _ok(rpc_id: Any, result: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "result": result})


async def mcp(request: Request) -> Response:
    session = request.headers.get("mcp-session-id", "")
    if request.method == "GET":
        return StreamingResponse(_notices(session), media_type="text/event-stream")
    if request.method == "DELETE":
        return Response(status_code=200)
    body = await request.json()
    method, rpc_id, params = body.get("method"), body.get("id"), body.get("params") or {}
    if method == "initialize":
        return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "result": {
            "protocolVersion": "2025-11-25", "serverInfo": {"name": "deferred", "version": "1"},
            "capabilities": {"tools": {}, "tasks": {"requests": {"tools": {"call": {}}}, "cancel": {}}}}},
            headers={"Mcp-Session-Id": uuid.uuid4().hex})
    if rpc_id is None:
        return Response(status_code=202)
    if method == "tools/call":
        name, arguments = params.get("name"), params.get("arguments") or {}
        calls[name] += 1
        if isinstance(params.get("task"), dict):
            answer = await _create_task(rpc_id, name, arguments, session)
        elif name == "ask":
            answer = _round(rpc_id, params)
        else:
            answer = _ok(rpc_id, {"content": [{"type": "text", "text": name}]})
        return _streamed(answer, rpc_id) if arguments.get("stream") else answer
    if method in ("tasks/get", "tasks/cancel", "tasks/result"):
        task_id = params.get("taskId")
        if task_id not in tasks:
            return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32602, "message": "no task"}})
        if method == "tasks/cancel" and tasks[task_id]["status"] == "working":
            tasks[task_id]["status"] = "cancelled"
        if method != "tasks/result":
            return _ok(rpc_id, _task(task_id))
        status = tasks[task_id]["status"]
        related = {"io.modelcontextprotocol/related-task": {"taskId": task_id}}
        if status == "failed":
            return JSONResponse({"jsonrpc": "2.0", "id": rpc_id,
                                 "error": {"code": -32603, "message": "the tool crashed"}})
        if status == "completed":
            return _ok(rpc_id, {"content": [{"type": "text", "text": "done"}], "_meta": related})
        return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32600, "message": status}})
    return _ok(rpc_id, {})


async def _create_task(rpc_id: Any, name: str, arguments: dict[str, Any], session: str) -> Response:
    task_id = uuid.uuid4().hex
    fate = {"finish": "completed", "crash": "failed"}.get(name, "working")
    tasks[task_id] = {"status": fate, "tool": name}
    answer = _task(task_id) | {"status": "working"}
    if name == "announce":
        tasks[task_id]["status"] = arguments.get("fate", "completed")
        notice = {"jsonrpc": "2.0", "method": "notifications/tasks/status", "params": _task(task_id)}
        if arguments.get("order") == "before":
            notices.setdefault(session, []).append(notice)
            for _ in range(500):  # until the GET stream has carried it (5 s at most)
                if notice not in notices.get(session, []):
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # and the gateway has read it
        else:
            asyncio.get_running_loop().call_later(0.3, lambda: notices.setdefault(session, []).append(notice))
    return _ok(rpc_id, {"task": answer})


def _round(rpc_id: Any, params: dict[str, Any]) -> Response:
    state = params.get("requestState")
    if not isinstance(state, str):
        return _ask(rpc_id)
    reply = ((params.get("inputResponses") or {}).get("name") or {}).get("content", {}).get("name")
    if reply == "fail":
        return JSONResponse({"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32603, "message": "no luck"}})
    if reply == "again":
        return _ask(rpc_id)
    return _ok(rpc_id, {"resultType": "complete", "content": [{"type": "text", "text": f"hello {reply}"}]})


def _ask(rpc_id: Any) -> Response:
    state = "st-" + uuid.uuid4().hex
    issued.add(state)
    return _ok(rpc_id, {"resultType": "input_required", "requestState": state, "inputRequests": {
        "name": {"method": "elicitation/create", "params": {
            "mode": "form", "message": "Your name?",
            "requestedSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}}}})


def _streamed(answer: JSONResponse, rpc_id: Any) -> StreamingResponse:
    """The same answer as an SSE stream: a progress notification, then the answer."""
    progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": f"p{rpc_id}", "progress": 1, "total": 2}}

    async def events():  # type: ignore[no-untyped-def]
        yield b"id: 1\nevent: message\ndata: " + json.dumps(progress).encode() + b"\n\n"
        await asyncio.sleep(0.05)
        yield b"id: 2\nevent: message\ndata: " + bytes(answer.body) + b"\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _notices(session: str):  # type: ignore[no-untyped-def]
    yield b": stream open\n\n"
    for _ in range(40):
        while notices.get(session):
            n = notices[session][0]
            yield f"event: message\ndata: {json.dumps(n)}\n\n".encode()
            notices[session].pop(0)  # carried (a waiting answer goes on)
        await asyncio.sleep(0.05)


def build_app() -> Starlette:
    return Starlette(routes=[Route("/mcp", mcp, methods=["GET", "POST", "DELETE"])])
