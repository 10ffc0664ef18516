"""The addon's hooks driven directly with mitmproxy's taddons/tflow: no sockets, no subprocesses.

Each test builds a flow as mitmproxy would hand it to the addon in reverse mode, calls the
hooks in the order mitmproxy calls them, plays the upstream by setting `flow.response` or
`flow.error`, and checks the flow and the SQLite ledger the embedded store wrote.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import exceptions, http
from mitmproxy.flow import Error
from mitmproxy.net.http import http1
from mitmproxy.test import taddons, tflow, tutils

from addon import compat, config as config_module, forwarding
from addon.errors import rpc_code
from addon.gateway import META, Mcpmeter
from tests import redisutil
from tests.refusals import refusal
from addon.store import StoreUnavailable
from tests.mitm_fakes import FakeHandler, FakeProxyserver

pytestmark = pytest.mark.timeout(30)

ALICE = "mcpm_test_alice0123456789"
BOB = "mcpm_test_bob0123456789"
SUSPENDED = "mcpm_test_suspended0123"
POOR = "mcpm_test_poor0123456789"
CAPPED = "mcpm_test_capped0123456"
UNKNOWN = "mcpm_test_nosuchkey999999"
ALL_TOKENS = (ALICE, BOB, SUSPENDED, POOR, CAPPED, UNKNOWN)

OPENING = 1_000_000
PRICE = 1000

# How the request reaches the addon in reverse mode: aimed at the --mode reverse: target.
CLIENT_HOST, CLIENT_PORT = "127.0.0.1", 3011
PUBLIC_HOST = "gw.example:3010"
UPSTREAM = "http://127.0.0.1:1"

SEED: dict[str, Any] = {
    "listings": [
        {"slug": "echo-test", "upstream_url": f"{UPSTREAM}/mcp/", "price_micro_cents": PRICE,
         "tool_prices": {"slow_count": 5000, "freebie": 0},
         "upstream_headers": {"X-Publisher-Key": "pub-secret"}, "upstream_timeout_seconds": 10},
        {"slug": "freebies", "upstream_url": f"{UPSTREAM}/free", "price_micro_cents": PRICE,
         "free_calls_per_consumer": 1},
        {"slug": "strict", "upstream_url": f"{UPSTREAM}/strict", "price_micro_cents": PRICE,
         "rate_limit_per_minute": 1},
        {"slug": "lenient", "upstream_url": f"{UPSTREAM}/lenient", "price_micro_cents": PRICE,
         "bill_tool_errors": True},
        {"slug": "old-one", "upstream_url": f"{UPSTREAM}/old", "status": "archived", "price_micro_cents": PRICE},
        {"slug": "paused-one", "upstream_url": f"{UPSTREAM}/paused", "status": "paused", "price_micro_cents": PRICE},
        {"slug": "draft-one", "upstream_url": f"{UPSTREAM}/draft", "status": "draft", "price_micro_cents": PRICE},
        {"slug": "no-upstream", "status": "live", "price_micro_cents": PRICE},
    ],
    "consumers": [
        {"key": ALICE, "user_id": 1, "project_id": 1, "credit_micro_cents": OPENING},
        {"key": BOB, "user_id": 2, "project_id": 2, "credit_micro_cents": OPENING},
        {"key": SUSPENDED, "user_id": 3, "project_id": 3, "credit_micro_cents": OPENING, "status": "suspended"},
        {"key": POOR, "user_id": 4, "project_id": 4, "credit_micro_cents": 100},
        {"key": CAPPED, "user_id": 5, "project_id": 5, "credit_micro_cents": OPENING,
         "spending_cap_cents_per_month": 0},
    ],
}
USERS = {ALICE: 1, BOB: 2, SUSPENDED: 3, POOR: 4, CAPPED: 5}
MAX_BODY = 4096


# --- fixtures and helpers ----------------------------------------------------------------------


class Db:
    """Reads the embedded store's SQLite file behind the addon's back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path)) as conn:
            return conn.execute(sql, args).fetchall()

    def balance(self, user_id: int = 1) -> int:
        return self.rows("SELECT credit_micro_cents FROM users WHERE id = ?", user_id)[0][0]

    def balances(self) -> dict[int, int]:
        return dict(self.rows("SELECT id, credit_micro_cents FROM users"))

    def ledger(self, user_id: int = 1) -> list[tuple[str, int]]:
        return [(t, a) for t, a in self.rows(
            "SELECT type, amount_micro_cents FROM credit_transactions WHERE user_id = ? ORDER BY id", user_id)]

    def usage(self) -> list[dict[str, Any]]:
        with closing(sqlite3.connect(self.path)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM usage_events ORDER BY id")]

    def journal(self) -> list[tuple[Any, ...]]:
        return self.rows("SELECT request_id, verdict, amount_micro_cents, refunded, settled_at IS NOT NULL"
                         " FROM mcpmeter_calls")

    def free_used(self, slug: str, user_id: int = 1) -> int:
        rows = self.rows("SELECT u.free_calls_used FROM mcp_consumer_usage u JOIN mcps m ON m.id = u.mcp_id"
                         " WHERE m.slug = ? AND u.user_id = ?", slug, user_id)
        return rows[0][0] if rows else 0

    def assert_reconciled(self) -> None:
        """I1: every balance equals the sum of its ledger rows (the seed's opening balance is a topup)."""
        for user_id, balance in self.balances().items():
            assert balance == sum(a for _, a in self.ledger(user_id)), f"user {user_id} does not reconcile"


@dataclasses.dataclass
class Gw:
    addon: Mcpmeter
    tctx: taddons.context
    db: Db


def write_config(tmp_path: Path, **extra: Any) -> Path:
    config = {"sqlite_path": str(tmp_path / "mcpmeter.db"), "max_body_bytes": MAX_BODY, "seed": SEED, **extra}
    path = tmp_path / "mcpmeter.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No environment override may redirect these tests, and a store opened with the default
    path (what a rolled-back bad option reloads) lands in tmp_path, not in the repository."""
    for name in (*config_module._ENV_STR, *config_module._ENV_INT, *config_module._ENV_FLOAT,
                 *config_module._ENV_MYSQL, *config_module._ENV_REDIS, *config_module._ENV_LIST, "MCPMETER_SHADOW"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path)))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


def rpc(method: str, rpc_id: Any = 1, **params: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rpc_id is not None:
        message["id"] = rpc_id
    if params:
        message["params"] = params
    return message


def tool_call(name: str = "echo", rpc_id: Any = 1) -> dict[str, Any]:
    return rpc("tools/call", rpc_id, name=name, arguments={"text": "hi"})


def make_flow(
    path: str = "/echo-test",
    token: str | None = ALICE,
    body: Any = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> http.HTTPFlow:
    if body is None and method == "POST":
        body = tool_call()
    content = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    fields = [("Host", PUBLIC_HOST), ("Content-Type", "application/json"),
              ("Accept", "application/json, text/event-stream"), ("User-Agent", "claude-code/1.0")]
    if token is not None:
        fields.append(("Authorization", f"Bearer {token}"))
    fields += list((headers or {}).items())
    req = tutils.treq(host=CLIENT_HOST, port=CLIENT_PORT, method=method.encode(), path=path.encode(),
                      headers=http.Headers([(k.encode(), v.encode()) for k, v in fields]), content=content)
    if content:
        req.headers["Content-Length"] = str(len(content))
    flow = tflow.tflow(req=req)
    flow.live = True
    return flow


def json_response(message: Any, status: int = 200, headers: dict[str, str] | None = None) -> http.Response:
    return http.Response.make(status, json.dumps(message).encode(),
                              {"Content-Type": "application/json", **(headers or {})})


async def upstream_answers(gw: Gw, flow: http.HTTPFlow, response: http.Response) -> None:
    """What mitmproxy does when the upstream answers: responseheaders, then response."""
    flow.response = response
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    await gw.addon.drain()  # billed answers are recorded just after they are sent


async def upstream_fails(gw: Gw, flow: http.HTTPFlow, msg: str) -> None:
    flow.error = Error(msg)
    await gw.addon.error(flow)


def parse_raw(raw: bytes) -> tuple[http.Response, bytes]:
    """A raw HTTP/1 response (what compat sends in place of mitmproxy's error page)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    response = http1.read_response_head(head.split(b"\r\n"))
    assert response.headers.get("content-length") == str(len(body))
    return response, body


def pop_receipt(message: dict[str, Any]) -> dict[str, Any]:
    """The receipt out of an answer, and the answer as the upstream sent it."""
    holder_of, key = (message["result"], "_meta") if "result" in message else (message["error"], "data")
    receipt = holder_of[key].pop("mcpmeter/receipt")
    if not holder_of[key]:
        del holder_of[key]
    return receipt


def sent(out: bytes | list[bytes]) -> bytes:
    """What a stream callable let out (bytes, or a list of chunks; [] is nothing)."""
    return out if isinstance(out, bytes) else b"".join(out)


def forwarded(flow: http.HTTPFlow) -> bool:
    return flow.request.host == "127.0.0.1" and flow.request.port == 1


def meta(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata[META]


def is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def assert_no_secret(flow: http.HTTPFlow, caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    """The key is in nothing mitmweb shows or saves, and in no log line."""
    state = repr(flow.get_state())
    answer = compat._pending.get(flow.client_conn.id, b"")
    for secret in secrets or ALL_TOKENS:
        assert secret not in state
        assert secret not in repr(flow.metadata)
        assert secret not in (flow.comment or "")
        assert secret.encode() not in answer
        assert secret not in caplog.text


# --- forwarding a priced call ----------------------------------------------------------------


async def test_priced_call_is_retargeted_with_clean_headers_and_debited(gw: Gw) -> None:
    flow = make_flow("/echo-test/sub/path?x=1&y=2", headers={
        "Cookie": "session=consumer-cookie",
        "X-Forward-X-Api-Key": "consumer-upstream-key",
        "X-Forward-Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Publisher-Key": "forged-by-consumer",
        "Accept-Encoding": "gzip, br",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "hop",
        "Mcp-Session-Id": "s-123",
    })
    await gw.addon.request(flow)

    assert flow.response is None
    assert flow.request.url == f"{UPSTREAM}/mcp/sub/path?x=1&y=2"
    h = flow.request.headers
    assert "authorization" not in h and "cookie" not in h and "x-forwarded-host" not in h
    assert "connection" not in h and "x-hop" not in h
    assert h.get_all("host") == ["127.0.0.1:1"]
    assert h["accept-encoding"] == "identity"
    assert h["x-api-key"] == "consumer-upstream-key"
    assert not any(k.lower().startswith("x-forward-") for k in h)
    # The publisher's header wins; the flow shows it redacted, its value goes only on the wire.
    assert h.get_all("x-publisher-key") == ["(redacted)"]
    assert compat._hidden[flow.request] == [("x-publisher-key", "pub-secret")]
    assert h["mcp-session-id"] == "s-123"
    assert h["user-agent"] == "claude-code/1.0"
    assert json.loads(flow.request.content) == tool_call()

    m = meta(flow)
    assert m["slug"] == "echo-test" and m["tool"] == "echo" and m["price"] == PRICE
    assert m["method"] == "tools/call" and m["decision"] == "forwarded" and is_uuid4(m["request_id"])
    # I2: the debit is committed before the call leaves.
    assert gw.db.balance(1) == OPENING - PRICE
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]
    assert [(v, a, settled) for _, v, a, _, settled in gw.db.journal()] == [("debited", PRICE, 0)]
    assert gw.db.usage() == []  # recorded at settlement, not before


async def test_per_tool_price_and_upstream_without_subpath(gw: Gw) -> None:
    flow = make_flow("/echo-test", body=tool_call("slow_count"))
    await gw.addon.request(flow)
    assert flow.request.url == f"{UPSTREAM}/mcp"
    assert meta(flow)["price"] == 5000
    assert gw.db.balance(1) == OPENING - 5000


async def test_deadline_is_the_listing_timeout_capped(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    call = gw.addon.calls[flow.id]
    assert call.deadline is not None
    assert 9 < call.deadline.when() - asyncio.get_running_loop().time() <= 10

    gw.addon.config = dataclasses.replace(gw.addon.config, max_upstream_timeout_ms=2000)
    flow = make_flow()
    await gw.addon.request(flow)
    assert 1 < gw.addon.calls[flow.id].deadline.when() - asyncio.get_running_loop().time() <= 2


async def test_json_result_is_billed_and_stamped(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    request_id = meta(flow)["request_id"]
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))

    h = flow.response.headers
    assert h["X-Mcpmeter-Request-Id"] == request_id and is_uuid4(request_id)
    assert h["X-Mcpmeter-Billed"] == str(PRICE)
    assert h["X-Mcpmeter-Duration-Ms"].isdigit()
    assert h["X-Mcpmeter-Balance"] == str(OPENING - PRICE)
    assert "X-Mcpmeter-Refunded" not in h
    assert h["RateLimit-Limit"] == "60" and h["RateLimit-Remaining"] == "59"
    answer = json.loads(flow.response.content)
    receipt = answer["result"]["_meta"].pop("mcpmeter/receipt")  # the body gains only the receipt
    assert answer["result"] == {"content": [], "_meta": {}}
    assert receipt == {"request_id": request_id, "decision": "billed", "reason": "result",
                       "amount_micro_cents": PRICE, "balance_micro_cents": OPENING - PRICE}
    assert h["Content-Length"] == str(len(flow.response.raw_content))

    parts = flow.comment.split(" · ")
    assert "\n" not in flow.comment and len(parts) == 6
    assert parts[0].startswith("user 1 (mcpm_test_") and parts[0].endswith("…)")  # who, never the key
    assert parts[1] == "echo-test" and parts[2] == "echo" and parts[3] == f"price {PRICE} µ¢"
    assert parts[4] == f"billed ({PRICE} µ¢; result)" and str(OPENING - PRICE) in parts[5]
    assert flow.marked
    m = meta(flow)
    assert m["decision"] == "billed" and m["billed"] == PRICE and m["balance"] == OPENING - PRICE

    [row] = gw.db.usage()
    assert row["request_id"] == request_id and row["status"] == 200 and row["tool_name"] == "echo"
    assert row["billed_micro_cents"] == PRICE
    assert row["publisher_payout_micro_cents"] + row["platform_fee_micro_cents"] == PRICE
    assert row["platform_fee_micro_cents"] == PRICE * 2000 // 10_000
    assert row["user_agent"] == "claude-code/1.0" and row["api_key_id"] is not None
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]
    assert gw.addon.calls == {}
    gw.db.assert_reconciled()


async def test_free_tier_call_is_marked_free_and_a_refund_returns_the_slot(gw: Gw) -> None:
    flow = make_flow("/freebies")
    await gw.addon.request(flow)
    assert gw.db.free_used("freebies") == 1
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {}}))
    assert flow.response.headers["X-Mcpmeter-Billed"] == "free"
    assert meta(flow)["decision"] == "free" and flow.marked
    assert gw.db.balance(1) == OPENING

    flow = make_flow("/freebies")  # the allowance (1) is used up: this one is paid
    await gw.addon.request(flow)
    assert gw.db.balance(1) == OPENING - PRICE
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {}}))
    assert flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)

    flow = make_flow("/freebies", token=BOB)
    await gw.addon.request(flow)
    assert gw.db.free_used("freebies", 2) == 1
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "x"}}))
    assert gw.db.free_used("freebies", 2) == 0  # the refunded free call gave its slot back
    assert flow.response.headers["X-Mcpmeter-Refunded"] == "1"


