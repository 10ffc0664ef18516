"""Money under real database faults: connections killed, locks held past the timeout, the network cut
for a moment, the server read-only, two sweepers on the same rows, SQLite's file locked by another
process. Nothing is faked: the faults come from other sessions (KILL, FOR UPDATE, read_only,
BEGIN EXCLUSIVE) or from a TCP relay switched off. Every case ends with `reconcile` (SPEC I1-I4).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from mitmproxy.test import taddons

from addon.config import Config, MysqlSettings
from addon.gateway import Mcpmeter
from addon.model import Settlement, Verdict
from addon.store import mysql_trip
from addon.store.base import StoreUnavailable
from addon.store.mysql import MysqlStore

from .dbutil import SCHEMA, Relay, connect, require_server, scratch_database
from .test_mysql_charge_replay import REPLAYED, batch_world, batch_written, settle_all
from .test_mysql_loop import hold_row, mysql, server_done, store_of  # noqa: F401  (mysql: a fixture, pool_size 4)
from .test_gateway_hooks import (  # noqa: F401  (gw, isolated: fixtures)
    Gw,
    forwarded,
    gw,
    isolated,
    json_response,
    make_flow,
    upstream_answers,
    upstream_fails,
)
from .test_store_contract import (
    FEE_BPS,
    MysqlBackend,
    Who,
    _prepare,
    add_consumer,
    add_listing,
    call,
    outcome,
    reconcile,
)

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
            with gateway_behind(relay, settings, tmp_path) as addon:
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


# --- connections killed mid-transaction, locks held past the timeout -------------------------------------


async def waiting_on_lock(db: MysqlBackend, statement: str) -> int:
    """The id of the connection whose statement (its text starts with `statement`: a procedure's shows
    the statement it runs) waits on a lock in the test database."""
    for _ in range(250):
        rows = db.rows("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND COMMAND = 'Query'"
                       " AND ID <> CONNECTION_ID() AND INFO LIKE %s AND TIME_MS > 50", (statement + "%",))
        if rows:
            return int(rows[0][0])
        await asyncio.sleep(0.02)
    raise AssertionError(f"no statement {statement!r} waits on a lock")


def kill(db: MysqlBackend, connection_id: int) -> None:
    admin(f"KILL CONNECTION {connection_id}")


async def killed_while_waiting(db: MysqlBackend, table: str, key: str, value: object, statement: str,
                               work: Any) -> Any:
    """Run `work` while another session holds a row it needs; KILL its connection once its
    `statement` waits on that row, then let the row go. Returns what `work` returned."""
    holder = hold_row(db, table, key, value)
    try:
        task = asyncio.ensure_future(work)
        kill(db, await waiting_on_lock(db, statement))
        await asyncio.sleep(0.2)  # the store finds its connection dead and runs the work again: it waits
    finally:
        holder.commit()
        holder.close()
    result = await task
    await server_done(db)
    return result


async def billed_settlements(db: MysqlBackend, store: MysqlStore, n: int) -> tuple[Who, list[Settlement]]:
    """User 1 and their `n` charged calls' billed settlements (batchable: no balance needed)."""
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "w", price=PRICE)
    out = []
    for _ in range(n):
        req = call(who, 10, PRICE)
        taken = await store.charge(req)
        assert taken.verdict is Verdict.DEBITED
        out.append(dataclasses.replace(outcome(req, who), taken=taken, need_balance=False))
    return who, out


