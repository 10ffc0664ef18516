"""Money under real database faults: connections killed, locks held past the timeout, the network cut
for a moment, the server read-only, two sweepers on the same rows, SQLite's file locked by another
process. Nothing is faked: the faults come from other sessions (KILL, FOR UPDATE, read_only,
BEGIN EXCLUSIVE) or from a TCP relay switched off. Every case ends with `reconcile` (SPEC I1-I4).
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from mitmproxy.test import taddons

from addon.gateway import Mcpmeter

from .dbutil import SCHEMA, Relay, scratch_database
from .test_gateway_hooks import isolated, json_response, make_flow, upstream_answers  # noqa: F401  (isolated: a fixture)
from .test_store_contract import MysqlBackend, _prepare, add_consumer, add_listing, reconcile

pytestmark = pytest.mark.timeout(30)

PRICE = 1000


# --- the network cut for a moment, at the gateway -----------------------------------------------------


@pytest.mark.parametrize("answer", [{"result": {"content": []}}, {"error": {"code": -32000, "message": "no"}}],
                         ids=["billed", "refunded"])
async def test_a_settlement_outlasts_a_network_cut_shorter_than_its_retries(
        tmp_path: Path, answer: dict[str, Any]) -> None:
    """MySQL unreachable for 0.3 s while a forwarded call's answer is settled. The first failed
    connect makes the store refuse at once for DOWN_FOR (1 s): settlement retries that all fall within
    that window never reach the database, and the call was left to the sweeper (a delivered call
    refunded ten minutes later, or a refund held as long). They reach it once it is back."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)
        relay = Relay(settings)  # the gateway's only way to the server
        relay.start()
        try:
            _prepare(db)
            who = add_consumer(db, 1, credit=10 * PRICE)
            add_listing(db, 10, "w", price=PRICE)
            config = tmp_path / "mcpmeter.yaml"
            config.write_text(yaml.safe_dump({"store": "mysql", "mysql": {
                "host": settings.host, "port": relay.port, "user": settings.user, "password": settings.password,
                "database": settings.database, "pool_size": 2}}))
            addon = Mcpmeter()
            with taddons.context(addon) as tctx:
                tctx.configure(addon, mcpmeter_config=str(config))
                flow = make_flow("/w", token=who.key)
                await addon.request(flow)
                assert flow.response is None  # charged and forwarded
                relay.stop()  # the open connections cut, new ones refused ...
                back = threading.Timer(0.3, relay.start)  # ... for 0.3 s
                back.start()
                try:
                    await upstream_answers(SimpleNamespace(addon=addon), flow,
                                           json_response({"jsonrpc": "2.0", "id": 1, **answer}))
                finally:
                    back.join()
                addon.done()
            refunded = "error" in answer
            assert db.rows("SELECT settled_at IS NOT NULL, refunded FROM mcpmeter_calls") == [(1, int(refunded))]
            assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == (10 - (not refunded)) * PRICE
            assert db.rows("SELECT billed_micro_cents FROM usage_events") == [(0 if refunded else PRICE,)]
            reconcile(db)
        finally:
            relay.stop()
            db.close()