# --- refunds -----------------------------------------------------------------------------------


REFUNDED_ANSWERS = {
    "rpc_error": (200, {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "boom"}}),
    "tool_error": (200, {"jsonrpc": "2.0", "id": 1, "result": {"isError": True, "content": []}}),
    "http_500": (500, {"error": "upstream exploded"}),
    "http_500_with_result": (500, {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}),
    "http_502_with_tool_error": (502, {"jsonrpc": "2.0", "id": 1, "result": {"isError": True}}),
    "http_404": (404, {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": "Session not found"}}),
    "no_answer": (200, {"jsonrpc": "2.0", "id": 2, "result": {}}),  # answers some other request id
}


@pytest.mark.parametrize("case", REFUNDED_ANSWERS)
async def test_failed_answers_are_refunded_exactly_once(gw: Gw, case: str) -> None:
    status, body = REFUNDED_ANSWERS[case]
    flow = make_flow()
    await gw.addon.request(flow)
    assert gw.db.balance(1) == OPENING - PRICE
    await upstream_answers(gw, flow, json_response(body, status))

    h = flow.response.headers
    assert flow.response.status_code == status  # passed through
    answer = json.loads(flow.response.content)
    if "id" in body and body["id"] == 1:  # the answer to the call carries the receipt
        receipt = pop_receipt(answer)
        assert receipt["decision"] == "refunded" and receipt["balance_micro_cents"] == OPENING
        assert receipt["amount_micro_cents"] == 0 and receipt["refunded_micro_cents"] == PRICE
    assert answer == body
    assert h["X-Mcpmeter-Refunded"] == "1"
    assert h["X-Mcpmeter-Billed"] == "0"
    assert h["X-Mcpmeter-Balance"] == str(OPENING)
    assert meta(flow)["decision"] == "refunded" and "refunded" in flow.comment and flow.marked
    assert gw.db.balance(1) == OPENING

    # mitmproxy may also report an error for the same flow (the client left, the stream broke).
    await upstream_fails(gw, flow, "Client disconnected.")
    await gw.addon.response(flow)

    assert gw.db.balance(1) == OPENING
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE), ("refund", PRICE)]
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == 0 and row["status"] == status
    [(_, verdict, amount, refunded, settled)] = gw.db.journal()
    assert (verdict, amount, refunded, settled) == ("debited", PRICE, 1, 1)
    gw.db.assert_reconciled()