async def test_a_charge_batch_killed_mid_way_is_run_again_and_charges_each_once(
        mysql: MysqlBackend) -> None:  # noqa: F811
    """The batch's third CALL waits on user 3's row when its connection is killed: the server rolls the
    first two back, and the batch runs again whole on a new connection. Each charge lands once."""
    users = [add_consumer(mysql, u, credit=10 * PRICE) for u in (1, 2, 3)]
    add_listing(mysql, 10, "w", price=PRICE, free=1)
    store = store_of(mysql)
    await store.charge(call(users[0], 10, 0))  # a pooled connection: the batch goes on it
    reqs = [call(who, 10, PRICE, free=1) for who in users for _ in range(2)]
    # (User 3's free call waits first: its balance is read under a shared lock.)
    results = await killed_while_waiting(mysql, "users", "id", 3, "", store.charge_batch(reqs))
    assert [r.verdict for r in results] == [Verdict.FREE, Verdict.DEBITED] * 3
    assert mysql.rows("SELECT user_id, COUNT(*) FROM credit_transactions WHERE type = 'usage'"
                      " GROUP BY user_id ORDER BY user_id") == [(1, 1), (2, 1), (3, 1)]
    assert mysql.value("SELECT COUNT(*) FROM mcpmeter_calls") == 7
    assert await store.sweep(-2, FEE_BPS) == 7
    reconcile(mysql)


async def test_a_billed_batch_killed_before_its_commit_is_written_once(mysql: MysqlBackend) -> None:  # noqa: F811
    """The batch's writes wait on the consumer's usage row when the connection is killed: rolled back,
    run again, every call billed once with one usage row, none counted twice."""
    store = store_of(mysql)
    _, jobs = await billed_settlements(mysql, store, 5)
    await store.settle(jobs[0])  # the usage row exists
    done = await killed_while_waiting(mysql, "mcp_consumer_usage", "user_id", 1, "INSERT INTO mcp_consumer_usage",
                                      store.settle_billed(jobs[1:]))
    assert done == [True] * 4
    for s in jobs:  # settled again (a retry, a second gateway): nothing changes
        assert await store.settle(s) is None
    assert mysql.rows("SELECT COUNT(*), SUM(billed_micro_cents) FROM usage_events") == [(5, 5 * PRICE)]
    assert mysql.value("SELECT billable_calls FROM mcp_consumer_usage WHERE user_id = 1") == 5
    reconcile(mysql)


async def test_a_refund_killed_mid_way_is_refunded_once(mysql: MysqlBackend) -> None:  # noqa: F811
    store = store_of(mysql)
    who = add_consumer(mysql, 1, credit=10 * PRICE)
    add_listing(mysql, 10, "w", price=PRICE)
    req = call(who, 10, PRICE)
    taken = await store.charge(req)
    refund = dataclasses.replace(outcome(req, who, refund=True, status=502), taken=taken)
    # The settlement's refund waits on the consumer's row (the flip before it is rolled back with it).
    assert await killed_while_waiting(mysql, "users", "id", 1, "UPDATE users", store.settle(refund)) == 10 * PRICE
    assert await store.settle(refund) == 10 * PRICE
    assert mysql.rows("SELECT type FROM credit_transactions WHERE request_id = %s ORDER BY id",
                      (req.request_id,)) == [("usage",), ("refund",)]
    reconcile(mysql)


async def test_a_sweep_killed_mid_way_refunds_each_call_once(mysql: MysqlBackend) -> None:  # noqa: F811
    store = store_of(mysql)
    who = add_consumer(mysql, 1, credit=10 * PRICE)
    add_listing(mysql, 10, "w", price=PRICE)
    for _ in range(3):
        await store.charge(call(who, 10, PRICE))
    await store.balance(1)  # a worker's pooled connection: the sweep's refund runs again on a new one
    assert await killed_while_waiting(mysql, "users", "id", 1, "UPDATE users", store.sweep(-2, FEE_BPS)) == 3
    assert await store.sweep(-2, FEE_BPS) == 0
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 10 * PRICE
    reconcile(mysql)


