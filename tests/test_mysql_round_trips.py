"""A charge and a settlement on MySQL cost one network round trip each, COMMIT included.

Counted on the store's own (single) connection, both ways: the commands pymysql sends (each
one a round trip: a request, then its answers) and the server's session counters (exactly one
COMMIT, no ROLLBACK, per operation). Each case also checks what the operation did to the money,
and every test ends with the contract suite's `reconcile` (SPEC I1-I4).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from addon.model import Settlement, Verdict
from addon.store.mysql import MysqlStore

from .dbutil import SCHEMA, scratch_database
from .test_store_contract import (
    NEXT_PERIOD,
    Backend,
    MysqlBackend,
    _prepare,
    add_consumer,
    add_listing,
    call,
    outcome,
    reconcile,
)

PRICE = 5000


@dataclass
class Meter:
    """Round trips and server counters of the store's connections: the worker's (pool_size 1: one
    thread, one connection, for lookups and the Ledger's statements) and the event loop's (one, for
    the per-call transactions, mysql_loop.py)."""

    store: MysqlStore
    trips: int = 0

    async def status(self) -> dict[str, int]:
        query = "SHOW SESSION STATUS WHERE Variable_name IN ('Com_commit', 'Com_rollback')"
        rows: list[tuple[Any, Any]] = []
        for conn in self.store._conns:
            cur = conn.cursor()
            cur.execute(query)
            rows += cur.fetchall()
        for conn in self.store._hot.open:
            cur = await conn.cursor()
            await cur.execute(query)
            rows += await cur.fetchall()
        total: Counter[str] = Counter({"Com_commit": 0, "Com_rollback": 0})
        for name, value in rows:
            total[str(name)] += int(value)
        return dict(total)

    async def measure(self, op: Any) -> tuple[Any, int, dict[str, int]]:
        """Run `op` (a coroutine of the store, not yet running: the counters are read on idle
        connections) and say what it cost."""
        before = await self.status()
        self.trips = 0
        result = await op
        trips, after = self.trips, await self.status()
        return result, trips, {k: after[k] - before[k] for k in after}


@pytest.fixture
def world() -> Iterator[tuple[Backend, Meter]]:
    with scratch_database(SCHEMA) as settings:
        backend = MysqlBackend(replace(settings, pool_size=1))
        try:
            _prepare(backend)
            store = backend.store
            assert isinstance(store, MysqlStore)
            meter = Meter(store)
            connect, connect_on_loop = store._connect, store._hot._connect

            def counted(conn: Any) -> Any:
                send = conn._execute_command

                def execute_command(command: int, sql: Any) -> Any:
                    meter.trips += 1
                    return send(command, sql)  # on the loop's connections, a coroutine: awaited by the caller

                conn._execute_command = execute_command
                return conn

            async def counted_on_loop() -> Any:
                return counted(await connect_on_loop())

            store._connect = lambda: counted(connect())  # type: ignore[method-assign]
            store._hot._connect = counted_on_loop  # type: ignore[method-assign]
            yield backend, meter
        finally:
            backend.close()


ONE_TRIP = {"Com_commit": 1, "Com_rollback": 0}


async def _warm(meter: Meter, who_user: int) -> None:
    """Open both connections (handshake, session settings) so that they are not counted."""
    await meter.store.balance(who_user)
    await meter.store._hot.run(lambda conn: conn.ping())


async def test_a_debited_call_and_its_settlement_cost_one_round_trip_each(world: tuple[Backend, Meter]) -> None:
    db, meter = world
    who = add_consumer(db, 1, credit=3 * PRICE)
    add_listing(db, 10, "w", price=PRICE)
    await _warm(meter, who.user_id)

    billed = call(who, 10, PRICE)
    taken, trips, server = await meter.measure(meter.store.charge(billed))
    assert (taken.verdict, taken.amount, taken.balance) == (Verdict.DEBITED, PRICE, 2 * PRICE)
    assert (trips, server) == (1, ONE_TRIP)
    balance, trips, server = await meter.measure(meter.store.settle(dataclasses.replace(outcome(billed, who),
                                                                                           taken=taken)))
    assert balance == 2 * PRICE and (trips, server) == (1, ONE_TRIP)
    assert db.rows("SELECT billable_calls FROM mcp_consumer_usage WHERE user_id = 1") == [(1,)]

    refunded = call(who, 10, PRICE)
    taken, trips, server = await meter.measure(meter.store.charge(refunded))
    assert (taken.verdict, taken.balance, trips, server) == (Verdict.DEBITED, PRICE, 1, ONE_TRIP)
    settle = dataclasses.replace(outcome(refunded, who, refund=True, status=502), taken=taken, reason="upstream")
    balance, trips, server = await meter.measure(meter.store.settle(settle))
    assert balance == 2 * PRICE and (trips, server) == (1, ONE_TRIP)
    assert db.rows("SELECT amount_micro_cents, balance_after_micro_cents, description FROM credit_transactions"
                   " WHERE request_id = %s AND type = 'refund'", (refunded.request_id,)) == [
        (PRICE, 2 * PRICE, "refund: search on mcp 10 (upstream)")]
    assert db.value("SELECT spent_micro_cents FROM mcpmeter_project_spend WHERE project_id = %s",
                    (who.project_id,)) == PRICE

    # Settling again changes nothing; it may cost more (the Ledger reads the journal), never money.
    assert await meter.store.settle(settle) == 2 * PRICE

    # A billed call within the minute of the last last_used_at stamp: the settlement's shortest text.
    again = call(who, 10, PRICE)
    taken = await meter.store.charge(again)
    balance, trips, server = await meter.measure(meter.store.settle(
        dataclasses.replace(outcome(again, who), taken=taken, need_balance=False)))
    assert (balance, trips, server) == (None, 1, ONE_TRIP)
    assert db.rows("SELECT billable_calls FROM mcp_consumer_usage WHERE user_id = 1") == [(2,)]
    assert db.rows("SELECT status, billed_micro_cents FROM usage_events WHERE request_id = %s",
                   (again.request_id,)) == [(200, PRICE)]
    assert db.value("SELECT COUNT(*) FROM credit_transactions WHERE request_id = %s AND type = 'refund'",
                    (refunded.request_id,)) == 1
    reconcile(db)


async def test_refusals_cost_one_round_trip_and_leave_no_trace(world: tuple[Backend, Meter]) -> None:
    db, meter = world
    poor = add_consumer(db, 1, credit=PRICE - 1)
    capped = add_consumer(db, 2, credit=10 * PRICE, cap_cents=0)  # a cap of 0 ¢: any price is over it
    add_listing(db, 10, "w", price=PRICE)
    await _warm(meter, poor.user_id)
    tables = ("credit_transactions", "mcpmeter_calls", "mcpmeter_project_spend", "mcp_consumer_usage")
    rows_before = {t: db.value(f"SELECT COUNT(*) FROM {t}") for t in tables}

    result, trips, server = await meter.measure(meter.store.charge(call(poor, 10, PRICE)))
    assert (result.verdict, result.amount, result.balance) == (Verdict.INSUFFICIENT_CREDIT, 0, PRICE - 1)
    assert (trips, server) == (1, ONE_TRIP)
    result, trips, server = await meter.measure(meter.store.charge(call(capped, 10, PRICE)))
    assert (result.verdict, result.amount, result.balance) == (Verdict.PROJECT_CAP_EXCEEDED, 0, 10 * PRICE)
    assert (trips, server) == (1, ONE_TRIP)

    assert {t: db.value(f"SELECT COUNT(*) FROM {t}") for t in tables} == rows_before
    assert db.rows("SELECT id, credit_micro_cents FROM users WHERE id IN (1, 2) ORDER BY id") == [
        (1, PRICE - 1), (2, 10 * PRICE)]
    reconcile(db)


async def test_free_and_unpriced_calls_cost_one_round_trip(world: tuple[Backend, Meter]) -> None:
    db, meter = world
    who = add_consumer(db, 1, credit=PRICE)
    add_listing(db, 10, "w", price=PRICE, free=1)
    await _warm(meter, who.user_id)

    free = call(who, 10, PRICE, free=1)
    taken, trips, server = await meter.measure(meter.store.charge(free))
    assert (taken.verdict, taken.amount, taken.balance, trips, server) == (Verdict.FREE, 0, PRICE, 1, ONE_TRIP)
    balance, trips, server = await meter.measure(meter.store.settle(
        dataclasses.replace(outcome(free, who, refund=True, status=500), taken=taken)))
    assert (balance, trips, server) == (PRICE, 1, ONE_TRIP)
    assert db.rows("SELECT free_calls_used FROM mcp_consumer_usage WHERE user_id = 1") == [(0,)]  # the slot is back

    again = call(who, 10, PRICE, free=1)
    taken, trips, _ = await meter.measure(meter.store.charge(again))
    assert (taken.verdict, trips) == (Verdict.FREE, 1)
    await meter.store.settle(dataclasses.replace(outcome(again, who), taken=taken))
    # The month's one free call is used: the next is debited, in one trip as well.
    paid = call(who, 10, PRICE, free=1)
    taken, trips, _ = await meter.measure(meter.store.charge(paid))
    assert (taken.verdict, taken.balance, trips) == (Verdict.DEBITED, 0, 1)
    # A new month resets the allowance.
    taken, trips, _ = await meter.measure(meter.store.charge(call(who, 10, PRICE, free=1, period=NEXT_PERIOD)))
    assert (taken.verdict, trips) == (Verdict.FREE, 1)

    unpriced = call(who, 10, 0)
    taken, trips, server = await meter.measure(meter.store.charge(unpriced))
    assert (taken.verdict, taken.balance, trips, server) == (Verdict.UNPRICED, 0, 1, ONE_TRIP)
    assert db.value("SELECT verdict FROM mcpmeter_calls WHERE request_id = %s", (unpriced.request_id,)) == "unpriced"
    await meter.store.sweep(0, 2000)  # the unsettled ones: refunded by the sweeper's Ledger path
    reconcile(db)


async def test_a_settlement_that_disagrees_with_the_journal_goes_by_the_journal(
        world: tuple[Backend, Meter]) -> None:
    db, meter = world
    who = add_consumer(db, 1, credit=2 * PRICE)
    add_listing(db, 10, "w", price=PRICE)
    await _warm(meter, who.user_id)
    req = call(who, 10, PRICE)
    taken = await meter.store.charge(req)
    assert taken.verdict is Verdict.DEBITED
    # The caller believes the call was free: the refund still gives back what was really debited.
    wrong = dataclasses.replace(taken, verdict=Verdict.FREE, amount=0)
    settle: Settlement = dataclasses.replace(outcome(req, who, refund=True), taken=wrong)
    assert await meter.store.settle(settle) == 2 * PRICE
    assert db.value("SELECT COUNT(*) FROM credit_transactions WHERE request_id = %s AND type = 'refund'",
                    (req.request_id,)) == 1
    reconcile(db)


async def test_the_cap_holds_when_two_gateways_and_two_users_charge_one_project() -> None:
    """The cap is read inside the debit (under a shared lock on the spend row, written after under an
    exclusive one): concurrent charges of different users on one project never pass it together."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)  # pool_size 8
        try:
            _prepare(db)
            owner = add_consumer(db, 1, credit=200 * PRICE, cap_cents=1)  # 1 ¢ a month: 200 calls at 5000 µ¢
            member = add_consumer(db, 2, credit=200 * PRICE)
            add_listing(db, 10, "w", price=PRICE)
            stores = [db.store, db.open_store()]

            async def charge(i: int) -> Verdict:
                who = (owner, member)[i % 2]
                req = dataclasses.replace(call(who, 10, PRICE), project_id=owner.project_id)
                return (await stores[i // 2 % 2].charge(req)).verdict

            verdicts = await asyncio.gather(*(charge(i) for i in range(240)))
            assert Counter(verdicts) == {Verdict.DEBITED: 200, Verdict.PROJECT_CAP_EXCEEDED: 40}
            assert db.value("SELECT spent_micro_cents FROM mcpmeter_project_spend WHERE project_id = %s",
                            (owner.project_id,)) == 1_000_000
            # 2 x 200 prices of credit, 200 prices debited: the cap, not the credit, stopped them.
            assert db.value("SELECT SUM(credit_micro_cents) FROM users WHERE id IN (1, 2)") == 200 * PRICE
            reconcile(db)
        finally:
            db.close()
