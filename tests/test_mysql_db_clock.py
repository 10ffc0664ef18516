"""On MySQL the journal's times, the sweeper's cutoff and a charge's billing month are the database's.

Several gateways share one database; each has its own wall clock. When the journal's created_at and
the sweep's cutoff came from each gateway's clock, a gateway running `stale_call_seconds` ahead
refunded calls the others were still running (delivered for free: the publisher's loss), and one
running behind wrote created_at in the past, for any other gateway's sweep to refund at once. Here
the Python clock of the gateway under test is pushed an hour off (time.time, which the store's
`utc` and `billing.period` read) while the database keeps the real time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from addon.model import Verdict
from addon.store import mysql_trip
from addon.store.mysql import MysqlStore

from .test_store_contract import FEE_BPS, MysqlBackend, add_consumer, add_listing, call, outcome, reconcile
from .test_store_contract import mysql_db  # noqa: F401  (a fixture: a scratch MariaDB database)

PRICE = 1000
HOUR = 3600.0


@pytest.fixture
def skew(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Set skew[0] to push the process's wall clock that many seconds off the database's."""
    offset = [0.0]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    yield offset


def db_month(db: MysqlBackend) -> str:
    return str(db.value("SELECT DATE_FORMAT(UTC_TIMESTAMP(), '%%Y-%%m')"))


async def test_a_gateway_ahead_does_not_sweep_a_call_running_elsewhere(mysql_db: MysqlBackend,  # noqa: F811
                                                                       skew: list[float]) -> None:
    who = add_consumer(mysql_db, 1, credit=10 * PRICE)
    add_listing(mysql_db, 10, "w", price=PRICE)
    running = call(who, 10, PRICE)
    assert (await mysql_db.store.charge(running)).verdict is Verdict.DEBITED  # a second ago, on gateway A

    ahead = mysql_db.open_store()  # gateway B, its clock an hour ahead
    skew[0] = HOUR
    assert await ahead.sweep(600, FEE_BPS) == 0
    assert mysql_db.value("SELECT settled_at FROM mcpmeter_calls WHERE request_id = %s",
                          (running.request_id,)) is None
    skew[0] = 0.0
    await mysql_db.store.settle(outcome(running, who))  # A delivers it: billed, once
    assert await mysql_db.store.balance(1) == 9 * PRICE
    reconcile(mysql_db)


async def test_a_gateway_behind_writes_the_database_time(mysql_db: MysqlBackend,  # noqa: F811
                                                         skew: list[float]) -> None:
    who = add_consumer(mysql_db, 1, credit=10 * PRICE)
    add_listing(mysql_db, 10, "w", price=PRICE)
    skew[0] = -HOUR  # gateway A, an hour behind, charges two calls (one alone, two in a batch)
    alone, *batch = (call(who, 10, PRICE) for _ in range(3))
    assert (await mysql_db.store.charge(alone)).accepted
    assert all(r.accepted for r in await mysql_db.store.charge_batch(batch))  # type: ignore[attr-defined]
    skew[0] = 0.0
    # No journal row is dated in the past: gateway B's sweep leaves them to A.
    age = mysql_db.value("SELECT MAX(TIMESTAMPDIFF(SECOND, created_at, UTC_TIMESTAMP())) FROM mcpmeter_calls")
    assert 0 <= int(age) < 60
    assert await mysql_db.open_store().sweep(600, FEE_BPS) == 0
    reconcile(mysql_db)


async def test_a_stale_call_is_still_swept_by_the_database_clock(mysql_db: MysqlBackend,  # noqa: F811
                                                                  skew: list[float]) -> None:
    who = add_consumer(mysql_db, 1, credit=10 * PRICE)
    add_listing(mysql_db, 10, "w", price=PRICE)
    orphan = call(who, 10, PRICE)
    assert (await mysql_db.store.charge(orphan)).accepted
    mysql_db.execute("UPDATE mcpmeter_calls SET created_at = UTC_TIMESTAMP() - INTERVAL 601 SECOND")
    skew[0] = -HOUR  # a gateway behind still sweeps what the database says is stale
    assert await mysql_db.store.sweep(600, FEE_BPS) == 1
    assert await mysql_db.store.balance(1) == 10 * PRICE
    reconcile(mysql_db)


async def test_the_billing_month_of_a_charge_is_the_databases(mysql_db: MysqlBackend,  # noqa: F811
                                                              skew: list[float]) -> None:
    who = add_consumer(mysql_db, 1, credit=10 * PRICE)
    add_listing(mysql_db, 10, "w", price=PRICE, free=1)
    month = db_month(mysql_db)
    skew[0] = 40 * 24 * HOUR  # the gateway's clock is in another month
    free, paid = call(who, 10, PRICE, free=1, period=None), call(who, 10, PRICE, free=1, period=None)
    results = [await mysql_db.store.charge(free), await mysql_db.store.charge(paid)]
    assert [r.verdict for r in results] == [Verdict.FREE, Verdict.DEBITED]
    assert [r.period for r in results] == [month, month]
    assert mysql_db.rows("SELECT DISTINCT period_year_month FROM mcpmeter_calls") == [(month,)]
    assert mysql_db.rows("SELECT period_year_month, free_calls_used FROM mcp_consumer_usage") == [(month, 1)]
    assert mysql_db.rows("SELECT period_year_month, spent_micro_cents FROM mcpmeter_project_spend") == [(month, PRICE)]
    reconcile(mysql_db)


async def test_a_charge_run_again_answers_the_month_its_first_run_counted_in(mysql_db: MysqlBackend,  # noqa: F811
                                                                              ) -> None:
    """A charge whose COMMIT landed but whose answer was lost runs again (mysql_trip.py): it answers
    the journal's month, in which its settlement must count, even if the database's clock has
    moved to another month since (here: the first run named a month of its own)."""
    who = add_consumer(mysql_db, 1, credit=10 * PRICE)
    add_listing(mysql_db, 10, "w", price=PRICE)
    store = mysql_db.store
    assert isinstance(store, MysqlStore)
    first = call(who, 10, PRICE, period="2030-01")
    again = dataclasses.replace(first, period=None)
    taken = [await store._hot.run(lambda conn, r=r: mysql_trip.charge(conn, r)) for r in (first, again)]
    assert [(r.verdict, r.period) for r in taken] == [(Verdict.DEBITED, "2030-01")] * 2
    await store.settle(dataclasses.replace(outcome(dataclasses.replace(again, period=taken[1].period), who),
                                           refund=True, taken=taken[1]))
    assert mysql_db.rows("SELECT period_year_month, spent_micro_cents FROM mcpmeter_project_spend") == [("2030-01", 0)]
    reconcile(mysql_db)