async def test_batches_past_the_lock_wait_timeout_run_again_exactly(mysql: MysqlBackend) -> None:  # noqa: F811
    """A row held past the 2 s lock wait timeout, mid-batch: InnoDB rolls back only the statement that
    waited, the store the rest, and the batch runs again from the start; nothing lands twice."""
    store = store_of(mysql)
    who, jobs = await billed_settlements(mysql, store, 5)
    other = add_consumer(mysql, 2, credit=10 * PRICE)
    await store.settle(jobs[0])
    holder = hold_row(mysql, "mcp_consumer_usage", "user_id", 1)
    try:
        billed = asyncio.ensure_future(store.settle_billed(jobs[1:]))
        # A charge batch whose second user's row is held: user 1's charges are in, user 2's waits.
        second = hold_row(mysql, "users", "id", other.user_id)
        try:
            charges = asyncio.ensure_future(store.charge_batch(
                [call(who, 10, PRICE), call(other, 10, PRICE)]))
            await asyncio.sleep(2.5)  # past one lock wait timeout
        finally:
            second.commit()
            second.close()
    finally:
        holder.commit()
        holder.close()
    assert await billed == [True] * 4
    assert [r.verdict for r in await charges] == [Verdict.DEBITED] * 2
    assert store.retries >= 2
    assert mysql.rows("SELECT COUNT(*), SUM(billed_micro_cents) FROM usage_events") == [(5, 5 * PRICE)]
    assert mysql.value("SELECT billable_calls FROM mcp_consumer_usage WHERE user_id = 1") == 5
    assert mysql.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'usage'") == 7
    assert await store.sweep(-2, FEE_BPS) == 2
    reconcile(mysql)


# --- two sweepers, and settlements after the sweep ---------------------------------------------------


async def test_two_gateways_sweeping_the_same_calls_refund_each_once(mysql: MysqlBackend) -> None:  # noqa: F811
    """Both sweepers list the same stale calls and queue on the consumer's row: whichever refunds a call
    first settles it, the other's flip then matches nothing, and each reports only the calls it settled
    (their log lines said every call twice)."""
    who = add_consumer(mysql, 1, credit=10 * PRICE)
    add_listing(mysql, 10, "w", price=PRICE, free=2)
    a, b = store_of(mysql), mysql.open_store()
    reqs = [call(who, 10, PRICE, free=2) for _ in range(6)]
    for req in reqs:
        assert (await a.charge(req)).accepted
    holder = hold_row(mysql, "users", "id", 1)
    try:
        sweeps = asyncio.gather(a.sweep(-2, FEE_BPS), b.sweep(-2, FEE_BPS))
        await asyncio.sleep(0.5)
    finally:
        holder.commit()
        holder.close()
    assert sum(await sweeps) == 6
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 10 * PRICE
    assert mysql.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'") == 4
    assert mysql.value("SELECT free_calls_used FROM mcp_consumer_usage WHERE user_id = 1") == 0
    assert mysql.value("SELECT COUNT(*) FROM usage_events") == 6
    reconcile(mysql)


@pytest.mark.parametrize("background", [False, True], ids=["alone", "batched"])
async def test_a_settlement_after_the_sweeper_refunded_its_call_changes_nothing(
        mysql: MysqlBackend, background: bool) -> None:  # noqa: F811
    """The sweeper refunded a call (its gateway seemed gone); its settlement comes after all, billed or
    refunded, through the one-trip procedure or a batch: not billed again, not refunded twice."""
    who = add_consumer(mysql, 1, credit=10 * PRICE)
    add_listing(mysql, 10, "w", price=PRICE)
    store = store_of(mysql)
    reqs = [call(who, 10, PRICE) for _ in range(4)]
    taken = [await store.charge(req) for req in reqs]
    assert await mysql.open_store().sweep(-2, FEE_BPS) == 4
    late = [dataclasses.replace(outcome(req, who, refund=refund, status=502 if refund else 200), taken=t,
                                need_balance=not background, background=background)
            for req, t, refund in zip(reqs, taken, (False, False, True, True), strict=True)]
    await asyncio.gather(*(store.settle(s) for s in late))
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 10 * PRICE
    assert mysql.rows("SELECT refunded, reason FROM mcpmeter_calls GROUP BY refunded, reason") == [(1, "swept")]
    assert mysql.rows("SELECT COUNT(*), SUM(billed_micro_cents) FROM usage_events") == [(4, 0)]
    assert mysql.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'") == 4
    reconcile(mysql)