async def test_tool_errors_are_billed_when_the_listing_opts_in(gw: Gw) -> None:
    flow = make_flow("/lenient")
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"isError": True}}))
    assert flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)
    assert "X-Mcpmeter-Refunded" not in flow.response.headers
    assert gw.db.balance(1) == OPENING - PRICE


async def test_upstream_error_then_late_response_hook_refunds_once(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "Connection refused")
    flow.response = json_response({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x"}}, 500)
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE), ("refund", PRICE)]
    assert len(gw.db.usage()) == 1


# --- SSE -------------------------------------------------------------------------------------


def sse_response() -> http.Response:
    return http.Response.make(200, b"", {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


PROGRESS = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                       "params": {"progressToken": "t", "progress": 1, "total": 2}})
# Things that look like an answer to id 1 but are not: a server->client request, a string id.
SERVER_REQUEST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}})
STRING_ID = json.dumps({"jsonrpc": "2.0", "id": "1", "result": {}})
RESULT = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "done"}]}})
RPC_ERROR = json.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "tool crashed"}})


def sse_chunks(final: str) -> list[bytes]:
    return [
        b"id: prime-0\r\ndata:\r\n\r\n",  # the priming event: empty data, never dispatched
        b": keep-alive comment\r\n\r\n",
        b"event: message\r\nid: 1\r\ndata: " + PROGRESS[:30].encode(),  # split mid-event
        PROGRESS[30:].encode() + b"\r",  # ... and mid-CRLF
        b"\n\r\n",
        b"event: message\ndata: " + SERVER_REQUEST.encode() + b"\n\n",
        b"data: " + STRING_ID.encode() + b"\r\n\r\n",
        b"event: message\r\ndata: " + final[:10].encode(),
        final[10:].encode() + b"\r\n\r\n",
    ]


async def test_sse_stream_passes_unchanged_and_settles_on_the_matching_result(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)

    watch = flow.response.stream
    assert callable(watch)
    h = flow.response.headers  # stamped before the body streams: these are what the client gets
    assert is_uuid4(h["X-Mcpmeter-Request-Id"])
    assert h["X-Mcpmeter-Billed"] == str(PRICE) and h["X-Mcpmeter-Balance"] == str(OPENING - PRICE)
    call = gw.addon.calls[flow.id]

    *before, last_a, last_b = sse_chunks(RESULT)
    out = b""
    for chunk in before + [last_a]:
        out += sent(watch(chunk))
        assert call.settlement is None and call.outcome is None
    assert out == b"".join(before)  # whole events pass as they complete; the answer's is held
    last = sent(watch(last_b))
    assert call.settlement is not None  # settled as the result passed, not at the end of the stream
    assert last.startswith(b"event: message\r\ndata: ") and last.endswith(b"\r\n\r\n")
    answer = json.loads(last[len(b"event: message\r\ndata: "):])
    assert pop_receipt(answer)["decision"] == "billed" and answer == json.loads(RESULT)
    await call.settlement
    [row] = gw.db.usage()
    assert row["status"] == 200 and row["billed_micro_cents"] == PRICE

    assert watch(b"data: trailing\n\n") == b"data: trailing\n\n"
    assert sent(watch(b"")) == b""
    flow.response.content = None  # a streamed body is not kept
    await gw.addon.response(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    assert len(gw.db.usage()) == 1
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]
    assert meta(flow)["decision"] == "billed" and flow.marked


async def test_sse_billed_answer_ends_without_waiting_for_its_settlement(gw: Gw) -> None:
    # mitmproxy sends a streamed answer's last chunk only after the response hook returns: a billed
    # answer's settlement is written in the background (Settlement.background: batched on MySQL),
    # as a buffered one's is, and the hook does not wait for it. A refund is still awaited.
    store = gw.addon.store
    assert store is not None
    gate, seen = asyncio.Event(), []
    real = store.settle

    async def slow_settle(settlement: Any) -> Any:
        seen.append(settlement)
        await gate.wait()
        return await real(settlement)

    store.settle = slow_settle  # type: ignore[method-assign]
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    for chunk in sse_chunks(RESULT):
        sent(flow.response.stream(chunk))
    sent(flow.response.stream(b""))
    await asyncio.wait_for(gw.addon.response(flow), 1)  # returns with the write held back
    await asyncio.sleep(0.05)  # the settlement task reaches the store
    assert [s.background for s in seen] == [True] and not seen[0].refund
    assert gw.db.usage() == [] and meta(flow)["decision"] == "billed"
    gate.set()
    await gw.addon.drain()
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == PRICE and gw.db.balance(1) == OPENING - PRICE

    gate.clear()
    refunded = make_flow()
    await gw.addon.request(refunded)
    refunded.response = sse_response()
    await gw.addon.responseheaders(refunded)
    for chunk in sse_chunks(RPC_ERROR):
        sent(refunded.response.stream(chunk))
    hook = asyncio.ensure_future(gw.addon.response(refunded))
    await asyncio.sleep(0.05)
    assert not hook.done() and seen[-1].refund and not seen[-1].background  # a refund is waited for
    gate.set()
    await hook
    assert gw.db.balance(1) == OPENING - PRICE


async def test_sse_error_for_the_call_refunds(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    out = b"".join(sent(flow.response.stream(chunk)) for chunk in sse_chunks(RPC_ERROR))
    answer = json.loads(out.rpartition(b"data: ")[2])
    assert pop_receipt(answer)["decision"] == "refunded" and answer == json.loads(RPC_ERROR)
    await gw.addon.calls[flow.id].settlement
    assert gw.db.balance(1) == OPENING
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE), ("refund", PRICE)]
    await gw.addon.response(flow)
    assert meta(flow)["decision"] == "refunded"
    assert gw.db.usage()[0]["billed_micro_cents"] == 0


async def test_sse_stream_that_ends_without_the_answer_is_refunded(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    assert flow.response.stream(b"data: " + PROGRESS.encode() + b"\n\n")
    flow.response.stream(b"")
    await gw.addon.response(flow)
    assert gw.db.balance(1) == OPENING
    assert meta(flow)["decision"] == "refunded"


async def test_sse_watcher_never_raises(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    call = gw.addon.calls[flow.id]
    call.parser.feed = None  # type: ignore[assignment]  # anything inside blowing up
    assert flow.response.stream(b"data: x\n\n") == b"data: x\n\n"


# --- the error hook ------------------------------------------------------------------------------


async def test_client_disconnect_is_billed(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    [row] = gw.db.usage()
    assert row["status"] == 499 and row["billed_micro_cents"] == PRICE
    assert gw.db.balance(1) == OPENING - PRICE
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE)]
    assert flow.client_conn.id not in compat._pending  # nobody to answer
    assert meta(flow)["decision"] == "billed" and meta(flow)["reason"] == "client_disconnected"
    assert gw.addon.calls == {}


async def test_client_gone_before_its_call_left_is_refunded(gw: Gw) -> None:
    """The client hung up while its call was being admitted (charged): mitmproxy never opens the upstream
    connection, so the flow's server connection is still the unopened reverse-mode placeholder."""
    flow = make_flow()
    flow.server_conn.timestamp_start = None
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    [row] = gw.db.usage()
    assert row["status"] == 499 and row["billed_micro_cents"] == 0
    assert gw.db.balance(1) == OPENING
    assert meta(flow)["reason"] == "cancelled"
    assert flow.client_conn.id not in compat._pending  # nobody to answer
    gw.db.assert_reconciled()


@pytest.mark.parametrize("msg", ["Connection refused", "peer closed connection without sending complete message"])
async def test_upstream_failure_is_refunded_and_answered_with_json_502(gw: Gw, msg: str) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, msg)
    [row] = gw.db.usage()
    assert row["status"] == 502 and row["billed_micro_cents"] == 0
    assert gw.db.balance(1) == OPENING
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE), ("refund", PRICE)]

    response, body = parse_raw(compat._pending[flow.client_conn.id])
    assert response.status_code == 502
    answer = refusal(body)
    assert answer["error"] == "upstream_failed" and answer["request_id"] == meta(flow)["request_id"]
    h = response.headers
    assert h["Content-Type"] == "application/json" and h["Connection"] == "close"
    assert h["X-Mcpmeter-Request-Id"] == answer["request_id"]
    assert h["X-Mcpmeter-Refunded"] == "1" and h["X-Mcpmeter-Billed"] == "0"
    assert h["X-Mcpmeter-Balance"] == str(OPENING)
    compat.forget(flow)
    assert flow.client_conn.id not in compat._pending


