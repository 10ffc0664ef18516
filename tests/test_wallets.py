"""The wallet store (wallets: true) on real MySQL and Redis: credit held in bulk, spent in Redis.

Every scenario ends with `reconcile_holds`: each balance == opening + its ledger (I1), never below
zero, and per hold spent == what its billed calls cost, spent + returned <= granted, and once settled
granted == spent + returned + rest. Gateways are WalletStores sharing one database and one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addon.admin import Admin
from addon.config import Config
from addon.model import ChargeRequest, ChargeResult, Settlement, Verdict
from addon.store import open_store, wallet_scripts
from addon.store.base import StoreUnavailable
from addon.store.wallets import WalletStore

from . import redisutil
from .dbutil import SCHEMA, scratch_database
from .test_store_contract import MysqlBackend, Who, _prepare, add_consumer, add_listing, call, outcome

PRICE = 1000


class Wallets(MysqlBackend):
    def __init__(self, settings: Any, redis: Any, **config: Any) -> None:
        self.redis = redis
        self.wallet_config = config
        super().__init__(settings)

    def open_store(self) -> WalletStore:
        config = Config(store="mysql", cache="redis", mysql=self.config.mysql, redis=self.redis, wallets=True,
                        **{"wallet_calls": 10, **self.wallet_config})
        store = open_store(config)
        assert isinstance(store, WalletStore)
        self.stores.append(store)
        return store


@contextlib.contextmanager
def wallets(**config: Any) -> Iterator[Wallets]:
    with contextlib.ExitStack() as stack:
        backend = Wallets(stack.enter_context(scratch_database(SCHEMA)),
                          stack.enter_context(redisutil.scratch_prefix()), **config)
        stack.callback(backend.close)
        yield _prepare(backend)  # type: ignore[misc]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Wallets]:
    with wallets() as backend:
        yield backend


def balance(db: Wallets, who: Who) -> int:
    return int(db.value("SELECT credit_micro_cents FROM users WHERE id = %s", (who.user_id,)))


def reconcile_holds(db: Wallets, settled: bool = False) -> None:
    store = db.store
    assert isinstance(store, WalletStore)
    # `mcpmeter reconcile` agrees (its I1 counts from 0: these users opened with credit and no ledger row)
    failed = [c for c in Admin(store.mysql, store.config).reconcile() if not c.ok and c.invariant != "I1"]
    assert failed == [], failed
    for user_id, credit in db.rows("SELECT id, credit_micro_cents FROM users"):
        ledger = db.value("SELECT COALESCE(SUM(amount_micro_cents), 0) FROM credit_transactions WHERE user_id = %s",
                          (user_id,))
        assert int(credit) == db.opening.get(int(user_id), 0) + int(ledger), f"I1 broken for user {user_id}"
        assert int(credit) >= 0
    for hold, granted, spent, returned, rest, settled_at in db.rows(
            "SELECT id, granted_micro_cents, spent_micro_cents, returned_micro_cents, rest_micro_cents, settled_at"
            " FROM mcpmeter_holds"):
        billed = db.value("SELECT COALESCE(SUM(amount_micro_cents), 0) FROM mcpmeter_calls"
                          " WHERE hold_id = %s AND refunded = 0", (hold,))
        assert int(spent) == int(billed), f"hold {hold}: spent {spent} but its billed calls cost {billed}"
        assert int(spent) + int(returned) <= int(granted), f"hold {hold} gave back more than it held"
        if settled_at is not None:
            assert int(granted) == int(spent) + int(returned) + int(rest), f"hold {hold} does not add up"
        else:
            assert not settled, f"hold {hold} not settled"
        events = db.value("SELECT COALESCE(SUM(e.billed_micro_cents), 0) FROM usage_events e JOIN mcpmeter_calls c"
                          " ON c.request_id = e.request_id WHERE c.hold_id = %s", (hold,))
        assert int(events) == int(billed), f"hold {hold}: usage rows bill {events}, its calls {billed}"
    held = db.value("SELECT COALESCE(SUM(amount_micro_cents), 0) FROM credit_transactions"
                    " WHERE reference_type = 'mcpmeter_hold'")
    open_holds = db.value("SELECT COALESCE(SUM(granted_micro_cents - spent_micro_cents - returned_micro_cents"
                          " - COALESCE(rest_micro_cents, 0)), 0) FROM mcpmeter_holds")
    billed = db.value("SELECT COALESCE(SUM(spent_micro_cents), 0) FROM mcpmeter_holds")
    refunded = db.value("SELECT COALESCE(SUM(t.amount_micro_cents), 0) FROM credit_transactions t JOIN mcpmeter_calls c"
                        " ON c.request_id = t.request_id WHERE t.type = 'refund' AND c.hold_id IS NOT NULL")
    # What the holds took from balances is what their calls were billed, what still is in them, and the
    # refunds (paid back as refund rows of their own).
    assert -int(held) == int(billed) + int(open_holds) + int(refunded)


async def settle_all(store: WalletStore) -> None:
    store.settle_after = 0.0
    store.config = dataclasses.replace(store.config, wallet_seconds=0)
    await asyncio.sleep(1.1)  # the holds' created_at has whole seconds
    await store.settle_holds()


class Calls:
    """Charges through a store, remembered so that their settlements say what was taken (as the gateway's do)."""

    def __init__(self) -> None:
        self.taken: dict[str, ChargeResult] = {}

    async def charge(self, store: WalletStore, req: ChargeRequest) -> ChargeResult:
        self.taken[req.request_id] = result = await store.charge(req)
        return result

    def outcome(self, req: ChargeRequest, who: Who, refund: bool = False) -> Settlement:
        return dataclasses.replace(outcome(req, who, refund=refund), taken=self.taken[req.request_id])


def listing(db: Wallets) -> int:
    return add_listing(db, 1, "search", price=PRICE)


def consumer(db: Wallets, credit: int, **options: Any) -> tuple[Who, WalletStore, Calls]:
    """The priced listing, one consumer with `credit`, the store and a record of its charges."""
    listing(db)
    who = add_consumer(db, 1, credit=credit, **options)
    assert isinstance(db.store, WalletStore)
    return who, db.store, Calls()


async def test_calls_spend_from_one_hold_and_settle_in_batches(db: Wallets) -> None:
    who, store, calls = consumer(db, 100 * PRICE)
    reqs = [call(who, 1, PRICE) for _ in range(25)]
    results = [await calls.charge(store, r) for r in reqs]
    assert all(r.verdict is Verdict.DEBITED and r.amount == PRICE and r.hold is not None for r in results)
    assert store.grants == 3  # 10 calls' worth each
    assert balance(db, who) == 100 * PRICE - 30 * PRICE  # three holds of 10 calls
    assert results[-1].balance == 100 * PRICE - 25 * PRICE  # the wallet's left-over + the balance
    await asyncio.gather(*(store.settle(calls.outcome(r, who, refund=i % 5 == 0)) for i, r in enumerate(reqs)))
    assert store.batches <= 2 and store.recorded == 25
    reconcile_holds(db)
    await settle_all(store)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 100 * PRICE - 20 * PRICE  # 5 refunded
    assert db.value("SELECT COUNT(*) FROM usage_events WHERE billed_micro_cents > 0") == 20
    refunds = db.rows("SELECT amount_micro_cents FROM credit_transactions WHERE type = 'refund'")
    assert [int(a) for a, in refunds] == [PRICE] * 5


async def test_no_overspend_across_two_gateways_and_many_callers(db: Wallets) -> None:
    listing(db)
    who = add_consumer(db, 1, credit=37 * PRICE + 500)
    a, b = db.store, db.open_store()
    assert isinstance(a, WalletStore) and isinstance(b, WalletStore)
    calls = Calls()
    reqs = [call(who, 1, PRICE) for _ in range(80)]
    charged_by = {r.request_id: a if i % 2 else b for i, r in enumerate(reqs)}
    results = await asyncio.gather(*(calls.charge(charged_by[r.request_id], r) for r in reqs),
                                   return_exceptions=True)
    accepted = [(r, q) for r, q in zip(results, reqs, strict=True) if isinstance(r, ChargeResult) and r.accepted]
    refused = [r for r in results if isinstance(r, ChargeResult) and not r.accepted]
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert len(accepted) == 37 and all(r.verdict is Verdict.INSUFFICIENT_CREDIT for r in refused)
    await asyncio.gather(*(charged_by[q.request_id].settle(calls.outcome(q, who)) for _, q in accepted))
    for store in (a, b):
        assert await store.drain(5)
    reconcile_holds(db)
    for store in (a, b):
        await settle_all(store)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 500


async def test_a_crashed_gateways_unwritten_calls_come_back_to_the_consumer(db: Wallets) -> None:
    who, store, calls = consumer(db, 50 * PRICE)
    reqs = [call(who, 1, PRICE) for _ in range(6)]
    for r in reqs:
        await calls.charge(store, r)
    await asyncio.gather(*(store.settle(calls.outcome(r, who)) for r in reqs[:4]))  # two never settled: the crash
    store.close()  # nothing drained: as if SIGKILLed
    survivor = db.open_store()
    assert isinstance(survivor, WalletStore)
    await settle_all(survivor)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 50 * PRICE - 4 * PRICE


async def test_redis_losing_the_wallets_costs_the_consumer_nothing(db: Wallets) -> None:
    who, store, calls = consumer(db, 50 * PRICE)
    first = [call(who, 1, PRICE) for _ in range(3)]
    for r in first:
        await calls.charge(store, r)
    redisutil.delete_prefix(db.redis)  # a Redis restart: every wallet gone
    second = [call(who, 1, PRICE) for _ in range(3)]
    for r in second:
        assert (await calls.charge(store, r)).accepted  # a new hold
    await asyncio.gather(*(store.settle(calls.outcome(r, who)) for r in first + second))
    await settle_all(store)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 50 * PRICE - 6 * PRICE
    assert store.grants == 2


async def test_the_project_cap_bounds_the_holds(db: Wallets) -> None:
    listing(db)
    who = add_consumer(db, 1, credit=100 * PRICE, cap_cents=1)  # 1 cent = 1,000,000 µ¢ = 1000 calls
    db.execute("UPDATE projects SET spending_cap_cents_per_month = 0 WHERE id = %s", (who.project_id,))
    result = await db.store.charge(call(who, 1, PRICE))
    assert result.verdict is Verdict.PROJECT_CAP_EXCEEDED and balance(db, who) == 100 * PRICE
    db.execute("UPDATE projects SET spending_cap_cents_per_month = 1 WHERE id = %s", (who.project_id,))
    db.execute("UPDATE mcpmeter_project_spend SET spent_micro_cents = %s WHERE project_id = %s",
               (10**6 - 3 * PRICE, who.project_id))  # (the refused charge made the month's row)
    results = [await db.store.charge(call(who, 1, PRICE)) for _ in range(5)]
    assert [r.verdict for r in results] == [Verdict.DEBITED] * 3 + [Verdict.PROJECT_CAP_EXCEEDED] * 2
    reconcile_holds(db)


async def test_a_stale_wallet_is_retired_and_its_left_over_returned(db: Wallets) -> None:
    who, store, calls = consumer(db, 100 * PRICE)
    req = call(who, 1, PRICE)
    await calls.charge(store, req)
    assert balance(db, who) == 90 * PRICE
    await store.settle(calls.outcome(req, who))
    store.config = dataclasses.replace(store.config, wallet_seconds=0)
    await asyncio.sleep(1.1)
    await store.settle_holds()  # retired: the 9 calls' worth left comes back now; the hold is not settled yet
    assert balance(db, who) == 99 * PRICE
    key = wallet_scripts.wallet_key(db.redis.prefix, who.user_id, who.project_id)
    assert key not in redisutil.keys(db.redis)
    reconcile_holds(db)


async def test_free_tiers_and_unpriced_calls_keep_the_journal(db: Wallets) -> None:
    add_listing(db, 2, "free", price=PRICE, free=2)
    who = add_consumer(db, 1, credit=10 * PRICE)
    results = [await db.store.charge(call(who, 2, PRICE, free=2)) for _ in range(3)]
    assert [r.verdict for r in results] == [Verdict.FREE, Verdict.FREE, Verdict.DEBITED]
    assert all(r.hold is None for r in results)


async def test_redis_down_refuses_before_forwarding(db: Wallets) -> None:
    listing(db)
    who = add_consumer(db, 1, credit=10 * PRICE)
    config = dataclasses.replace(db.store.config, redis=dataclasses.replace(db.redis, port=redisutil_closed_port()))
    store = WalletStore(config, db.store.mysql)  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        await store.charge(call(who, 1, PRICE))
    assert balance(db, who) == 10 * PRICE


def redisutil_closed_port() -> int:
    from .dbutil import closed_port

    return closed_port()


def test_keys_of_one_consumer_share_a_hash_tag() -> None:
    """Redis Cluster: each script touches one wallet key, and a consumer's wallets (one per project)
    share its slot, whatever the prefix (a prefix may not hold braces: config)."""
    from redis.crc import key_slot

    key = wallet_scripts.wallet_key("mcpmeter:", 42, 7)
    assert key == "mcpmeter:w:{u42}:p7"
    slots = {key_slot(wallet_scripts.wallet_key(prefix, 42, project).encode())
             for prefix in ("mcpmeter:", "staging:x:", "") for project in (1, 7, 10**12)}
    assert slots == {key_slot(b"u42")}
    assert key_slot(wallet_scripts.wallet_key("mcpmeter:", 43, 7).encode()) == key_slot(b"u43")


def test_a_calls_rate_keys_share_its_wallets_slot() -> None:
    """Redis Cluster: RATE_SPEND touches a (listing, consumer) bucket's rate keys and the consumer's
    wallet together, so all of them carry the consumer's hash tag, whatever the listing or prefix."""
    from redis.crc import key_slot

    from addon.cache.redis import rate_keys
    from addon.ratelimit import bucket, windows_for

    assert rate_keys("mcpmeter:", bucket(3, 42), windows_for(60, 10_000)) == [
        "mcpmeter:rl:{u42}:3:60", "mcpmeter:rl:{u42}:3:86400"]
    for prefix in ("mcpmeter:", "staging:x:", ""):
        for listing_id in (1, 3, 10**12):
            keys = [*rate_keys(prefix, bucket(listing_id, 42), windows_for(60, 10_000)),
                    wallet_scripts.wallet_key(prefix, 42, 7)]
            assert {key_slot(k.encode()) for k in keys} == {key_slot(b"u42")}, keys


async def test_gateways_granting_at_once_never_replace_each_others_fresh_wallet() -> None:
    """Every call needs a grant (a wallet of one call): two gateways granting at once retire only the
    wallet that could not pay, so no call fails for churn and the money adds up."""
    with wallets(wallet_calls=1) as db:
        listing(db)
        who = add_consumer(db, 1, credit=100 * PRICE)
        a, b = db.store, db.open_store()
        assert isinstance(a, WalletStore) and isinstance(b, WalletStore)
        calls = Calls()
        reqs = [call(who, 1, PRICE) for _ in range(40)]
        by = {r.request_id: a if i % 2 else b for i, r in enumerate(reqs)}
        results = await asyncio.gather(*(calls.charge(by[r.request_id], r) for r in reqs))
        assert all(r.verdict is Verdict.DEBITED for r in results)
        await asyncio.gather(*(by[r.request_id].settle(calls.outcome(r, who)) for r in reqs))
        for store in (a, b):
            await settle_all(store)
        reconcile_holds(db, settled=True)
        assert balance(db, who) == 60 * PRICE


# --- adversarial review (revwallets) -------------------------------------------------------------------


async def test_a_call_that_cannot_be_written_does_not_stop_the_others(db: Wallets) -> None:
    """A consumer deleted between charge and record (ON DELETE CASCADE): their usage row breaks the
    foreign key. Their call alone is given up; the batch it shared is written, and the flusher goes on."""
    listing(db)
    gone, who = add_consumer(db, 1, credit=10 * PRICE), add_consumer(db, 2, credit=10 * PRICE)
    store = db.store
    assert isinstance(store, WalletStore)
    calls = Calls()
    lost, kept = call(gone, 1, PRICE), call(who, 1, PRICE)
    for r in (lost, kept):
        assert (await calls.charge(store, r)).accepted
    db.execute("DELETE FROM users WHERE id = %s", (gone.user_id,))
    del db.opening[gone.user_id]
    await asyncio.gather(store.settle(calls.outcome(lost, gone)), store.settle(calls.outcome(kept, who)))
    assert await store.drain(10), "the flusher is stuck on a batch that can never be written"
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE request_id = %s", (kept.request_id,)) == 1
    later = call(who, 1, PRICE)
    await calls.charge(store, later)
    await store.settle(calls.outcome(later, who, refund=True))
    assert await store.drain(5)
    assert balance(db, who) == PRICE  # the refund written (the rest of its hold is in the wallet)
    await settle_all(store)
    assert balance(db, who) == 9 * PRICE
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE request_id = %s", (lost.request_id,)) == 0


async def test_a_call_settled_on_the_store_a_reload_made_is_recorded_once(db: Wallets) -> None:
    """A held call outlives a reload: settlement.py settles it on the new store (the old one closed)."""
    listing(db)
    who = add_consumer(db, 1, credit=10 * PRICE)
    old = db.store
    assert isinstance(old, WalletStore)
    calls = Calls()
    billed, refunded = call(who, 1, PRICE), call(who, 1, PRICE)
    for r in (billed, refunded):
        await calls.charge(old, r)
    old.close()
    new = db.open_store()
    assert isinstance(new, WalletStore)
    # each twice, at once: recorded once all the same
    await asyncio.gather(*(new.settle(calls.outcome(r, who, refund=r is refunded))
                           for r in (billed, refunded, billed, refunded)))
    assert await new.drain(5)
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE request_id IN (%s, %s)",
                    (billed.request_id, refunded.request_id)) == 2
    assert db.value("SELECT COUNT(*) FROM usage_events WHERE billed_micro_cents = %s", (PRICE,)) == 1
    db.store = new
    await settle_all(new)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 9 * PRICE