# --- SQLite's file locked by another process ------------------------------------------------------------


def lock_file(path: Path, seconds: float) -> threading.Thread:
    """Another process's connection holding the database file's write lock (BEGIN EXCLUSIVE) for `seconds`."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")

    def release() -> None:
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


RESULT = {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}


async def test_sqlite_locked_briefly_delays_a_call_and_loses_nothing(gw: Gw) -> None:  # noqa: F811
    """Locked for less than the busy timeout (5 s): the charge waits for the lock, then the call goes."""
    released = lock_file(gw.db.path, 1.0)
    flow = make_flow()
    await gw.addon.request(flow)
    released.join()
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response(RESULT))
    assert [(v, settled, refunded) for _, v, _, refunded, settled in gw.db.journal()] == [("debited", 1, 0)]
    gw.db.assert_reconciled()


async def test_sqlite_locked_past_the_busy_timeout_refuses_and_then_serves(gw: Gw) -> None:  # noqa: F811
    """Locked past the busy timeout: the call is refused 503, never forwarded, nothing taken; once the
    lock goes, the store serves again (no transaction was left open)."""
    released = lock_file(gw.db.path, 6.0)
    refused = make_flow()
    await gw.addon.request(refused)
    released.join()
    assert refused.response is not None and refused.response.status_code == 503 and not forwarded(refused)
    assert gw.db.journal() == [] and gw.db.balance(1) == 1_000_000
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response(RESULT))
    assert gw.db.balance(1) == 1_000_000 - 1000
    gw.db.assert_reconciled()


async def test_sqlite_locked_while_a_refund_is_written_refunds_it_once(gw: Gw) -> None:  # noqa: F811
    """Locked past the busy timeout while a failed call's refund is written: its first attempt fails,
    a retry writes it once the lock goes."""
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    released = lock_file(gw.db.path, 5.5)
    await upstream_fails(gw, flow, "connection reset")
    released.join()
    await gw.addon.drain()
    assert [(v, settled, refunded) for _, v, _, refunded, settled in gw.db.journal()] == [("debited", 1, 1)]
    assert gw.db.balance(1) == 1_000_000
    gw.db.assert_reconciled()


# --- the answer lost after the COMMIT (the outcome unknown to the client) ------------------------------


@contextlib.contextmanager
def gateway_behind(relay: Relay, settings: MysqlSettings, tmp_path: Path) -> Iterator[Mcpmeter]:
    """A gateway (its hooks) whose MySQL connections all go through `relay`."""
    config = tmp_path / "mcpmeter.yaml"
    config.write_text(yaml.safe_dump({"store": "mysql", "mysql": {
        "host": settings.host, "port": relay.port, "user": settings.user, "password": settings.password,
        "database": settings.database, "pool_size": 2}}))
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(config))
        yield addon
        addon.done()


async def test_a_charge_whose_answer_is_lost_after_its_commit_is_forwarded_and_debited_once(
        tmp_path: Path) -> None:
    """The network cuts after the server committed the charge and answered: the gateway runs it again
    on a new connection, which finds the committed charge and answers it. The call is forwarded (it
    was paid for), debited once, billed once."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)
        relay = Relay(settings)
        relay.start()
        try:
            _prepare(db)
            who = add_consumer(db, 1, credit=10 * PRICE)
            add_listing(db, 10, "w", price=PRICE)
            with gateway_behind(relay, settings, tmp_path) as addon:
                flows = []
                for lose in (False, True):  # the first call pools a connection and caches key and listing
                    flow = make_flow("/w", token=who.key)
                    if lose:
                        relay.lose_answer()  # the charge's: the first statement this call sends
                    await addon.request(flow)
                    assert flow.response is None  # forwarded
                    flows.append(flow)
                assert relay.lost == 1
                for flow in flows:
                    await upstream_answers(SimpleNamespace(addon=addon), flow, json_response(RESULT))
        finally:
            relay.stop()
        try:
            assert db.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'usage'") == 2
            assert db.rows("SELECT settled_at IS NOT NULL, refunded FROM mcpmeter_calls") == [(1, 0), (1, 0)]
            assert db.rows("SELECT COUNT(*), SUM(billed_micro_cents) FROM usage_events") == [(2, 2 * PRICE)]
            assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 8 * PRICE
            reconcile(db)
        finally:
            db.close()