async def test_upstream_timeout_aborts_the_upstream_refunds_and_answers_504(gw: Gw) -> None:
    proxyserver = FakeProxyserver()
    gw.tctx.master.addons.add(proxyserver)
    gw.addon.config = dataclasses.replace(gw.addon.config, upstream_timeout_ms=20)
    flow = make_flow("/freebies", token=BOB, body=tool_call())  # no listing timeout: the config's
    handler = proxyserver.connections[flow.client_conn.id] = FakeHandler(flow.server_conn)
    # Use up Bob's free call so this one is a paid one.
    first = make_flow("/freebies", token=BOB)
    await gw.addon.request(first)
    await upstream_answers(gw, first, json_response({"jsonrpc": "2.0", "id": 1, "result": {}}))

    await gw.addon.request(flow)
    assert gw.db.balance(2) == OPENING - PRICE
    await asyncio.sleep(0.1)
    assert handler.closed == [flow.server_conn]  # the deadline closed the upstream connection
    await upstream_fails(gw, flow, "Connection killed.")  # what mitmproxy reports next
    response, body = parse_raw(compat._pending[flow.client_conn.id])
    assert response.status_code == 504 and refusal(body)["error"] == "upstream_timeout"
    assert response.headers["X-Mcpmeter-Refunded"] == "1"
    assert gw.db.balance(2) == OPENING
    assert gw.db.usage()[-1]["status"] == 504
    compat.forget(flow)


async def test_deadline_without_proxyserver_is_logged(gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    gw.addon.streams.on_deadline(flow, gw.addon.calls[flow.id])
    assert "could not abort" in caplog.text
    await upstream_fails(gw, flow, "Connection killed.")
    assert compat._pending.pop(flow.client_conn.id).startswith(b"HTTP/1.1 504")


# --- refusals ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    path: str = "/echo-test"
    token: str | None = ALICE
    body: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    authorization: str | None = None  # a raw Authorization header instead of the token


REFUSALS = {
    "invalid_slug": Refusal(400, "invalid_slug", path="/Echo_Test"),
    "invalid_slug_dot": Refusal(400, "invalid_slug", path="/../etc"),
    "not_found": Refusal(404, "not_found", path="/"),
    "invalid_json": Refusal(400, "invalid_json", body=b"{not json"),
    "batch": Refusal(400, "batch_not_supported", body=[tool_call(rpc_id=1), tool_call(rpc_id=2)]),
    "header_mismatch_method": Refusal(400, "header_mismatch", headers={"Mcp-Method": "tools/list"}),
    "header_mismatch_name": Refusal(400, "header_mismatch", headers={"Mcp-Method": "tools/call", "Mcp-Name": "free"}),
    "priced_notification": Refusal(400, "invalid_request", body=rpc("tools/call", None, name="echo")),
    "missing_key": Refusal(401, "invalid_token", token=None),
    "unknown_key": Refusal(401, "invalid_token", token=UNKNOWN),
    "malformed_key": Refusal(401, "invalid_token", token=None, authorization="Bearer sk-not-ours-0123456789"),
    "suspended": Refusal(403, "account_suspended", token=SUSPENDED),
    "no_such_mcp": Refusal(404, "no_such_mcp", path="/nope"),
    "archived": Refusal(410, "mcp_archived", path="/old-one"),
    "paused": Refusal(503, "mcp_paused", path="/paused-one"),
    "draft": Refusal(503, "mcp_not_yet_live", path="/draft-one"),
    "no_upstream": Refusal(503, "mcp_not_yet_live", path="/no-upstream"),
    "insufficient_credit": Refusal(402, "insufficient_credit", token=POOR),
    "project_cap": Refusal(402, "project_cap_exceeded", token=CAPPED),
    "too_large_chunked": Refusal(413, "payload_too_large", body=b'{"jsonrpc":"2.0","x":"' + b"a" * MAX_BODY + b'"}'),
}


def refusal_flow(case: Refusal) -> http.HTTPFlow:
    headers = dict(case.headers)
    if case.authorization:
        headers["Authorization"] = case.authorization
    flow = make_flow(case.path, token=case.token, body=case.body, headers=headers)
    if case.code == "payload_too_large":
        del flow.request.headers["content-length"]  # as if sent chunked: only the body size tells
    return flow


@pytest.mark.parametrize("name", REFUSALS)
async def test_refusals_answer_json_and_never_forward(gw: Gw, caplog: pytest.LogCaptureFixture, name: str) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("mcpmeter").setLevel(logging.DEBUG)
    case = REFUSALS[name]
    flow = refusal_flow(case)
    url = flow.request.url
    balances = gw.db.balances()

    await gw.addon.request(flow)

    assert flow.response is not None, "a refused call must be answered in the request hook"
    assert flow.request.url == url and not forwarded(flow)
    assert flow.response.status_code == case.status
    h = flow.response.headers
    assert h["Content-Type"] == "application/json"
    body = refusal(flow.response)
    assert body["error"] == case.code and body["message"]
    assert is_uuid4(h["X-Mcpmeter-Request-Id"]) and body["request_id"] == h["X-Mcpmeter-Request-Id"]
    assert h["X-Mcpmeter-Billed"] == "0" and h["X-Mcpmeter-Duration-Ms"].isdigit()
    assert meta(flow)["decision"] == "refused" and meta(flow)["error"] == case.code
    assert flow.marked and case.code in flow.comment
    if case.code in ("insufficient_credit", "project_cap_exceeded"):  # the charge read it
        assert h["X-Mcpmeter-Balance"] == str(balances[USERS[case.token]])
    else:  # a flood of refusals must not reach the database
        assert "X-Mcpmeter-Balance" not in h
    # Only a refusal after the rate limit counted the call (the charge's), and says so.
    counted = case.code in ("insufficient_credit", "project_cap_exceeded")
    assert any(name.startswith("RateLimit-") for name in h) == counted

    # mitmproxy still runs the response hooks for an answer set in `request`: nothing may change.
    before = flow.response.copy()
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    assert flow.response.headers == before.headers and flow.response.content == before.content

    assert gw.db.balances() == balances
    assert gw.db.usage() == [] and gw.db.journal() == []
    assert gw.addon.calls == {}
    assert_no_secret(flow, caplog, *ALL_TOKENS, "sk-not-ours-0123456789")


async def test_401_challenges(gw: Gw) -> None:
    missing, unknown = make_flow(token=None), make_flow(token=UNKNOWN)
    await gw.addon.request(missing)
    await gw.addon.request(unknown)
    metadata_url = f'resource_metadata="http://{PUBLIC_HOST}/.well-known/oauth-protected-resource"'
    challenge = missing.response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and metadata_url in challenge and "error=" not in challenge
    challenge = unknown.response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and metadata_url in challenge and 'error="invalid_token"' in challenge


async def test_402_bodies_say_balance_and_required(gw: Gw) -> None:
    poor, capped = make_flow(token=POOR), make_flow(token=CAPPED)
    await gw.addon.request(poor)
    await gw.addon.request(capped)
    body = refusal(poor.response)
    assert body["balance_micro_cents"] == 100 and body["required_micro_cents"] == PRICE
    assert poor.response.headers["X-Mcpmeter-Balance"] == "100"
    body = refusal(capped.response)
    assert body["error"] == "project_cap_exceeded" and body["required_micro_cents"] == PRICE
    assert body["balance_micro_cents"] == OPENING
    assert gw.db.ledger(5) == [("topup", OPENING)]


async def test_rate_limit_answers_429_with_retry_after_and_ratelimit_headers(
        gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    first = make_flow("/strict", body=rpc("tools/list"))
    await gw.addon.request(first)
    assert forwarded(first)
    await upstream_answers(gw, first, json_response({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}))
    assert first.response.headers["RateLimit-Remaining"] == "0"

    second = make_flow("/strict")
    await gw.addon.request(second)
    assert second.response.status_code == 429 and not forwarded(second)
    h = second.response.headers
    assert 1 <= int(h["Retry-After"]) <= 60
    assert h["RateLimit-Policy"] == "1;w=60, 10000;w=86400"
    assert h["RateLimit-Limit"] == "1" and h["RateLimit-Remaining"] == "0"
    assert int(h["RateLimit-Reset"]) >= 1
    body = refusal(second.response)
    assert body["error"] == "rate_limited" and body["scope"] == "minute"
    assert body["retry_after"] == int(h["Retry-After"])
    assert meta(second)["decision"] == "refused" and second.marked
    assert gw.db.balance(1) == OPENING  # refused before any debit
    assert_no_secret(second, caplog)

    other = make_flow("/strict", token=BOB)  # the window is per (listing, consumer)
    await gw.addon.request(other)
    assert forwarded(other)


async def test_session_belongs_to_the_key_that_opened_it(gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    init = make_flow(body=rpc("initialize", protocolVersion="2025-06-18", capabilities={},
                              clientInfo={"name": "t", "version": "1"}))
    await gw.addon.request(init)
    await upstream_answers(gw, init, json_response({"jsonrpc": "2.0", "id": 1, "result": {}},
                                                   headers={"Mcp-Session-Id": "sess-alice"}))

    hijack = make_flow(token=BOB, body=rpc("tools/list"), headers={"Mcp-Session-Id": "sess-alice"})
    await gw.addon.request(hijack)
    assert hijack.response.status_code == 403 and not forwarded(hijack)
    assert refusal(hijack.response)["error"] == "session_forbidden"
    assert meta(hijack)["decision"] == "refused"
    assert_no_secret(hijack, caplog)

    own = make_flow(body=rpc("tools/list"), headers={"Mcp-Session-Id": "sess-alice"})
    await gw.addon.request(own)
    assert own.response is None and forwarded(own)


async def open_session(gw: Gw, session: str, token: str = ALICE, path: str = "/echo-test") -> None:
    init = make_flow(path, token=token, body=rpc("initialize", protocolVersion="2025-06-18", capabilities={},
                                                 clientInfo={"name": "t", "version": "1"}))
    await gw.addon.request(init)
    await upstream_answers(gw, init, json_response({"jsonrpc": "2.0", "id": 1, "result": {}},
                                                   headers={"Mcp-Session-Id": session}))


@pytest.mark.parametrize("cache", ["memory", "redis"])
async def test_a_session_id_is_owned_per_listing(tmp_path: Path, cache: str) -> None:
    """Upstreams choose session ids, and two listings' can hand out the same one (a server numbering
    its sessions 1, 2, 3; a publisher copying ids it saw). Each listing's session is its own opener's:
    neither refuses the other's owner nor lets the other's opener in."""
    with ExitStack() as stack:
        extra: dict[str, Any] = {}
        if cache == "redis":
            settings = stack.enter_context(redisutil.scratch_prefix())
            extra = {"cache": "redis", "redis": dataclasses.asdict(settings)}
        addon = Mcpmeter()
        tctx = stack.enter_context(taddons.context(addon))
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, **extra)))
        gw = Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        assert type(addon.cache).__name__ == ("RedisCache" if cache == "redis" else "MemoryCache")
        await open_session(gw, "1")  # Alice's session "1" of echo-test ...
        await open_session(gw, "1", token=BOB, path="/lenient")  # ... then Bob's, of another upstream
        for path, token, allowed in (("/echo-test", ALICE, True), ("/lenient", BOB, True),
                                     ("/echo-test", BOB, False), ("/lenient", ALICE, False)):
            flow = make_flow(path, token=token, body=rpc("tools/list"), headers={"Mcp-Session-Id": "1"})
            await addon.request(flow)
            assert forwarded(flow) is allowed, (path, token)
            if not allowed:
                assert flow.response is not None and refusal(flow.response)["error"] == "session_forbidden"
        addon.done()


