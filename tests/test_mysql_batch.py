"""Billed settlements written in batches on MySQL (addon/store/mysql_batch.py).

Under load the billed settlements that queue while one batch is written go together in the
next: one transaction, two round trips, however many calls. Each case checks the money with the
contract suite's `reconcile` (SPEC I1-I4) and what the batch wrote row by row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from typing import Any

from addon.model import Settlement, Verdict
from addon.store.base import StoreUnavailable
from addon.store import mysql_batch
from addon.store.mysql import BilledBatches, MysqlStore

from .dbutil import SCHEMA, scratch_database
from .test_mysql_round_trips import Meter, world  # noqa: F401  (the fixture)
from .test_store_contract import (
    NEXT_PERIOD,
    PERIOD,
    Backend,
    MysqlBackend,
    _prepare,
    add_consumer,
    add_listing,
    call,
    outcome,
    Who,
    reconcile,
)

PRICE = 5000


def billed(settlement: Settlement) -> Settlement:
    return dataclasses.replace(settlement, need_balance=False)


async def test_concurrent_billed_settlements_share_one_transaction(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    db, meter = world
    users = [add_consumer(db, u, credit=100 * PRICE) for u in (1, 2, 3)]
    add_listing(db, 10, "a", price=PRICE)
    add_listing(db, 11, "b", price=PRICE, free=2)
    await meter.store.balance(1)
    jobs: list[Settlement] = []
    for i in range(60):
        who = users[i % 3]
        listing = 10 + i % 2
        req = call(who, listing, PRICE if i % 7 else 0, free=2 if listing == 11 else 0)
        taken = await meter.store.charge(req)
        assert taken.accepted
        jobs.append(billed(dataclasses.replace(outcome(req, who, status=200 + i % 2), taken=taken,
                                               reason=f"r{i % 3}")))
    verdicts = Counter(s.taken.verdict for s in jobs if s.taken)
    assert verdicts[Verdict.FREE] == 6 and verdicts[Verdict.UNPRICED] > 0 and verdicts[Verdict.DEBITED] > 30
    # Settled twice in one burst (a repeat), and once by a caller that believes the wrong thing.
    wrong = dataclasses.replace(jobs[5], taken=dataclasses.replace(jobs[5].taken, verdict=Verdict.FREE, amount=0))
    burst = [*jobs, jobs[3], wrong]
    random.Random(8).shuffle(burst)

    async def settle_all() -> list[int | None]:
        return await asyncio.gather(*(meter.store.settle(s) for s in burst))

    results, trips, server = await meter.measure(settle_all())
    assert results == [None] * len(burst)
    # All 62 queue before the writer runs and go together in one batch (two trips); a repeat and the
    # disagreeing one, left out of it, go alone (a one-trip try, then the Ledger's statements, which
    # read the journal): a dozen round trips for 62 settlements, not 62.
    assert trips <= 12, trips
    assert server["Com_commit"] <= 6 and server["Com_rollback"] == 0, server  # 62 one by one: 62

    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
    # /health says how many settlements went in batches: the 60 calls, less the one whose copy read
    # first was the disagreeing one (it and its repeat then settled alone).
    health = await meter.store.health()
    assert health["billed_batches"]["transactions"] == 1
    assert health["billed_batches"]["settlements"] in (59, 60)
    for s in jobs:
        assert s.taken is not None
        row = db.rows("SELECT status, billed_micro_cents FROM usage_events WHERE request_id = %s",
                      (s.charge.request_id,))
        assert row == [(s.status, s.taken.amount)]
        assert db.rows("SELECT refunded, status, reason FROM mcpmeter_calls WHERE request_id = %s",
                       (s.charge.request_id,)) == [(0, s.status, s.reason)]
    for who in users:
        for listing in (10, 11):
            want = sum(1 for s in jobs if s.charge.user_id == who.user_id and s.charge.listing_id == listing
                       and s.taken is not None and s.taken.amount > 0)
            got = db.value("SELECT billable_calls FROM mcp_consumer_usage WHERE user_id = %s AND mcp_id = %s",
                           (who.user_id, listing))
            assert int(got or 0) == want
    reconcile(db)


async def test_a_batch_spanning_a_new_month_counts_each_month_apart(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    await meter.store.balance(1)
    jobs = []
    for period, n in ((PERIOD, 3), (NEXT_PERIOD, 2)):
        for _ in range(n):
            req = dataclasses.replace(call(who, 10, PRICE), period=period)
            jobs.append(billed(dataclasses.replace(outcome(req, who), taken=await meter.store.charge(req))))
    await asyncio.gather(*(meter.store.settle(s) for s in jobs))  # queued together: one batch
    assert (await meter.store.health())["billed_batches"] == {"transactions": 1, "settlements": 5}
    assert db.rows("SELECT period_year_month, billable_calls FROM mcp_consumer_usage WHERE user_id = 1") == [
        (NEXT_PERIOD, 2)]
    assert db.value("SELECT COUNT(*) FROM usage_events") == 5
    reconcile(db)


async def test_batches_charges_and_refunds_of_two_gateways_never_deadlock_or_lose_money() -> None:
    """Charges, billed settlements (batched) and refunds (alone) of several users on shared listings,
    from two stores at once: every operation succeeds and the ledger reconciles."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)  # pool_size 8
        try:
            _prepare(db)
            users = [add_consumer(db, u, credit=1000 * PRICE) for u in range(1, 7)]
            for listing in (10, 11, 12):
                add_listing(db, listing, f"l{listing}", price=PRICE, free=3)
            stores = [db.store, db.open_store()]
            assert all(isinstance(s, MysqlStore) for s in stores)
            rng = random.Random(3)

            async def one(i: int) -> tuple[Verdict, bool]:
                store = stores[i % 2]
                who = users[rng.randrange(len(users))]
                req = call(who, rng.choice((10, 11, 12)), PRICE, free=3)
                taken = await store.charge(req)
                refund = rng.random() < 0.2
                await store.settle(dataclasses.replace(outcome(req, who, refund=refund, status=502 if refund else 200),
                                                       taken=taken, need_balance=refund))
                return taken.verdict, refund

            done = await asyncio.gather(*(one(i) for i in range(400)))
            assert len(done) == 400
            assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
            kept = sum(PRICE for verdict, refund in done if verdict is Verdict.DEBITED and not refund)
            assert db.value("SELECT SUM(billed_micro_cents) FROM usage_events") == kept
            assert db.value("SELECT SUM(billable_calls) FROM mcp_consumer_usage") == kept // PRICE
            reconcile(db)
        finally:
            db.close()


