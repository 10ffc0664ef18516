"""The official TypeScript MCP SDK on both sides of the gateway, on both backends (issue 11).

Calls that outlive their POST, as the TypeScript SDK makes them: its own `ssePollingExample` server
(SEP-1699: the server closes the call's SSE stream after an event id, and its client resumes by GET +
`Last-Event-ID`), a server built the same way with timings a test chooses, and its client's cancellation
(an AbortSignal, or its request timeout: `notifications/cancelled`). Versions are pinned in
tests/ts/package.json and package-lock.json; `./scripts/test` installs them (`npm ci`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.backends import Backend, TestConsumer
from tests.gateway_proc import ROOT, Gateway
from tests.test_e2e_gateway import eventually, slug

TS = ROOT / "tests" / "ts"
SDK = "@modelcontextprotocol/sdk"
PRICE = 1000
START_TIMEOUT = 15.0
CLIENT_TIMEOUT = 60.0


def _missing() -> str | None:
    """Why the TypeScript side cannot run here, or None."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (install Node.js >= 20 with npm)"
    pinned = json.loads((TS / "package.json").read_text())["dependencies"][SDK]
    installed = TS / "node_modules" / SDK / "package.json"
    if not installed.exists():
        return f"{SDK} is not installed in tests/ts (run ./scripts/test, or `npm ci --prefix tests/ts`)"
    version = json.loads(installed.read_text())["version"]
    if version != pinned:
        return f"tests/ts has {SDK} {version}, the pin is {pinned} (run `npm ci --prefix tests/ts`)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _ts_sdk_installed() -> None:
    reason = _missing()
    if reason is not None:
        if os.environ.get("MCPMETER_REQUIRE_BACKENDS") == "1":  # CI: a skipped test here is a failure
            pytest.fail(f"MCPMETER_REQUIRE_BACKENDS=1 but the TypeScript SDK tests cannot run: {reason}")
        pytest.skip(f"TypeScript SDK tests not run: {reason}")


class NodeServer:
    """A tests/ts server script in a node process; its stdout's JSON lines are kept as they come."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(["node", script, *args], cwd=TS, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        started = self._listening.wait(START_TIMEOUT)
        url = next((json.loads(line)["url"] for line in self.lines if line.startswith('{"url"')), None)
        if not started or url is None:
            self.stop()
            raise RuntimeError(f"node {script} did not start: {''.join(self.lines)[-2000:]}")
        self.url = str(url)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith('{"url"'):
                self._listening.set()
        self._listening.set()  # it exited

    def events(self, session: str, kind: str) -> list[dict[str, Any]]:
        """What the server reported of one session: {"event": kind, ...} lines (polling_server.mjs)."""
        return [e for e in (json.loads(line) for line in list(self.lines) if line.startswith('{"event"'))
                if e["event"] == kind and e["sessionId"] == session]

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def example() -> Iterator[NodeServer]:
    """The SDK's ssePollingExample as shipped (retry interval 2 s)."""
    server = NodeServer("example_server.mjs")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def polling() -> Iterator[NodeServer]:
    """The same kind of server with timings chosen per call; the client resumes 0.3 s after a close."""
    server = NodeServer("polling_server.mjs", "--retry-ms", "300")
    yield server
    server.stop()