async def test_a_rate_limited_key_gets_429_not_session_forbidden(gw: Gw) -> None:
    await open_session(gw, "sess-alice", path="/strict")
    spent = make_flow("/strict", token=BOB, body=rpc("tools/list"))  # Bob's one call a minute on /strict
    await gw.addon.request(spent)
    assert forwarded(spent)
    probe = make_flow("/strict", token=BOB, body=rpc("tools/list"), headers={"Mcp-Session-Id": "sess-alice"})
    await gw.addon.request(probe)
    assert probe.response is not None and probe.response.status_code == 429 and not forwarded(probe)
    assert refusal(probe.response)["error"] == "rate_limited" and "Retry-After" in probe.response.headers


async def test_a_refusal_of_a_call_shadow_mode_let_through_the_limit_says_no_retry_after(tmp_path: Path) -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, shadow=True)))
        shadowed = Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        await open_session(shadowed, "sess-alice", path="/strict")
        spent = make_flow("/strict", token=BOB, body=rpc("tools/list"))  # Bob's one call a minute on /strict
        await addon.request(spent)
        probe = make_flow("/strict", token=BOB, body=rpc("tools/list"), headers={"Mcp-Session-Id": "sess-alice"})
        await addon.request(probe)  # over the limit, let through by shadow mode, then refused: not his session
        assert probe.response is not None and refusal(probe.response)["error"] == "session_forbidden"
        assert probe.response.headers["RateLimit-Remaining"] == "0"  # what it was counted under
        assert "Retry-After" not in probe.response.headers  # a 403 is not cured by waiting
        addon.done()


async def test_probing_session_ids_counts_against_the_rate_limit(gw: Gw) -> None:
    await open_session(gw, "sess-alice", path="/strict")
    probe = make_flow("/strict", token=BOB, body=rpc("tools/list"), headers={"Mcp-Session-Id": "sess-alice"})
    await gw.addon.request(probe)
    assert probe.response is not None and probe.response.status_code == 403 and not forwarded(probe)
    assert refusal(probe.response)["error"] == "session_forbidden"
    after = make_flow("/strict", token=BOB, body=rpc("tools/list"))  # the probe took Bob's one call a minute
    await gw.addon.request(after)
    assert after.response is not None and after.response.status_code == 429 and not forwarded(after)


