"""Money under real database faults: connections killed, locks held past the timeout, the network cut
for a moment, the server read-only, two sweepers on the same rows, SQLite's file locked by another
process. Nothing is faked: the faults come from other sessions (KILL, FOR UPDATE, read_only,
BEGIN EXCLUSIVE) or from a TCP relay switched off. Every case ends with `reconcile` (SPEC I1-I4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from mitmproxy.test import taddons

from addon.config import Config, MysqlSettings
from addon.gateway import Mcpmeter
from addon.model import Verdict
from addon.store.base import StoreUnavailable
from addon.store.mysql import MysqlStore

from .dbutil import SCHEMA, Relay, connect, require_server, scratch_database
from .test_mysql_loop import mysql  # noqa: F401  (a fixture: a scratch database, pool_size 4)
from .test_gateway_hooks import isolated, json_response, make_flow, upstream_answers  # noqa: F401  (isolated: a fixture)
from .test_store_contract import FEE_BPS, MysqlBackend, _prepare, add_consumer, add_listing, call, outcome, reconcile

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


# --- the server read-only --------------------------------------------------------------------------------


def admin(statement: str) -> None:
    conn = connect(require_server())
    try:
        conn.cursor().execute(statement)
    finally:
        conn.close()


@contextlib.contextmanager
def gateway_user(settings: MysqlSettings, grants: str) -> Iterator[MysqlSettings]:
    """A user of the test database with `grants` only, as a gateway runs in production: read_only binds
    it (root, with SUPER / READ_ONLY ADMIN, would write on regardless)."""
    user = f"mcpm_ro_{secrets.token_hex(4)}"
    admin(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
    try:
        admin(f"GRANT {grants} ON `{settings.database}`.* TO '{user}'@'%'")
        yield dataclasses.replace(settings, user=user, password="pw")
    finally:
        admin(f"DROP USER IF EXISTS '{user}'@'%'")


@contextlib.contextmanager
def read_only() -> Iterator[None]:
    """The whole server read-only (a failover in progress, say), always restored."""
    admin("SET GLOBAL read_only = 1")
    try:
        yield
    finally:
        admin("SET GLOBAL read_only = 0")


async def test_a_read_only_server_refuses_calls_and_nothing_is_lost_once_it_is_writable(
        mysql: MysqlBackend) -> None:  # noqa: F811
    """While the server is read-only no call is charged (503, never forwarded), settlements and the
    sweep fail and leave their journal rows unsettled; a gateway started meanwhile still answers
    what needs no write (its schema is in place: it creates nothing). Once writable again, the
    sweep settles every call exactly once."""
    with gateway_user(mysql.db.settings, "SELECT, INSERT, UPDATE, DELETE, EXECUTE") as limited:
        who = add_consumer(mysql, 1, credit=10 * PRICE)
        add_listing(mysql, 10, "w", price=PRICE)
        store = MysqlStore(Config(store="mysql", mysql=limited))  # the schema is there: no CREATE needed
        try:
            reqs = [call(who, 10, PRICE) for _ in range(3)]
            taken = [await store.charge(req) for req in reqs]
            with read_only():
                with pytest.raises(StoreUnavailable, match="read-only"):
                    await store.charge(call(who, 10, PRICE))
                for req, t, refund in zip(reqs[:2], taken[:2], (False, True), strict=True):
                    with pytest.raises(StoreUnavailable, match="read-only"):
                        await store.settle(dataclasses.replace(outcome(req, who, refund=refund), taken=t))
                assert await store.sweep(-2, FEE_BPS) == 0
                started = MysqlStore(Config(store="mysql", mysql=limited))  # a gateway (re)started meanwhile
                try:
                    assert (await started.health())["ok"] is True
                    assert (await started.find_listing("w")) is not None
                    with pytest.raises(StoreUnavailable, match="read-only"):
                        await started.charge(call(who, 10, PRICE))
                finally:
                    started.close()
            assert mysql.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 3
            assert await store.sweep(-2, FEE_BPS) == 3
            assert await store.sweep(-2, FEE_BPS) == 0
            assert (await store.charge(call(who, 10, PRICE))).verdict is Verdict.DEBITED
        finally:
            store.close()
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 9 * PRICE
    reconcile(mysql)