async def ts_client(gw: Gateway, path: str, c: TestConsumer, calls: list[dict[str, Any]],
                    version: str = "2025-11-25") -> dict[str, Any]:
    """Run tests/ts/client.mjs through the gateway; its summary (see that file). `version`: the protocol
    revision the server agrees to."""
    proc = await asyncio.create_subprocess_exec(
        "node", "client.mjs", gw.url + path, json.dumps(calls), cwd=TS, env={**os.environ, "MCPMETER_KEY": c.key},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["protocolVersion"] == version
    return summary


def journal(backend: Backend, c: TestConsumer) -> list[tuple[str, int, int, str | None]]:
    rows = backend.query("SELECT tool_name, status, refunded, reason FROM mcpmeter_calls WHERE user_id = %s"
                         " AND settled_at IS NOT NULL ORDER BY created_at, request_id", (c.user_id,))
    return [(t, int(st), int(r), why) for t, st, r, why in rows]


def refunds(backend: Backend, c: TestConsumer) -> list[tuple[int, str]]:
    """The refund rows of a consumer's ledger, with the reason their description names."""
    rows = backend.query("SELECT amount_micro_cents, description FROM credit_transactions WHERE user_id = %s"
                         " AND type = 'refund' ORDER BY id", (c.user_id,))
    return [(int(a), str(d)) for a, d in rows]


def resumes(summary: dict[str, Any]) -> list[str]:
    """The Last-Event-ID of each GET the client made to resume a stream."""
    return [h["lastEventId"] for h in summary["http"] if h["method"] == "GET" and h["lastEventId"]]


def listing(backend: Backend, server: NodeServer, prefix: str, timeout: int = 10) -> tuple[str, int]:
    """A listing whose upstream is `server`: its gateway path and id."""
    s = slug(prefix)
    return f"/{s}", backend.add_listing(s, server.url, price=PRICE, timeout=timeout)


# --- (a) SEP-1699: the server closes the call's stream, the client resumes and is billed once --------


async def test_the_sdk_example_long_task_resumed_by_the_sdk_client_is_billed_once(
        gateway: Gateway, backend: Backend, example: NodeServer) -> None:
    path, _ = listing(backend, example, "ts-example")
    c = backend.add_consumer(credit=10_000)
    summary = await ts_client(gateway, path, c, [{"tool": "long-task"}, {"tool": "long-task"}])
    for call in summary["calls"]:
        assert call["ok"] and call["text"] == "Long task completed successfully!", call
        # the example's progress, including what it sent while the client was away
        assert "Progress: 75% - Almost done (sent while client disconnected)..." in call["messages"]
        assert call["tokens"]  # the POST stream's priming event: an id to resume from
    assert len(resumes(summary)) == 2  # each answer came on a GET + Last-Event-ID through the gateway
    assert await eventually(lambda: journal(backend, c) == [("long-task", 200, 0, "result")] * 2)
    assert [(u["tool_name"], u["billed"]) for u in backend.usage(c)] == [("long-task", PRICE)] * 2
    assert backend.balance(c.user_id) == 10_000 - 2 * PRICE


async def test_a_parked_call_with_progress_on_its_own_stream_is_billed_once(
        gateway: Gateway, backend: Backend, polling: NodeServer) -> None:
    path, _ = listing(backend, polling, "ts-resume")
    c = backend.add_consumer(credit=10_000)
    summary = await ts_client(gateway, path, c, [{"tool": "late-task", "args": {"closeAfterMs": 100,
                                                                                 "answerAfterMs": 1200}}])
    [call] = summary["calls"]
    assert call["ok"] and call["text"] == "late-task answered after 1300 ms", call
    assert call["messages"] == ["late-task: started", "late-task: answering"]
    assert resumes(summary)
    assert await eventually(lambda: journal(backend, c) == [("late-task", 200, 0, "result")])
    await asyncio.sleep(0.5)  # nothing settles it twice
    assert journal(backend, c) == [("late-task", 200, 0, "result")] and len(backend.usage(c)) == 1
    assert backend.balance(c.user_id) == 10_000 - PRICE


# --- (b) the client cancels: AbortSignal or its request timeout -> notifications/cancelled -> refund ------


async def test_cancellation_from_the_sdk_client_is_refunded_with_its_reason(
        gateway: Gateway, backend: Backend, polling: NodeServer) -> None:
    path, mcp = listing(backend, polling, "ts-cancel")
    c = backend.add_consumer(credit=10_000)
    summary = await ts_client(gateway, path, c, [
        # running: its POST stream is open
        {"tool": "slow", "args": {"ms": 4000}, "abortAfterMs": 600, "abortReason": "user stopped"},
        {"tool": "slow", "args": {"ms": 4000}, "timeoutMs": 600},
        # parked: the server closed its stream, the client is on the resumed GET
        {"tool": "late-task", "args": {"closeAfterMs": 100, "answerAfterMs": 4000}, "abortAfterMs": 1500,
         "abortReason": "parked, then stopped"},
        # the next call in the same session is billed as usual
        {"tool": "slow", "args": {"ms": 0}},
    ])
    aborted, timed_out, parked, last = summary["calls"]
    assert aborted["error"] == {"code": -32001, "message": "MCP error -32001: user stopped"}
    assert timed_out["error"] == {"code": -32001, "message": "MCP error -32001: Request timed out"}
    assert parked["error"]["message"] == "MCP error -32001: parked, then stopped" and parked["tokens"]
    assert last["ok"] and last["text"] == "slow answered after 0 ms"
    assert resumes(summary)  # the parked call was being resumed when it was cancelled
    # The notifications reached the server as the client sent them: the SDK aborted those three tools.
    cancelled = await eventually(lambda: len(polling.events(summary["sessionId"], "cancelled")) == 3
                                 and polling.events(summary["sessionId"], "cancelled"))
    assert sorted((e["tool"], e["reason"]) for e in cancelled) == [
        ("late-task", "parked, then stopped"), ("slow", "McpError: MCP error -32001: Request timed out"),
        ("slow", "user stopped")]
    assert await eventually(lambda: sorted(journal(backend, c)) == [
        ("late-task", 499, 1, "cancelled"), ("slow", 200, 0, "result"), ("slow", 499, 1, "cancelled"),
        ("slow", 499, 1, "cancelled")])
    assert refunds(backend, c) == [(PRICE, f"refund: {tool} on mcp {mcp} (cancelled)")
                                   for tool in ("slow", "slow", "late-task")]
    # The parked call's refund and the last call's bill settle on their own tasks: either row may come first.
    assert sorted((u["tool_name"], u["billed"]) for u in backend.usage(c)) == [
        ("late-task", 0), ("slow", 0), ("slow", 0), ("slow", PRICE)]
    assert backend.balance(c.user_id) == 10_000 - PRICE


# --- (c) the listing's timeout passes while the call is parked: refunded, its late answer dropped -------


async def test_a_parked_call_past_the_listing_timeout_is_refunded_and_its_late_answer_not_delivered(
        gateway: Gateway, backend: Backend, polling: NodeServer) -> None:
    path, mcp = listing(backend, polling, "ts-late", timeout=1)
    c = backend.add_consumer(credit=10_000)
    summary = await ts_client(gateway, path, c, [
        {"tool": "late-task", "args": {"closeAfterMs": 100, "answerAfterMs": 2000}, "timeoutMs": 4500}])
    [call] = summary["calls"]
    # The server answered (it logged so, and its last progress came through on the resumed stream) ...
    assert call["messages"] == ["late-task: started", "late-task: answering"]
    assert await eventually(lambda: polling.events(summary["sessionId"], "answered"))
    # ... and the client never got the answer: its own timeout ended the call.
    assert call["error"] == {"code": -32001, "message": "MCP error -32001: Request timed out"}, call
    # The dropped event kept its id: the client resumed again from past it.
    ids = resumes(summary)
    assert len(ids) >= 2 and ids[-1] != ids[0]
    assert await eventually(lambda: journal(backend, c) == [("late-task", 504, 1, "no_answer_by_timeout")])
    assert refunds(backend, c) == [(PRICE, f"refund: late-task on mcp {mcp} (no_answer_by_timeout)")]
    assert [(u["tool_name"], u["billed"]) for u in backend.usage(c)] == [("late-task", 0)]
    assert backend.balance(c.user_id) == 10_000


# --- an event MCP clients cannot read, before the answer: the call ends with the meter's error ----------


async def test_an_unreadable_event_before_the_answer_ends_the_ts_call_with_an_error_and_refunds_it(
        gateway: Gateway, backend: Backend, fault_url: str) -> None:
    """The TypeScript SDK reports such an event and reads on: the error the meter puts in its place ends the
    call, and the answer after it never arrives (tests/test_e2e_hostile_parse.py: the Python SDK's side)."""
    s = slug("ts-unreadable")
    backend.add_listing(s, f"{fault_url}/mcp", price=PRICE)
    c = backend.add_consumer(credit=10_000)
    summary = await ts_client(gateway, f"/{s}", c, [{"tool": "sse_unreadable"}, {"tool": "ok"}],
                              version="2025-06-18")  # the fault server's
    unreadable, ok = summary["calls"]
    assert unreadable["ok"] is False and unreadable["error"]["code"] == -32011
    assert "a message MCP clients cannot read" in unreadable["error"]["message"]
    assert ok["ok"] and ok["text"] == "ok"  # the session goes on
    assert await eventually(lambda: sorted(journal(backend, c)) == [
        ("ok", 200, 0, "result"), ("sse_unreadable", 200, 1, "unreadable_event")])
    assert backend.balance(c.user_id) == 10_000 - PRICE
