"""What the agent-protocol features (issue 10) cost a paid call, measured in-process.

A wrk run cannot resolve 50 µs on this machine (its run-to-run noise is larger), so each feature
is timed where it runs: a real gateway (embedded store, in-process cache) is configured through
mitmproxy's test context, one real paid call goes through its request hook, and the function each
hook calls for the feature is then timed over many iterations on that call:

  metrics        Metrics.settled (the counters and histograms of one settled call)
  circuit        Circuits.admit before forwarding + Circuits.record after the answer
  idempotency    the Idempotency-Key check of a request that has none
  receipt-json   the receipt written into a JSON answer (receipts.write_body)
  receipt-sse    the receipt written into an SSE answer: the editor (stream_edit.StreamEditor) made
                 and fed the stream watcher's parse of the events and its reading of the answer
                 (the meter parses the stream and reads the answer with or without receipts)

The hot path of a paid call runs the first three and the receipt of its kind of answer; that sum,
for a JSON answer and for an SSE answer, is what the target (50 µs) is checked against. Refusal
bodies and tools/list prices are shown too (they run on refusals and lists, not on a paid call).

  whole paid call  every hook of one paid call with a JSON answer, in mitmproxy's order, and its
                 settlement (requestheaders, request, responseheaders, response, drain): the event
                 loop's CPU for all the meter does per call, the SQLite thread's statements left out.
                 Not a feature: the meter's own per-call cost, which a wrk run here cannot resolve
                 either, for comparing versions (issue 8).
"""

from __future__ import annotations

import asyncio
import gc
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addon import receipts, rpc_errors
from addon.errors import GatewayError
from addon.gateway import Mcpmeter
from addon.call import event_outcome
from addon.jsonrpc import Outcome
from addon.sse import SseParser
from addon.stream_edit import StreamEditor

TARGET_US = 50.0
KEY = "mcpm_test_bench0123456789"
SEED: dict[str, Any] = {
    "listings": [{"slug": "bench", "upstream_url": "http://127.0.0.1:1/mcp", "price_micro_cents": 1000,
                  "tool_prices": {f"tool{i}": 1000 + i for i in range(10)},
                  "rate_limit_per_minute": 10**9, "rate_limit_per_day": 10**10}],
    "consumers": [{"key": KEY, "credit_micro_cents": 10**15}],
}
# A typical small tool result, as the Python SDK writes it.
ANSWER = {"jsonrpc": "2.0", "id": 1, "result": {
    "content": [{"type": "text", "text": "The weather in Lisbon is sunny, 21 °C, wind 12 km/h from the north."}],
    "structuredContent": {"city": "Lisbon", "temperature_c": 21, "wind_kmh": 12}, "isError": False}}
PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 1, "total": 2, "message": "fetching"}}
TOOLS = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
    {"name": f"tool{i}", "description": "A tool of the bench.", "inputSchema": {"type": "object"}} for i in range(10)]}}


def _flow(body: dict[str, Any]) -> http.HTTPFlow:
    content = json.dumps(body).encode()
    headers = http.Headers([(b"Host", b"gw.example:3010"), (b"Content-Type", b"application/json"),
                            (b"Accept", b"application/json, text/event-stream"),
                            (b"Authorization", f"Bearer {KEY}".encode()),
                            (b"Content-Length", str(len(content)).encode())])
    req = tutils.treq(host="127.0.0.1", port=3010, method=b"POST", path=b"/bench", headers=headers, content=content)
    flow = tflow.tflow(req=req)
    flow.live = True
    return flow


def _sse_events() -> list[bytes]:
    """A streamed answer: the priming event, two progress notifications, the result; one chunk each."""
    return [b"id: 0\ndata:\n\n",
            *(b"event: message\nid: %d\ndata: %s\n\n" % (i, json.dumps(PROGRESS).encode()) for i in (1, 2)),
            b"event: message\nid: 3\ndata: " + json.dumps(ANSWER).encode() + b"\n\n", b""]


async def _time(work: Callable[[], Awaitable[Any] | Any], setup: Callable[[], Any] | None = None,
                n: int = 2000, rounds: int = 7) -> float:
    """The least over `rounds` of the µs of CPU (this thread's) per call of `work`; `setup`, run
    before each call, is timed alone and taken off. CPU time, not wall time, and the least round:
    other processes on the machine lengthen a loop's wall clock and, sharing caches and cores, some
    rounds' CPU time too; none makes a round shorter."""
    async def loop(with_work: bool) -> int:
        gc.disable()
        try:
            t0 = time.thread_time_ns()
            for _ in range(n):
                if setup is not None:
                    setup()
                if with_work:
                    result = work()
                    if asyncio.iscoroutine(result):
                        await result
            return time.thread_time_ns() - t0
        finally:
            gc.enable()
    means = []
    for _ in range(rounds):
        spent = await loop(True) - (await loop(False) if setup is not None else 0)
        means.append(max(spent, 0) / n / 1000)
    return min(means)


