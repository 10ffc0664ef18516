"""Shadow mode end to end, on both backends: a real mitmdump with `shadow: true` forwards every call,
records it (usage row, billed 0) and never touches a balance or the ledger."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import call, post

pytestmark = pytest.mark.timeout(120)
_n = itertools.count()


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"shadow": True}


async def test_shadow_gateway_forwards_records_and_charges_nothing(gateway: Gateway, backend: Backend,
                                                                  fault_url: str) -> None:
    slug = f"shadow-{next(_n)}"
    backend.add_listing(slug, fault_url + "/mcp", price=1000, rpm=1)
    rich, poor = backend.add_consumer(credit=10_000), backend.add_consumer(credit=500)
    ledgers = {c.user_id: backend.ledger(c.user_id) for c in (rich, poor)}
    for consumer in (rich, poor, poor):  # would be: debit; refused for credit; refused for the rate limit
        r = await post(gateway, f"/{slug}", call("ok"), consumer)
        assert r.status_code == 200 and r.json()["result"]["content"][0]["text"] == "ok"
        assert r.headers["X-Mcpmeter-Billed"] == "0"
    for _ in range(50):  # settlement is written just after the answer
        if len(backend.usage(rich)) + len(backend.usage(poor)) == 3:
            break
        await asyncio.sleep(0.05)
    assert backend.balance(rich.user_id) == 10_000 and backend.balance(poor.user_id) == 500
    assert {c.user_id: backend.ledger(c.user_id) for c in (rich, poor)} == ledgers
    rows = backend.usage(rich) + backend.usage(poor)
    assert len(rows) == 3 and all(r["billed"] == 0 and r["status"] == 200 for r in rows)
    # What shadow mode would have done is recorded as each call's reason (mcpmeter usage --by reason).
    reasons = sorted(r for (r,) in backend.query(
        "SELECT c.reason FROM mcpmeter_calls c JOIN usage_events e ON e.request_id = c.request_id"
        " WHERE e.api_key_id IN (%s, %s)", (rich.key_id, poor.key_id)))
    assert reasons == ["shadow:debited", "shadow:insufficient_credit", "shadow:rate_limited"]
