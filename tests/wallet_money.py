"""The money of gateways running with wallets (addon/store/wallets.py), checked end to end.

Gateways get short lives (WALLET_SETTINGS) so that their sweepers settle every hold within seconds:
a test waits for the real settlement (no hold is settled by hand), then checks the database to the
micro-cent against what the clients saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from typing import Any

from addon.admin import Admin
from addon.config import Config
from addon.store.mysql import MysqlStore
from addon.store.wallet_sql import settle_after
from tests.backends import Backend, ProductionBackend, TestConsumer

# The longest call 3 s (the slow tool takes 1.5 s), a sweep every second: a hold settles
# settle_after = 2 + 3 * 1 + 4 = 9 s after its grant, at the next sweep.
WALLET_SETTINGS: dict[str, Any] = {
    "wallet_seconds": 2, "stale_call_seconds": 4, "upstream_timeout_ms": 3000, "max_upstream_timeout_ms": 3000,
    "task_settle_seconds": 4, "round_settle_seconds": 4,
}


def uses_wallets(backend: Backend) -> bool:
    return isinstance(backend, ProductionBackend) and backend.wallets


def gateway_config(backend: Backend, **others: Any) -> dict[str, Any]:
    """The gateways' configuration: `others`, over the short lives when the backend runs wallets."""
    return {**(WALLET_SETTINGS if uses_wallets(backend) else {}), **others}


def config(backend: ProductionBackend, **others: Any) -> Config:
    """The gateways' configuration (gateway_config's `others` included) as `mcpmeter reconcile` reads it."""
    return Config(store="mysql", cache="redis", mysql=backend.mysql, redis=backend.redis, wallets=True,
                  **{**WALLET_SETTINGS, **others})


async def holds_settled(backend: ProductionBackend, **others: Any) -> None:
    """Wait until the gateways' sweepers have settled every hold (at least one was granted)."""
    deadline = time.monotonic() + settle_after(config(backend, **others)) + 15
    while True:
        total, open_ = backend.query("SELECT COUNT(*), COUNT(*) - COUNT(settled_at) FROM mcpmeter_holds")[0]
        if int(total) > 0 and int(open_) == 0:
            return
        assert time.monotonic() < deadline, f"{open_} of {total} hold(s) still unsettled"
        await asyncio.sleep(0.25)


def assert_settled_money(backend: ProductionBackend, consumer: TestConsumer, opening: int, price: int,
                         seen: Mapping[str, int], lost: Collection[str] = (), **others: Any) -> None:
    """After every hold settled: the consumer paid exactly what their usage rows bill, each billed answer
    the clients saw (`seen`: request id -> X-Mcpmeter-Billed of each 200) is billed there, and `mcpmeter
    reconcile` finds nothing. `lost`: answers of a SIGKILLed gateway whose settlement may have died in its
    queue: such a call is unbilled, never recorded, and its price came back with its hold's rest.
    `others`: the gateways' settings besides WALLET_SETTINGS (gateway_config)."""
    assert backend.unreconciled() == [], "balances differ from their ledgers (I1)"
    assert backend.query("SELECT id, credit_micro_cents FROM users WHERE credit_micro_cents < 0") == []
    billed = {r for r, amount in seen.items() if amount > 0}
    assert {seen[r] for r in billed} <= {price}, "an answer billed another price"
    assert len(billed) * price <= opening, "more answers billed than the credit paid for"
    events = {str(r): int(b) for r, b in backend.query(
        "SELECT request_id, billed_micro_cents FROM usage_events WHERE api_key_id = %s", (consumer.key_id,))}
    missing = {r for r in billed if events.get(r) != price}
    assert missing <= set(lost), f"billed answers without their billed usage row: {sorted(missing - set(lost))}"
    recorded = {str(r) for r, in backend.query("SELECT request_id FROM mcpmeter_calls WHERE user_id = %s",
                                               (consumer.user_id,))}
    assert not missing & (recorded | set(events)), "a lost call was recorded after all, yet not billed"
    assert backend.query("SELECT id FROM mcpmeter_holds WHERE settled_at IS NULL") == []
    # Nothing left in a wallet, and what the consumer paid is exactly what the usage rows bill.
    final = int(backend.query("SELECT credit_micro_cents FROM users WHERE id = %s", (consumer.user_id,))[0][0])
    assert backend.balance(consumer.user_id) == final, "a wallet still holds credit after its hold settled"
    assert final == opening - sum(events.values())
    settings = config(backend, **others)
    store = MysqlStore(settings)
    try:
        failed = [(c.invariant, c.rule, c.discrepancies) for c in Admin(store, settings).reconcile() if not c.ok]
    finally:
        store.close()
    assert failed == [], f"mcpmeter reconcile: {failed}"
