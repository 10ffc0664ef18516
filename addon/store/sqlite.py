"""The embedded store: one SQLite file, driven from one dedicated thread.

One writer thread serialises every transaction, which is what SQLite does anyway, and
keeps blocking file I/O off mitmproxy's event loop. The catalogue and test consumers
come from the YAML `seed` at start, so `mitmdump -s mcpmeter_addon.py` meters real
traffic with no database server.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, TypeVar

from ..auth import token_hash
from ..config import Config, ConfigError
from .base import StoreUnavailable
from .sql import SQLITE, Ledger, SqlStore, utc

T = TypeVar("T")

# A job for the store's thread: the loop to answer on, the future to answer, the transaction and its arguments.
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class SqliteStore(SqlStore):
    db_errors = (sqlite3.Error,)
    parallel = 1  # one writer thread: SQLite serialises writers anyway
    def __init__(self, config: Config) -> None:
        self.path = config.sqlite_path
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL still survives a crash of the gateway process (each commit is in the
            # WAL before it returns); only an OS crash or power loss may undo the last commits. It
            # halves the cost of a commit, which the embedded store pays twice per paid call.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(resources.files(__package__).joinpath("sqlite_schema.sql").read_text())
            _add_missing_columns(self._conn)
            self._ledger = Ledger(self._conn, SQLITE)
            self._transaction(lambda ledger: seed(ledger, config.seed))
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open the SQLite store at {self.path!r}: {e}") from None
        # The store's own thread, fed by a SimpleQueue and answering with call_soon_threadsafe: a hop
        # costs the event loop about 30 % less CPU than run_in_executor, which wraps a concurrent
        # Future and chains it to an asyncio one (103 fewer function calls per hop). Daemon, so that a
        # store never closed cannot hang the interpreter's exit (an unfinished transaction is rolled
        # back by SQLite); it holds only the queue, so a store dropped unclosed stops it.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # a job is queued before close's stop mark, or refused
        self._closed = False
        self._thread = threading.Thread(target=_work, args=(self._jobs,), name="mcpmeter-sqlite", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, self._jobs.put, None)  # the stop mark, put once

    async def _run(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        """One transaction on the store's thread. A cancelled caller does not cancel it: it runs to its
        end and its result is dropped."""
        loop = asyncio.get_running_loop()  # each job answers on its own loop: a store outlives a loop
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise StoreUnavailable("sqlite store is closed")
            self._jobs.put((loop, future, self._transaction, (fn, commit)))
        try:
            return await future
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite: {e}") from e

    def duplicate_key(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and "UNIQUE constraint failed" in str(error)

    def _transaction(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        # On the store's own thread (or the caller's, for the admin command and the seed).
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._ledger)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT" if commit(result) else "ROLLBACK")
        return result

    async def health(self) -> dict[str, object]:
        await self._run(lambda ledger: ledger.balance(0))
        return {"store": "sqlite", "ok": True}

    def close(self) -> None:
        """Run the jobs already queued, then stop the thread and close the file."""
        with self._lock:
            self._closed = True
            self._stop()
        self._thread.join()
        self._conn.close()


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """The store's thread: every job in order, each to its end, until the stop mark."""
    while (job := jobs.get()) is not None:
        _do(*job)
        del job  # idle, it holds neither the store nor a result


def _do(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], transaction: Callable[..., Any],
        args: tuple[Any, ...]) -> None:
    try:
        outcome = (future, True, transaction(*args))
    except BaseException as e:  # to its caller, as run_in_executor did
        outcome = (future, False, e)
    try:
        loop.call_soon_threadsafe(_answer, *outcome)
    except RuntimeError:  # its loop is closed: nobody is waiting for it
        pass


def _answer(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # its caller was cancelled: the result is dropped, an exception unseen
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def seed(ledger: Ledger, seed: Mapping[str, Any]) -> None:
    """Make the catalogue match the YAML; add consumers that are new. Balances are never reset."""
    now = utc()
    q = ledger._q
    for x in seed.get("listings", []):
        q(
            "INSERT INTO mcps (slug, name, upstream_url, upstream_headers, transport, status,"
            " free_calls_per_consumer, rate_limit_per_minute, rate_limit_per_day, upstream_timeout_seconds,"
            " bill_tool_errors, created_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            " ON CONFLICT (slug) DO UPDATE SET upstream_url = excluded.upstream_url,"
            " upstream_headers = excluded.upstream_headers, transport = excluded.transport,"
            " status = excluded.status, free_calls_per_consumer = excluded.free_calls_per_consumer,"
            " rate_limit_per_minute = excluded.rate_limit_per_minute,"
            " rate_limit_per_day = excluded.rate_limit_per_day,"
            " upstream_timeout_seconds = excluded.upstream_timeout_seconds,"
            " bill_tool_errors = excluded.bill_tool_errors, updated_at = excluded.updated_at",
            (x["slug"], x["slug"], x["upstream_url"], _json(x["upstream_headers"]), x["transport"], x["status"],
             x["free_calls_per_consumer"], x["rate_limit_per_minute"], x["rate_limit_per_day"],
             x["upstream_timeout_seconds"], int(x["bill_tool_errors"]), now, now),
        )
        mcp_id = q("SELECT id FROM mcps WHERE slug = %s", (x["slug"],)).fetchone()[0]
        q("DELETE FROM pricing_rules WHERE mcp_id = %s", (mcp_id,))
        rules = [(None, x["price_micro_cents"])] if x["price_micro_cents"] is not None else []
        rules += list(x["tool_prices"].items())
        for tool, price in rules:
            q("INSERT INTO pricing_rules (mcp_id, tool_name, price_micro_cents, created_at, updated_at)"
              " VALUES (%s, %s, %s, %s, %s)", (mcp_id, tool, price, now, now))
    for c in seed.get("consumers", []):
        new_user = q("SELECT 1 FROM users WHERE id = %s", (c["user_id"],)).fetchone() is None
        if new_user:
            q("INSERT INTO users (id, name, status, credit_micro_cents, created_at, updated_at)"
              " VALUES (%s, %s, %s, 0, %s, %s)", (c["user_id"], f"consumer {c['user_id']}", c["status"], now, now))
            if c["credit_micro_cents"]:
                ledger.topup(c["user_id"], c["credit_micro_cents"], "opening balance from the seed")
        else:
            q("UPDATE users SET status = %s WHERE id = %s", (c["status"], c["user_id"]))
        q("INSERT INTO projects (id, user_id, name, spending_cap_cents_per_month, created_at, updated_at)"
          " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
          " spending_cap_cents_per_month = excluded.spending_cap_cents_per_month",
          (c["project_id"], c["user_id"], f"project {c['project_id']}", c["spending_cap_cents_per_month"], now, now))
        q("INSERT OR IGNORE INTO api_keys (user_id, project_id, key_prefix, key_hash, env, created_at, updated_at)"
          " VALUES (%s, %s, %s, %s, %s, %s, %s)",
          (c["user_id"], c["project_id"], c["key"][:14], token_hash(c["key"]), c["env"], now, now))


def _json(value: dict[str, str]) -> str | None:
    import json

    return json.dumps(value) if value else None


# Columns added to the embedded schema after files were made with it: (table, column, type).
ADDED_COLUMNS = [("mcpmeter_calls", "reason", "TEXT")]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a store file made by an older mcpmeter up to sqlite_schema.sql (CREATE IF NOT EXISTS cannot)."""
    for table, column, kind in ADDED_COLUMNS:
        if column in {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as e:
            if "duplicate column" not in str(e):  # another process opening the file added it meanwhile
                raise
