"""The benchmark's ledger check after a wallet run (bench/run.py check_wallet_ledger): a consistent
ledger passes, and each way money can go missing is reported. Its SQL is portable, so the tables it
reads are built here in SQLite with just the columns it reads (the smoke run checks it on MariaDB)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.run import PRICE, check_wallet_ledger, ledger_check, sqlite_query

TABLES = """
CREATE TABLE users (id INTEGER PRIMARY KEY, credit_micro_cents INTEGER NOT NULL);
CREATE TABLE credit_transactions (id INTEGER PRIMARY KEY, user_id INTEGER, amount_micro_cents INTEGER,
  type TEXT, reference_type TEXT, reference_id INTEGER, request_id TEXT);
CREATE TABLE mcpmeter_holds (id INTEGER PRIMARY KEY, user_id INTEGER, granted_micro_cents INTEGER,
  spent_micro_cents INTEGER DEFAULT 0, returned_micro_cents INTEGER DEFAULT 0, rest_micro_cents INTEGER,
  settled_at TEXT);
CREATE TABLE mcpmeter_calls (request_id TEXT PRIMARY KEY, verdict TEXT, amount_micro_cents INTEGER,
  refunded INTEGER DEFAULT 0, settled_at TEXT, reason TEXT, hold_id INTEGER);
CREATE TABLE usage_events (id INTEGER PRIMARY KEY, request_id TEXT, billed_micro_cents INTEGER);
"""
NOW = "2026-12-05 22:00:00"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """One consumer topped up with 100 calls' worth; a hold of 10 calls; 3 calls billed from it, one refunded."""
    conn = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    conn.executescript(TABLES)
    top, granted = 100 * PRICE, 10 * PRICE
    conn.execute("INSERT INTO users VALUES (1, ?)", (top - granted + PRICE,))
    conn.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type) VALUES (1, ?, 'topup')", (top,))
    conn.execute("INSERT INTO mcpmeter_holds (id, user_id, granted_micro_cents, spent_micro_cents,"
                 " returned_micro_cents) VALUES (7, 1, ?, ?, ?)", (granted, 3 * PRICE, PRICE))
    conn.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, reference_type, reference_id)"
                 " VALUES (1, ?, 'adjustment', 'mcpmeter_hold', 7)", (-granted,))
    for i in range(4):
        refunded = i == 3
        conn.execute("INSERT INTO mcpmeter_calls VALUES (?, 'debited', ?, ?, ?, ?, 7)",
                     (f"r{i}", PRICE, int(refunded), NOW, "upstream_error" if refunded else "result"))
        conn.execute("INSERT INTO usage_events (request_id, billed_micro_cents) VALUES (?, ?)",
                     (f"r{i}", 0 if refunded else PRICE))
    conn.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, request_id)"
                 " VALUES (1, ?, 'refund', 'r3')", (PRICE,))
    yield conn
    conn.close()


def check(conn: sqlite3.Connection, billed: int = 3) -> dict[str, object]:
    (path,) = [row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"]
    return check_wallet_ledger(sqlite_query(Path(path)), billed)


def test_a_consistent_wallet_ledger_passes(db: sqlite3.Connection) -> None:
    lg = check(db)
    assert (lg["ok"], lg["problems"]) == (True, [])
    assert (lg["holds"], lg["wallet_calls"], lg["refunded"], lg["per_call_debits"], lg["billed_micro_cents"]) \
        == (1, 4, 1, 0, 3 * PRICE)
    (path,) = [row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"]
    assert ledger_check(sqlite_query(Path(path)), 3, wallets=True) == lg


def test_a_settled_hold_must_account_for_all_it_granted(db: sqlite3.Connection) -> None:
    db.execute("UPDATE mcpmeter_holds SET rest_micro_cents = ?, settled_at = ?", (6 * PRICE, NOW))
    db.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, reference_type, reference_id)"
               " VALUES (1, ?, 'adjustment', 'mcpmeter_hold', 7)", (6 * PRICE,))
    db.execute("UPDATE users SET credit_micro_cents = credit_micro_cents + ?", (6 * PRICE,))
    assert check(db)["ok"]
    db.execute("UPDATE mcpmeter_holds SET rest_micro_cents = ?", (5 * PRICE,))  # 1 call's worth unaccounted for
    assert "holds not adding up" in " ".join(check(db)["problems"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("damage", "billed", "says"), [
    ("", 4, "the load generator saw 4 billed answers"),  # an answer said billed, no usage row bills it
    ("UPDATE usage_events SET billed_micro_cents = 2 * billed_micro_cents WHERE request_id = 'r0'", 3,
     "usage_events billed 4000"),
    ("UPDATE mcpmeter_calls SET hold_id = NULL WHERE request_id = 'r0'", 3, "1 calls charged one by one"),
    ("UPDATE mcpmeter_calls SET refunded = 1 WHERE request_id = 'r0'", 3, "without a non-refunded wallet call"),
    ("UPDATE mcpmeter_holds SET spent_micro_cents = spent_micro_cents - 1000", 3, "holds not adding up"),
    ("UPDATE mcpmeter_holds SET returned_micro_cents = 8000", 3, "holds not adding up"),  # 3 + 8 > 10 calls
    ("DELETE FROM credit_transactions WHERE reference_type = 'mcpmeter_hold'", 3, "balance != sum of ledger"),
    ("UPDATE users SET credit_micro_cents = credit_micro_cents + 1", 3, "balance != sum of ledger"),
    ("DELETE FROM credit_transactions WHERE type = 'refund'", 3, "1 refunded calls but 0 refund ledger rows"),
    ("DELETE FROM usage_events WHERE request_id = 'r3'", 3, "1 calls without theirs"),
    ("UPDATE mcpmeter_calls SET settled_at = NULL WHERE request_id = 'r3'", 3, "1 calls unsettled"),
])
def test_each_way_money_goes_missing_is_reported(db: sqlite3.Connection, damage: str, billed: int,
                                                 says: str) -> None:
    if damage:
        db.execute(damage)
    lg = check(db, billed)
    assert not lg["ok"]
    assert any(says in p for p in lg["problems"]), lg["problems"]  # type: ignore[attr-defined]


def test_billed_answers_without_any_hold_are_reported(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "empty.db", isolation_level=None)
    conn.executescript(TABLES)
    conn.close()
    lg = check_wallet_ledger(sqlite_query(tmp_path / "empty.db"), 2)
    assert "2 billed answers but no hold" in lg["problems"]


def test_the_wallet_scenarios_are_the_production_ones_with_the_wallet_store_on() -> None:
    from addon.config import load
    from bench.run import SCENARIOS, WALLETS, production_env

    assert set(WALLETS) <= set(SCENARIOS)  # so a default or --quick run includes them
    assert [w.replace("wallets", "production") for w in WALLETS] == \
        ["gateway-production", "gateway-production-x2", "gateway-production-x2-nginx"]
    db = {"mysql": {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}, "database": "scratch",
          "redis": {"host": "127.0.0.1", "port": 6379, "db": 2}, "prefix": "mcpmeter-bench:x:"}
    production, wallets = production_env(db), production_env(db, wallets=True)
    assert wallets == {**production, "MCPMETER_WALLETS": "1"}
    assert (load(None, production).wallets, load(None, wallets).wallets) == (False, True)