@pytest.mark.parametrize("kind", ["billed", "refund", "billed batch", "charge batch"])
async def test_work_whose_answer_is_lost_after_its_commit_lands_once(kind: str) -> None:
    """A settlement (one CALL), a batch of billed settlements (two round trips) and a batch of charges
    (one text of CALLs and a COMMIT), each answered by the server after its COMMIT, the answer lost:
    run again on a new connection, they find their work done and do nothing twice."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)
        relay = Relay(settings)
        relay.start()
        store = MysqlStore(Config(store="mysql", mysql=dataclasses.replace(settings, port=relay.port, pool_size=1)))
        try:
            _prepare(db)
            who = add_consumer(db, 1, credit=10 * PRICE)
            add_listing(db, 10, "w", price=PRICE)
            reqs = [call(who, 10, PRICE) for _ in range(3)]
            taken = [await store.charge(req) for req in reqs]  # the one loop connection, pooled
            settles = [dataclasses.replace(outcome(req, who, refund=kind == "refund", status=502 if kind == "refund"
                                                   else 200), taken=t, need_balance=False)
                       for req, t in zip(reqs, taken, strict=True)]
            relay.lose_answer(after=1 if kind == "billed batch" else 0)  # a billed batch: its second trip's
            if kind == "charge batch":
                again = [call(who, 10, PRICE) for _ in range(3)]
                assert [r.verdict for r in await store.charge_batch(again)] == [Verdict.DEBITED] * 3
                assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 4 * PRICE
            elif kind == "billed batch":
                assert await store.settle_billed(settles) == [False] * 3  # found settled: nothing written
            else:
                await store.settle(settles[0])
            assert relay.lost == 1
            for s in settles:  # (again, as a caller retrying would)
                await store.settle(s)
            assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == (
                3 if kind == "charge batch" else 0)
            await store.sweep(-2, FEE_BPS)
            assert db.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'") == (
                3 if kind in ("refund", "charge batch") else 0)
            assert db.value("SELECT COUNT(*) FROM usage_events") == db.value("SELECT COUNT(*) FROM mcpmeter_calls")
            reconcile(db)
        finally:
            store.close()
            relay.stop()
            db.close()


CHARGE_CALL = f"CALL `{mysql_trip.CHARGE_PROCEDURE}`".encode()
BATCH_CALL = f"CALL `{mysql_trip.CHARGE_BATCH_PROCEDURE}`".encode()


@pytest.mark.parametrize("credit,losses", [(10 * PRICE, 1), (PRICE - 1, 1), (10 * PRICE, 2)],
                         ids=["debited", "refused", "lost-twice"])
async def test_a_charge_whose_answer_is_lost_on_a_new_connection_is_asked_again_once(
        tmp_path: Path, credit: int, losses: int) -> None:
    """The gateway's first call: its charge goes on a brand-new connection, and the server commits it
    and answers, the answer lost. Asked again once, on another connection, the charge answers what
    was committed: a debit is forwarded and debited once, a refusal refused with nothing taken. (Only
    a pooled connection's charge was asked again: this one got a 503, its debit held until the
    sweeper's refund.) Lost a second time, it is not asked a third: a 503, and the sweeper refunds."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)
        relay = Relay(settings)
        relay.start()
        try:
            _prepare(db)
            who = add_consumer(db, 1, credit=credit)
            add_listing(db, 10, "w", price=PRICE)
            with gateway_behind(relay, settings, tmp_path) as addon:
                assert isinstance(addon.store, MysqlStore) and not addon.store._hot.open  # no loop connection yet
                relay.lose_answer(to=CHARGE_CALL, times=losses)
                flow = make_flow("/w", token=who.key)
                await addon.request(flow)
                assert relay.lost == losses
                status = flow.response.status_code if flow.response is not None else None  # None: forwarded
                if losses == 2:
                    assert status == 503
                elif credit >= PRICE:
                    assert status is None
                    await upstream_answers(SimpleNamespace(addon=addon), flow, json_response(RESULT))
                else:
                    assert status == 402
        finally:
            relay.stop()
        try:
            debited = credit >= PRICE
            assert db.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'usage'") == int(debited)
            assert db.rows("SELECT verdict, amount_micro_cents FROM mcpmeter_calls") == (
                [("debited", PRICE)] if debited else [])
            if losses == 2:  # committed, refused to the client: nobody settles it but the sweeper
                assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == credit - PRICE
                assert await db.open_store().sweep(-2, FEE_BPS) == 1
                assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == credit
            else:
                assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
                assert db.rows("SELECT COUNT(*), COALESCE(SUM(billed_micro_cents), 0) FROM usage_events") == [
                    (int(debited), PRICE * debited)]
                assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == credit - PRICE * debited
            reconcile(db)
        finally:
            db.close()


async def test_a_charge_batch_whose_answer_is_lost_on_a_new_connection_answers_what_it_committed() -> None:
    """A batch of charges (a free call, debits, one of a consumer's last credit, an unpriced call, a
    refusal) on a brand-new connection, committed, its answer lost: asked again once, as a batch, on
    another connection, each charge answers what the first run committed; nothing lands twice."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)
        relay = Relay(settings)
        relay.start()
        store = MysqlStore(Config(store="mysql", mysql=dataclasses.replace(settings, port=relay.port, pool_size=1)))
        try:
            _prepare(db)
            whos, reqs = batch_world(db)
            assert not store._hot.open  # no loop connection yet
            relay.lose_answer(to=BATCH_CALL)
            results = await store.charge_batch(reqs)
            assert relay.lost == 1
            assert results == REPLAYED
            batch_written(db, reqs)
            await settle_all(store, whos, reqs, results)
            assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
            assert db.rows("SELECT COUNT(*), SUM(billed_micro_cents) FROM usage_events") == [(4, 2 * PRICE)]
            reconcile(db)
        finally:
            store.close()
            relay.stop()
            db.close()


async def test_a_charge_batch_chosen_as_a_deadlock_victim_runs_again_exactly(mysql: MysqlBackend) -> None:  # noqa: F811
    """Another transaction, heavier (it wrote many rows), holds user 2's row and then asks for user 1's,
    which the batch holds while it waits for user 2's: InnoDB rolls the lighter batch back whole (1213)
    and the store runs it again once the other is done. Each charge lands once."""
    users = [add_consumer(mysql, u, credit=10 * PRICE) for u in (1, 2)]
    add_listing(mysql, 10, "w", price=PRICE)
    store = store_of(mysql)
    other = connect(mysql.db.settings)
    other.autocommit(False)
    try:
        cur = other.cursor()
        cur.executemany("INSERT INTO mcpmeter_project_spend (project_id, period_year_month, spent_micro_cents)"
                        " VALUES (%s, '1999-01', 0)", [(n,) for n in range(1000, 1200)])  # its weight
        cur.execute("SELECT id FROM users WHERE id = 2 FOR UPDATE")
        charges = asyncio.ensure_future(store.charge_batch([call(who, 10, PRICE) for who in users]))
        await waiting_on_lock(mysql, "UPDATE users")  # user 1 debited, user 2's row awaited
        retries = store.retries
        cur.execute("SELECT id FROM users WHERE id = 1 FOR UPDATE")  # the cycle: the batch is the victim
        await asyncio.sleep(0.1)
        other.rollback()
    finally:
        other.close()
    assert [r.verdict for r in await charges] == [Verdict.DEBITED] * 2
    assert store.retries == retries + 1
    assert mysql.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'usage'") == 2
    assert await store.sweep(-2, FEE_BPS) == 2
    reconcile(mysql)