async def test_refusals_after_the_rate_limit_carry_its_headers(gw: Gw) -> None:
    """The headers a call was counted under go out on every answer after the count, refusals too."""
    reused_key = {"Idempotency-Key": "k-1"}
    first = make_flow(headers=reused_key)
    await gw.addon.request(first)
    await upstream_answers(gw, first, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    await open_session(gw, "sess-alice")
    refused = {
        "insufficient_credit": make_flow(token=POOR),  # the charge refuses
        "idempotency_key_reused": make_flow(body=tool_call(rpc_id=2), headers=reused_key),
        "session_forbidden": make_flow(token=BOB, body=rpc("tools/list"), headers={"Mcp-Session-Id": "sess-alice"}),
    }
    for code, flow in refused.items():
        await gw.addon.request(flow)
        assert flow.response is not None and refusal(flow.response)["error"] == code
        h = flow.response.headers
        assert h["RateLimit-Policy"] == "60;w=60, 10000;w=86400" and h["RateLimit-Limit"] == "60", code
        assert h["RateLimit-Remaining"].isdigit() and h["RateLimit-Reset"].isdigit(), code
        assert "Retry-After" not in h, code  # within the limit
    for before in (make_flow(token=UNKNOWN), make_flow(token=SUSPENDED), make_flow("/paused-one")):
        await gw.addon.request(before)  # refused before the rate limit: nothing was counted, nothing to say
        assert before.response is not None and before.response.status_code in (401, 403, 503)
        assert not any(name.startswith("RateLimit-") for name in before.response.headers)


# --- failing closed ------------------------------------------------------------------------------


def assert_internal_error(flow: http.HTTPFlow) -> None:
    assert flow.response is not None and flow.response.status_code == 500
    assert refusal(flow.response)["error"] == "internal_error"
    assert not forwarded(flow)
    assert meta(flow)["decision"] == "refused"


async def test_unexpected_error_in_charge_fails_closed(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*_: Any) -> Any:
        raise RuntimeError("surprise")

    monkeypatch.setattr(gw.addon.store, "charge", boom)
    flow = make_flow()
    await gw.addon.request(flow)
    assert_internal_error(flow)
    assert gw.db.balance(1) == OPENING and gw.addon.calls == {}


async def test_unexpected_error_in_rate_limiter_fails_closed(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*_: Any) -> Any:
        raise KeyError("surprise")

    monkeypatch.setattr(gw.addon.cache, "hit", boom)
    flow = make_flow(body=rpc("tools/list"))  # unpriced calls too
    await gw.addon.request(flow)
    assert_internal_error(flow)
    assert gw.db.journal() == []


async def test_failure_after_the_debit_refunds_it(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> Any:
        raise ValueError("surprise")

    # Fails after the debit and after flow.request.url was already pointed at the upstream.
    monkeypatch.setattr(forwarding, "upstream_headers", boom)
    flow = make_flow()
    await gw.addon.request(flow)
    assert_internal_error(flow)
    assert gw.db.balance(1) == OPENING
    assert gw.db.ledger(1) == [("topup", OPENING), ("usage", -PRICE), ("refund", PRICE)]
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == 0
    assert gw.addon.calls == {}
    gw.db.assert_reconciled()


async def test_a_refusal_whose_balance_lookup_fails_is_still_answered(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*_: Any) -> Any:
        raise OSError("database driver exploded")  # not a StoreUnavailable

    monkeypatch.setattr(gw.addon.store, "balance", boom)
    flow = make_flow("/nope")
    await gw.addon.request(flow)  # must not raise: mitmproxy would forward the flow unchanged
    assert flow.response is not None and flow.response.status_code == 404
    assert not forwarded(flow)


@pytest.mark.parametrize("method", ["find_consumer", "find_listing", "charge"])
async def test_store_unavailable_answers_503_with_retry_after(
    gw: Gw, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    async def down(*_: Any) -> Any:
        raise StoreUnavailable("sqlite: database is locked")

    monkeypatch.setattr(gw.addon.store, method, down)
    flow = make_flow()
    url = flow.request.url
    await gw.addon.request(flow)
    assert flow.response.status_code == 503 and flow.request.url == url
    assert refusal(flow.response)["error"] == "store_unavailable"
    assert flow.response.headers["Retry-After"] == "1"
    assert meta(flow)["decision"] == "refused"
    assert gw.db.balance(1) == OPENING


async def test_unconfigured_addon_fails_closed() -> None:
    addon = Mcpmeter()
    with taddons.context(addon):
        flow = make_flow()
        await addon.request(flow)
        assert_internal_error(flow)


# --- request bodies over the limit ------------------------------------------------------------------


async def test_content_length_over_the_limit_is_answered_413_in_requestheaders(
    gw: Gw, caplog: pytest.LogCaptureFixture
) -> None:
    flow = make_flow()
    flow.request.headers["Content-Length"] = str(MAX_BODY + 1)
    flow.request.content = None  # requestheaders runs before the body is read
    gw.addon.requestheaders(flow)

    assert flow.response is not None and flow.response.status_code == 413
    answer = json.loads(flow.response.content)
    assert answer["error"] == "payload_too_large" and answer["limit_bytes"] == MAX_BODY
    assert is_uuid4(answer["request_id"]) and flow.response.headers["X-Mcpmeter-Billed"] == "0"
    assert meta(flow)["decision"] == "refused"
    await gw.addon.request(flow)  # the hook's guard: an answered flow is left alone
    assert flow.response.status_code == 413 and not forwarded(flow)
    assert_no_secret(flow, caplog)  # `request`, which redacts, never runs for this flow


async def test_content_length_far_over_the_limit_kills_the_flow_with_a_413_answer(
    gw: Gw, caplog: pytest.LogCaptureFixture
) -> None:
    flow = make_flow()
    flow.request.headers["Content-Length"] = str(100 * MAX_BODY)
    flow.request.content = None
    gw.addon.requestheaders(flow)

    assert flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE and not flow.live
    assert_no_secret(flow, caplog)
    response, body = parse_raw(compat._pending.pop(flow.client_conn.id))
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/json" and response.headers["Connection"] == "close"
    answer = json.loads(body)
    assert answer["error"] == "payload_too_large" and answer["limit_bytes"] == MAX_BODY
    assert is_uuid4(answer["request_id"])
    assert meta(flow)["decision"] == "refused"
    await gw.addon.request(flow)  # the hook's guard: a killed flow is left alone
    assert flow.response is None and not forwarded(flow)


async def test_content_length_at_the_limit_passes_requestheaders(gw: Gw) -> None:
    flow = make_flow()
    flow.request.headers["Content-Length"] = str(MAX_BODY)
    gw.addon.requestheaders(flow)
    assert flow.error is None and flow.live and flow.response is None
    assert flow.client_conn.id not in compat._pending


# --- the gateway's own endpoints -------------------------------------------------------------------


async def test_health(gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    flow = make_flow("/health", method="GET")
    await gw.addon.request(flow)
    assert flow.response.status_code == 200 and not forwarded(flow)
    body = json.loads(flow.response.content)
    assert body["status"] == "ok" and body["store"]["ok"] is True and body["cache"]["ok"] is True
    assert flow.response.headers["Content-Type"] == "application/json"
    assert_no_secret(flow, caplog)

    post = make_flow("/health", body=rpc("ping"))
    await gw.addon.request(post)
    assert post.response.status_code == 405
    assert refusal(post.response)["error"] == "method_not_allowed"


async def test_health_reports_a_dead_store(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down() -> Any:
        raise StoreUnavailable("gone")

    monkeypatch.setattr(gw.addon.store, "health", down)
    flow = make_flow("/health", method="GET", token=None)
    await gw.addon.request(flow)
    assert flow.response.status_code == 503
    body = json.loads(flow.response.content)
    assert body["status"] == "degraded" and body["store"]["ok"] is False and body["cache"]["ok"] is True


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource",
                                  "/.well-known/oauth-protected-resource/echo-test"])
async def test_protected_resource_metadata(gw: Gw, caplog: pytest.LogCaptureFixture, path: str) -> None:
    flow = make_flow(path, method="GET")
    await gw.addon.request(flow)
    assert flow.response.status_code == 200 and not forwarded(flow)
    body = json.loads(flow.response.content)
    assert body["resource"] == f"http://{PUBLIC_HOST}"
    assert "authorization_servers" not in body  # none configured: the gateway does not name itself
    assert body["bearer_methods_supported"] == ["header"]
    assert_no_secret(flow, caplog)


async def test_protected_resource_metadata_answers_only_get_and_head(gw: Gw) -> None:
    flow = make_flow("/.well-known/oauth-protected-resource", method="DELETE", body=b"")
    await gw.addon.request(flow)
    assert flow.response.status_code == 405 and flow.response.headers["Allow"] == "GET, HEAD"
    assert not forwarded(flow)


async def test_public_url_overrides_the_host_header(tmp_path: Path) -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, public_url="https://meter.example/")))
        flow = make_flow("/.well-known/oauth-protected-resource", method="GET")
        await addon.request(flow)
        assert json.loads(flow.response.content)["resource"] == "https://meter.example"
        flow = make_flow(token=None)
        await addon.request(flow)
        assert ('resource_metadata="https://meter.example/.well-known/oauth-protected-resource"'
                in flow.response.headers["WWW-Authenticate"])
        addon.done()


# --- unpriced traffic ------------------------------------------------------------------------------


UNPRICED = {
    "initialize": ("POST", rpc("initialize", protocolVersion="2025-06-18", capabilities={},
                               clientInfo={"name": "t", "version": "1"}), 200),
    "tools/list": ("POST", rpc("tools/list"), 200),
    "ping": ("POST", rpc("ping"), 200),
    "notification": ("POST", rpc("notifications/initialized", None), 202),
    "client_response": ("POST", {"jsonrpc": "2.0", "id": 7, "result": {}}, 202),
    "sse_get": ("GET", None, 200),
    "delete": ("DELETE", None, 200),
}


@pytest.mark.parametrize("name", UNPRICED)
async def test_unpriced_traffic_is_forwarded_without_charge(gw: Gw, name: str) -> None:
    method, body, status = UNPRICED[name]
    flow = make_flow("/echo-test", method=method, body=body)
    await gw.addon.request(flow)
    assert flow.response is None and forwarded(flow)
    assert "authorization" not in flow.request.headers
    assert "tool" not in meta(flow) and "price" not in meta(flow)

    content = b"" if status == 202 else json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode()
    await upstream_answers(gw, flow, http.Response.make(status, content, {"Content-Type": "application/json"}))
    h = flow.response.headers
    # Unpriced traffic never reaches the database (issue 8): no balance is read for it.
    assert h["X-Mcpmeter-Billed"] == "0" and "X-Mcpmeter-Balance" not in h
    assert is_uuid4(h["X-Mcpmeter-Request-Id"])
    assert meta(flow)["decision"] == "passthrough"
    assert gw.db.balance(1) == OPENING and gw.db.ledger(1) == [("topup", OPENING)]
    assert gw.db.usage() == [] and gw.db.journal() == []


async def test_free_tool_is_not_charged(gw: Gw) -> None:
    flow = make_flow(body=tool_call("freebie"))
    await gw.addon.request(flow)
    assert forwarded(flow) and meta(flow)["price"] == 0
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {}}))
    assert flow.response.headers["X-Mcpmeter-Billed"] == "0"
    assert gw.db.balance(1) == OPENING and gw.db.ledger(1) == [("topup", OPENING)]


async def test_unpriced_sse_stream_cancels_the_deadline(gw: Gw) -> None:
    flow = make_flow(method="GET", body=None)
    await gw.addon.request(flow)
    call = gw.addon.calls[flow.id]
    assert call.deadline is not None
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    assert call.deadline is None  # a GET stream may stay open for hours
    assert flow.response.headers["X-Mcpmeter-Billed"] == "0"
    assert flow.response.stream(b"data: {}\n\n") == b"data: {}\n\n"
    await gw.addon.response(flow)
    assert gw.db.usage() == []


# --- configure ---------------------------------------------------------------------------------------


def test_option_has_help_text() -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        option = tctx.options._options["mcpmeter_config"]
        assert option.default is None
        assert "YAML" in option.help and "config.example.yaml" in option.help and len(option.help) > 80