async def test_holds_waiting_to_settle_do_not_keep_stale_wallets_open(db: Wallets) -> None:
    """The sweeper's page of due holds is not filled by closed holds too young to settle."""
    listing(db)
    first, second = add_consumer(db, 1, credit=10 * PRICE), add_consumer(db, 2, credit=10 * PRICE)
    store = db.store
    assert isinstance(store, WalletStore)
    await store.charge(call(first, 1, PRICE))
    store.config = dataclasses.replace(store.config, wallet_seconds=0)
    await asyncio.sleep(1.1)
    assert await store.settle_holds(limit=1) == 0  # the first hold closed (its wallet's 9 calls back)
    assert balance(db, first) == 9 * PRICE
    store.config = dataclasses.replace(store.config, wallet_seconds=60)
    await store.charge(call(second, 1, PRICE))
    store.config = dataclasses.replace(store.config, wallet_seconds=0)
    await asyncio.sleep(1.1)
    await store.settle_holds(limit=1)
    assert balance(db, second) == 9 * PRICE, "the stale wallet's left-over was never returned"


async def test_wallets_of_huge_prices_add_up_to_the_micro_cent(db: Wallets) -> None:
    """Past 2**53 µ¢ a Lua number (a double) is not exact: the wallet's arithmetic must be Redis's integers."""
    price = 2**50 + 3  # 9 calls of it left in a wallet: 2 µ¢ more, as a double
    add_listing(db, 1, "search", price=price)
    who = add_consumer(db, 1, credit=2**62)
    store = db.store
    assert isinstance(store, WalletStore)
    calls = Calls()
    reqs = [call(who, 1, price) for _ in range(20)]
    results = [await calls.charge(store, r) for r in reqs]
    assert all(r.accepted for r in results)
    assert results[0].balance == 2**62 - price  # the wallet's left + the balance in MySQL, exactly
    await asyncio.gather(*(store.settle(calls.outcome(r, who)) for r in reqs))
    assert await store.drain(5)
    await settle_all(store)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 2**62 - 20 * price