async def test_a_settlement_that_cannot_be_written_fails_alone_not_its_batch(
        world: tuple[Backend, Meter]) -> None:  # noqa: F811
    """A batch that fails is rolled back and each of its settlements goes alone: the calls batched
    with a bad one are written; only the bad one is left to its owner's retries (and the sweeper)."""
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    add_listing(db, 11, "gone", price=PRICE)
    await meter.store.balance(1)
    jobs = []
    for i in range(40):
        req = call(who, 11 if i == 7 else 10, PRICE)
        jobs.append(billed(dataclasses.replace(outcome(req, who), taken=await meter.store.charge(req))))
    # Listing 11 is deleted mid-call: its usage counter's row can no longer be written (foreign key).
    db.execute("SET FOREIGN_KEY_CHECKS = 0")
    db.execute("DELETE FROM mcps WHERE id = 11")
    db.execute("SET FOREIGN_KEY_CHECKS = 1")
    results = await asyncio.gather(*(meter.store.settle(s) for s in jobs), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if r is not None]
    assert failed == [7] and isinstance(results[7], StoreUnavailable)
    assert db.value("SELECT COUNT(*) FROM usage_events") == 39
    assert db.rows("SELECT request_id FROM mcpmeter_calls WHERE settled_at IS NULL") == [
        (jobs[7].charge.request_id,)]


