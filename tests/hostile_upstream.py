"""A hostile MCP upstream on raw asyncio sockets, for the adversarial and fuzz suites (issue 7).

No framework: every byte it reads is recorded and every byte it sends is chosen, so it can
behave the way real servers behind a gateway do when they disagree with the gateway:

- a normalising router: it percent-decodes and resolves `.`/`..` (as nginx or a web framework
  would) and records which route it served (`Seen.route`);
- a first-duplicate-key-wins JSON-RPC parser (`first_wins`) and JavaScript number semantics for
  ids (`js_number`: 2**53+1 -> 2**53, 1.0 -> 1, NaN -> null): `Seen.rpc` is what it would run;
- a method-agnostic handler: a tools/call body runs whatever the HTTP method (`Seen.ran`);
- misbehaving answers picked by tool name (first-wins view) or an `X-Hostile` request header:
  slow, huge SSE events, deeply nested results, gzip/deflate bombs sent despite
  `Accept-Encoding: identity` (and a gzip event stream, `gzip_sse`), broken framing (a chunk line that
  never ends, trailers, a folded line, both framings), field names that are no tokens, a 101 or 103
  unasked (after a 101, what comes through is run as a call: `Seen.method` "TUNNEL"), its own
  `X-Mcpmeter-*` headers, an echo of every header it received, and a minimal legacy HTTP+SSE session
  (GET .../sse; its tool `late_big` answers big, and late).

`Canary` is the same server answering anything on another port: any request it records came
from a gateway that left its listing. `RawClient` is a keep-alive HTTP/1.1 client that sends
exactly the bytes it is given (http.client refuses the paths an attacker sends).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import posixpath
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

MAX_REQUEST_BODY = 256 * 1024 * 1024


# --- how other languages read JSON --------------------------------------------------------


def first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook of a parser that keeps the first of duplicate keys (Go-style lenient, many JS libs)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


def js_number(value: Any) -> Any:
    """A JSON number as JavaScript holds it: an IEEE double; NaN/Infinity serialise as null."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    f = float(value) if abs(value) < 1e308 else math.inf
    if math.isnan(f) or math.isinf(f):
        return None
    return int(f) if f.is_integer() and abs(f) < 1e21 else f


def js_parse(body: bytes) -> Any:
    """What a lenient first-wins, JavaScript-number JSON-RPC server makes of a body (None if unreadable)."""
    try:
        message = json.loads(body, object_pairs_hook=first_wins, parse_constant=float)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(message, dict) and "id" in message:
        message["id"] = js_number(message["id"])
    return message


def normalise(path: str) -> str:
    """The route a normalising router serves for a raw path: decoded once, dot segments resolved.

    Once, as HTTP servers and frameworks do: `%252e` is the text `%2e`, which the agreed path rule
    forwards as sent (only a server that decodes twice, itself a path-traversal bug, reads a dot)."""
    decoded = unquote(path).replace("\\", "/")
    resolved = posixpath.normpath("/" + decoded.lstrip("/"))
    return resolved + ("/" if decoded.endswith("/") and resolved != "/" else "")


def has_dot_segment(path: str) -> bool:
    """A `.`/`..` segment, encoded or not, or with `;params` (Tomcat and Jetty resolve `..;` as `..`)."""
    return any(seg.split(";")[0] in (".", "..") for seg in unquote(path).replace("\\", "/").split("/"))


# --- what the server saw ------------------------------------------------------------------


@dataclass
class Seen:
    port: int
    method: str
    target: str  # the raw request-target, byte for byte (latin-1)
    headers: list[tuple[str, str]]
    body: bytes
    route: str  # what a normalising router serves for it
    rpc: Any = None  # the body as a first-wins / JS-number server reads it
    ran: str | None = None  # the tool it ran, if it ran one

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def listing(self) -> str | None:
        """Which listing sent it: every test listing has upstream_headers {X-Listing: <slug>}."""
        return self.header("x-listing")


@dataclass
class _Session:
    queue: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)