async def test_the_balance_shown_counts_earlier_refunds(db: Wallets) -> None:
    """X-Mcpmeter-Balance comes from the wallet (its left-over + the balance in MySQL when funded): a
    refund, paid back in MySQL, shows in every later answer too, not only in its own."""
    who, store, _ = consumer(db, 10 * PRICE)
    calls, shown = Calls(), []
    for refund in (True, True, False, False):
        req = call(who, 1, PRICE)
        shown.append((await calls.charge(store, req)).balance)
        shown.append(await store.settle(dataclasses.replace(calls.outcome(req, who, refund=refund), need_balance=True)))
    assert shown == [9 * PRICE, 10 * PRICE, 9 * PRICE, 10 * PRICE, 9 * PRICE, 9 * PRICE, 8 * PRICE, 8 * PRICE]
    assert balance(db, who) == 2 * PRICE  # the two refunds; the hold took all ten, six are left in the wallet
    reconcile_holds(db)


async def test_wallets_turned_off_neither_strand_the_holds_nor_drop_their_calls(db: Wallets) -> None:
    """Gateways without wallets share the database (README, "Mixing modes"): when none with wallets is
    left (turned off, by a restart or a reload), a wallet call settles on the journal's store, and the
    holds still settle, their credit back to the consumer."""
    from addon.store.mysql import MysqlStore

    who, store, calls = consumer(db, 10 * PRICE)
    billed, refunded = call(who, 1, PRICE), call(who, 1, PRICE)
    for r in (billed, refunded):
        await calls.charge(store, r)
    store.close()
    journal = MysqlStore(dataclasses.replace(store.config, wallets=False))
    db.stores.append(journal)
    for r in (billed, refunded):
        await journal.settle(dataclasses.replace(calls.outcome(r, who, refund=r is refunded), need_balance=False))
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE hold_id IS NOT NULL") == 2
    db.execute("UPDATE mcpmeter_holds SET created_at = created_at - INTERVAL 30 DAY")  # long abandoned
    await journal.sweep(3600, 0)
    assert db.value("SELECT COUNT(*) FROM mcpmeter_holds WHERE settled_at IS NULL") == 0
    assert balance(db, who) == 9 * PRICE
    reconcile_holds(db, settled=True)


