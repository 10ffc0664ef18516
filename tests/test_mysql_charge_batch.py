"""Charges that queue under load share one MySQL transaction and round trip (mysql_trip.charge_batch).

A charge with nothing under way goes alone; those that arrive meanwhile go together next: one
CALL each of the COMMIT-less procedure, one COMMIT. Each case checks the verdicts a lone charge
would give (credit, free tier, project cap never passed within a batch), what was written, and the
money with the contract suite's `reconcile` (SPEC I1-I4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter

import pytest

from addon.model import ChargeRequest, ChargeResult, Verdict
from addon.store import mysql_trip
from addon.store.base import StoreUnavailable
from addon.store.mysql import ChargeBatches, MysqlStore

from .dbutil import SCHEMA, scratch_database
from .test_mysql_round_trips import Meter, _warm, world  # noqa: F401  (the fixture)
from .test_store_contract import (
    FEE_BPS,
    Backend,
    MysqlBackend,
    Who,
    _prepare,
    add_consumer,
    add_listing,
    call,
    outcome,
    reconcile,
)

PRICE = 250_000  # µ¢: four calls make a cent, the unit of a project's cap


async def test_queued_charges_share_one_transaction_and_decide_as_alone(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    db, meter = world
    rich = add_consumer(db, 1, credit=100 * PRICE)
    poor = add_consumer(db, 2, credit=5 * PRICE)  # five of its twelve calls can be paid
    capped = add_consumer(db, 3, credit=100 * PRICE, cap_cents=4 * PRICE // 1_000_000)  # four calls a month
    add_listing(db, 10, "a", price=PRICE)
    add_listing(db, 11, "b", price=PRICE, free=3)
    await _warm(meter, 1)
    reqs: list[ChargeRequest] = []
    for i in range(36):
        who = (rich, poor, capped)[i % 3]
        listing = 11 if who is rich else 10
        reqs.append(call(who, listing, PRICE, free=3 if listing == 11 else 0))

    async def charge_all() -> list[ChargeResult]:
        return await asyncio.gather(*(meter.store.charge(r) for r in reqs))

    results, trips, server = await meter.measure(charge_all())
    # The first goes alone; the 35 that queued meanwhile go in one transaction: two trips, two COMMITs.
    assert trips == 2 and server == {"Com_commit": 2, "Com_rollback": 0}, (trips, server)
    assert (await meter.store.health())["charge_batches"] == {"transactions": 1, "charges": 35}
    verdicts = Counter((req.user_id, result.verdict) for req, result in zip(reqs, results, strict=True))
    assert verdicts[(1, Verdict.FREE)] == 3 and verdicts[(1, Verdict.DEBITED)] == 9  # (the first went alone)
    assert verdicts[(2, Verdict.DEBITED)] == 5 and verdicts[(2, Verdict.INSUFFICIENT_CREDIT)] == 7
    assert verdicts[(3, Verdict.DEBITED)] == 4 and verdicts[(3, Verdict.PROJECT_CAP_EXCEEDED)] == 8
    assert db.value("SELECT credit_micro_cents FROM users WHERE id = 2") == 0
    # Each outcome's balance is the consumer's balance just after its own debit: all differ, none below 0.
    for user in (1, 2, 3):
        debited = [r.balance for q, r in zip(reqs, results, strict=True)
                   if q.user_id == user and r.verdict is Verdict.DEBITED]
        assert len(set(debited)) == len(debited) and min(debited) >= 0
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls") == sum(r.accepted for r in results)
    whos = {who.user_id: who for who in (rich, poor, capped)}
    for req, result in zip(reqs, results, strict=True):
        if result.accepted:
            await meter.store.settle(dataclasses.replace(outcome(req, whos[req.user_id]), taken=result,
                                                         need_balance=False))
    reconcile(db)


def test_a_batch_runs_its_charges_in_the_lock_order() -> None:
    """By user, as billed batches lock usage rows; each user's in arrival order."""
    reqs = [dataclasses.replace(call(Who(user, user * 10, "", 0), listing, PRICE), request_id=f"r{n}")
            for n, (user, listing) in enumerate([(3, 10), (1, 11), (2, 10), (1, 11), (3, 10)])]
    assert [reqs[i].request_id for i in mysql_trip.batch_order(reqs)] == ["r1", "r3", "r2", "r0", "r4"]


async def test_a_batch_charges_one_listing_per_user(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    """A user's charges of a second listing wait for the next transaction: in one, the second listing's
    free-tier row would be locked after the user's row, which a lone charge of it, holding that
    free-tier row, waits for (a deadlock). Such a batch is refused outright, writing nothing."""
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE, free=2)
    add_listing(db, 11, "b", price=PRICE, free=2)
    await _warm(meter, 1)
    mixed = [call(who, 10, PRICE, free=2), call(who, 11, PRICE, free=2)]
    with pytest.raises(ValueError, match="one listing per user"):
        await meter.store.charge_batch(mixed)
    reqs = [call(who, 10 + i % 2, PRICE, free=2) for i in range(10)]

    async def charge_all() -> list[ChargeResult]:
        return await asyncio.gather(*(meter.store.charge(r) for r in reqs))

    results, trips, server = await meter.measure(charge_all())
    # Alone: the first (listing 10); then the queued ones of listing 11 (the first queued); then listing 10's.
    assert trips == 3 and server == {"Com_commit": 3, "Com_rollback": 0}, (trips, server)
    assert (await meter.store.health())["charge_batches"] == {"transactions": 2, "charges": 9}
    assert Counter((r.listing_id, res.verdict) for r, res in zip(reqs, results, strict=True)) == {
        (10, Verdict.FREE): 2, (10, Verdict.DEBITED): 3, (11, Verdict.FREE): 2, (11, Verdict.DEBITED): 3}
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls") == 10
    await meter.store.sweep(-2, FEE_BPS)
    reconcile(db)