BAD_CONFIGS = {
    "unreadable": (None, "cannot read"),
    "invalid_yaml": ("store: [sqlite\n", "not valid YAML"),
    "not_a_mapping": ("- a\n- b\n", "mapping"),
    "unknown_store": ("store: postgres\n", "postgres"),
    "unknown_key": ("stroe: sqlite\n", "stroe"),
    "invalid_listing": ("seed:\n  listings:\n    - slug: Bad Slug\n      upstream_url: http://x/\n", "Bad Slug"),
    "invalid_upstream": ("seed:\n  listings:\n    - slug: ok\n      upstream_url: ftp://x/\n", "ftp://x/"),
    "invalid_key": ("seed:\n  consumers:\n    - key: sk-live-123\n", "seed.consumers[0].key"),
    "bad_number": ("default_rpm: lots\n", "default_rpm"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_raises_options_error_naming_the_problem(tmp_path: Path, name: str) -> None:
    text, fragment = BAD_CONFIGS[name]
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(f"sqlite_path: {tmp_path / 'x.db'}\n" + text)
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError) as raised:
            tctx.configure(addon, mcpmeter_config=str(path))
        assert "mcpmeter_config" in str(raised.value) and fragment in str(raised.value)
        addon.done()


async def test_bad_reload_keeps_the_running_config(gw: Gw, tmp_path: Path) -> None:
    config = gw.addon.config
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: postgres\n")
    with pytest.raises(exceptions.OptionsError):
        gw.tctx.configure(gw.addon, mcpmeter_config=str(bad))
    # mitmproxy rolls the option back, which reloads the previous file.
    assert gw.addon.config == config
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)


def test_connection_strategy_is_forced_lazy_and_host_kept() -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        # Declared by mitmproxy's proxyserver addon, which taddons does not load.
        tctx.options.add_option("connection_strategy", str, "eager", "", choices=("eager", "lazy"))
        tctx.options.add_option("keep_host_header", bool, False, "")
        tctx.configure(addon, connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"
        tctx.configure(addon, keep_host_header=False)
        assert tctx.options.keep_host_header is True
        # At start-up configure sees every option: the defaults (eager) are overridden too.
        tctx.options.connection_strategy = "eager"
        addon.configure({"connection_strategy", "keep_host_header"})
        assert tctx.options.connection_strategy == "lazy"


def test_large_bodies_are_never_streamed_past_the_meter() -> None:
    """mitmproxy's stream_large_bodies sends a body over it upstream as it comes, before the `request`
    hook: to the reverse-mode target, unauthenticated, unmetered and unbounded by max_body_bytes or
    max_reading_bytes (whose bytes it never gave back). The meter reads every body whole: it is turned off."""
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        # Declared by mitmproxy's proxyserver addon, which taddons does not load.
        tctx.options.add_option("stream_large_bodies", str | None, None, "")
        tctx.configure(addon, stream_large_bodies="1m")
        assert tctx.options.stream_large_bodies is None
        tctx.options.stream_large_bodies = "10k"  # at start-up configure sees every option
        addon.configure({"stream_large_bodies"})
        assert tctx.options.stream_large_bodies is None


def test_load_installs_the_compat_patches() -> None:
    from mitmproxy.proxy.layers.http import _http1

    with taddons.context(Mcpmeter()):
        assert compat._installed
        assert _http1.make_error_response is compat._json_error_response


# --- commands for local billing debugging ------------------------------------------------------


async def _logged(caplog: pytest.LogCaptureFixture, needle: str, timeout: float = 3.0) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for record in caplog.records:
            if needle in record.getMessage():
                return record.getMessage()
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing logged with {needle!r}: {[r.getMessage() for r in caplog.records]}")


async def test_commands_show_balance_top_up_and_list_calls(gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcpmeter")
    flow = make_flow(body=tool_call())
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))

    first = gw.tctx.command(gw.addon.commands.balance_command, "1")
    assert "reading the balance" in first  # the store is not waited for on the event loop
    assert await _logged(caplog, "user 1: balance") == f"mcpmeter: user 1: balance {OPENING - PRICE} µ¢"
    again = gw.tctx.command(gw.addon.commands.balance_command, "1")
    assert again.startswith(f"user 1: balance {OPENING - PRICE} µ¢ (read ")  # the result, in the command bar
    gw.tctx.command(gw.addon.commands.topup_command, "1", "2500")
    await _logged(caplog, "topped up 2500")
    assert gw.db.balance(1) == OPENING - PRICE + 2500
    assert gw.db.ledger(1)[-1] == ("topup", 2500)
    gw.db.assert_reconciled()
    listed = gw.tctx.command(gw.addon.commands.calls_command, "5")  # from memory: returned at once
    assert f"user 1 echo-test echo billed {PRICE} µ¢ status 200" in listed and meta(flow)["request_id"] in listed

    with pytest.raises(exceptions.CommandError):
        gw.tctx.command(gw.addon.commands.topup_command, "1", "-5")
    assert gw.db.balance(1) == OPENING - PRICE + 2500


# --- refusals an agent can read: JSON-RPC errors answering the call's id --------------------------


@pytest.mark.parametrize("case, rpc_id", [
    (Refusal(401, "invalid_token", token=None), "call-7"),
    (Refusal(404, "no_such_mcp", path="/nope"), 7),
    (Refusal(410, "mcp_archived", path="/old-one"), 7),
    (Refusal(503, "mcp_paused", path="/paused-one"), 7),
    (Refusal(403, "account_suspended", token=SUSPENDED), 7),
    (Refusal(402, "insufficient_credit", token=POOR), 7),
    (Refusal(402, "project_cap_exceeded", token=CAPPED), 7),
])
async def test_refusal_of_a_json_rpc_request_answers_its_id(tmp_path: Path, case: Refusal, rpc_id: Any) -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, top_up_url="https://pay.example/top-up")))
        flow = make_flow(case.path, token=case.token, body=tool_call(rpc_id=rpc_id))
        await addon.request(flow)
        addon.done()
    assert flow.response.status_code == case.status and not forwarded(flow)
    body = json.loads(flow.response.content)
    assert body["jsonrpc"] == "2.0" and body["id"] == rpc_id
    error = body["error"]
    assert error["code"] == rpc_code(case.code) and -32019 <= error["code"] <= -32003
    assert error["data"]["error"] == case.code
    assert error["data"]["request_id"] == flow.response.headers["X-Mcpmeter-Request-Id"]
    if case.status == 402:
        assert error["data"]["required_micro_cents"] == PRICE and "top_up_url" in error["data"]
        assert "https://pay.example/top-up" in error["message"] and f"{PRICE} µ¢" in error["message"]
    if case.status == 401:
        assert flow.response.headers["WWW-Authenticate"].startswith("Bearer ")


async def test_refusal_without_an_id_keeps_the_plain_body(gw: Gw) -> None:
    for body in (rpc("tools/call", None, name="echo"), [tool_call(rpc_id=1), tool_call(rpc_id=2)]):
        flow = make_flow(token=POOR, body=body)
        await gw.addon.request(flow)
        answer = json.loads(flow.response.content)
        assert "jsonrpc" not in answer and answer["error"] in ("invalid_request", "batch_not_supported")


async def test_429_answers_the_id_with_retry_after(gw: Gw) -> None:
    first = make_flow("/strict", body=rpc("tools/list"))
    await gw.addon.request(first)
    await upstream_answers(gw, first, json_response({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}))
    second = make_flow("/strict", body=tool_call(rpc_id=42))
    await gw.addon.request(second)
    body = json.loads(second.response.content)
    assert second.response.status_code == 429 and body["id"] == 42
    data = body["error"]["data"]
    assert data["scope"] == "minute" and data["retry_after"] == int(second.response.headers["Retry-After"])
    assert f"retry in {data['retry_after']} s" in body["error"]["message"]


async def test_upstream_failure_answers_the_call_id(gw: Gw) -> None:
    flow = make_flow(body=tool_call(rpc_id="up-1"))
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "Connection refused")
    response, raw = parse_raw(compat._pending[flow.client_conn.id])
    body = json.loads(raw)
    assert response.status_code == 502 and body["id"] == "up-1"
    assert body["error"]["code"] == rpc_code("upstream_failed") and body["error"]["data"]["error"] == "upstream_failed"
    compat.forget(flow)

# --- secrets: redacted from the first hook; gateway headers only from the gateway ---------------


