"""End to end through mitmdump, on both backends: the circuit breaker and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx2
import pytest

from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.refusals import refusal
from tests.test_e2e_gateway import call, eventually, fault_listing, post  # noqa: F401  (a fixture)

METRICS_TOKEN = "mcpm_live_scraper0123456789abcdefghij"


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"circuit_breaker": {"failures": 2, "cooldown_seconds": 1}, "metrics_token": METRICS_TOKEN}


async def scrape(gateway: Gateway, token: str | None = METRICS_TOKEN) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.get(gateway.url + "/metrics", headers=headers)


async def test_circuit_opens_refuses_before_charging_then_closes(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000)
    c = backend.add_consumer(credit=10_000)
    d = backend.add_consumer(credit=10_000)
    for who in (c, d):  # two consumers' failures: one alone never opens a circuit
        r = await post(gateway, f"/{s}", call("http500"), who)
        assert r.status_code == 500 and r.headers["X-Mcpmeter-Refunded"] == "1"
    await eventually(lambda: len(backend.usage(c)) == 1 and len(backend.usage(d)) == 1)
    ledger = backend.ledger(c.user_id)

    r = await post(gateway, f"/{s}", call("ok", rpc_id="after"), c)
    assert r.status_code == 503 and r.json()["id"] == "after"
    assert refusal(r)["error"] == "upstream_unavailable" and 1 <= int(r.headers["Retry-After"]) <= 1
    assert backend.ledger(c.user_id) == ledger and backend.balance(c.user_id) == 10_000
    async with httpx2.AsyncClient(timeout=10) as http:
        health = (await http.get(gateway.url + "/health")).json()
    assert health["circuits"].get(s) == "open"

    await asyncio.sleep(1.1)
    r = await post(gateway, f"/{s}", call("ok"), c)  # the probe
    assert r.status_code == 200 and r.headers["X-Mcpmeter-Billed"] == "1000"
    r = await post(gateway, f"/{s}", call("ok"), c)
    assert r.status_code == 200
    await eventually(lambda: backend.balance(c.user_id) == 8_000)


async def test_metrics_are_protected_and_count_calls(
        gateway: Gateway, backend: Backend, fault_listing: Callable[..., tuple[str, int]]) -> None:
    s, _ = fault_listing(price=1000, tool_prices={"ok": 700})
    c = backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", call("ok"), c)
    assert r.status_code == 200
    assert (await scrape(gateway, None)).status_code == 401
    assert (await scrape(gateway, c.auth["Authorization"].split()[1])).status_code == 403

    async def billed() -> bool:
        text = (await scrape(gateway)).text
        return f'mcpmeter_calls_total{{decision="billed",listing="{s}",status="200",tool="ok"}} 1.0' in text \
            and f'mcpmeter_billed_micro_cents_total{{listing="{s}"}} 700.0' in text

    for _ in range(50):
        if await billed():
            break
        await asyncio.sleep(0.1)
    assert await billed()
    await eventually(lambda: backend.balance(c.user_id) == 9_300)
