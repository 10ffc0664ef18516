"""A charge on MySQL run again after its COMMIT landed answers what it decided, and takes nothing twice.

The charge is one CALL that ends with its COMMIT (mysql_trip.py). When the connection is lost after
the server committed it but before the answer is read, the store runs the job again on a new
connection (mysql_loop.py). The procedure first reads the call journal for the request id: a charge
that committed is answered as it was decided (its verdict, the journal's amount, the balance now),
writing nothing; without that read the second run decided again, and the consumer, debited once,
got a 402 (the first run took the last credit) or a 503 (the journal's key refused the second
debit) until the sweeper's refund. Every charge case runs on the real server and ends with `reconcile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pymysql
import pytest

from addon.config import Config
from addon.model import ChargeRequest, ChargeResult, Verdict
from addon.store import mysql_trip
from addon.store.base import StoreUnavailable
from addon.store.mysql import MysqlStore

from .dbutil import SCHEMA, Db, connect, scratch_database
from .test_store_contract import (
    FEE_BPS,
    MysqlBackend,
    Who,
    add_consumer,
    add_listing,
    call,
    outcome,
    reconcile,
)

from .test_mysql_loop import mysql, store_of  # noqa: F401  (mysql: a fixture, a scratch MariaDB database)

PRICE = 1000


async def call_twice(store: MysqlStore, req: ChargeRequest) -> tuple[ChargeResult, ChargeResult]:
    """The CALL of `req`, then the same CALL again (each committed), on the store's loop connections."""
    first = await store._hot.run(lambda conn: mysql_trip.charge(conn, req))
    again = await store._hot.run(lambda conn: mysql_trip.charge(conn, req))
    return first, again


