"""The benchmark's load generator: N keep-alive HTTP/1.1 connections posting JSON-RPC tools/call.

Run it as its own process so that it does not share the proxy's core:

    python -m bench.loadgen --url http://127.0.0.1:PORT/slug --concurrency 32 --duration 5 \
        --max-requests 100000 [--key mcpm_test_...]

--url may be given several times (several gateway processes behind a notional load balancer):
connection i then goes to URL i mod n, round-robin, and keeps that target when it reconnects; the
result adds each target's connections, successes and errors under "per_target". With fewer
connections than URLs the last URLs get none. --key may be repeated too: connection i then sends key
(i div n_urls) mod n_keys, so with n_urls x n_keys connections every (URL, key) pair has one.

Each connection sends one request, waits for the whole response, and sends the next (a
closed loop), until the duration is up or max-requests have been started. Every request's
latency is recorded from the first byte written to the last byte read. Only 200s count as
successes; other statuses, timeouts and broken connections are counted as errors. One JSON
object with the results is printed on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_BILLED = re.compile(rb"\r\nx-mcpmeter-billed:[ \t]*([^\r]*)", re.IGNORECASE)
CONNECT_TIMEOUT = 5.0


class Broken(Exception):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive client connection with at most one request in flight."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            # A response without length ends with the connection.
            self._deliver(eof=True)
            if not self.waiter.done():
                self.waiter.set_exception(Broken("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._deliver()

    def _deliver(self, eof: bool = False) -> None:
        assert self.waiter is not None
        try:
            parsed = self._parse(eof)
        except (Broken, ValueError) as e:
            self.waiter.set_exception(Broken(str(e)))
            if self.transport is not None:
                self.transport.close()
            return
        if parsed is not None:
            self.waiter.set_result(parsed)

    def _parse(self, eof: bool = False) -> tuple[int, bytes, bool] | None:
        """(status, head, close) once a whole response is in the buffer, which is consumed.

        The head ends with its blank line; for statuses other than 200 the body follows it."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end + 2])
        try:
            status = int(head[9:12])
        except ValueError:
            raise Broken(f"bad status line {head[:40]!r}") from None
        start = end + 4
        if 100 <= status < 200 or status in (204, 304):
            total = start
        elif m := _CONTENT_LENGTH.search(head):
            total = start + int(m.group(1))
        elif _CHUNKED.search(head):
            total = _chunked_end(self.buf, start)
            if total < 0:
                return None
        elif eof:
            total = len(self.buf)
        else:
            return None  # body until close
        if len(self.buf) < total:
            return None
        body = b"" if status == 200 else bytes(self.buf[start:total])
        del self.buf[:total]
        if 100 <= status < 200:
            return self._parse(eof)  # skip interim responses
        return status, head + b"\r\n" + body, bool(_CLOSE.search(head))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        if self.closed or self.transport is None:
            raise Broken("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _chunked_end(buf: bytearray, pos: int) -> int:
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return -1
        size = int(bytes(buf[pos:line_end]).split(b";")[0] or b"0", 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            return trailer_end + 4 if trailer_end >= 0 else -1
        pos += size + 2
        if len(buf) < pos:
            return -1


def build_request(host: str, path: str, key: str | None, tool: str, rpc_id: int) -> bytes:
    body = (b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s","arguments":{"text":"hello"}}}'
            % (rpc_id, tool.encode()))
    lines = [
        f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
        "Accept: application/json, text/event-stream", "User-Agent: mcpmeter-bench/1",
        f"Content-Length: {len(body)}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


class Target:
    """One URL to load: where to connect and what to put in the request line and Host."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("the load generator only talks plain HTTP to loopback")
        self.url = url
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.authority = f"{self.host}:{self.port}"
        self.connections = self.ok = 0
        self.errors = 0


async def run(url: str | list[str], concurrency: int, duration: float, max_requests: int,
              key: str | list[str] | None, tool: str, timeout: float) -> dict[str, object]:
    urls = [url] if isinstance(url, str) else list(url)
    keys: list[str | None] = [key] if key is None or isinstance(key, str) else list(key)
    if not urls:
        raise SystemExit("no URL to load")
    targets = [Target(u) for u in urls]
    shown_url: object = urls[0] if len(urls) == 1 else urls
    loop = asyncio.get_running_loop()

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    billed: Counter[str] = Counter()
    samples: list[str] = []  # the first few error responses: status line .. body
    started = 0
    reconnects = 0

    async def connect(target: Target) -> Connection:
        _, conn = await asyncio.wait_for(loop.create_connection(Connection, target.host, target.port),
                                         CONNECT_TIMEOUT)
        return conn

    # Round-robin: connection i goes to target i mod n, with key (i div n) mod (number of keys).
    assigned = [targets[i % len(targets)] for i in range(concurrency)]
    assigned_keys = [keys[(i // len(targets)) % len(keys)] for i in range(concurrency)]
    for target in assigned:
        target.connections += 1
    conns = await asyncio.gather(*(connect(t) for t in assigned), return_exceptions=True)
    failed = [c for c in conns if isinstance(c, BaseException)]
    if failed:
        for c in conns:
            if isinstance(c, Connection):
                c.close()
        return {"url": shown_url, "concurrency": concurrency, "fatal": f"cannot connect: {failed[0]!r}"}

    t_start = time.perf_counter()
    deadline = t_start + duration
    next_id = 0

    async def worker(conn: Connection, target: Target, key: str | None) -> None:
        nonlocal started, next_id, reconnects
        perf = time.perf_counter
        while started < max_requests and perf() < deadline:
            started += 1
            next_id += 1
            data = build_request(target.authority, target.path, key, tool, next_id)
            t0 = perf()
            try:
                if conn.closed:
                    reconnects += 1
                    conn = await connect(target)
                waiter = conn.request(data)
                timer = loop.call_later(timeout, _expire, waiter)
                try:
                    status, head, close = await waiter
                finally:
                    timer.cancel()
            except TimeoutError:
                errors["timeout"] += 1
                target.errors += 1
                conn.close()
                conn.closed = True
                continue
            except (Broken, OSError) as e:
                errors[f"connection: {e}"[:60]] += 1
                target.errors += 1
                conn.close()
                conn.closed = True
                continue
            elapsed = perf() - t0
            if status == 200:
                latencies.append(elapsed)
                target.ok += 1
                m = _BILLED.search(head)
                billed[m.group(1).decode(errors="replace") if m else "-"] += 1
            else:
                errors[f"status {status}"] += 1
                target.errors += 1
                if len(samples) < 3:
                    line, _, rest = head.partition(b"\r\n")
                    samples.append((line + b" " + rest.partition(b"\r\n\r\n")[2][:300]).decode(errors="replace"))
            if close:
                conn.close()
                conn.closed = True
        conn.close()

    await asyncio.gather(*(worker(c, t, k)  # type: ignore[arg-type]
                           for c, t, k in zip(conns, assigned, assigned_keys, strict=True)))
    elapsed = time.perf_counter() - t_start
    latencies.sort()
    ok = len(latencies)
    ms = [x * 1000 for x in latencies]
    result: dict[str, object] = {
        "url": shown_url,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 4),
        "requests": started,
        "ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": samples,
        "reconnects": reconnects,
        "billed": dict(billed),
        "rps": round(ok / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": _r(percentile(ms, 50)), "p90": _r(percentile(ms, 90)), "p99": _r(percentile(ms, 99)),
            "max": _r(ms[-1] if ms else None), "mean": _r(sum(ms) / ok if ok else None),
        },
    }
    if len(targets) > 1:
        result["per_target"] = [{"url": t.url, "connections": t.connections, "ok": t.ok, "errors": t.errors,
                                 "rps": round(t.ok / elapsed, 2) if elapsed > 0 else 0.0} for t in targets]
    return result


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, action="append",
                   help="http://127.0.0.1:PORT/PATH; repeat it to spread the connections round-robin over several")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="connections, one request in flight each")
    p.add_argument("--duration", "-d", type=float, default=5.0, help="seconds to send for (at most)")
    p.add_argument("--max-requests", "-n", type=int, default=1_000_000, help="requests to send (at most)")
    p.add_argument("--key", action="append", help="bearer key sent as Authorization; repeat it for several")
    p.add_argument("--tool", default="echo", help="the tools/call tool name")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one request may take")
    args = p.parse_args(argv)
    if not (1 <= args.concurrency <= 4096 and 0 < args.duration <= 3600 and args.max_requests >= 1):
        p.error("concurrency 1..4096, duration 0..3600 s, max-requests >= 1")
    urls = args.url[0] if len(args.url) == 1 else args.url
    key = args.key[0] if args.key and len(args.key) == 1 else args.key
    result = asyncio.run(run(urls, args.concurrency, args.duration, args.max_requests, key, args.tool, args.timeout))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 1 if "fatal" in result else 0


if __name__ == "__main__":
    sys.exit(main())
