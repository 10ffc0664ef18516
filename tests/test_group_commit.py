"""Group commit: concurrent store work shares transactions without one job's fate touching another's."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from addon.config import Config
from addon.model import ChargeRequest, Verdict
from addon.store import StoreUnavailable
from addon.store.sqlite import SqliteStore

SEED = {"listings": [{"slug": "w", "upstream_url": "http://127.0.0.1:9/w", "status": "live", "transport": "streamable",
                      "upstream_headers": {}, "tool_prices": {}, "bill_tool_errors": False, "price_micro_cents": 1000,
                      "free_calls_per_consumer": 0, "rate_limit_per_minute": None, "rate_limit_per_day": None,
                      "upstream_timeout_seconds": None}],
        "consumers": [{"key": "mcpm_test_a1", "env": "test", "status": "active", "user_id": 1, "project_id": 1,
                       "credit_micro_cents": 20_000, "spending_cap_cents_per_month": None}]}


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStore(Config(sqlite_path=str(tmp_path / "g.db"), seed=SEED))
    transactions: list[int] = []
    run = s._run

    async def counted(fn: Any, commit: Any = lambda _: True) -> Any:
        transactions.append(1)
        return await run(fn, commit)

    s._run = counted  # type: ignore[method-assign]
    s.transactions = transactions  # type: ignore[attr-defined]
    yield s
    s.close()


def charge(price: int = 1000) -> ChargeRequest:
    return ChargeRequest(request_id=str(uuid.uuid4()), user_id=1, project_id=1, listing_id=1, tool_name="t",
                         price=price, free_allowance=0, period="2026-11")


async def test_concurrent_charges_share_transactions_and_never_overspend(store: Any) -> None:
    results = await asyncio.gather(*(store.charge(charge()) for _ in range(50)))
    assert sorted(r.verdict for r in results).count(Verdict.DEBITED) == 20
    assert await store.balance(1) == 0
    assert len(store.transactions) < 50 / 2, "concurrent jobs should have been batched"
    ledger = await store._run(lambda lg: lg._q("SELECT COUNT(*), SUM(amount_micro_cents) FROM credit_transactions"
                                               " WHERE type = 'usage'").fetchone())
    assert tuple(ledger) == (20, -20_000)


async def test_a_lone_job_runs_as_a_plain_transaction(store: Any) -> None:
    assert (await store.charge(charge())).verdict is Verdict.DEBITED
    assert len(store.transactions) == 1


async def test_a_failing_job_fails_alone(store: Any) -> None:
    def broken(ledger: Any) -> Any:
        ledger.topup(1, 5, "rolled back with its job")
        raise ValueError("a bug in one job")

    async def first() -> None:
        await store._submit(lambda lg: lg.balance(1))  # occupies the one slot so the rest queue up together

    outcomes = await asyncio.gather(first(), store._submit(broken), store.charge(charge()),
                                    return_exceptions=True)
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[2].verdict is Verdict.DEBITED
    assert await store.balance(1) == 19_000  # the broken job's top-up went with it


async def test_a_database_error_fails_every_job_of_its_batch(store: Any) -> None:
    def corrupt(ledger: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    outcomes = await asyncio.gather(store._submit(lambda lg: lg.balance(1)), store._submit(corrupt),
                                    store.charge(charge()), return_exceptions=True)
    assert isinstance(outcomes[1], StoreUnavailable) and isinstance(outcomes[2], StoreUnavailable)
    assert await store.balance(1) == 20_000  # nothing of the failed batch was committed


async def test_a_lone_job_whose_caller_is_cancelled_still_commits(store: Any) -> None:
    """The fast path for a lone job: cancelling its caller does not cut the transaction (it runs on
    the store's thread to its end, as a batched job does), and the next job runs after it."""
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_topup(ledger: Any) -> int:
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.2)
        return ledger.topup(1, 7, "committed though its caller left")

    caller = asyncio.ensure_future(store._submit(slow_topup))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert store._group._slots.locked()  # its slot stays taken until its transaction ends
    queued = asyncio.ensure_future(store.charge(charge()))  # waits for the slot, then goes
    await asyncio.sleep(0.05)
    assert not queued.done()
    assert (await queued).verdict is Verdict.DEBITED
    assert not store._group._slots.locked()
    assert (await store.charge(charge())).verdict is Verdict.DEBITED
    assert await store.balance(1) == 20_000 + 7 - 2000
