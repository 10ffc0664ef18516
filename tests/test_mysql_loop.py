"""The MySQL store's per-call transactions on the event loop (addon/store/mysql_loop.py).

A charge, a settlement and a batch of billed settlements run on mitmproxy's event loop through
aiomysql, with no worker thread. These cases attack that path: connections the server kills, a
server that stops answering mid-charge, a caller cancelled mid-charge, a store used from a new
event loop. In each the consumer never pays for a call that was not delivered: a charge whose
caller saw an error is explained by the journal, and the sweeper refunds it (`reconcile`, SPEC
I1-I4, to the micro-cent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from addon.config import Config
from addon.model import Verdict
from addon.store import mysql_loop
from addon.store.base import StoreUnavailable
from addon.store.mysql import MysqlStore

from .dbutil import SCHEMA, connect, scratch_database
from .test_store_contract import MysqlBackend, Who, _prepare, add_consumer, add_listing, call, outcome, reconcile

PRICE = 1000
FEE_BPS = 2000


@pytest.fixture
def mysql() -> Iterator[MysqlBackend]:
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(dataclasses.replace(settings, pool_size=4))
        try:
            _prepare(db)
            yield db
        finally:
            db.close()


def store_of(db: MysqlBackend) -> MysqlStore:
    assert isinstance(db.store, MysqlStore)
    return db.store


def paying_consumer(mysql: MysqlBackend, credit: int) -> tuple[Who, MysqlStore]:
    """User 1 with `credit`, listing 10 at PRICE, and the store."""
    who = add_consumer(mysql, 1, credit=credit)
    add_listing(mysql, 10, "w", price=PRICE)
    return who, store_of(mysql)


def loop_connection_ids(db: MysqlBackend) -> list[int]:
    return [int(conn.server_thread_id[0]) for conn in store_of(db)._hot.open]


async def test_a_paid_call_never_hops_to_a_worker_thread(mysql: MysqlBackend, monkeypatch: Any) -> None:
    who, store = paying_consumer(mysql, 10 * PRICE)
    await store.balance(who.user_id)  # the schema is ready and a worker has its connection
    hops: list[str] = []
    transaction = store._transaction
    monkeypatch.setattr(store, "_transaction", lambda *a: hops.append(threading.current_thread().name)
                        or transaction(*a))
    for _ in range(3):
        req = call(who, 10, PRICE)
        taken = await store.charge(req)
        assert taken.verdict is Verdict.DEBITED
        await store.settle(dataclasses.replace(outcome(req, who), taken=taken))
    assert hops == []
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 7 * PRICE
    reconcile(mysql)


async def test_killed_connections_are_replaced_without_failing_a_charge(mysql: MysqlBackend) -> None:
    who, store = paying_consumer(mysql, 100 * PRICE)
    # charge_alone: one connection each (store.charge would batch the 16 on one or two connections).
    assert all(r.accepted for r in await asyncio.gather(*(store.charge_alone(call(who, 10, PRICE))
                                                          for _ in range(16))))
    ids = loop_connection_ids(mysql)
    assert 1 < len(ids) <= 4  # the pool's size bounds them
    admin = connect(mysql.db.settings)
    try:
        for connection_id in ids:
            admin.cursor().execute(f"KILL CONNECTION {connection_id}")
    finally:
        admin.close()
    # Every idle connection is dead: each charge finds that out and runs again on a new one, once.
    results = await asyncio.gather(*(store.charge_alone(call(who, 10, PRICE)) for _ in range(16)))
    assert [r.verdict for r in results] == [Verdict.DEBITED] * 16
    assert not set(loop_connection_ids(mysql)) & set(ids)
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 68 * PRICE
    assert await store.sweep(-2, FEE_BPS) == 32  # nobody settled them: all refunded
    reconcile(mysql)


async def server_done(mysql: MysqlBackend) -> None:
    """Wait until the server runs no statement in the test database (a CALL its client left)."""
    for _ in range(100):
        if not mysql.value("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE()"
                             " AND COMMAND = 'Query' AND ID <> CONNECTION_ID()"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the server still runs a statement of the test database")


def hold_row(mysql: MysqlBackend, table: str, key: str, value: object) -> Any:
    """Another session holding a row's lock (a user's: charges wait on it; a journal row: its
    settlement waits on it) until it commits."""
    holder = connect(mysql.db.settings)
    holder.autocommit(False)
    holder.cursor().execute(f"SELECT * FROM {table} WHERE {key} = %s FOR UPDATE", (value,))
    return holder


async def test_a_server_silent_mid_charge_costs_two_io_timeouts_and_never_the_consumer(
        mysql: MysqlBackend, monkeypatch: Any) -> None:
    who, store = paying_consumer(mysql, 10 * PRICE)
    assert all(r.accepted for r in await asyncio.gather(*(store.charge_alone(call(who, 10, PRICE))
                                                          for _ in range(8))))
    pooled = len(store._hot.open)
    assert pooled > 1
    opened: list[Any] = []
    connect = store._hot._connect

    async def counted() -> Any:
        opened.append(await connect())
        return opened[-1]

    monkeypatch.setattr(store._hot, "_connect", counted)
    monkeypatch.setattr(mysql_loop, "IO_TIMEOUT", 0.3)
    holder = hold_row(mysql, "users", "id", who.user_id)  # the CALL waits on the lock: no answer in time
    try:
        with pytest.raises(StoreUnavailable, match="no answer"):
            await store.charge(call(who, 10, PRICE))
        # A pooled connection timed out, then one new connection did: two tries, not one per
        # pooled connection. Neither is used again; the other pooled ones are still there.
        assert len(opened) == 1 and opened[0] not in store._hot.open
        assert len(store._hot.open) == pooled - 1
    finally:
        holder.commit()
        holder.close()
    # The server may still run both CALLs when the lock is released: the journal's key lets one
    # land at most, its row explains the debit, nobody settles it, and the sweeper gives it back.
    monkeypatch.setattr(mysql_loop, "IO_TIMEOUT", 5.0)
    await server_done(mysql)
    await store.sweep(-2, FEE_BPS)
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 10 * PRICE
    reconcile(mysql)


async def test_a_charge_whose_caller_is_cancelled_runs_to_its_end_and_is_swept(mysql: MysqlBackend) -> None:
    who, store = paying_consumer(mysql, 10 * PRICE)
    assert (await store.charge(call(who, 10, PRICE))).accepted
    holder = hold_row(mysql, "users", "id", who.user_id)
    try:
        abandoned = call(who, 10, PRICE)
        pending = asyncio.ensure_future(store.charge(abandoned))
        await asyncio.sleep(0.2)  # the CALL is on the wire, waiting on the lock
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    finally:
        holder.commit()
        holder.close()
    await server_done(mysql)
    assert mysql.value("SELECT verdict FROM mcpmeter_calls WHERE request_id = %s", (abandoned.request_id,)) == "debited"
    assert len(store._hot.open) == 1  # its connection went back to the pool, answers read
    settled = call(who, 10, PRICE)
    taken = await store.charge(settled)
    await store.settle(dataclasses.replace(outcome(settled, who), taken=taken))
    assert await store.sweep(-2, FEE_BPS) == 2  # the first charge and the abandoned one
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 9 * PRICE  # only the settled one
    reconcile(mysql)


async def test_a_settlement_is_written_even_if_its_waiter_is_cancelled_or_the_store_closes(
        mysql: MysqlBackend) -> None:
    who, store = paying_consumer(mysql, 10 * PRICE)
    reqs = [call(who, 10, PRICE) for _ in range(2)]
    taken = [await store.charge(req) for req in reqs]
    settles = [dataclasses.replace(outcome(req, who), taken=t) for req, t in zip(reqs, taken, strict=True)]
    holder = hold_row(mysql, "mcpmeter_calls", "request_id", reqs[0].request_id)  # the settlement's flip waits on it
    try:
        pending = asyncio.ensure_future(store.settle(settles[0]))
        await asyncio.sleep(0.2)
        pending.cancel()  # e.g. the hook that awaited it went away
        with pytest.raises(asyncio.CancelledError):
            await pending
    finally:
        holder.commit()
        holder.close()
    holder = hold_row(mysql, "mcpmeter_calls", "request_id", reqs[1].request_id)
    try:
        pending = asyncio.ensure_future(store.settle(settles[1]))
        await asyncio.sleep(0.2)
        store._hot.close()  # a stop or a reload closes the store while the settlement is under way
        with pytest.raises(StoreUnavailable, match="closed"):
            await store.charge(call(who, 10, PRICE))
    finally:
        holder.commit()
        holder.close()
    assert await pending == 8 * PRICE
    await server_done(mysql)
    assert store._hot.open == set()  # the last job's connection closed when it ended
    assert mysql.rows("SELECT COUNT(*), SUM(billed_micro_cents) FROM usage_events") == [(2, 2 * PRICE)]
    assert mysql.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
    reconcile(mysql)


def test_a_store_used_from_a_new_event_loop_opens_new_connections() -> None:
    with scratch_database(SCHEMA) as settings:
        backend = MysqlBackend(dataclasses.replace(settings, pool_size=2))
        try:
            _prepare(backend)
            who = add_consumer(backend, 1, credit=10 * PRICE)
            add_listing(backend, 10, "w", price=PRICE)
            store = store_of(backend)

            async def charge() -> tuple[Verdict, list[int]]:
                verdict = (await store.charge(call(who, 10, PRICE))).verdict
                return verdict, loop_connection_ids(backend)

            first, first_ids = asyncio.run(charge())
            second, second_ids = asyncio.run(charge())  # the first loop and its sockets are gone
            assert first is second is Verdict.DEBITED
            assert len(first_ids) == len(second_ids) == 1 and first_ids != second_ids
            assert backend.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 8 * PRICE
        finally:
            backend.close()


async def test_closing_the_store_ends_its_loop_sessions_cleanly(mysql: MysqlBackend) -> None:
    who, store = paying_consumer(mysql, 10 * PRICE)
    await asyncio.gather(*(store.charge(call(who, 10, PRICE)) for _ in range(8)))
    ids = loop_connection_ids(mysql)
    assert ids
    aborted = int(mysql.rows("SHOW GLOBAL STATUS LIKE 'Aborted_clients'")[0][1])
    store.close()
    await asyncio.sleep(0)  # the transports write the goodbye and close
    for _ in range(100):
        if not mysql.value("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN %s", (ids,)):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the loop's sessions are still open on the server")
    assert int(mysql.rows("SHOW GLOBAL STATUS LIKE 'Aborted_clients'")[0][1]) == aborted
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.charge(call(who, 10, PRICE))
    # The charges nobody settled: another gateway's sweeper (a new store on the database) refunds them.
    other = MysqlStore(Config(store="mysql", mysql=mysql.db.settings))
    try:
        assert await other.sweep(-2, FEE_BPS) == 8
    finally:
        other.close()
    reconcile(mysql)
