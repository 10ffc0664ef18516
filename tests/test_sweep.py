"""The sweeper's store side when the database goes away mid-sweep: one log line, and it stops."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addon.store import StoreUnavailable
from addon.store.sql import Ledger, utc

from .test_store_contract import FEE_BPS, Backend, add_consumer, add_listing, call, open_backend, reconcile

PRICE = 1000
STALE = 20


@pytest.fixture
async def swept(tmp_path: Path) -> Iterator[tuple[Backend, list[str]]]:
    """SQLite, with STALE calls charged an hour ago and never settled (their gateway died)."""
    with open_backend("sqlite", tmp_path) as db:
        who = add_consumer(db, 1, credit=STALE * PRICE)
        add_listing(db, 10, "w", price=PRICE)
        ids = []
        for _ in range(STALE):
            req = call(who, 10, PRICE)
            assert (await db.store.charge(req)).accepted
            ids.append(req.request_id)
        db.execute("UPDATE mcpmeter_calls SET created_at = %s", (utc(time.time() - 3600),))
        yield db, ids


def unsettled(db: Backend) -> int:
    return int(db.rows("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL")[0][0])


def sweep_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mcpmeter"]


async def test_a_database_gone_mid_sweep_stops_it_with_one_line(
        swept: tuple[Backend, list[str]], caplog: pytest.LogCaptureFixture) -> None:
    """The database drops after the sweep listed its calls and settled three: each later call failed
    alike and logged its own line (100 per sweep, every sweep). Now one line says how many, and the
    first error; the rest is left for the next sweep, which settles it once the database is back."""
    db, _ = swept
    store: Any = db.store
    submit, runs = store._submit, [0]

    async def failing(*args: Any, **kwargs: Any) -> Any:
        runs[0] += 1
        if runs[0] > 4:  # the listing, then three settlements
            raise StoreUnavailable("sqlite: disk I/O error")
        return await submit(*args, **kwargs)

    store._submit = failing
    with caplog.at_level(logging.WARNING, logger="mcpmeter"):
        assert await store.sweep(600, FEE_BPS) == 3
    assert runs[0] == 6  # the failed settlement and one probe: no attempt at the 16 calls after it
    lines = sweep_lines(caplog)
    assert len(lines) == 1, lines
    assert "3 of 20" in lines[0] and "disk I/O error" in lines[0] and "next sweep" in lines[0]
    assert unsettled(db) == STALE - 3
    store._submit = submit  # the database is back
    assert await store.sweep(600, FEE_BPS) == STALE - 3
    assert unsettled(db) == 0
    reconcile(db)


async def test_one_call_that_cannot_be_settled_is_skipped_with_one_line(
        swept: tuple[Backend, list[str]], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both stores report any database error as StoreUnavailable, one call's own too (a constraint its
    row breaks): that one call is skipped, as before, not the calls after it (listed oldest first, it
    would stop every later sweep); the database answers, so the sweep goes on."""
    db, ids = swept
    settle_stale = Ledger.settle_stale

    def poisoned(self: Ledger, request_id: str, *args: Any, **kwargs: Any) -> bool:
        if request_id in (ids[0], ids[5]):
            raise sqlite3.IntegrityError("FOREIGN KEY constraint failed")
        return settle_stale(self, request_id, *args, **kwargs)

    monkeypatch.setattr(Ledger, "settle_stale", poisoned)
    with caplog.at_level(logging.WARNING, logger="mcpmeter"):
        assert await db.store.sweep(600, FEE_BPS) == STALE - 2
    lines = sweep_lines(caplog)
    assert len(lines) == 1, lines
    assert "2 of 20" in lines[0] and "FOREIGN KEY" in lines[0] and ids[0] in lines[0]
    assert unsettled(db) == 2