def written(db: MysqlBackend, req: ChargeRequest) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The ledger rows and the journal rows of one request."""
    return (db.rows("SELECT type, amount_micro_cents FROM credit_transactions WHERE request_id = %s",
                    (req.request_id,)),
            db.rows("SELECT verdict, amount_micro_cents FROM mcpmeter_calls WHERE request_id = %s",
                    (req.request_id,)))


async def test_a_debit_called_again_answers_debited_and_debits_once(mysql: MysqlBackend) -> None:
    who = add_consumer(mysql, 1, credit=10 * PRICE)
    add_listing(mysql, 10, "w", price=PRICE)
    store = store_of(mysql)
    req = call(who, 10, PRICE)
    first, again = await call_twice(store, req)
    assert first == again == ChargeResult(Verdict.DEBITED, PRICE, 9 * PRICE)
    assert written(mysql, req) == ([("usage", -PRICE)], [("debited", PRICE)])
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 9 * PRICE
    # The amount answered is the journal's, not the price asked this time.
    assert (await store._hot.run(lambda conn: mysql_trip.charge(conn, dataclasses.replace(req, price=7)))
            == ChargeResult(Verdict.DEBITED, PRICE, 9 * PRICE))
    await store.settle(dataclasses.replace(outcome(req, who), taken=again))
    reconcile(mysql)


async def test_a_charge_that_took_the_last_credit_is_not_refused_when_called_again(mysql: MysqlBackend) -> None:
    who = add_consumer(mysql, 1, credit=PRICE)
    add_listing(mysql, 10, "w", price=PRICE)
    store = store_of(mysql)
    req = call(who, 10, PRICE)
    first, again = await call_twice(store, req)
    assert first == again == ChargeResult(Verdict.DEBITED, PRICE, 0)  # not insufficient_credit
    assert written(mysql, req) == ([("usage", -PRICE)], [("debited", PRICE)])
    # A new request is decided, and refused: the credit is gone.
    assert (await store.charge(call(who, 10, PRICE))).verdict is Verdict.INSUFFICIENT_CREDIT
    await store.settle(dataclasses.replace(outcome(req, who), taken=again))
    reconcile(mysql)


async def test_a_free_call_called_again_counts_its_slot_once(mysql: MysqlBackend) -> None:
    who = add_consumer(mysql, 1, credit=10 * PRICE)
    add_listing(mysql, 10, "w", price=PRICE, free=2)
    store = store_of(mysql)
    req = call(who, 10, PRICE, free=2)
    first, again = await call_twice(store, req)
    assert first == again == ChargeResult(Verdict.FREE, 0, 10 * PRICE)
    assert written(mysql, req) == ([], [("free", 0)])
    assert mysql.value("SELECT free_calls_used FROM mcp_consumer_usage WHERE mcp_id = 10 AND user_id = 1") == 1
    # The second free call is still there, and then the month's allowance is used.
    verdicts = [(await store.charge(call(who, 10, PRICE, free=2))).verdict for _ in range(2)]
    assert verdicts == [Verdict.FREE, Verdict.DEBITED]
    unpriced = call(who, 10, 0)
    assert await call_twice(store, unpriced) == (ChargeResult(Verdict.UNPRICED, 0, 9 * PRICE),) * 2
    assert written(mysql, unpriced) == ([], [("unpriced", 0)])
    assert await store.sweep(-2, FEE_BPS) == 4
    reconcile(mysql)


async def test_a_settled_call_or_another_users_is_not_answered_again(mysql: MysqlBackend) -> None:
    """Only the unsettled journal row of the same user answers a charge run again: a settled call was
    served or refunded already. Anything else falls through to the journal's key, which refuses it
    (a 503), writing nothing."""
    who = add_consumer(mysql, 1, credit=10 * PRICE)
    other = add_consumer(mysql, 2, credit=10 * PRICE)
    add_listing(mysql, 10, "w", price=PRICE)
    store = store_of(mysql)
    settled, theirs = call(who, 10, PRICE), call(who, 10, PRICE)
    taken = await store.charge(settled)
    await store.settle(dataclasses.replace(outcome(settled, who, refund=True, status=502), taken=taken))
    assert (await store.charge(theirs)).verdict is Verdict.DEBITED
    for req in (settled, dataclasses.replace(theirs, user_id=other.user_id, project_id=other.project_id)):
        with pytest.raises(StoreUnavailable, match="Duplicate entry"):
            await store.charge_alone(req)
    assert mysql.rows("SELECT id, credit_micro_cents FROM users WHERE id IN (1, 2) ORDER BY id") == [
        (1, 9 * PRICE), (2, 10 * PRICE)]
    assert await store.sweep(-2, FEE_BPS) == 1
    reconcile(mysql)


async def test_a_refusal_reports_the_balance_it_was_decided_on(mysql: MysqlBackend) -> None:
    """The journal read opens the transaction's snapshot (REPEATABLE READ) before the debit waits for
    another transaction's debit of the same user: the refusal, decided on the latest balance, reports
    that one (the procedure's final balance read is a locking one), not the snapshot's."""
    who = add_consumer(mysql, 1, credit=PRICE)
    add_listing(mysql, 10, "w", price=PRICE)
    store = store_of(mysql)
    await store._hot.run(lambda conn: conn.ping())  # the connection and the procedure are ready
    other = connect(mysql.db.settings)  # another gateway's debit, under way
    try:
        other.autocommit(False)
        cur = other.cursor()
        cur.execute("UPDATE users SET credit_micro_cents = credit_micro_cents - %s WHERE id = 1", (PRICE,))
        cur.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, balance_after_micro_cents)"
                    " VALUES (1, %s, 'adjustment', 0)", (-PRICE,))
        pending = asyncio.ensure_future(store.charge(call(who, 10, PRICE)))
        await asyncio.sleep(0.3)  # the CALL read the journal, then waits on the users row
        assert not pending.done()
        other.commit()
    finally:
        other.close()
    assert await pending == ChargeResult(Verdict.INSUFFICIENT_CREDIT, 0, 0)
    reconcile(mysql)


# --- the store's path: the connection lost after the server committed -------------------------------------


def lose_answer_after(real: Callable[..., Awaitable[Any]], times: int, log: list[str]) -> Callable[..., Any]:
    """`real` (a one-trip job's step: its first argument is the connection) that, its first `times`
    calls, runs on the server to its COMMIT, then loses the connection before the answer is read:
    what a server restart or a network cut right after the COMMIT looks like to the client."""

    async def wrapped(conn: Any, *args: Any) -> Any:
        result = await real(conn, *args)
        if len(log) >= times:
            log.append("answered")
            return result
        log.append("lost")
        conn.close()
        raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")

    return wrapped


@pytest.mark.parametrize("credit", [10 * PRICE, 2 * PRICE], ids=["credit-left", "last-credit"])
async def test_a_charge_whose_answer_was_lost_runs_again_and_is_debited_once(
        mysql: MysqlBackend, monkeypatch: Any, credit: int) -> None:
    who = add_consumer(mysql, 1, credit=credit)
    add_listing(mysql, 10, "w", price=PRICE)
    store = store_of(mysql)
    warm = call(who, 10, PRICE)
    warm_taken = await store.charge(warm)  # a pooled connection: the charge is run again on a new one
    assert warm_taken.verdict is Verdict.DEBITED
    pooled = set(store._hot.open)
    assert len(pooled) == 1
    log: list[str] = []
    monkeypatch.setattr(mysql_trip, "one_trip", lose_answer_after(mysql_trip.one_trip, 1, log))
    req = call(who, 10, PRICE)
    taken = await store.charge(req)
    assert log == ["lost", "answered"]
    assert taken == ChargeResult(Verdict.DEBITED, PRICE, credit - 2 * PRICE)
    assert not store._hot.open & pooled  # run again on a new connection
    assert written(mysql, req) == ([("usage", -PRICE)], [("debited", PRICE)])
    assert mysql.value("SELECT credit_micro_cents FROM users WHERE id = 1") == credit - 2 * PRICE
    monkeypatch.undo()
    for r, t in ((warm, warm_taken), (req, taken)):
        await store.settle(dataclasses.replace(outcome(r, who), taken=t))
    assert mysql.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
    reconcile(mysql)


def batch_world(db: MysqlBackend) -> tuple[list[Who], list[ChargeRequest]]:
    """Users 1-4 and listings 10 (priced) and 11 (priced, one free call), and charges of each verdict:
    user 1 a free call then a debit, user 2 a debit of its last credit, user 3 an unpriced call,
    user 4 a refusal (no credit)."""
    whos = [add_consumer(db, 1, credit=10 * PRICE), add_consumer(db, 2, credit=PRICE),
            add_consumer(db, 3, credit=PRICE), add_consumer(db, 4, credit=PRICE - 1)]
    add_listing(db, 10, "w", price=PRICE)
    add_listing(db, 11, "f", price=PRICE, free=1)
    reqs = [call(whos[0], 11, PRICE, free=1), call(whos[0], 11, PRICE, free=1), call(whos[1], 10, PRICE),
            call(whos[2], 10, 0), call(whos[3], 10, PRICE)]
    return whos, reqs


# What the batch's first run answers; a run again answers the same verdicts and amounts, each with the
# balance now: user 1's free call reports the balance after user 1's debit, which followed it.
EXPECTED = [ChargeResult(Verdict.FREE, 0, 10 * PRICE), ChargeResult(Verdict.DEBITED, PRICE, 9 * PRICE),
            ChargeResult(Verdict.DEBITED, PRICE, 0), ChargeResult(Verdict.UNPRICED, 0, PRICE),
            ChargeResult(Verdict.INSUFFICIENT_CREDIT, 0, PRICE - 1)]
REPLAYED = [dataclasses.replace(EXPECTED[0], balance=9 * PRICE), *EXPECTED[1:]]


def batch_written(db: MysqlBackend, reqs: Sequence[ChargeRequest]) -> None:
    """Each accepted charge of `batch_world` wrote once, the refusal nothing."""
    assert [written(db, r) for r in reqs] == [
        ([], [("free", 0)]), ([("usage", -PRICE)], [("debited", PRICE)]),
        ([("usage", -PRICE)], [("debited", PRICE)]), ([], [("unpriced", 0)]), ([], [])]
    assert db.rows("SELECT id, credit_micro_cents FROM users WHERE id BETWEEN 1 AND 4 ORDER BY id") == [
        (1, 9 * PRICE), (2, 0), (3, PRICE), (4, PRICE - 1)]
    assert db.value("SELECT free_calls_used FROM mcp_consumer_usage WHERE mcp_id = 11 AND user_id = 1") == 1


async def settle_all(store: MysqlStore, whos: list[Who], reqs: Sequence[ChargeRequest],
                     results: Sequence[ChargeResult]) -> None:
    by_user = {who.user_id: who for who in whos}
    for req, taken in zip(reqs, results, strict=True):
        if taken.accepted:
            await store.settle(dataclasses.replace(outcome(req, by_user[req.user_id]), taken=taken))


async def test_a_batch_called_again_answers_its_recorded_verdicts(mysql: MysqlBackend) -> None:
    whos, reqs = batch_world(mysql)
    store = store_of(mysql)
    order = mysql_trip.batch_order(reqs)
    first = await store._hot.run(lambda conn: mysql_trip.charge_batch(conn, reqs, order))
    again = await store._hot.run(lambda conn: mysql_trip.charge_batch(conn, reqs, order))
    assert (first, again) == (EXPECTED, REPLAYED)  # the refusal is decided again, and refused again
    batch_written(mysql, reqs)
    # Gone alone, as the charges of a batch that failed go: the same answers.
    assert [await store.charge_alone(r) for r in reqs] == REPLAYED
    batch_written(mysql, reqs)
    await settle_all(store, whos, reqs, again)
    reconcile(mysql)


@pytest.mark.parametrize("losses", [1, 2], ids=["run-again", "then-alone"])
async def test_a_batch_whose_answer_was_lost_answers_its_recorded_verdicts(
        mysql: MysqlBackend, monkeypatch: Any, losses: int) -> None:
    """Lost once, the batch runs again on a new connection; lost on that one too, its charges go
    alone (ChargeBatches). Either way each gets the verdict its first run committed."""
    whos, reqs = batch_world(mysql)
    store = store_of(mysql)
    await store._hot.run(lambda conn: conn.ping())  # a pooled connection: the batch is run again on a new one
    log: list[str] = []
    monkeypatch.setattr(mysql_trip, "charge_batch", lose_answer_after(mysql_trip.charge_batch, losses, log))
    if losses == 1:
        results = await store.charge_batch(reqs)
    else:
        # Through the store's queue: charged behind one under way, they go together next, and
        # once that batch failed, alone.
        ahead = call(whos[2], 10, 0)  # unpriced: changes no balance
        pending = asyncio.ensure_future(store.charge(ahead))
        await asyncio.sleep(0)  # under way: what follows queues
        results = list(await asyncio.gather(*(store.charge(r) for r in reqs)))
        taken = await pending
        assert taken.verdict is Verdict.UNPRICED
        assert (await store.health())["charge_batches"] == {"transactions": 0, "charges": 0}  # the batch failed
        await store.settle(dataclasses.replace(outcome(ahead, whos[2]), taken=taken))
    assert log == ["lost"] * losses + (["answered"] if losses == 1 else [])
    assert results == REPLAYED
    batch_written(mysql, reqs)
    monkeypatch.undo()
    await settle_all(store, whos, reqs, results)
    reconcile(mysql)


def test_an_older_gateways_procedures_stay_in_place() -> None:
    """The procedure changed, so it has a new name: a gateway of the previous version, still running
    against the same database, keeps calling its own, which the new gateway's start leaves alone."""
    with scratch_database(SCHEMA) as settings, contextlib.closing(Db(settings)) as db:
        db.execute("CREATE PROCEDURE mcpmeter_charge_v2() SELECT 'old'")  # a stand-in for the old one
        MysqlStore(Config(store="mysql", mysql=settings)).close()
        assert db.rows("SELECT ROUTINE_NAME, ROUTINE_DEFINITION LIKE '%%''old''%%' FROM information_schema.ROUTINES"
                       " WHERE ROUTINE_SCHEMA = DATABASE() ORDER BY ROUTINE_NAME") == [
            ("mcpmeter_charge_batch_v3", 0), ("mcpmeter_charge_v2", 1), ("mcpmeter_charge_v3", 0),
            ("mcpmeter_settle_v1", 0)]
