"""A trivial, fast JSON-RPC responder: the upstream MCP server of the benchmark.

Raw asyncio HTTP/1.1 with keep-alive. Any POST is answered 200 with a small JSON-RPC
tool result echoing the request's id (a JSON body, or with --sse one `message` event of an
event stream, as MCP SDK servers answer a tools/call by default); a GET is answered with the counters so far
(`{"connections": ..., "requests": ...}`), so the benchmark can see whether the proxy reuses
its upstream connections. It does as little
as possible so that what the benchmark measures is the proxy in front of it.

    python -m bench.upstream [--host 127.0.0.1] [--port 0] [--sse]

prints `READY <port>` on stdout once it listens, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nContent-Length: "
SSE = {"on": False}  # --sse: answers are one `message` event of an event stream
MAX_HEADER = 64 * 1024


def answer_body(body: bytes) -> bytes:
    """The JSON-RPC result for one request body: `isError: false`, the request's id echoed."""
    rpc_id: object = None
    try:
        message = json.loads(body) if body else None
        if isinstance(message, dict):
            rpc_id = message.get("id")
    except ValueError:
        pass
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id,
                       "result": {"content": [{"type": "text", "text": "ok"}], "isError": False}},
                      separators=(",", ":")).encode()


STATS = {"connections": 0, "requests": 0}


class Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = bytearray()
        close = False
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEADER:
                    close = True
                break
            head = bytes(self.buf[:end + 2])
            if _CHUNKED.search(head):
                body_start = end + 4
                body, consumed = _dechunk(self.buf, body_start)
                if consumed < 0:
                    break  # the rest of the chunked body has not arrived yet
                del self.buf[:consumed]
            else:
                m = _CONTENT_LENGTH.search(head)
                length = int(m.group(1)) if m else 0
                total = end + 4 + length
                if len(self.buf) < total:
                    break
                body = bytes(self.buf[end + 4:total])
                del self.buf[:total]
            response_head = _HEAD
            if head[:4].upper() == b"POST":
                STATS["requests"] += 1
                payload = answer_body(body)
                if SSE["on"]:
                    payload, response_head = b"event: message\ndata: " + payload + b"\n\n", _SSE_HEAD
            else:
                payload = json.dumps(STATS).encode()
            out += response_head + str(len(payload)).encode() + b"\r\n\r\n" + payload
            if _CLOSE.search(head):
                close = True
                break
        if out and self.transport is not None:
            self.transport.write(bytes(out))
        if close and self.transport is not None:
            self.transport.close()


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int]:
    """(body, index after it) of a chunked body starting at `pos`, or (b"", -1) if incomplete."""
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return b"", -1
        size = int(bytes(buf[pos:line_end]).split(b";")[0] or b"0", 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            return (bytes(body), trailer_end + 4) if trailer_end >= 0 else (b"", -1)
        if len(buf) < pos + size + 2:
            return b"", -1
        body += buf[pos:pos + size]
        pos += size + 2


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Responder, host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)")
    p.add_argument("--sse", action="store_true", help="answer POSTs with an event stream of one message")
    args = p.parse_args(argv)
    SSE["on"] = args.sse
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("the benchmark upstream only listens on loopback", file=sys.stderr)
        return 2
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
