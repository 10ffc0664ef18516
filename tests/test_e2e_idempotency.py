"""Idempotency-Key end to end, on both backends: a retry gets the first answer and pays nothing more.

Real mitmdump gateways in front of the fault-on-demand upstream; the upstream counts the calls
that reach it, the ledger counts the money, and every test reconciles the ledger after.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests import fault_server
from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import assert_calls_cost, call, eventually, post, slug
from tests.test_e2e_production import pair, prod, redis_proc  # noqa: F401  (fixtures: two gateways)

pytestmark = pytest.mark.timeout(120)


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"retry-{uuid.uuid4()}"}


def debits(backend: Backend, user_id: int) -> list[int]:
    return [a for a, t, _ in backend.call_debits(user_id) if t == "usage"]


async def test_same_key_twice_one_debit_same_answer(gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    k, before = key(), fault_server.calls["headers"]
    first = await post(gateway, f"/{s}", call("headers", rpc_id=7), c, headers=k)
    assert first.status_code == 200 and first.headers["X-Mcpmeter-Billed"] == "1000"
    assert "idempotent-replayed" not in first.headers
    assert "idempotency-key" not in fault_server.seen_headers["headers"]  # the gateway's header, not forwarded
    second = await post(gateway, f"/{s}", call("headers", rpc_id=7), c, headers=k)
    assert second.status_code == 200 and second.headers["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert second.headers["X-Mcpmeter-Request-Id"] == first.headers["X-Mcpmeter-Request-Id"]
    assert second.headers["X-Mcpmeter-Billed"] == "1000"  # the one charge of this call, not a second
    assert fault_server.calls["headers"] == before + 1
    assert backend.balance(c.user_id) == 9_000
    await eventually(lambda: len(backend.usage(c)) == 1)
    assert_calls_cost(backend, c, 10_000, [(-1000, "usage", first.headers["X-Mcpmeter-Request-Id"])])
    third = await post(gateway, f"/{s}", call("headers", rpc_id=7), c, headers=key())  # a new key: a new call
    assert third.status_code == 200 and "idempotent-replayed" not in third.headers
    assert backend.balance(c.user_id) == 8_000


async def test_another_body_with_the_key_is_422_and_free(gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    k = key()
    assert (await post(gateway, f"/{s}", call("ok", rpc_id=1), c, headers=k)).status_code == 200
    r = await post(gateway, f"/{s}", call("ok", {"x": 1}, rpc_id=2), c, headers=k)
    assert r.status_code == 422 and r.headers["X-Mcpmeter-Billed"] == "0"
    body = r.json()
    assert body["id"] == 2 and body["error"]["code"] == -32015
    assert body["error"]["data"]["error"] == "idempotency_key_reused"
    assert backend.balance(c.user_id) == 9_000
    other = backend.add_consumer(credit=10_000)  # keys are per consumer: the same key is new for another
    r = await post(gateway, f"/{s}", call("ok", {"x": 1}, rpc_id=2), other, headers=k)
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers
    await eventually(lambda: len(backend.usage(c)) == 1 and len(backend.usage(other)) == 1)


async def test_invalid_key_is_400_and_unpriced_calls_ignore_it(gateway: Gateway, backend: Backend,
                                                                fault_url: str) -> None:
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("ok"), c, headers={"Idempotency-Key": "x" * 256})
    assert r.status_code == 400 and r.json()["error"]["data"]["error"] == "invalid_idempotency_key"
    listing = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
    k = key()
    for _ in range(2):  # not priced: forwarded each time, never replayed
        r = await post(gateway, f"/{s}", listing, c, headers=k)
        assert r.status_code == 200 and "idempotent-replayed" not in r.headers
    assert backend.balance(c.user_id) == 10_000


async def test_concurrent_retry_is_409_then_replayed(gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    k, body = key(), call("slow", {"seconds": 2}, rpc_id="a")
    first = asyncio.ensure_future(post(gateway, f"/{s}", body, c, headers=k))
    await eventually(lambda: backend.balance(c.user_id) == 9_000)  # charged: the first is in flight
    retry = await post(gateway, f"/{s}", body, c, headers=k)
    assert retry.status_code == 409 and retry.headers["Retry-After"] == "1"
    assert retry.json()["error"]["data"]["error"] == "idempotency_in_flight" and retry.json()["id"] == "a"
    done = await first
    assert done.status_code == 200
    again = await post(gateway, f"/{s}", body, c, headers=k)
    assert again.headers["Idempotent-Replayed"] == "true" and again.content == done.content
    assert backend.balance(c.user_id) == 9_000
    await eventually(lambda: len(backend.usage(c)) == 1)


async def test_a_walked_away_keyed_call_is_neither_run_nor_charged_again(gateway: Gateway, backend: Backend,
                                                                          fault_url: str) -> None:
    """The client hangs up while its keyed call runs: billed (the upstream ran it), answer lost. Its
    retries are told so (410), never forwarded, never charged; the tool ran once."""
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    k, body, before = key(), call("slow", {"seconds": 1.5}, rpc_id="w"), fault_server.calls["slow"]
    first = asyncio.ensure_future(post(gateway, f"/{s}", body, c, headers=k))
    await eventually(lambda: fault_server.calls["slow"] == before + 1)  # forwarded: the tool is running
    first.cancel()  # the client walks away
    with pytest.raises(asyncio.CancelledError):
        await first
    await eventually(lambda: len(backend.usage(c)) == 1, timeout=10)
    assert backend.balance(c.user_id) == 9_000  # a walk-away is billed
    for _ in range(2):
        retry = await post(gateway, f"/{s}", body, c, headers=k)
        assert retry.status_code == 410 and retry.headers["Idempotent-Replayed"] == "true", retry.text
        assert retry.json()["error"]["data"]["error"] == "idempotency_answer_lost" and retry.json()["id"] == "w"
        assert retry.headers["X-Mcpmeter-Billed"] == "1000"
    await asyncio.sleep(1.5)
    assert fault_server.calls["slow"] == before + 1 and backend.balance(c.user_id) == 9_000
    assert len(backend.usage(c)) == 1


async def test_refunded_call_is_replayed_refunded(gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)  # tool errors are refunded
    c = backend.add_consumer(credit=10_000)
    k, before = key(), fault_server.calls["tool_error"]
    first = await post(gateway, f"/{s}", call("tool_error"), c, headers=k)
    assert first.headers["X-Mcpmeter-Refunded"] == "1"
    second = await post(gateway, f"/{s}", call("tool_error"), c, headers=k)
    assert second.headers["Idempotent-Replayed"] == "true" and second.content == first.content
    assert second.headers["X-Mcpmeter-Refunded"] == "1" and second.headers["X-Mcpmeter-Billed"] == "0"
    assert fault_server.calls["tool_error"] == before + 1
    await eventually(lambda: backend.balance(c.user_id) == 10_000 and len(backend.usage(c)) == 1)


async def test_streamed_answer_is_replayed_as_its_bytes(gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=10_000)
    k = key()
    first = await post(gateway, f"/{s}", call("sse_ok", {"delay": 0.05}), c, headers=k)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/event-stream")
    await eventually(lambda: len(backend.usage(c)) == 1)
    second = await post(gateway, f"/{s}", call("sse_ok", {"delay": 0.05}), c, headers=k)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["content-type"].startswith("text/event-stream")
    assert second.content == first.content and b'"streamed"' in second.content
    assert backend.balance(c.user_id) == 9_000


async def test_refused_first_attempt_is_not_stored(gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug("idem")
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    c = backend.add_consumer(credit=0)
    k = key()
    assert (await post(gateway, f"/{s}", call("ok"), c, headers=k)).status_code == 402
    backend.topup(c.user_id, 5_000)
    r = await post(gateway, f"/{s}", call("ok"), c, headers=k)  # after topping up: runs normally
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers and r.headers["X-Mcpmeter-Billed"] == "1000"
    assert backend.balance(c.user_id) == 4_000
    await eventually(lambda: len(backend.usage(c)) == 1)


async def test_two_gateways_one_debit(pair: tuple[Gateway, Gateway], prod: Backend, fault_url: str) -> None:
    s = slug("idem")
    prod.add_listing(s, fault_url + "/mcp", price=1000)
    c = prod.add_consumer(credit=10_000)
    a, b = pair
    k, body = key(), call("slow", {"seconds": 1.5}, rpc_id=5)
    first = asyncio.ensure_future(post(a, f"/{s}", body, c, headers=k))
    await eventually(lambda: prod.balance(c.user_id) == 9_000)
    assert (await post(b, f"/{s}", body, c, headers=k)).status_code == 409  # in flight on the other gateway
    done = await first
    replayed = await post(b, f"/{s}", body, c, headers=k)
    assert replayed.headers["Idempotent-Replayed"] == "true" and replayed.content == done.content
    assert (await post(b, f"/{s}", call("slow", {"seconds": 0}, rpc_id=5), c, headers=k)).status_code == 422
    await eventually(lambda: len(prod.usage(c)) == 1)
    assert prod.balance(c.user_id) == 9_000 and debits(prod, c.user_id) == [-1000]