async def test_requestheaders_redacts_every_credential_before_the_body_is_read(
        gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    """A flow that dies before `request` (client gone mid-upload) holds no credential."""
    flow = make_flow(headers={"Cookie": "session=cookie-secret", "Proxy-Authorization": "Basic proxy-secret"})
    flow.request.headers.add("Cookie", "second=cookie-secret-2")
    flow.request.content = None  # requestheaders runs before the body is read
    gw.addon.requestheaders(flow)
    h = flow.request.headers
    assert h["authorization"].startswith("Bearer mcpm_test_") and h["authorization"].endswith("(redacted)")
    assert h.get_all("cookie") == ["(redacted)"] and h["proxy-authorization"] == "(redacted)"
    assert_no_secret(flow, caplog, ALICE, "cookie-secret", "proxy-secret")
    assert not any(ALICE in repr(v) for v in flow.metadata.values())

    # The credential still reaches `request`, which meters the call with it.
    flow.request.content = json.dumps(tool_call()).encode()
    await gw.addon.request(flow)
    assert flow.response is None and forwarded(flow) and gw.db.balance() == OPENING - PRICE
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    assert_no_secret(flow, caplog, ALICE, "cookie-secret", "proxy-secret")
    gw.db.assert_reconciled()


async def test_requestheaders_redacts_even_before_the_addon_is_configured() -> None:
    addon = Mcpmeter()
    flow = make_flow()
    addon.requestheaders(flow)
    assert ALICE not in repr(flow.get_state())


async def test_upstream_cannot_send_gateway_headers(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    forged = {"X-Mcpmeter-Billed": "0", "x-mcpmeter-refunded": "1", "X-Mcpmeter-Balance": "999999999",
              "X-Mcpmeter-Custom": "upstream"}
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}},
                                                   headers=forged))
    h = flow.response.headers
    assert h["X-Mcpmeter-Billed"] == str(PRICE)
    assert "x-mcpmeter-refunded" not in h and "x-mcpmeter-custom" not in h
    assert h.get_all("x-mcpmeter-balance") == [str(OPENING - PRICE)]
    gw.db.assert_reconciled()


async def test_only_forwarded_flows_are_claimed_for_the_guard(gw: Gw) -> None:
    from addon import guard

    forwarded_flow, refused_flow = make_flow(), make_flow(token=None)
    await gw.addon.request(forwarded_flow)
    await gw.addon.request(refused_flow)
    assert forwarded_flow in guard._claimed and refused_flow not in guard._claimed
    assert refused_flow.response is not None and refused_flow.response.status_code == 401
    await upstream_answers(gw, forwarded_flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {}}))


async def test_a_flow_that_dies_before_request_leaves_no_credential_behind(gw: Gw) -> None:
    from addon import gateway

    flow = make_flow()
    gw.addon.requestheaders(flow)
    assert flow in gateway._credentials
    await upstream_fails(gw, flow, "Client disconnected.")
    assert flow not in gateway._credentials


async def test_a_listing_url_with_credentials_is_refused_before_any_charge(gw: Gw) -> None:
    """A listing row the seed and the command would refuse, written straight into the store (as the
    reference web app writes MySQL): its userinfo never becomes the upstream's Host. 400
    invalid_path before the charge, nothing debited, the credentials in no answer."""
    with closing(sqlite3.connect(gw.db.path)) as conn, conn:
        conn.execute("UPDATE mcps SET upstream_url = ? WHERE slug = 'echo-test'", (f"http://user:s3cret@{UPSTREAM[7:]}/mcp",))
    flow = make_flow()
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert refusal(flow.response)["error"] == "invalid_path" and b"s3cret" not in flow.response.content
    assert not forwarded(flow) and "s3cret" not in str(flow.request.headers)
    assert gw.db.balance() == OPENING and gw.db.journal() == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:99999/mcp",  # were a 500 and a traceback: mitmproxy's parse raised ValueError
    "http://127.0.0.1:1x/mcp",
    "http://[::1/mcp",  # were a 500: urlsplit raised ValueError
    "http://[127.0.0.1]:1/mcp",
    "http://[::1]x:1/mcp",  # was charged and forwarded to [::1]:1 with Host `[::1]x:1`
])
async def test_a_listing_url_with_a_bad_host_or_port_is_refused_before_any_charge(gw: Gw, url: str) -> None:
    """Written into the store as the web app may write it: 400 invalid_path, not an internal error."""
    with closing(sqlite3.connect(gw.db.path)) as conn, conn:
        conn.execute("UPDATE mcps SET upstream_url = ? WHERE slug = 'echo-test'", (url,))
    flow = make_flow()
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert refusal(flow.response)["error"] == "invalid_path"
    assert not forwarded(flow) and gw.db.balance() == OPENING and gw.db.journal() == []


async def test_a_listing_url_that_cannot_be_aimed_at_is_refused_before_any_charge(tmp_path: Path) -> None:
    """A listing whose own URL path is not ASCII (mitmproxy would not send it either): 400
    invalid_path, decided before the charge, so nothing is debited or left for the sweeper.
    The YAML seed refuses such a URL, so it is written as the web app could write it."""
    seed = {**SEED, "listings": [{"slug": "odd-url", "upstream_url": f"{UPSTREAM}/cafe",
                                  "price_micro_cents": PRICE}]}
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, seed=seed)))
        db = Db(tmp_path / "mcpmeter.db")
        with closing(sqlite3.connect(db.path)) as conn, conn:
            conn.execute("UPDATE mcps SET upstream_url = ? WHERE slug = 'odd-url'", (f"{UPSTREAM}/caf\u00e9",))
        flow = make_flow("/odd-url")
        addon.requestheaders(flow)
        await addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 400
        assert json.loads(flow.response.content)["error"]["data"]["error"] == "invalid_path"
        assert not forwarded(flow)
        assert db.balance() == OPENING and db.journal() == []
        addon.done()


async def test_trailers_cross_the_gateway_in_neither_direction(gw: Gw) -> None:
    """Trailer fields are nothing the meter checked (an HTTP/2 client's would reach the upstream, and
    mitmproxy crashes writing them to an HTTP/1 one); an answer's could forge X-Mcpmeter-* fields."""
    flow = make_flow()
    flow.request.trailers = http.Headers([(b"mcp-session-id", b"other"), (b"content-type", b"text/plain")])
    await gw.addon.request(flow)
    assert forwarded(flow) and flow.request.trailers is None
    answer = json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    answer.trailers = http.Headers([(b"x-mcpmeter-billed", b"0"), (b"grpc-status", b"0")])
    await upstream_answers(gw, flow, answer)
    assert flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE) and flow.response.trailers is None


# Field names that are not tokens: mitmproxy keeps them as sent when its validate_inbound_headers option
# is off, and a server that trims the name reads the real field.
UNTOKENED = ["Mcp-Session-Id ", "Cookie\t", "X-Forward-Authorization ", "Authorization\x0b", "Content-Length ",
             "x(y)", "Authorizati\u00f3n"]


@pytest.mark.parametrize("name", UNTOKENED)
async def test_a_field_name_that_is_not_a_token_is_refused_before_authentication_and_redacted(
        gw: Gw, caplog: pytest.LogCaptureFixture, name: str) -> None:
    secret = "consumer-secret-0123456789"
    flow = make_flow(token=UNKNOWN, headers={name: secret})  # a known key is not needed to be refused
    balances = gw.db.balances()
    gw.addon.requestheaders(flow)
    assert secret not in repr(flow.get_state())  # from the first hook on: the flow may die before `request`
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    body = refusal(flow.response)
    assert body["error"] == "invalid_request" and "not a token" in body["reason"]
    assert name not in flow.response.text and name.strip() not in body["reason"]
    assert not forwarded(flow)
    assert gw.db.balances() == balances and gw.db.usage() == [] and gw.db.journal() == []
    assert_no_secret(flow, caplog, *ALL_TOKENS, secret)


async def test_a_trailer_field_name_that_is_not_a_token_is_refused_and_redacted(gw: Gw) -> None:
    """HTTP/2 request trailers (never forwarded) are held to the same rule."""
    flow = make_flow()
    flow.request.trailers = http.Headers([(b"cookie ", b"consumer-secret-0123456789")])
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert refusal(flow.response)["error"] == "invalid_request" and not forwarded(flow)
    assert "consumer-secret" not in repr(flow.get_state())
    assert gw.db.balance() == OPENING and gw.db.journal() == []


async def test_answer_fields_whose_name_is_not_a_token_are_dropped_and_the_call_billed(gw: Gw) -> None:
    """A client that trims such a name would take a session the gateway never bound to the consumer; one
    that refuses it would refuse the whole answer, paid for. Neither mitmproxy nor the gateway read them:
    dropped, the client gets the answer that was metered."""
    flow = make_flow()
    await gw.addon.request(flow)
    listing = gw.addon.calls[flow.id].listing
    assert listing is not None
    answer = json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    answer.headers.fields += ((b"Mcp-Session-Id ", b"forged"), (b"Set-Cookie\x0b", b"a=1"), (b"X-N\xc3\xb6te", b"b"),
                              (b"X-Kept", b"c"))
    await upstream_answers(gw, flow, answer)
    names = [name for name, _ in flow.response.headers.fields]
    assert [name for name in names if name.lower().startswith((b"mcp-", b"set-", b"x-n"))] == [], names
    assert flow.response.headers["X-Kept"] == "c" and flow.response.headers["X-Mcpmeter-Billed"] == str(PRICE)
    assert await gw.addon.cache.session_owner(listing.id, "forged") is None
    assert gw.db.balance() == OPENING - PRICE and [u["status"] for u in gw.db.usage()] == [200]
    gw.db.assert_reconciled()