async def test_a_wallet_restored_stale_by_redis_never_spends_more_than_its_hold(db: Wallets) -> None:
    """Redis restarted from a snapshot (or failed over to a lagging replica) brings a wallet back with
    more left than it had: the calls it pays beyond its hold are recorded unbilled, and its retired
    left-over gives back no more than the hold still has."""
    who, store, calls = consumer(db, 100 * PRICE)
    key = wallet_scripts.wallet_key(db.redis.prefix, who.user_id, who.project_id)
    reqs = [call(who, 1, PRICE) for _ in range(11)]
    await calls.charge(store, reqs[0])
    with redisutil.client(db.redis) as r:
        snapshot = r.hgetall(key)
    for req in reqs[1:6]:
        await calls.charge(store, req)
    await asyncio.gather(*(store.settle(calls.outcome(req, who)) for req in reqs[:6]))
    with redisutil.client(db.redis) as r:
        r.hset(key, mapping=snapshot)  # 9 calls left again, though 4 are
    for req in reqs[6:]:
        await calls.charge(store, req)
    await asyncio.gather(*(store.settle(calls.outcome(req, who, refund=req is reqs[-1])) for req in reqs[6:]))
    assert await store.drain(5)
    assert store.grants == 1
    await settle_all(store)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 90 * PRICE  # the hold's 10 calls, no more and no less