async def measure(n: int = 3000) -> dict[str, float]:
    """µs per call for each feature (see the module's docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "mcpmeter.yaml"
        config.write_text(yaml.safe_dump({"sqlite_path": str(Path(tmp) / "bench.db"), "seed": SEED}))
        addon = Mcpmeter()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, mcpmeter_config=str(config))
            try:
                return await _measure(addon, n)
            finally:
                task = addon.done()
                if task is not None:
                    await task


async def _measure(addon: Mcpmeter, n: int) -> dict[str, float]:
    flow = _flow({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "tool3", "arguments": {}}})
    await addon.request(flow)  # a real paid call: authenticated, rate-limited, charged
    call = addon.calls[flow.id]
    assert call.charged is not None and call.listing is not None, "the bench's call was not charged"
    listing, consumer = call.listing, call.consumer
    assert consumer is not None
    call.forwarded = call.started + 0.001
    call.status, call.outcome = 200, Outcome.RESULT
    out: dict[str, float] = {}

    out["metrics"] = await _time(lambda: addon.metrics.settled(call, False, 200), n=n)

    async def circuit() -> None:
        await addon.circuits.admit(listing, priced=True)
        await addon.circuits.record(listing, consumer.user_id, 200, None)
    out["circuit"] = await _time(circuit, n=n)

    out["idempotency"] = await _time(lambda: addon.admission._idempotent(flow, call, listing), n=n)

    answer = json.dumps(ANSWER).encode()

    flow.response = http.Response.make(200, answer, {"Content-Type": "application/json"})
    json_response = flow.response

    def fresh_json() -> None:  # the upstream's answer again (cheap: the timing of this is taken off)
        flow.response = json_response
        json_response.raw_content = answer
    out["receipt-json"] = await _time(lambda: receipts.write_body(flow, call, addon.store, addon.free_used),
                                      setup=fresh_json, n=n)
    fresh_json()
    await receipts.write_body(flow, call, addon.store, addon.free_used)
    assert receipts.RECEIPT in json.loads(flow.response.content)["result"]["_meta"], "no receipt was written"

    events = _sse_events()

    sse_response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
    flow.response = sse_response

    # The stream as the watcher takes it: its parse and its reading of the answer, which the meter
    # does with or without receipts, done once here; what is timed is the editor fed from them.
    parser, parsed, answer = SseParser(), [], None
    for chunk in events:
        found = parser.feed(chunk)
        for event in found:
            if answer is None and (outcome := event_outcome(event, 1)) is not None:
                answer = event, outcome
        parsed.append((chunk, found, parser.pending_from, answer))

    async def sse() -> bytes:  # as the watcher makes its editor (stream_watch.attach) and feeds it
        editor = StreamEditor(await receipts.stream_plan(flow, call, addon.store, addon.free_used))
        return b"".join([editor.feed(*step) for step in parsed])
    out["receipt-sse"] = await _time(sse, n=n)
    assert receipts.RECEIPT.encode() in await sse(), "no receipt was written into the stream"

    tools_flow = _flow({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    await addon.request(tools_flow)
    tools_call = addon.calls[tools_flow.id]
    tools = json.dumps(TOOLS).encode()

    tools_flow.response = http.Response.make(200, tools, {"Content-Type": "application/json"})
    tools_response = tools_flow.response

    def fresh_tools() -> None:
        tools_response.raw_content = tools
    out["prices (tools/list, 10 tools)"] = await _time(
        lambda: receipts.write_body(tools_flow, tools_call, addon.store, addon.free_used), setup=fresh_tools, n=n // 3)
    out[WHOLE_CALL] = await _whole_call(addon, answer_bytes=json.dumps(ANSWER).encode(), n=max(n // 6, 100))
    error = GatewayError("rate_limited", retry_after=3, scope="minute")
    out["refusal (JSON-RPC error)"] = await _time(
        lambda: rpc_errors.refusal_body(error, call.request_id, 1, None), n=n)
    return out


async def _whole_call(addon: Mcpmeter, answer_bytes: bytes, n: int) -> float:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "tool3", "arguments": {}}}
    made: list[tuple[http.HTTPFlow, http.Response]] = []

    def fresh() -> None:  # a new request and its upstream answer (made outside the timing)
        made[:] = [(_flow(body), http.Response.make(200, answer_bytes, {"Content-Type": "application/json"}))]

    async def paid_call() -> None:
        flow, response = made[0]
        addon.requestheaders(flow)
        await addon.request(flow)
        flow.response = response
        await addon.responseheaders(flow)
        await addon.response(flow)
        await addon.drain()

    fresh()
    await paid_call()
    assert made[0][0].response is not None and made[0][0].response.headers.get("X-Mcpmeter-Billed") == "1003", (
        "the bench's whole call was not billed")
    return await _time(paid_call, setup=fresh, n=n)


WHOLE_CALL = "whole paid call (all hooks)"
HOT_PATH = ("metrics", "circuit", "idempotency")


def hot_path_us(figures: dict[str, float], answer: str = "json") -> float:
    """What a paid call pays for all of it: the three always-on parts and its answer's receipt."""
    return sum(figures[k] for k in HOT_PATH) + figures[f"receipt-{answer}"]


def verdicts(figures: dict[str, float]) -> dict[str, tuple[float, bool]]:
    """Per kind of answer: the paid call's total and whether it is within TARGET_US."""
    return {answer: (total, total <= TARGET_US)
            for answer in ("json", "sse") for total in (hot_path_us(figures, answer),)}


def report(figures: dict[str, float]) -> str:
    lines = ["agent-protocol features (issue 10), in-process, µs of CPU per call (least of 7 rounds)", "-" * 72]
    for name, us in figures.items():
        where = ("paid call" if name in HOT_PATH or name.startswith("receipt") else
                 "the meter's event-loop CPU per paid call, for comparing versions" if name == WHOLE_CALL
                 else "not on a paid call")
        lines.append(f"{name:<34} {us:8.1f}   {where}")
    for answer, (total, ok) in verdicts(figures).items():
        label = f"paid call, {answer.upper()} answer (sum)"
        lines.append(f"{label:<34} {total:8.1f}   target <= {TARGET_US:.0f} µs  {'PASS' if ok else 'MISS'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(asyncio.run(measure())))
