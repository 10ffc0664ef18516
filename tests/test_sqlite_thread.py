"""The embedded store's thread: every job it takes runs to its end, in order, whatever its caller does."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addon.config import Config
from addon.store import StoreUnavailable
from addon.store.sqlite import SqliteStore
from tests.test_group_commit import SEED


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(Config(sqlite_path=str(tmp_path / "t.db"), seed=SEED))
    yield s
    s.close()


def slow_topup(amount: int, started: threading.Event | None = None, pause: float = 0.2) -> Any:
    def job(ledger: Any) -> int:
        if started is not None:
            started.set()
        time.sleep(pause)
        return ledger.topup(1, amount, "slow top-up")
    return job


def balance_on_disk(store: SqliteStore) -> int:
    conn = sqlite3.connect(store.path)
    try:
        return int(conn.execute("SELECT credit_micro_cents FROM users WHERE id = 1").fetchone()[0])
    finally:
        conn.close()


async def test_a_cancelled_caller_neither_cancels_nor_loses_its_transaction(store: SqliteStore) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    started = threading.Event()
    running = asyncio.ensure_future(store._run(slow_topup(7, started)))
    queued = asyncio.ensure_future(store._run(slow_topup(11, pause=0)))  # behind it, not started yet

    def failing(ledger: Any) -> None:
        time.sleep(0.05)
        raise ValueError("after its caller left")
    failed = asyncio.ensure_future(store._run(failing))
    await asyncio.to_thread(started.wait, 5)
    for caller in (running, queued, failed):
        caller.cancel()
    await asyncio.gather(running, queued, failed, return_exceptions=True)
    assert all(c.cancelled() for c in (running, queued, failed))
    assert await store._run(lambda ledger: ledger.balance(1)) == 20_000 + 7 + 11  # both ran, in order
    gc.collect()
    await asyncio.sleep(0)
    assert reported == []  # no "Future exception was never retrieved" for the failed one


async def test_an_exception_in_a_job_reaches_its_caller(store: SqliteStore) -> None:
    def broken(ledger: Any) -> None:
        ledger.topup(1, 5, "rolled back")
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        await store._run(broken)

    def corrupt(ledger: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(StoreUnavailable, match="disk I/O error"):
        await store._run(corrupt)
    assert await store.balance(1) == 20_000


async def test_close_runs_the_jobs_already_queued_then_refuses_new_ones(store: SqliteStore) -> None:
    started = threading.Event()
    callers = [asyncio.ensure_future(store._run(slow_topup(1, started)))]
    callers += [asyncio.ensure_future(store._run(slow_topup(10**i, pause=0.01))) for i in range(1, 5)]
    await asyncio.sleep(0)  # each caller has queued its job
    assert started.wait(5)
    store.close()  # blocks until the queue is empty, as ThreadPoolExecutor.shutdown(wait=True) did
    assert balance_on_disk(store) == 20_000 + 11_111
    assert [await c for c in callers] == [20_001, 20_011, 20_111, 21_111, 31_111]  # answered after the close
    with pytest.raises(StoreUnavailable, match="closed"):
        await store._run(lambda ledger: ledger.balance(1))
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.balance(1)  # through group commit
    store.close()  # twice is harmless


def test_the_store_outlives_an_event_loop_closed_under_a_job(store: SqliteStore) -> None:
    started = threading.Event()

    async def leave_a_job_running() -> None:
        asyncio.ensure_future(store._submit(slow_topup(3, started)))
        await asyncio.to_thread(started.wait, 5)
        # asyncio.run cancels the caller and closes the loop while the job still runs: its answer
        # has no loop to go to

    asyncio.run(leave_a_job_running())
    assert asyncio.run(store.balance(1)) == 20_003  # a new loop; the job committed


def test_a_store_dropped_unclosed_stops_its_thread(tmp_path: Path) -> None:
    s = SqliteStore(Config(sqlite_path=str(tmp_path / "d.db"), seed=SEED))
    thread = s._thread
    assert asyncio.run(s.balance(1)) == 20_000
    del s
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