async def test_grants_records_sweeps_and_journal_calls_of_one_consumer_at_once(db: Wallets) -> None:
    """Lock order: two gateways granting and recording (refunds too), a third settling holds, and the
    journal's one-trip charges and settlements (a free tier), all for one consumer, at once."""
    listing(db)
    add_listing(db, 2, "free", price=PRICE, free=5)
    who = add_consumer(db, 1, credit=60 * PRICE)
    stores = [db.store, db.open_store(), db.open_store()]
    a, b, sweeper = stores
    assert isinstance(a, WalletStore) and isinstance(b, WalletStore) and isinstance(sweeper, WalletStore)
    for store in stores:
        store.config = dataclasses.replace(store.config, wallet_calls=2)
    sweeper.config = dataclasses.replace(sweeper.config, wallet_seconds=0)
    calls = Calls()

    async def gateway(store: WalletStore, n: int) -> list[ChargeRequest]:
        done = []
        for i in range(n):
            req = call(who, 2 if i % 7 == 0 else 1, PRICE, free=5 if i % 7 == 0 else 0)
            if (await calls.charge(store, req)).accepted:
                await store.settle(dataclasses.replace(calls.outcome(req, who, refund=i % 3 == 0),
                                                       need_balance=False))
                done.append(req)
        return done

    async def sweep() -> None:
        for _ in range(20):
            await sweeper.settle_holds()
            await asyncio.sleep(0.05)

    results = await asyncio.gather(gateway(a, 40), gateway(b, 40), gateway(a, 40), gateway(b, 40), sweep(),
                                   return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
    for store in (a, b):
        assert await store.drain(5)
    await settle_all(sweeper)
    reconcile_holds(db, settled=True)
    billed = db.value("SELECT COALESCE(SUM(billed_micro_cents), 0) FROM usage_events")
    assert balance(db, who) == 60 * PRICE - int(billed)


async def test_commits_whose_answers_are_lost_cost_the_consumer_nothing(db: Wallets) -> None:
    """A grant's COMMIT lands but its answer is lost (OutcomeUnknown): the call is refused and its
    hold, never funded, comes back whole. A batch's: written again, its calls skipped (refunds once)."""
    from .dbutil import Relay

    listing(db)
    who = add_consumer(db, 1, credit=20 * PRICE)
    relay = Relay(db.config.mysql)
    relay.start()
    try:
        store = WalletStore(dataclasses.replace(db.store.config, mysql=dataclasses.replace(
            db.config.mysql, port=relay.port, pool_size=1)))
        db.stores.append(store)
        await store.prepare()
        calls = Calls()
        relay.lose_answer(to=b"\x03COMMIT")
        with pytest.raises(StoreUnavailable):
            await store.charge(call(who, 1, PRICE))  # the grant committed, unknown to it
        assert relay.lost == 1 and balance(db, who) == 10 * PRICE
        reqs = [call(who, 1, PRICE) for _ in range(4)]
        for r in reqs:
            assert (await calls.charge(store, r)).accepted  # a second hold
        relay.lose_answer(to=b"\x03COMMIT")
        await asyncio.gather(*(store.settle(calls.outcome(r, who, refund=r is reqs[0])) for r in reqs))
        assert await store.drain(10)
        assert relay.lost == 2
    finally:
        relay.stop()
    assert db.value("SELECT COUNT(*) FROM mcpmeter_calls") == 4
    assert db.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'") == 1
    db.store = db.open_store()
    await settle_all(db.store)  # type: ignore[arg-type]
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 17 * PRICE


async def test_a_store_a_reload_closes_writes_what_it_had_queued(db: Wallets) -> None:
    """settlement.py closes a store a reload replaced once its settlement tasks are done; a refund's
    task is done after WAIT_SECONDS even if the database was away, its settlement still queued."""
    from .dbutil import Relay

    listing(db)
    who = add_consumer(db, 1, credit=10 * PRICE)
    relay = Relay(db.config.mysql)
    relay.start()
    try:
        store = WalletStore(dataclasses.replace(db.store.config, mysql=dataclasses.replace(
            db.config.mysql, port=relay.port, pool_size=1)))
        db.stores.append(store)
        calls = Calls()
        req = call(who, 1, PRICE)
        await calls.charge(store, req)
        relay.stop()  # the database away
        await store.settle(calls.outcome(req, who, refund=True))  # gave up waiting: still queued
        store.close()
        relay.start()
        for _ in range(100):
            if db.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'"):
                break
            await asyncio.sleep(0.1)
    finally:
        relay.stop()
    assert db.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'") == 1
    assert balance(db, who) == PRICE


async def test_a_new_month_retires_the_old_months_wallet_and_counts_apart(db: Wallets) -> None:
    """A call of a new month never spends from last month's wallet: a new hold counts in the new
    month's spend (and cap), and last month's keeps what its calls cost there."""
    who, store, calls = consumer(db, 100 * PRICE, cap_cents=1)
    old = [dataclasses.replace(call(who, 1, PRICE), period="2026-11") for _ in range(3)]
    new = [dataclasses.replace(call(who, 1, PRICE), period="2026-12") for _ in range(2)]
    results = [await calls.charge(store, r) for r in old + new]
    assert all(r.accepted for r in results) and store.grants == 2
    assert {r.hold for r in results[:3]} != {r.hold for r in results[3:]}
    await asyncio.gather(*(store.settle(calls.outcome(r, who, refund=r is new[0])) for r in old + new))
    assert await store.drain(5)
    spend = dict(db.rows("SELECT period_year_month, spent_micro_cents FROM mcpmeter_project_spend"
                         " WHERE project_id = %s", (who.project_id,)))
    assert int(spend["2026-11"]) == 3 * PRICE  # the old wallet's left-over came back when it was retired
    assert int(spend["2026-12"]) == 10 * PRICE - PRICE  # the new hold whole, less the refund
    await settle_all(store)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 96 * PRICE


async def test_one_sweep_goes_through_every_page_of_due_holds(db: Wallets) -> None:
    """Every hold made must be settled by a sweep: a sweep that took one page would fall behind the
    gateways granting more holds than that a sweep interval, for ever."""
    listing(db)
    who = [add_consumer(db, i, credit=10 * PRICE) for i in (1, 2, 3)]
    store = db.store
    assert isinstance(store, WalletStore)
    for w in who:
        await store.charge(call(w, 1, PRICE))
    store.config = dataclasses.replace(store.config, wallet_seconds=0)
    await asyncio.sleep(1.1)
    await store.settle_holds(limit=1)
    assert [balance(db, w) for w in who] == [9 * PRICE] * 3  # every stale wallet retired
    store.settle_after = 0.0
    assert await store.settle_holds(limit=1) == 3
    reconcile_holds(db, settled=True)


async def test_gateways_granting_at_once_never_refuse_a_consumer_who_can_pay(db: Wallets) -> None:
    """A grant whose FUND lost to another gateway's used to give its hold back and spend from the
    winner's wallet, which the winner's other calls could empty first, three times running: the call
    was refused (StoreUnavailable) though the consumer could pay. It is paid from its own hold now."""
    listing(db)
    who = add_consumer(db, 1, credit=10**6 * PRICE)
    stores = [db.store] + [db.open_store() for _ in range(5)]
    for store in stores:
        assert isinstance(store, WalletStore)
        store.config = dataclasses.replace(store.config, wallet_calls=1)  # a grant for every call: the worst case
    calls = Calls()
    reqs = [call(who, 1, PRICE) for _ in range(600)]
    results = await asyncio.gather(*(calls.charge(stores[i % 6], r)  # type: ignore[arg-type]
                                     for i, r in enumerate(reqs)), return_exceptions=True)
    assert [r for r in results if not isinstance(r, ChargeResult) or not r.accepted] == []
    await asyncio.gather(*(stores[i % 6].settle(calls.outcome(r, who)) for i, r in enumerate(reqs)))
    for store in stores:
        assert await store.drain(10)  # type: ignore[attr-defined]
    db.store = stores[0]
    await settle_all(stores[0])  # type: ignore[arg-type]
    reconcile_holds(db, settled=True)
    assert balance(db, who) == (10**6 - 600) * PRICE


async def test_a_consumer_whose_credit_sits_in_another_projects_wallet_is_not_refused(db: Wallets) -> None:
    """A consumer's projects share one balance, each with a wallet of its own: a grant for one project
    took all of a small balance, and the other project's calls were refused 402 (balance 0) for a
    wallet's life though the consumer could pay. A grant refused for credit retires the consumer's
    other wallets (their left-overs back to the balance) and tries once more."""
    listing(db)
    a = add_consumer(db, 1, credit=10 * PRICE)
    b = add_consumer(db, 1)  # a second project of the same user
    store = db.store
    assert isinstance(store, WalletStore)
    calls = Calls()
    first = call(a, 1, PRICE)
    assert (await calls.charge(store, first)).accepted
    assert balance(db, a) == 0  # project a's wallet holds it all
    other = call(b, 1, PRICE)
    result = await calls.charge(store, other)
    assert result.verdict is Verdict.DEBITED and result.balance == 8 * PRICE
    assert (await calls.charge(store, call(a, 1, PRICE))).accepted  # and project a goes on paying
    assert (await store.charge(call(b, 1, 8 * PRICE))).verdict is Verdict.INSUFFICIENT_CREDIT
    refused = await store.charge(call(b, 1, 8 * PRICE))
    assert (refused.verdict, refused.balance) == (Verdict.INSUFFICIENT_CREDIT, 7 * PRICE)
    reconcile_holds(db)


async def test_a_preview_counts_the_credit_in_the_consumers_wallet(db: Wallets) -> None:
    """Shadow mode and dry runs ask `preview`: it read the balance and the month's spend in MySQL only,
    where an open hold is taken whole, so a consumer whose wallet pays was shown insufficient_credit
    (or project_cap_exceeded) and a balance short of what the wallet holds."""
    listing(db)
    who = add_consumer(db, 1, credit=10 * PRICE, cap_cents=1)
    store = db.store
    assert isinstance(store, WalletStore)
    assert (await store.charge(call(who, 1, PRICE))).accepted
    assert balance(db, who) == 0
    seen = await store.preview(call(who, 1, PRICE))
    assert (seen.verdict, seen.balance, seen.spent) == (Verdict.DEBITED, 9 * PRICE, PRICE)
    charged = await store.charge(call(who, 1, PRICE))
    assert charged.balance == seen.balance - PRICE  # the charge decides as the preview said
    too_much = await store.preview(call(who, 1, 9 * PRICE))
    assert (too_much.verdict, too_much.balance) == (Verdict.INSUFFICIENT_CREDIT, 8 * PRICE)


async def test_an_input_required_round_held_by_a_stopped_gateway_is_billed_by_the_next(db: Wallets) -> None:
    """A held wallet call gets its journal row, marked (`hold`), as the journal store's: when the gateway
    holding it stops (a deploy), any gateway's held sweep settles it by the round's rule, billed
    (input_abandoned: its answer was delivered), against its hold. Without the row the hold gave its
    price back, and the publisher lost every round held across a restart."""
    listing(db)
    who = add_consumer(db, 1, credit=10 * PRICE)
    stopped = db.store
    assert isinstance(stopped, WalletStore)
    req = call(who, 1, PRICE)
    assert (await stopped.charge(req)).accepted
    assert await stopped.hold(req.request_id, "input_pending")
    assert await stopped.drain(5)
    stopped.close()  # a graceful stop: the held call stays for another gateway's sweep
    survivor = db.open_store()
    assert isinstance(survivor, WalletStore)
    await asyncio.sleep(1.1)
    await survivor.sweep(0.0, 0, held="input_pending", refund=False, reason="input_abandoned")
    await settle_all(survivor)
    assert balance(db, who) == 9 * PRICE  # billed, as the journal bills an abandoned round


async def test_held_wallet_calls_settle_once_by_their_gateway_or_by_the_sweep(db: Wallets) -> None:
    """A held call's marked row is flipped by its own gateway's settlement (not inserted twice), or by
    the held sweep when that comes first; either way once, against its hold, and the other finds it settled."""
    who, store, calls = consumer(db, 10 * PRICE)
    task, round_ = call(who, 1, PRICE), call(who, 1, PRICE)
    for r in (task, round_):
        assert (await calls.charge(store, r)).accepted
    assert await store.hold(task.request_id, "task_pending") and await store.hold(round_.request_id, "input_pending")
    assert db.rows("SELECT reason, settled_at FROM mcpmeter_calls ORDER BY reason") == [
        ("input_pending", None), ("task_pending", None)]
    await store.settle(calls.outcome(round_, who))  # its continuation came: billed by its gateway
    await asyncio.sleep(1.1)
    assert await store.sweep(0.0, 0, held="task_pending", refund=True, reason="task_expired") == 1
    await store.settle(calls.outcome(task, who, refund=True))  # too late: the sweep settled it
    assert await store.drain(5)
    rows = db.rows("SELECT request_id, refunded, reason, settled_at IS NOT NULL FROM mcpmeter_calls ORDER BY reason")
    assert rows == [(round_.request_id, 0, None, 1), (task.request_id, 1, "task_expired", 1)]
    assert db.value("SELECT COUNT(*) FROM usage_events") == 2
    refunds = db.rows("SELECT amount_micro_cents FROM credit_transactions WHERE type = 'refund'")
    assert [int(a) for a, in refunds] == [PRICE]
    await settle_all(store)
    reconcile_holds(db, settled=True)
    assert balance(db, who) == 9 * PRICE


async def test_the_rate_limit_and_the_spend_share_one_round_trip(db: Wallets) -> None:
    """charge_limited: one script run per call counts it and spends for it; a call the limit refuses
    spends nothing, and the limit is the very one RedisCache.hit judges (the same keys)."""
    from addon.cache.redis import RedisCache
    from addon.ratelimit import bucket, windows_for

    who, store, calls = consumer(db, 100 * PRICE)
    windows, where = windows_for(3, 1000), bucket(1, who.user_id)
    results = []
    for _ in range(4):
        req = call(who, 1, PRICE)
        verdict, result = await store.charge_limited(req, where, windows)
        results.append((verdict, result))
        if result is not None:
            calls.taken[req.request_id] = result
    assert [v.allowed for v, _ in results] == [True, True, True, False]
    assert [v.remaining for v, _ in results[:3]] == [2, 1, 0] and results[3][0].retry_after >= 1
    assert results[3][1] is None  # refused: nothing spent
    assert all(r is not None and r.verdict is Verdict.DEBITED and r.hold is not None for _, r in results[:3])
    assert store._rate_spend.round_trips == 4 and store._spend.round_trips == 0
    assert store.grants == 1  # the first call's wallet was empty: one grant, then spent from it
    wallet = scripts_key(store, who)
    with redisutil.client(store.config.redis) as r:
        assert int(r.hget(wallet, "left")) == 10 * PRICE - 3 * PRICE
    cache = RedisCache(store.config)
    try:
        assert not (await cache.hit(where, windows)).allowed  # the limit the gateway's other calls see
        assert (await cache.hit(bucket(2, who.user_id), windows)).allowed  # another listing: its own
    finally:
        await cache.close()
    await settle_all(store)
    reconcile_holds(db, settled=True)


async def test_a_call_the_limit_counted_and_a_grant_paid_is_counted_once(db: Wallets) -> None:
    """A wallet too empty to pay: the script counted the call, the grant pays it without counting it
    again (a wallet of one call: every call needs a grant)."""
    from addon.ratelimit import bucket, windows_for

    with wallets(wallet_calls=1) as one:
        who, store, _ = consumer(one, 100 * PRICE)
        windows = windows_for(2, 1000)
        verdicts = [await store.charge_limited(call(who, 1, PRICE), bucket(1, who.user_id), windows)
                    for _ in range(3)]
        assert [v.allowed for v, _ in verdicts] == [True, True, False]
        assert [r is not None and r.verdict is Verdict.DEBITED for _, r in verdicts] == [True, True, False]
        assert store.grants == 2


async def test_a_consumer_who_cannot_pay_is_counted_and_refused(db: Wallets) -> None:
    from addon.ratelimit import bucket, windows_for

    who, store, _ = consumer(db, PRICE // 2)
    verdict, result = await store.charge_limited(call(who, 1, PRICE), bucket(1, who.user_id), windows_for(5, 1000))
    assert verdict.allowed and verdict.remaining == 4  # counted, as when the limit was judged before the charge
    assert result is not None and result.verdict is Verdict.INSUFFICIENT_CREDIT and result.hold is None
    assert balance(db, who) == PRICE // 2
    reconcile_holds(db)


def scripts_key(store: WalletStore, who: Who) -> str:
    return wallet_scripts.wallet_key(store.config.redis.prefix, who.user_id, who.project_id)