class HostileUpstream:
    """The server; `start()` runs it on its own event loop in a daemon thread."""

    def __init__(self, canary: bool = False) -> None:
        self.canary = canary
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sessions: dict[str, _Session] = {}
        self._readers: dict[asyncio.StreamWriter, asyncio.StreamReader] = {}
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # life cycle
    def start(self) -> HostileUpstream:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            self._server = self.loop.run_until_complete(
                asyncio.start_server(self._serve, sock=sock, limit=1024 * 1024))
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="hostile-upstream")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        loop, server = self.loop, self._server
        if loop is not None and server is not None:
            async def shutdown() -> None:
                server.close()
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    # queries for tests
    def records(self, listing: str | None = None) -> list[Seen]:
        with self.lock:
            seen = list(self.seen)
        return [s for s in seen if listing is None or s.listing == listing]

    def ran(self, listing: str) -> list[Seen]:
        return [s for s in self.records(listing) if s.ran is not None]

    def hit_count(self) -> int:
        with self.lock:
            return len(self.seen)

    # the connection loop
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._readers[writer] = reader  # for a mode that reads on after its answer (a tunnel)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen, keep = await self._read_request(head, reader)
                with self.lock:
                    self.seen.append(seen)
                if not await self._answer(seen, writer) or not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            self._readers.pop(writer, None)
            try:
                writer.close()
            except Exception:
                pass

    async def _read_request(self, head: bytes, reader: asyncio.StreamReader) -> tuple[Seen, bool]:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
        h = {k.lower(): v for k, v in headers}
        body = b""
        if h.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
                if len(body) > MAX_REQUEST_BODY:
                    raise ValueError("request body too big")
        elif h.get("content-length"):
            body = await reader.readexactly(min(int(h["content-length"]), MAX_REQUEST_BODY))
        seen = Seen(self.port, method, target, headers, body, normalise(target.partition("?")[0]))
        seen.rpc = js_parse(body) if body else None
        return seen, h.get("connection", "").lower() != "close"

    async def _answer(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        """Write the answer; False closes the connection."""
        if self.canary:
            return await _send(writer, 200, json.dumps({"canary": True, "target": seen.target}).encode())
        rpc = seen.rpc if isinstance(seen.rpc, dict) else {}
        params = rpc.get("params") if isinstance(rpc.get("params"), dict) else {}
        args = params.get("arguments") if isinstance(params.get("arguments"), dict) else {}
        mode = seen.header("x-hostile") or (params.get("name") if rpc.get("method") == "tools/call" else None)
        query = parse_qs(seen.target.partition("?")[2])
        if seen.method == "GET" and seen.path.endswith("/sse") and not rpc:
            return await self._legacy_stream(seen, writer)
        if "session_id" in query and seen.method == "POST":
            return await self._legacy_post(seen, rpc, query["session_id"][0], writer)
        if not rpc:
            if seen.method == "GET" and "text/event-stream" in (seen.header("accept") or ""):
                return await _send(writer, 405, b"")
            return await _send(writer, 200 if seen.method != "POST" else 400,
                               json.dumps({"route": seen.route, "method": seen.method}).encode())
        rpc_id = rpc.get("id")
        if rpc.get("method") != "tools/call":
            if "id" not in rpc:
                return await _send(writer, 202, b"")
            return await _send(writer, 200, _result(rpc_id, {"tools": [], "route": seen.route}))
        seen.ran = str(params.get("name"))
        return await self._tool(seen, str(mode), rpc_id, args, writer)

    async def _tool(self, seen: Seen, mode: str, rpc_id: Any, args: dict[str, Any],
                    writer: asyncio.StreamWriter) -> bool:
        ok = _tool_result(rpc_id, f"ran {seen.ran} at {seen.route}")
        mb = float(args.get("mb", 20)) if isinstance(args.get("mb", 20), (int, float)) else 20.0
        match mode:
            case "echo_headers":
                text = json.dumps(seen.headers)
                return await _send(writer, 200, _tool_result(rpc_id, text))
            case "slow":
                await asyncio.sleep(float(args.get("seconds", 5)))
                return await _send(writer, 200, ok)
            case "sse":
                return await _send_sse(writer, [_sse_event(ok)])
            case "sse_other_event":  # the result under an event type MCP clients ignore
                return await _send_sse(writer, [b"event: debug\ndata: " + ok + b"\n\n"])
            case "huge_sse":  # one event of `mb` MB on one data line, then the stream ends
                text = "x" * int(mb * 1024 * 1024)
                return await _send_sse(writer, [_sse_event(_tool_result(rpc_id, text))],
                                       chunk=int(args.get("chunk", 64 * 1024)))
            case "sse_many":  # the same bytes as huge_sse, as ~1 KB progress events, then the result
                note = _sse_event(json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                              "params": {"progressToken": 1, "pad": "x" * 1000}}).encode())
                count = int(mb * 1024 * 1024) // len(note)
                return await _send_sse(writer, [note * 64] * (count // 64) + [_sse_event(ok)],
                                       chunk=int(args.get("chunk", 64 * 1024)))
            case "huge_json":
                return await _send(writer, 200, _tool_result(rpc_id, "x" * int(mb * 1024 * 1024)))
            case "stalled_json":  # a JSON answer of `mb` MB, of which `sent` MB come, then nothing for `seconds`
                body = _tool_result(rpc_id, "x" * int(mb * 1024 * 1024))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body[:int(float(args.get("sent", 1)) * 1024 * 1024)])
                await writer.drain()
                await asyncio.sleep(float(args.get("seconds", 5)))
                return False
            case "nested" | "nested_sse":
                depth = int(args.get("depth", 100_000))
                body = (b'{"jsonrpc":"2.0","id":' + json.dumps(rpc_id).encode()
                        + b',"result":{"content":[{"type":"text","text":"deep"}],"deep":'
                        + b"[" * depth + b"]" * depth + b"}}")
                if mode == "nested_sse":
                    return await _send_sse(writer, [b"event: message\ndata: " + body + b"\n\n"])
                return await _send(writer, 200, body)
            case "late_big_sse":  # a priming event, then `seconds` later a result of `mb` MB
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                await _chunk(writer, b"id: 0\ndata:\n\n")
                await asyncio.sleep(float(args.get("seconds", 2)))
                return await _send_sse(writer, [_sse_event(_tool_result(rpc_id, "big:" + "x" * int(mb * 2**20)))],
                                       head=False)
            case "gzip_sse":  # an event stream compressed despite Accept-Encoding: identity
                body = gzip.compress(b"id: 0\ndata:\n\n" + _sse_event(ok))
                return await _send(writer, 200, body, {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})
            case "gzip_bomb" | "deflate_bomb":
                # Valid JSON padded with spaces: small on the wire, `mb` MB decoded. Sent whatever
                # Accept-Encoding said (the gateway asks for identity).
                raw = ok[:-1] + b" " * int(mb * 1024 * 1024) + b"}"
                if mode == "gzip_bomb":
                    packed, enc = gzip.compress(raw, 9), "gzip"
                else:
                    packed, enc = zlib.compress(raw, 9), "deflate"
                return await _send(writer, 200, packed, {"Content-Encoding": enc})
            case "meter_headers":
                return await _send(writer, 200, ok, {
                    "X-Mcpmeter-Billed": "0", "X-Mcpmeter-Balance": "999999999",
                    "X-Mcpmeter-Refunded": "1", "X-Mcpmeter-Request-Id": "00000000-0000-4000-8000-000000000000",
                    "X-MCPMETER-Evil": "upstream"})
            case "short_body":  # Content-Length promises more than is sent, then the connection closes
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                             + ok[:20])
                await writer.drain()
                return False
            case "bad_chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"zz\r\n" + ok + b"\r\n0\r\n\r\n")
                await writer.drain()
                return False
            case "garbage_status":
                writer.write(b"HTTP/1.1 2OO OK\r\n\r\n" + ok)
                await writer.drain()
                return False
            case "huge_head":  # a status line, then header fields that never end (8 MB, then it waits)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                for _ in range(8 * 16):
                    writer.write(b"X-Pad: " + b"a" * 65_000 + b"\r\n")
                    await writer.drain()
                await asyncio.sleep(5)
                return False
            case "length_and_chunked":  # both framings: mitmproxy refuses it (a smuggling shape)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(ok):x}\r\n".encode() + ok
                             + b"\r\n0\r\n\r\n")
                await writer.drain()
                return False
            case "folded_header":  # an obs-fold line: a continuation that a lax client reads as a field of its own
                return await _send(writer, 200, ok, {"X-Note": "a\r\n X-Mcpmeter-Billed: 0"})
            case "bad_names":  # field names that are no tokens, which a lax client reads trimmed
                return await _send(writer, 200, ok, {"Mcp-Session-Id ": "forged-session", "X-Note\t": "a",
                                                     "Set-Cookie\x0b": "forged=1", "X-Nöte": "b", "X-Kept": "c"})
            case "json_trailers":  # a chunked JSON answer that ends with a trailer field
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                             b"Trailer: X-Checksum\r\n\r\n" + f"{len(ok):x}\r\n".encode() + ok
                             + b"\r\n0\r\nX-Checksum: 1\r\n\r\n")
                await writer.drain()
                return True
            case "endless_chunk_header":  # a chunk-size line whose extension never ends (8 MB, then it waits)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5;x=")
                for _ in range(8 * 16):
                    writer.write(b"a" * 65_536)
                    await writer.drain()
                await asyncio.sleep(5)
                return False
            case "switch_protocols":  # 101 to a request that asked for no upgrade, then a tunnel that runs calls
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                await writer.drain()
                await self._tunnel(seen, writer)
                return False
            case "informational_first":  # a 1xx (mitmproxy reads it as the final answer), then the answer
                writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
                return await _send(writer, 200, ok)
            case "other_id":  # answers a different id, as a JS server does for ids it cannot hold
                return await _send(writer, 200, _tool_result(js_number(rpc_id), "other"))
        return await _send(writer, 200, ok)

    async def _tunnel(self, seen: Seen, writer: asyncio.StreamWriter) -> None:
        """After a 101: whatever comes through is recorded as a request and run (a tools/call body is a call)."""
        reader = self._readers.get(writer)
        if reader is None:
            return
        try:
            data = await asyncio.wait_for(reader.read(1 << 20), 3)
        except (TimeoutError, ConnectionError):
            return
        if not data:
            return
        tunnelled = Seen(self.port, "TUNNEL", "", seen.headers, data, seen.route)
        tunnelled.rpc = js_parse(data.partition(b"\r\n\r\n")[2] or data)
        if isinstance(tunnelled.rpc, dict) and tunnelled.rpc.get("method") == "tools/call":
            params = tunnelled.rpc.get("params")
            tunnelled.ran = str(params.get("name") if isinstance(params, dict) else None)
        with self.lock:
            self.seen.append(tunnelled)
        writer.write(_tool_result(tunnelled.rpc.get("id") if isinstance(tunnelled.rpc, dict) else None, "tunnelled"))
        await writer.drain()

    # the legacy HTTP+SSE transport, minimal: GET .../sse announces an endpoint, answers go on the stream
    async def _legacy_stream(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        sid = uuid.uuid4().hex
        session = self._sessions[sid] = _Session()
        endpoint = seen.header("x-hostile-endpoint") or f"messages/?session_id={sid}"
        endpoint = endpoint.replace("{sid}", sid)
        hold = float(seen.header("x-hostile-hold") or 30)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        layout = seen.header("x-hostile-endpoint-layout") or "plain"
        event = {"plain": f"event: endpoint\ndata: {endpoint}\n\n",
                 "id-between": f"event: endpoint\nid: 1\ndata: {endpoint}\n\n",
                 "data-first": f"data: {endpoint}\nevent: endpoint\n\n",
                 "no-space-crlf": f"event:endpoint\r\ndata:{endpoint}\r\n\r\n",
                 "cr-only": f"event: endpoint\rdata: {endpoint}\r\r",
                 # "|": a chunk boundary, the next chunk a moment later
                 "split": f": hi\n\nevent: endp|oint\ndata: {endpoint}\r|\n\r|\n"}[layout]
        for part in event.split("|"):
            await _chunk(writer, part.encode())
            await asyncio.sleep(0.05 if "|" in event else 0)
        deadline = time.monotonic() + hold
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(session.queue.get(), min(left, 0.5))
                except TimeoutError:
                    await _chunk(writer, b": ping\n\n")
                    continue
                await _chunk(writer, event)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._sessions.pop(sid, None)
        return False

    async def _legacy_post(self, seen: Seen, rpc: dict[str, Any], sid: str, writer: asyncio.StreamWriter) -> bool:
        session = self._sessions.get(sid)
        if session is None:
            return await _send(writer, 404, b"no such session")
        params = rpc.get("params") if isinstance(rpc.get("params"), dict) else {}
        if rpc.get("method") == "tools/call":
            seen.ran = str(params.get("name"))
            answer = _sse_event(_tool_result(rpc.get("id"), f"ran {seen.ran}"))
            if params.get("name") == "sse_other_event":  # under an event type MCP clients ignore
                answer = answer.replace(b"event: message", b"event: debug", 1)
            args = params.get("arguments") if isinstance(params.get("arguments"), dict) else {}
            if params.get("name") == "late_big":  # `mb` MB of result, `seconds` late (past a listing's timeout)
                answer = _sse_event(_tool_result(rpc.get("id"), "big:" + "x" * int(float(args.get("mb", 2)) * 2**20)))
                asyncio.get_running_loop().call_later(float(args.get("seconds", 2)), session.queue.put_nowait, answer)
            elif params.get("name") != "no_answer":
                session.queue.put_nowait(answer)
        elif "id" in rpc:
            session.queue.put_nowait(_sse_event(_result(rpc.get("id"), {"tools": []})))
        return await _send(writer, 202, b"Accepted")


class Canary(HostileUpstream):
    """Answers everything with 200 and records it: a hit is a gateway that left its listing."""

    def __init__(self) -> None:
        super().__init__(canary=True)


# --- writing answers ------------------------------------------------------------------------


def _result(rpc_id: Any, result: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": result}).encode()


def _tool_result(rpc_id: Any, text: str) -> bytes:
    return _result(rpc_id, {"content": [{"type": "text", "text": text}], "isError": False})


def _sse_event(message: bytes) -> bytes:
    return b"event: message\ndata: " + message + b"\n\n"


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes,
                headers: dict[str, str] | None = None) -> bool:
    h = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    writer.write(f"HTTP/1.1 {status} X\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode()
                 + b"\r\n" + body)
    await writer.drain()
    return True


async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _send_sse(writer: asyncio.StreamWriter, events: list[bytes], chunk: int = 64 * 1024,
                    head: bool = True) -> bool:
    """An event stream (`head`: its status, headers and priming event first), chunked, then its end."""
    if head:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await _chunk(writer, b"id: 0\ndata:\n\n")
    for event in events:
        for i in range(0, len(event), chunk):
            await _chunk(writer, event[i:i + chunk])
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


# --- a client that sends exactly what it is given ----------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def refusal(self) -> Any:
        """The gateway's refusal fields, whether it answered plainly or as a JSON-RPC error (its `data`)."""
        body = self.json()
        error = body.get("error") if isinstance(body, dict) and "jsonrpc" in body else None
        if isinstance(error, dict) and isinstance(error.get("data"), dict):
            return {**error["data"], "message": error.get("message")}
        return body

    @property
    def error(self) -> str | None:
        try:
            body = self.refusal()
        except ValueError:
            return None
        return body.get("error") if isinstance(body, dict) else None


class RawClient:
    """Keep-alive HTTP/1.1 over one socket, reconnecting when the gateway closes it."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.addr = (host, int(port))
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def request(self, method: str | bytes, target: str | bytes, headers: list[tuple[str, str]] | dict[str, str] = (),
                body: bytes = b"", raw_head: bytes | None = None) -> RawResponse:
        """Send one request; `target` and header values go out byte for byte (latin-1 for str)."""
        items = list(headers.items()) if isinstance(headers, dict) else list(headers)
        m = method.encode("latin-1") if isinstance(method, str) else method
        t = target.encode("latin-1") if isinstance(target, str) else target
        head = raw_head or (m + b" " + t + b" HTTP/1.1\r\nHost: gateway.test\r\n"
                            + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in items)
                            + (f"Content-Length: {len(body)}\r\n".encode()
                               if body or m.upper() in (b"POST", b"PUT", b"PATCH") else b"")
                            + b"\r\n")
        for attempt in (0, 1):
            if self.sock is None:
                self.sock = socket.create_connection(self.addr, timeout=self.timeout)
                self.buf = b""
            try:
                self.sock.sendall(head + body)
                return self._read(m.upper() == b"HEAD")
            except (ConnectionError, BrokenPipeError, EOFError) as e:
                self.close()
                if attempt:
                    raise ConnectionError(f"gateway closed the connection: {e}") from e
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        out, _, self.buf = self.buf.partition(sep)
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read(self, head_only: bool) -> RawResponse:
        lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
        h = {k.lower(): v for k, v in headers}
        body = b""
        if head_only or status in (204, 304) or 100 <= status < 200:
            pass
        elif h.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._until(b"\r\n")
                    break
                body += self._exactly(size)
                self._exactly(2)
        elif "content-length" in h:
            body = self._exactly(int(h["content-length"]))
        else:
            try:
                while True:
                    self._fill()
            except EOFError:
                body, self.buf = self.buf, b""
            self.close()
        if h.get("connection", "").lower() == "close":
            self.close()
        return RawResponse(status, headers, body)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
