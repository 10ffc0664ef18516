"""End to end: a real `mitmdump -s mcpmeter_addon.py` in front of real upstreams, on both backends.

Every status and error code, header, refund case and the streaming timing, checked from
the client's side and in the database; after each test every ledger reconciles (conftest).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from tests import fault_server
from tests.refusals import refusal
from tests.backends import Backend, TestConsumer
from tests.fault_server import start_hang_up_server
from tests.gateway_proc import Gateway, free_port

_slugs = itertools.count(1)
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
METER_HEADERS = ("X-Mcpmeter-Request-Id", "X-Mcpmeter-Billed", "X-Mcpmeter-Duration-Ms")


def slug(prefix: str = "t") -> str:
    return f"{prefix}-{next(_slugs)}-{uuid.uuid4().hex[:6]}"


def call(tool: str, args: dict[str, Any] | None = None, rpc_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
            "params": {"name": tool, "arguments": args or {}}}


async def post(gw: Gateway, path: str, body: Any, consumer: TestConsumer | None = None,
               headers: dict[str, str] | None = None, timeout: float = 20) -> httpx2.Response:
    h = {**MCP_HEADERS, **(consumer.auth if consumer else {}), **(headers or {})}
    async with httpx2.AsyncClient(timeout=timeout) as client:
        return await client.post(gw.url + path, content=json.dumps(body).encode(), headers=h)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Settlement of streamed calls completes just after the client has read the stream."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(0.05)


def assert_meter_headers(r: httpx2.Response, balance: int | None = None) -> None:
    for name in METER_HEADERS:
        assert name in r.headers, f"{name} missing on {r.status_code}"
    uuid.UUID(r.headers["X-Mcpmeter-Request-Id"], version=4)
    assert int(r.headers["X-Mcpmeter-Duration-Ms"]) >= 0
    if balance is not None:
        assert int(r.headers["X-Mcpmeter-Balance"]) == balance


def assert_calls_cost(backend: Backend, c: TestConsumer, credit: int,
                      debits: list[tuple[int, str, str | None]], ordered: bool = True) -> None:
    """The consumer's paid calls were debited and refunded exactly so (backend.call_debits), and what
    they can spend is their top-ups less that: no money moved that no call accounts for."""
    seen = backend.call_debits(c.user_id)
    assert (seen if ordered else sorted(seen)) == (debits if ordered else sorted(debits))
    assert backend.balance(c.user_id) == credit + sum(amount for amount, _, _ in seen)


@pytest.fixture
def fault_listing(backend: Backend, fault_url: str) -> Callable[..., tuple[str, int]]:
    def make(**kwargs: Any) -> tuple[str, int]:
        s = slug()
        kwargs.setdefault("price", 1000)
        return s, backend.add_listing(s, kwargs.pop("upstream_url", fault_url + "/mcp"), **kwargs)

    return make


# --- the gateway's own endpoints ---------------------------------------------------------------


async def test_health_and_resource_metadata(gateway: Gateway) -> None:
    async with httpx2.AsyncClient() as client:
        r = await client.get(gateway.url + "/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert r.json()["store"]["ok"] is True
        r = await client.get(gateway.url + "/.well-known/oauth-protected-resource")
        assert r.status_code == 200
        meta = r.json()
        assert meta["resource"] == gateway.url and meta["bearer_methods_supported"] == ["header"]
        assert "authorization_servers" not in meta  # none configured: the gateway does not name itself


async def test_root_and_invalid_slug(gateway: Gateway) -> None:
    r = await post(gateway, "/", call("ok"))
    assert r.status_code == 404 and refusal(r)["error"] == "not_found"
    r = await post(gateway, "/Bad_Slug", call("ok"))
    assert r.status_code == 400 and refusal(r)["error"] == "invalid_slug"
    assert_meter_headers(r)


# --- authentication ----------------------------------------------------------------------------


async def test_unauthenticated_calls_get_401_with_challenge(gateway: Gateway, backend: Backend,
                                                            fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing()
    for headers, has_error in (({}, False), ({"Authorization": "Basic abc"}, True),
                               ({"Authorization": "Bearer mcpm_live_unknownkey123"}, True)):
        r = await post(gateway, f"/{s}", call("ok"), headers=headers)
        assert r.status_code == 401
        assert refusal(r)["error"] == "invalid_token"
        challenge = r.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ")
        assert f'resource_metadata="{gateway.url}/.well-known/oauth-protected-resource"' in challenge
        assert ('error="invalid_token"' in challenge) is has_error
        assert_meter_headers(r)
    assert fault_server.calls["ok"] == 0 or True  # other tests call "ok"; the upstream count is checked below


async def test_revoked_key_and_suspended_account(gateway: Gateway, backend: Backend,
                                                 fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing()
    revoked = backend.add_consumer(credit=10_000)
    backend.execute("UPDATE api_keys SET revoked_at = %s WHERE id = %s", ("2026-01-01 00:00:00", revoked.key_id))
    r = await post(gateway, f"/{s}", call("ok"), revoked)
    assert r.status_code == 401
    suspended = backend.add_consumer(credit=10_000, status="suspended")
    r = await post(gateway, f"/{s}", call("ok"), suspended)
    assert r.status_code == 403 and refusal(r)["error"] == "account_suspended"
    assert backend.balance(suspended.user_id) == 10_000


# --- listings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status, code, error", [
    ("archived", 410, "mcp_archived"), ("paused", 503, "mcp_paused"),
    ("draft", 503, "mcp_not_yet_live"), ("review", 503, "mcp_not_yet_live"),
])
async def test_listing_status(gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]],
                              status: str, code: int, error: str) -> None:
    s, _ = fault_listing(status=status)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("ok"), c)
    assert (r.status_code, refusal(r)["error"]) == (code, error)
    assert_meter_headers(r)
    assert "X-Mcpmeter-Balance" not in r.headers  # never read for an unpriced request or a refusal before the charge


async def test_unknown_slug_and_live_listing_without_upstream(gateway: Gateway, backend: Backend) -> None:
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{slug('nope')}", call("ok"), c)
    assert (r.status_code, refusal(r)["error"]) == (404, "no_such_mcp")
    s = slug()
    backend.add_listing(s, None, price=1000)
    r = await post(gateway, f"/{s}", call("ok"), c)
    assert (r.status_code, refusal(r)["error"]) == (503, "mcp_not_yet_live")


# --- billing -----------------------------------------------------------------------------------


async def test_paid_call_is_debited_recorded_and_headed(gateway: Gateway, backend: Backend,
                                                        fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, tool_prices={"headers": 2500})
    c = backend.add_consumer(credit=10_000)
    before = fault_server.calls["ok"]
    first = r = await post(gateway, f"/{s}", call("ok"), c)
    assert r.status_code == 200 and r.json()["result"]["content"][0]["text"] == "ok"
    assert r.headers["X-Mcpmeter-Billed"] == "1000"
    assert_meter_headers(r, balance=9_000)
    assert "X-Mcpmeter-Refunded" not in r.headers
    assert fault_server.calls["ok"] == before + 1
    r = await post(gateway, f"/{s}", call("headers"), c)
    assert r.headers["X-Mcpmeter-Billed"] == "2500"
    ids = [first.headers["X-Mcpmeter-Request-Id"], r.headers["X-Mcpmeter-Request-Id"]]
    assert backend.balance(c.user_id) == 6_500  # the debit commits before the call is forwarded
    usage = await eventually(lambda: len(backend.usage(c)) == 2 and backend.usage(c))
    # Billed answers settle just after they are sent, so the two rows may be written in either order.
    usage.sort(key=lambda u: u["tool_name"] != "ok")
    assert [(u["tool_name"], u["status"], u["billed"]) for u in usage] == [("ok", 200, 1000), ("headers", 200, 2500)]
    assert usage[0]["payout"] == 800 and usage[0]["fee"] == 200
    assert [u["request_id"] for u in usage] == ids
    assert backend.ledger(c.user_id)[0] == (10_000, "topup", None)
    # Settled in either order too (with wallets, a call's debit is written when it settles).
    assert_calls_cost(backend, c, 10_000, [(-1000, "usage", ids[0]), (-2500, "usage", ids[1])], ordered=False)


async def test_unpriced_methods_pass_through_unrecorded(gateway: Gateway, backend: Backend,
                                                        fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    for body in ({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
                 {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                 {"jsonrpc": "2.0", "method": "notifications/initialized"}):
        r = await post(gateway, f"/{s}", body, c)
        assert r.status_code in (200, 202)
        assert r.headers["X-Mcpmeter-Billed"] == "0"
        assert_meter_headers(r)
        # never read for an unpriced request or a refusal before the charge
        assert "X-Mcpmeter-Balance" not in r.headers
    assert backend.usage(c) == []
    assert backend.balance(c.user_id) == 10_000


async def test_free_tier_then_debit(gateway: Gateway, backend: Backend,
                                    fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, mcp_id = fault_listing(price=1000, free=2)
    c = backend.add_consumer(credit=10_000)
    billed = [(await post(gateway, f"/{s}", call("ok"), c)).headers["X-Mcpmeter-Billed"] for _ in range(3)]
    assert billed == ["free", "free", "1000"]
    assert backend.free_used(mcp_id, c.user_id) == 2
    assert backend.balance(c.user_id) == 9_000


async def test_insufficient_credit_is_402_and_never_forwarded(gateway: Gateway, backend: Backend,
                                                              fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, tool_prices={"sse_ok": 5000})
    c = backend.add_consumer(credit=4_000)
    before = fault_server.calls["sse_ok"]
    r = await post(gateway, f"/{s}", call("sse_ok"), c)
    assert r.status_code == 402
    body = refusal(r)
    assert body["error"] == "insufficient_credit"
    assert body["balance_micro_cents"] == 4_000 and body["required_micro_cents"] == 5_000
    assert_meter_headers(r, balance=4_000)
    assert fault_server.calls["sse_ok"] == before
    assert backend.ledger(c.user_id) == [(4_000, "topup", None)]


async def test_project_cap_is_402_and_never_forwarded(gateway: Gateway, backend: Backend,
                                                      fault_listing: Callable[..., tuple[str, int]]) -> None:
    # A cap of 1 cent = 1,000,000 µ¢: two calls of 400,000 fit, the third would pass it.
    s, _ = fault_listing(price=400_000)
    c = backend.add_consumer(credit=10_000_000, cap_cents=1)
    statuses = [(await post(gateway, f"/{s}", call("ok"), c)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 402]
    assert refusal(statuses[2])["error"] == "project_cap_exceeded"
    assert backend.balance(c.user_id) == 9_200_000


async def test_rate_limit_429_with_exact_retry_after(gateway: Gateway, backend: Backend,
                                                     fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=10, rpm=3)
    c = backend.add_consumer(credit=10_000)
    responses = [await post(gateway, f"/{s}", call("ok"), c) for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    refused = responses[3]
    assert refusal(refused)["error"] == "rate_limited" and refusal(refused)["scope"] == "minute"
    assert 15 <= int(refused.headers["Retry-After"]) <= 20  # GCRA: the next of 3 cells refills 60 s / 3 after the burst
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert responses[0].headers["RateLimit-Remaining"] == "2"
    assert backend.balance(c.user_id) == 10_000 - 30  # the refused call cost nothing


async def test_batches_and_header_mismatch_are_400(gateway: Gateway, backend: Backend,
                                                   fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", [call("ok", rpc_id=1), call("ok", rpc_id=2)], c)
    assert (r.status_code, refusal(r)["error"]) == (400, "batch_not_supported")
    r = await post(gateway, f"/{s}", call("ok"), c, headers={"Mcp-Method": "tools/list"})
    assert (r.status_code, refusal(r)["error"]) == (400, "header_mismatch")
    r = await post(gateway, f"/{s}", call("ok"), c, headers={"Mcp-Method": "tools/call", "Mcp-Name": "free_tool"})
    assert (r.status_code, refusal(r)["error"]) == (400, "header_mismatch")
    async with httpx2.AsyncClient() as client:
        r = await client.post(gateway.url + f"/{s}", content=b"{not json", headers={**MCP_HEADERS, **c.auth})
    assert (r.status_code, refusal(r)["error"]) == (400, "invalid_json")
    assert backend.balance(c.user_id) == 10_000


async def test_body_over_limit_is_413_and_never_forwarded(gateway: Gateway, backend: Backend,
                                                          fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    big = call("ok", {"blob": "x" * (10 * 1024 * 1024 + 10)})
    before = fault_server.calls["ok"]
    r = await post(gateway, f"/{s}", big, c)
    assert r.status_code == 413 and refusal(r)["error"] == "payload_too_large"
    assert_meter_headers(r)
    assert fault_server.calls["ok"] == before
    assert backend.balance(c.user_id) == 10_000


# --- refunds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tool, status", [
    ("tool_error", 200), ("rpc_error", 200), ("http500", 500), ("http400", 400), ("no_answer", 200),
])
async def test_failed_answers_are_refunded(gateway: Gateway, backend: Backend,
                                           fault_listing: Callable[..., tuple[str, int]], tool: str,
                                           status: int) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call(tool), c)
    assert r.status_code == status
    assert r.headers["X-Mcpmeter-Refunded"] == "1"
    assert r.headers["X-Mcpmeter-Billed"] == "0"
    assert_meter_headers(r, balance=10_000)
    assert backend.balance(c.user_id) == 10_000
    rid = r.headers["X-Mcpmeter-Request-Id"]  # a refund is written before the answer, on every store
    assert_calls_cost(backend, c, 10_000, [(-1000, "usage", rid), (1000, "refund", rid)])
    assert [(u["status"], u["billed"]) for u in backend.usage(c)] == [(status, 0)]


async def test_listing_may_bill_tool_errors(gateway: Gateway, backend: Backend,
                                            fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, bill_tool_errors=True)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("tool_error"), c)
    assert r.headers["X-Mcpmeter-Billed"] == "1000" and "X-Mcpmeter-Refunded" not in r.headers
    assert backend.balance(c.user_id) == 9_000


async def test_refunded_free_call_gives_its_slot_back(gateway: Gateway, backend: Backend,
                                                      fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, mcp_id = fault_listing(price=1000, free=1)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("http500"), c)
    assert r.headers["X-Mcpmeter-Refunded"] == "1"
    assert backend.free_used(mcp_id, c.user_id) == 0
    r = await post(gateway, f"/{s}", call("ok"), c)
    assert r.headers["X-Mcpmeter-Billed"] == "free"


async def test_unreachable_upstream_is_502_json_and_refunded(gateway: Gateway, backend: Backend,
                                                             fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, upstream_url=f"http://127.0.0.1:{free_port()}/mcp")
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("ok"), c)
    assert r.status_code == 502 and refusal(r)["error"] == "upstream_failed"
    assert r.headers["X-Mcpmeter-Refunded"] == "1"
    assert_meter_headers(r, balance=10_000)
    assert [(u["status"], u["billed"]) for u in backend.usage(c)] == [(502, 0)]


async def test_upstream_that_hangs_up_is_502_and_refunded(gateway: Gateway, backend: Backend,
                                                          fault_listing: Callable[..., tuple[str, int]]) -> None:
    port, stop = start_hang_up_server()
    try:
        s, _ = fault_listing(price=1000, upstream_url=f"http://127.0.0.1:{port}/mcp")
        c = backend.add_consumer(credit=10_000)
        r = await post(gateway, f"/{s}", call("ok"), c)
        assert r.status_code == 502 and refusal(r)["error"] == "upstream_failed"
        assert backend.balance(c.user_id) == 10_000
    finally:
        stop()


async def test_slow_upstream_is_504_json_and_refunded(gateway: Gateway, backend: Backend,
                                                      fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, timeout=1)
    c = backend.add_consumer(credit=10_000)
    started = time.monotonic()
    r = await post(gateway, f"/{s}", call("slow", {"seconds": 5}), c)
    assert time.monotonic() - started < 3
    assert r.status_code == 504 and refusal(r)["error"] == "upstream_timeout"
    assert r.headers["X-Mcpmeter-Refunded"] == "1"
    assert_meter_headers(r, balance=10_000)
    assert [(u["status"], u["billed"]) for u in backend.usage(c)] == [(504, 0)]


# --- streaming ---------------------------------------------------------------------------------


async def read_events(gw: Gateway, path: str, body: Any,
                      consumer: TestConsumer) -> tuple[httpx2.Response, list[tuple[float, str]]]:
    """POST and read an SSE answer line by line, noting when each data line arrived."""
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    async with httpx2.AsyncClient(timeout=20) as client:
        async with client.stream("POST", gw.url + path, content=json.dumps(body).encode(),
                                 headers={**MCP_HEADERS, **consumer.auth}) as r:
            try:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and line[5:].strip():
                        lines.append((time.monotonic() - started, line[5:].strip()))
            except httpx2.HTTPError:
                pass  # a stream the upstream cut off
    return r, lines


async def test_sse_events_stream_through_and_the_call_is_billed(gateway: Gateway, backend: Backend,
                                                                fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    r, events = await read_events(gateway, f"/{s}", call("sse_ok", {"delay": 0.6}), c)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["X-Mcpmeter-Billed"] == "1000"
    assert [json.loads(d).get("method", "result") for _, d in events] == ["notifications/progress", "result"]
    # The progress event arrives as the upstream writes it, well before the stream ends.
    assert events[1][0] - events[0][0] > 0.4
    await eventually(lambda: [u["billed"] for u in backend.usage(c)] == [1000])
    assert backend.balance(c.user_id) == 9_000


@pytest.mark.parametrize("tool", ["sse_rpc_error", "sse_tool_error", "sse_die"])
async def test_failures_inside_sse_streams_are_refunded(gateway: Gateway, backend: Backend,
                                                        fault_listing: Callable[..., tuple[str, int]],
                                                        tool: str) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    r, events = await read_events(gateway, f"/{s}", call(tool), c)
    assert r.status_code == 200 and events
    await eventually(lambda: [u["billed"] for u in backend.usage(c)] == [0])
    assert backend.balance(c.user_id) == 10_000
    rid = r.headers["X-Mcpmeter-Request-Id"]
    assert_calls_cost(backend, c, 10_000, [(-1000, "usage", rid), (1000, "refund", rid)])


async def test_stream_slower_than_timeout_is_cut_and_refunded(gateway: Gateway, backend: Backend,
                                                              fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, timeout=1)
    c = backend.add_consumer(credit=10_000)
    started = time.monotonic()
    await read_events(gateway, f"/{s}", call("sse_slow", {"seconds": 6}), c)
    assert time.monotonic() - started < 4
    await eventually(lambda: [(u["status"], u["billed"]) for u in backend.usage(c)] == [(504, 0)])
    assert backend.balance(c.user_id) == 10_000


async def test_client_that_disconnects_mid_call_is_billed_and_recorded(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    async with httpx2.AsyncClient(timeout=20) as client:
        with pytest.raises(httpx2.TimeoutException):
            await client.post(gateway.url + f"/{s}", content=json.dumps(call("slow", {"seconds": 3})).encode(),
                              headers={**MCP_HEADERS, **c.auth}, timeout=0.5)
    await eventually(lambda: [(u["status"], u["billed"]) for u in backend.usage(c)] == [(499, 1000)])
    assert backend.balance(c.user_id) == 9_000


# --- forwarding --------------------------------------------------------------------------------


async def test_forwarded_headers_path_and_query(gateway: Gateway, backend: Backend,
                                                fault_listing: Callable[..., tuple[str, int]],
                                                fault_url: str) -> None:
    s, _ = fault_listing(price=1000, headers={"X-Publisher-Key": "pub-secret", "X-Shared": "publisher"})
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}/deeper?x=1", call("headers"), c, headers={
        "Cookie": "session=consumer", "X-Forwarded-Host": "evil.example", "X-Forward-Authorization": "Bearer up",
        "X-Forward-X-Shared": "consumer", "X-Forward-Host": "evil.example", "X-Custom": "kept"})
    assert r.status_code == 200
    seen = fault_server.seen_headers["headers"]
    assert fault_server.seen_paths["headers"] == "/mcp/deeper?x=1"
    assert seen["authorization"] == "Bearer up"  # the consumer's key never, the unwrapped header yes
    assert "cookie" not in seen and "x-forwarded-host" not in seen
    assert seen["x-publisher-key"] == "pub-secret" and seen["x-shared"] == "publisher"
    assert seen["x-custom"] == "kept"
    assert seen["host"] == fault_url.removeprefix("http://")
    assert seen["accept-encoding"] == "identity"
    assert c.key not in json.dumps(seen)


async def test_reverse_target_is_never_contacted(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Only listings are forwarded to; the --mode reverse: target is not an open relay."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    accepted: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    from tests import gateway_proc

    original = gateway_proc.closed_port
    gateway_proc.closed_port = lambda: listener.getsockname()[1]
    gw = None
    try:
        gw = gateway_proc.start_gateway(backend.config(), tmp_path_factory.mktemp("relay"), env=backend.env())
        c = backend.add_consumer(credit=1000)
        for path in ("/", f"/{slug('nope')}", "/health", "/mcp", "/.well-known/x"):
            await post(gw, path, call("ok"), c)
        async with httpx2.AsyncClient() as client:
            await client.get(gw.url + "/anything", headers=c.auth)
        time.sleep(0.3)
        assert accepted == []
    finally:
        gateway_proc.closed_port = original
        if gw:
            gw.stop()
        stop.set()
        thread.join(1)
        listener.close()


# --- money under concurrency ---------------------------------------------------------------------


async def test_50_concurrent_paid_calls_against_a_balance_for_20(gateway: Gateway, backend: Backend,
                                                                 fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, rpm=1000)
    c = backend.add_consumer(credit=20_000)
    async with httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_connections=60)) as client:
        responses = await asyncio.gather(*(
            client.post(gateway.url + f"/{s}", content=json.dumps(call("ok", rpc_id=i)).encode(),
                        headers={**MCP_HEADERS, **c.auth}) for i in range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 20 and statuses.count(402) == 30
    assert backend.balance(c.user_id) == 0
    await eventually(lambda: len([u for u in backend.usage(c) if u["billed"] == 1000]) == 20)
    billed = {r.headers["X-Mcpmeter-Request-Id"] for r in responses if r.status_code == 200}
    assert len(billed) == 20 and len(backend.usage(c)) == 20  # the 30 refused calls are recorded nowhere
    assert_calls_cost(backend, c, 20_000, [(-1000, "usage", rid) for rid in billed], ordered=False)


async def test_oauth_tokens_bill_the_users_oldest_project(gateway: Gateway, backend: Backend,
                                                          fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    backend.execute("INSERT INTO projects (user_id, name, slug) VALUES (%s, %s, %s)",
                    (c.user_id, "newer project", f"newer-{uuid.uuid4().hex[:8]}"))
    token = backend.add_oauth_token(c.user_id)
    r = await post(gateway, f"/{s}", call("ok"), headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.headers["X-Mcpmeter-Billed"] == "1000"
    assert_meter_headers(r, balance=9_000)
    rows = await eventually(lambda: backend.query(
        "SELECT project_id, api_key_id, billed_micro_cents FROM usage_events WHERE request_id = %s",
        (r.headers["X-Mcpmeter-Request-Id"],)))  # recorded just after the answer was sent
    assert [tuple(int(x) if x is not None else None for x in row) for row in rows] == [(c.project_id, None, 1000)]
    for bad in (backend.add_oauth_token(c.user_id, expires_in=-60),
                backend.add_oauth_token(c.user_id, revoked=True)):
        r = await post(gateway, f"/{s}", call("ok"), headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert backend.balance(c.user_id) == 9_000