async def test_a_batch_locks_only_its_own_journal_rows(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    """While a batch holds its journal rows, new calls' journal rows can be written and other calls
    settled: the batch locks by primary key under READ COMMITTED, so neither the settled_at index
    (every unsettled row) nor next-key locks (the gaps around its rows, where random request ids
    land) are taken."""
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    await meter.store.balance(1)
    charged = []
    for _ in range(4):
        req = call(who, 10, PRICE)
        charged.append(billed(dataclasses.replace(outcome(req, who), taken=await meter.store.charge(req))))
    charged.sort(key=lambda s: s.charge.request_id)
    # The batch holds the three highest keys; the other call's row sorts below them.
    (other_settlement, *mine) = charged
    other, other_taken = other_settlement.charge, other_settlement.taken
    conn = meter.store._connect()
    try:
        cur = conn.cursor()
        # The batch's first round trip, left open: its locks are held.
        cur.execute(mysql_batch.lock_text(3), [s.charge.request_id for s in mine])
        cur.nextset()
        assert len(cur.fetchall()) == 3
        # A row whose key sorts after every other: the gap a range read's next-key locks end with.
        probe = meter.store._connect()
        try:
            probe.cursor().execute(
                "INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
                " amount_micro_cents, period_year_month, created_at) VALUES (%s, 1, 1, 10, 't', 'unpriced', 0,"
                 " '2030-01', UTC_TIMESTAMP())", ("z" * 36,))
            probe.rollback()
        finally:
            probe.close()
        second = db.open_store()
        try:
            fresh = await asyncio.wait_for(second.charge(call(who, 10, PRICE)), 1.5)
            assert fresh.verdict is Verdict.DEBITED
            await asyncio.wait_for(second.settle(dataclasses.replace(outcome(other, who), taken=other_taken)), 1.5)
        finally:
            second.close()
        conn.rollback()
        cur.execute("EXPLAIN " + mysql_batch.lock_text(3).split(";", 1)[1], [s.charge.request_id for s in mine])
        plan = cur.fetchall()
        assert all(row[5] == "PRIMARY" for row in plan), plan  # the key used
    finally:
        conn.close()


async def test_hostile_tool_names_and_user_agents_are_stored_as_sent(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    """Client-chosen text (the tool name from the body, the User-Agent header) reaches the charge
    procedure, the batch and the one-trip settlement as escaped values: quotes, backslashes, format markers and 4-byte
    characters are stored as sent, cut at the columns' lengths, and nothing else is touched."""
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    await meter.store.balance(1)
    users = db.value("SELECT COUNT(*) FROM users")
    tools = ["'; DROP TABLE users; -- %s %(x)s \\ \U0001F600" + "x" * 300, "a\\'b\"c`d%%e", "\u0000nul"]
    agent = "ua'); DELETE FROM usage_events; -- \\%s " + "\U0001F600" * 300
    jobs = []
    for tool in tools:
        req = call(who, 10, PRICE, tool=tool)
        taken = await meter.store.charge(req)
        assert taken.verdict is Verdict.DEBITED
        jobs.append(billed(dataclasses.replace(outcome(req, who), taken=taken, user_agent=agent)))
    await asyncio.gather(*(meter.store.settle(s) for s in jobs))
    assert (await meter.store.health())["billed_batches"] == {"transactions": 1, "settlements": 3}
    for s in jobs:
        rid = s.charge.request_id
        assert db.rows("SELECT tool_name FROM mcpmeter_calls WHERE request_id = %s", (rid,)) == [
            (s.charge.tool_name[:191],)]
        assert db.rows("SELECT tool_name, user_agent FROM usage_events WHERE request_id = %s", (rid,)) == [
            (s.charge.tool_name[:191], agent[:255])]
    # The same text through the one-trip settlement (a caller that needs the balance: never batched).
    alone = call(who, 10, PRICE, tool=tools[0])
    taken = await meter.store.charge(alone)
    balance, trips, _ = await meter.measure(meter.store.settle(
        dataclasses.replace(outcome(alone, who), taken=taken, user_agent=agent)))
    assert (balance, trips) == (96 * PRICE, 1)
    assert db.rows("SELECT tool_name, user_agent, billed_micro_cents FROM usage_events WHERE request_id = %s",
                   (alone.request_id,)) == [(tools[0][:191], agent[:255], PRICE)]
    assert db.value("SELECT COUNT(*) FROM users") == users
    reconcile(db)


# --- the flush interval: background settlements wait for others -----------------------------------


async def charged_settlements(db: Backend, meter: Meter, n: int) -> list[Settlement]:
    """`n` billed settlements of user 1's charged calls, as written in the background (the answer left)."""
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    out = []
    for _ in range(n):
        req = call(who, 10, PRICE)
        taken = await meter.store.charge(req)
        out.append(dataclasses.replace(billed(outcome(req, who)), taken=taken, background=True))
    return out


async def test_background_settlements_apart_in_time_share_one_transaction(
        world: tuple[Backend, Meter], monkeypatch: Any) -> None:  # noqa: F811
    db, meter = world
    monkeypatch.setattr(BilledBatches, "FLUSH_SECONDS", 0.5)
    jobs = await charged_settlements(db, meter, 6)

    async def one_by_one() -> list[int | None]:
        started = []
        for s in jobs:  # as calls answered a few ms apart at concurrency 1
            started.append(asyncio.ensure_future(meter.store.settle(s)))
            await asyncio.sleep(0.01)
        return await asyncio.gather(*started)

    results, trips, server = await meter.measure(one_by_one())
    assert results == [None] * 6
    # One batch: its two round trips and one COMMIT, where six settlements alone take six of each.
    assert trips == 2 and server == {"Com_commit": 1, "Com_rollback": 0}, (trips, server)
    assert (await meter.store.health())["billed_batches"] == {"transactions": 1, "settlements": 6}
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
    reconcile(db)


async def test_a_settlement_a_hook_waits_for_ends_the_flush_interval(
        world: tuple[Backend, Meter], monkeypatch: Any) -> None:  # noqa: F811
    db, meter = world
    monkeypatch.setattr(BilledBatches, "FLUSH_SECONDS", 60.0)  # no test waits that long
    first, second = await charged_settlements(db, meter, 2)
    waiting = asyncio.ensure_future(meter.store.settle(first))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # a background settlement waits for others to join it
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 2
    # A streamed answer's settlement, which its response hook awaits: written at once, with the first.
    async with asyncio.timeout(5):
        assert await meter.store.settle(dataclasses.replace(second, background=False)) is None
        assert await waiting is None
    assert (await meter.store.health())["billed_batches"] == {"transactions": 1, "settlements": 2}
    reconcile(db)


async def test_a_full_batch_is_written_without_waiting(world: tuple[Backend, Meter], monkeypatch: Any) -> None:  # noqa: F811
    db, meter = world
    monkeypatch.setattr(BilledBatches, "FLUSH_SECONDS", 60.0)
    monkeypatch.setattr(BilledBatches, "MAX", 4)
    jobs = await charged_settlements(db, meter, 8)
    async with asyncio.timeout(5):
        assert await asyncio.gather(*(meter.store.settle(s) for s in jobs)) == [None] * 8
    assert (await meter.store.health())["billed_batches"] == {"transactions": 2, "settlements": 8}
    reconcile(db)


async def test_settlements_waiting_when_the_loop_stops_are_cancelled_not_lost_silently(
        world: tuple[Backend, Meter], monkeypatch: Any) -> None:  # noqa: F811
    db, meter = world
    monkeypatch.setattr(BilledBatches, "FLUSH_SECONDS", 60.0)
    jobs = await charged_settlements(db, meter, 3)
    waiting = [asyncio.ensure_future(meter.store.settle(s)) for s in jobs]
    await asyncio.sleep(0.05)
    billed_batches = meter.store._billed
    assert billed_batches is not None and billed_batches._writer is not None
    billed_batches._writer.cancel()  # as when the event loop is torn down mid-interval
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    # Nothing written: the journal rows stay unsettled, and the sweeper refunds them (the consumer
    # never pays for what a crash lost; the publisher loses at most one flush interval of calls).
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 3
    assert await meter.store.sweep(-2, 2000) == 3
    reconcile(db)


def test_a_store_used_from_a_new_loop_starts_a_fresh_queue() -> None:
    """An event loop closed while settlements waited out their interval (its tasks never cancelled)
    leaves no writer nor wake-up behind for the next loop to trip on."""

    class Written:
        async def settle_billed(self, batch: list[Settlement]) -> list[bool]:
            return [True] * len(batch)

    batches = BilledBatches(Written())  # type: ignore[arg-type]
    batches.FLUSH_SECONDS = 60.0
    s = Settlement(charge=call(Who(1, 10, "k", 1), 10, PRICE), refund=False, status=200, duration_ms=1,
                   called_at=0.0, key_id=None, token_id=None, client=None, user_agent=None, fee_bps=0)
    old = asyncio.new_event_loop()

    async def leave_one_waiting() -> None:
        asyncio.ensure_future(batches.submit(dataclasses.replace(s, background=True)))
        await asyncio.sleep(0.01)

    old.run_until_complete(leave_one_waiting())
    old.close()

    async def on_the_new_loop() -> bool:
        async with asyncio.timeout(5):
            return await batches.submit(s)
    assert asyncio.run(on_the_new_loop()) is True