async def test_a_charge_that_cannot_be_written_fails_alone_not_its_batch(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    """A batch that fails is rolled back and each of its charges goes alone: only the bad one fails."""
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    await meter.store.balance(1)
    used = call(who, 10, PRICE)
    taken = await meter.store.charge(used)
    assert taken.verdict is Verdict.DEBITED
    # A settled call's request id: not answered again (a charge run again after an ambiguous COMMIT
    # is, test_mysql_charge_replay.py), so the journal's key refuses it.
    await meter.store.settle(dataclasses.replace(outcome(used, who), taken=taken))
    reqs = [call(who, 10, PRICE) for _ in range(9)]
    reqs[5] = dataclasses.replace(reqs[5], request_id=used.request_id)
    results = await asyncio.gather(*(meter.store.charge(r) for r in reqs), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [5] and isinstance(results[5], StoreUnavailable)
    assert all(r.verdict is Verdict.DEBITED for r in results if isinstance(r, ChargeResult))
    assert (await meter.store.health())["charge_batches"] == {"transactions": 0, "charges": 0}
    assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 91 * PRICE
    assert await meter.store.sweep(-2, FEE_BPS) == 8  # nobody settled them: all refunded, once
    reconcile(db)


async def test_a_queued_charge_whose_caller_went_away_is_never_written(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    await meter.store.balance(1)
    first = asyncio.ensure_future(meter.store.charge(call(who, 10, PRICE)))
    await asyncio.sleep(0)  # under way: what follows queues
    gone = call(who, 10, PRICE)
    queued = [asyncio.ensure_future(meter.store.charge(r)) for r in (call(who, 10, PRICE), gone, call(who, 10, PRICE))]
    await asyncio.sleep(0)
    queued[1].cancel()
    assert (await first).verdict is Verdict.DEBITED
    assert [(await queued[i]).verdict for i in (0, 2)] == [Verdict.DEBITED] * 2
    with pytest.raises(asyncio.CancelledError):
        await queued[1]
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE request_id = %s", (gone.request_id,)) == 0
    assert db.value("SELECT credit_micro_cents FROM users WHERE id = 1") == 97 * PRICE
    await meter.store.sweep(-2, FEE_BPS)
    reconcile(db)


async def test_the_queue_of_a_closed_loop_is_not_waited_on_by_the_next(world: tuple[Backend, Meter]) -> None:  # noqa: F811
    """A store used from a new event loop (a reload) does not wait behind charges of the old one."""
    db, meter = world
    who = add_consumer(db, 1, credit=100 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    batches = meter.store._charges
    assert isinstance(batches, ChargeBatches)
    batches._busy = True  # as a loop closed mid-charge would leave it
    batches._loop = object()  # type: ignore[assignment]
    assert (await asyncio.wait_for(meter.store.charge(call(who, 10, PRICE)), 5)).verdict is Verdict.DEBITED
    assert not batches._busy
    await meter.store.sweep(-2, FEE_BPS)
    reconcile(db)


async def test_charge_batches_of_two_gateways_never_overspend_or_deadlock() -> None:
    """Six users with little credit, tight caps and free tiers, charged from two stores at once in
    bursts (so both batch), settled billed or refunded: every operation succeeds, no balance goes
    below zero, no cap or free allowance is passed, and the ledger reconciles."""
    with scratch_database(SCHEMA) as settings:
        db = MysqlBackend(settings)
        try:
            _prepare(db)
            users = [add_consumer(db, u, credit=30 * PRICE, cap_cents=(20 * PRICE // 1_000_000) if u % 2 else None)
                     for u in range(1, 7)]
            for listing in (10, 11, 12):
                add_listing(db, listing, f"l{listing}", price=PRICE, free=2)
            stores = [db.store, db.open_store()]
            assert all(isinstance(s, MysqlStore) for s in stores)
            rng = random.Random(5)

            async def one(i: int) -> tuple[int, Verdict, bool]:
                store = stores[i % 2]
                who = users[rng.randrange(len(users))]
                req = call(who, rng.choice((10, 11, 12)), PRICE, free=2)
                taken = await store.charge(req)
                refund = taken.accepted and rng.random() < 0.25
                if taken.accepted:
                    settled = outcome(req, who, refund=refund, status=502 if refund else 200)
                    await store.settle(dataclasses.replace(settled, taken=taken, need_balance=refund))
                return who.user_id, taken.verdict, refund

            done = await asyncio.gather(*(one(i) for i in range(500)))
            assert sum(s._charges.batches for s in stores if isinstance(s, MysqlStore)) > 0
            # Two free calls a listing a month, kept (a refunded one gives its slot back).
            assert max(int(n) for n, in db.rows("SELECT free_calls_used FROM mcp_consumer_usage")) == 2
            for user_id, in db.rows("SELECT id FROM users WHERE id BETWEEN 1 AND 6"):
                balance = int(db.value("SELECT credit_micro_cents FROM users WHERE id = %s", (user_id,)))
                assert balance >= 0
                if user_id % 2:  # capped at 20 calls of spend a month, net of refunds
                    assert 30 * PRICE - balance <= 20 * PRICE
            assert any(verdict is Verdict.INSUFFICIENT_CREDIT for _, verdict, _ in done)
            assert any(verdict is Verdict.PROJECT_CAP_EXCEEDED for _, verdict, _ in done)
            assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL") == 0
            reconcile(db)
        finally:
            db.close()
