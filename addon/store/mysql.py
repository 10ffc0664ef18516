"""The production store: MySQL 8 / MariaDB, shared by every gateway instance, through pymysql and aiomysql.

A paid call's transactions run on mitmproxy's event loop through aiomysql (mysql_loop.py): the
charge and a settlement are one CALL each of a stored procedure (mysql_trip.py),
and billed settlements that queue up under load go together, many calls per transaction
(mysql_batch.py). Everything else (lookups, the Ledger's statement-by-statement settlements, the
sweeper, the commands; sql.py, the same SQL as the embedded store) runs on a bounded pool of worker
threads, each holding its own pymysql connection, off the event loop. The database serialises what
must be serialised: the conditional UPDATEs lock the rows they test, so any number of gateways can
share one database without overspending.

When the server cannot be reached, calls fail fast with StoreUnavailable (the gateway
answers 503 and forwards nothing) and the store reconnects by itself once it is back. A
database the reference gateway created is upgraded in place at start: the meter's
additive columns, keys and tables (ADDITIONS, mirrored in schema.sql) are added if missing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pymysql

from ..config import Config, ConfigError, MysqlSettings
from ..model import ChargeRequest, ChargeResult, Settlement
from . import mysql_batch, mysql_trip
from .base import OutcomeUnknown, StoreUnavailable
from .mysql_conn import (ATTEMPTS, CONNECT_TIMEOUT, DENIED, DOWN_FOR, IO_TIMEOUT, RETRY_BUDGET, RETRYABLE,
                         UNKNOWN_DB, code, connect_args, gone, reason)
from .mysql_loop import LoopConnections
from .sql import MYSQL, LastUsed, Ledger, SqlStore
from . import wallet_sql
from .sql import SWEPT
from .wallet_sql import HOLDS_DDL

T = TypeVar("T")
log = logging.getLogger("mcpmeter")

# The meter's additive schema, mirrored in schema.sql (tests compare the two). Applied at start to
# any database that lacks it, e.g. one the reference's Laravel app created.
ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "mcps": [("bill_tool_errors", "`bill_tool_errors` tinyint(1) NOT NULL DEFAULT '0'")],
    "credit_transactions": [("request_id", "`request_id` varchar(64) COLLATE utf8mb4_unicode_ci DEFAULT NULL")],
    # A journal made before settlements kept their reason (a new journal is made with it, below).
    "mcpmeter_calls": [("reason", "`reason` varchar(32) COLLATE utf8mb4_unicode_ci DEFAULT NULL"),
                       # The hold a wallet call spent from (wallets.py); NULL for calls the journal charged.
                       ("hold_id", "`hold_id` bigint unsigned DEFAULT NULL")],
}
ADDED_UNIQUE_KEYS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "credit_transactions": [("credit_transactions_request_id_type_unique", ("request_id", "type"))],
    "usage_events": [("usage_events_request_id_unique", ("request_id",))],
}
ADDED_TABLES = [
    """CREATE TABLE IF NOT EXISTS `mcpmeter_calls` (
  `request_id` varchar(64) COLLATE utf8mb4_unicode_ci NOT NULL,
  `user_id` bigint unsigned NOT NULL,
  `project_id` bigint unsigned NOT NULL,
  `mcp_id` bigint unsigned NOT NULL,
  `tool_name` varchar(191) COLLATE utf8mb4_unicode_ci NOT NULL,
  `verdict` varchar(20) COLLATE utf8mb4_unicode_ci NOT NULL,
  `amount_micro_cents` bigint NOT NULL,
  `period_year_month` varchar(7) COLLATE utf8mb4_unicode_ci NOT NULL,
  `status` smallint unsigned DEFAULT NULL,
  `refunded` tinyint(1) NOT NULL DEFAULT '0',
  `created_at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `settled_at` timestamp NULL DEFAULT NULL,
  `reason` varchar(32) COLLATE utf8mb4_unicode_ci DEFAULT NULL,
  `hold_id` bigint unsigned DEFAULT NULL,
  PRIMARY KEY (`request_id`),
  KEY `mcpmeter_calls_user_id_created_at_index` (`user_id`,`created_at`),
  KEY `mcpmeter_calls_settled_at_created_at_index` (`settled_at`,`created_at`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci""",
    """CREATE TABLE IF NOT EXISTS `mcpmeter_project_spend` (
  `project_id` bigint unsigned NOT NULL,
  `period_year_month` varchar(7) COLLATE utf8mb4_unicode_ci NOT NULL,
  `spent_micro_cents` bigint NOT NULL DEFAULT '0',
  PRIMARY KEY (`project_id`,`period_year_month`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci""",
    HOLDS_DDL,
]
# Reference tables the gateway reads or writes: without them the database was never initialised.
REQUIRED_TABLES = ("users", "projects", "api_keys", "oauth_access_tokens", "mcps", "pricing_rules",
                   "usage_events", "credit_transactions", "mcp_consumer_usage")


class MysqlStore(SqlStore):
    db_errors = (pymysql.Error,)
    # One job per transaction: jobs of several calls in one transaction take row locks in an order
    # no single job would (a refund's users row, then a charge's usage row), and concurrent batches
    # deadlock (measured). Single jobs all lock usage rows, then users, then spend: they never do.
    # Throughput comes from the pool's parallel transactions, and InnoDB group-commits them itself.
    max_batch = 1

    def __init__(self, config: Config) -> None:
        self.settings = config.mysql
        self.parallel = self.settings.pool_size
        if self.settings.pool_size < 1:
            raise ConfigError(f"mysql.pool_size must be at least 1, not {self.settings.pool_size}")
        self.where = f"{self.settings.host}:{self.settings.port}/{self.settings.database}"
        self._last_used = LastUsed()
        self.retries = 0  # transactions run again after a deadlock or lock wait timeout
        self._pool = ThreadPoolExecutor(max_workers=self.settings.pool_size, thread_name_prefix="mcpmeter-mysql")
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _conns
        self._schema_lock = threading.Lock()
        self._conns: set[pymysql.connections.Connection] = set()
        self._down_until = 0.0
        self._down_reason = ""
        self._schema_ready = False
        self._closed = False
        self._billed: BilledBatches | None = None
        self._abandoned_after = wallet_sql.abandoned_after(config)
        self._hot = LoopConnections(self, self.settings.pool_size)  # the per-call transactions (mysql_loop.py)
        self._charges = ChargeBatches(self)
        if config.seed.get("listings") or config.seed.get("consumers"):
            log.warning("mcpmeter: the YAML seed is for the embedded SQLite store; the MySQL store ignores it "
                        "(catalogue and consumers live in the database)")
        try:
            conn = self._connect()
        except pymysql.Error as e:
            if code(e) in DENIED or code(e) == UNKNOWN_DB:
                raise ConfigError(_config_message(self.settings, e)) from None
            self.mark_down(e)
            log.warning("mcpmeter: MySQL at %s is unreachable (%s); calls get 503 until it is back",
                        self.where, reason(e))
            return
        try:
            self._ensure_schema(conn)
        except pymysql.Error as e:  # lost mid-way: the first connection of a worker tries again
            log.warning("mcpmeter: cannot check the MySQL schema at %s yet: %s", self.where, reason(e))
        finally:
            _close_quietly(conn)

    # --- connections (worker threads) ---------------------------------------------------

    def _connect(self) -> pymysql.connections.Connection:
        conn = pymysql.connect(database=self.settings.database, read_timeout=CONNECT_TIMEOUT,
                               write_timeout=CONNECT_TIMEOUT, **connect_args(self.settings))
        # The handshake ran under CONNECT_TIMEOUT, so a server that accepts but never answers
        # fails fast; statements get longer. pymysql applies these on each read and write.
        conn._read_timeout = conn._write_timeout = IO_TIMEOUT  # type: ignore[attr-defined]  # private, not in types-PyMySQL
        return conn

    def mark_down(self, e: BaseException) -> None:
        self._down_reason = reason(e)
        self._down_until = time.monotonic() + DOWN_FOR

    def raise_if_down(self) -> None:
        if time.monotonic() < self._down_until:
            raise self._unavailable()

    def _unavailable(self) -> StoreUnavailable:
        return StoreUnavailable(f"mysql at {self.where} unreachable: {self._down_reason}")

    def _connection(self) -> tuple[pymysql.connections.Connection, bool]:
        """This worker's connection and whether it was reused; opens one if needed, fast-failing while down."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        self.raise_if_down()
        try:
            conn = self._connect()
        except pymysql.Error as e:
            self.mark_down(e)
            raise self._unavailable() from e
        if not self._schema_ready:
            try:
                self._ensure_schema(conn)
            except (ConfigError, pymysql.Error) as e:
                _close_quietly(conn)
                self.mark_down(e)
                log.error("mcpmeter: cannot prepare the MySQL schema at %s: %s", self.where, e)
                raise StoreUnavailable(f"mysql schema: {e}") from e
        self._local.conn = conn
        with self._lock:
            self._conns.add(conn)
        return conn, False

    def _drop(self, conn: pymysql.connections.Connection) -> None:
        """Forget a connection that failed; the next transaction on this worker opens a new one."""
        self._local.conn = None
        with self._lock:
            self._conns.discard(conn)
        _close_quietly(conn)

    def _abort(self, conn: pymysql.connections.Connection, error: BaseException | None = None) -> None:
        if error is not None and gone(error, not conn.open):
            self._drop(conn)
            return
        try:
            conn.rollback()
        except Exception:
            self._drop(conn)

    def duplicate_key(self, error: BaseException) -> bool:
        return isinstance(error, pymysql.err.IntegrityError) and code(error) == 1062

    def _transaction(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        attempt, started = 0, time.monotonic()
        while True:
            attempt += 1
            conn, reused = self._connection()
            try:
                result = fn(Ledger(conn, MYSQL, self._last_used))
            except pymysql.Error as e:
                self._abort(conn, e)
                retry = attempt < ATTEMPTS and time.monotonic() - started < RETRY_BUDGET
                if code(e) in RETRYABLE and retry:
                    self.retries += 1
                    log.debug("mcpmeter: mysql %s, running the transaction again (%d)", reason(e), attempt)
                    time.sleep(random.uniform(0.001, 0.005) * attempt)
                    continue
                if reused and gone(e, not conn.open):
                    # A pooled connection the server dropped (restart, idle timeout): the transaction
                    # runs again on a new connection, once. Its COMMIT is sent below, after `fn`, so the
                    # first run did not land. (The one-trip jobs, which carry their COMMIT and may have
                    # landed, run on the event loop: mysql_loop.py, mysql_trip.py.)
                    continue
                raise StoreUnavailable(f"mysql: {reason(e)}") from e
            except BaseException:
                self._abort(conn)
                raise
            try:
                if commit(result):
                    conn.commit()
                else:
                    conn.rollback()
            except pymysql.Error as e:
                # The outcome of an interrupted COMMIT is unknown: never run it again. A charge that
                # did commit is explained by its ledger and journal rows (request id).
                self._abort(conn, e)
                raise OutcomeUnknown(f"mysql: {reason(e)}") from e
            return result

    # --- schema ------------------------------------------------------------------------------

    def _ensure_schema(self, conn: pymysql.connections.Connection) -> None:
        """Add the meter's columns, unique keys and tables where missing. Idempotent, concurrent-safe."""
        with self._schema_lock:
            if not self._schema_ready:
                ensure_schema(conn, self.settings)
                conn.rollback()  # end the information_schema reads' transaction
                self._schema_ready = True

    # --- the Store protocol (event loop) -------------------------------------------------------

    async def _run(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        if self._closed:
            raise StoreUnavailable("mysql store is closed")
        if time.monotonic() < self._down_until and not self._conns:
            raise self._unavailable()  # no queueing behind connect attempts known to fail
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._transaction, fn, commit)
        except RuntimeError as e:  # the pool was shut down
            raise StoreUnavailable(f"mysql store is closed: {e}") from e

    async def prepare(self) -> None:
        """The schema checked (the charge procedure made) before the event loop's first connection."""
        if not self._schema_ready:
            await self._run(lambda ledger: None)  # a worker's first connection prepares it

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        # One round trip: the decisions are made in SQL and a refusal writes nothing (mysql_trip.py);
        # under load, the charges that queue meanwhile share the next one (ChargeBatches).
        return await self._charges.charge(request)

    async def charge_alone(self, request: ChargeRequest) -> ChargeResult:
        return await self._hot.run(lambda conn: mysql_trip.charge(conn, request))

    async def charge_batch(self, batch: list[ChargeRequest]) -> list[ChargeResult]:
        order = mysql_trip.batch_order(batch)  # ValueError for a batch that does not fit, before any work
        return await self._hot.run(lambda conn: mysql_trip.charge_batch(conn, batch, order))

    async def settle(self, settlement: Settlement) -> int | None:
        if settlement.taken is not None and settlement.taken.hold is not None:
            # A wallet call (wallets.py) whose store closed since, wallets turned off: recorded as its store would.
            await self._run(functools.partial(wallet_sql.record, batch=[settlement]))
            return await self.balance(settlement.charge.user_id) if settlement.need_balance else None
        if mysql_batch.batchable(settlement):
            if self._billed is None:
                self._billed = BilledBatches(self)
            if await self._billed.submit(settlement):
                return None
        return await self._settle(settlement)

    async def sweep(self, older_than_seconds: float, fee_bps: int, limit: int = 100, held: str | None = None,
                    refund: bool = True, reason: str = SWEPT) -> int:
        done = await super().sweep(older_than_seconds, fee_bps, limit, held, refund, reason)
        if held is None:
            # Holds no gateway with wallets settled (wallets turned off): their credit back to the consumer.
            holds = await self._run(functools.partial(wallet_sql.abandoned, older_than=self._abandoned_after))
            if settled := sum([await self._run(functools.partial(wallet_sql.abandon, hold=h)) for h in holds]):
                log.warning("mcpmeter: %d abandoned wallet hold(s) settled", settled)
        return done

    def _settle_stale(self, ledger: Ledger, request_id: str, fee_bps: int, refund: bool, reason: str) -> bool:
        # A wallet call's row (held, wallet_sql.mark_held) settles against its hold, not the balance.
        done = wallet_sql.settle_stale(ledger, request_id, fee_bps, refund, reason)
        return ledger.settle_stale(request_id, fee_bps, refund, reason) if done is None else done

    async def settle_billed(self, batch: list[Settlement]) -> list[bool]:
        """Billed settlements in one transaction (mysql_batch.py); one alone takes the one-trip path."""
        if len(batch) == 1:
            await self._settle(batch[0])
            return [True]
        return await self._hot.run(lambda conn: mysql_batch.settle_billed(conn, batch, self._last_used),
                                   round_trips=2)

    async def _settle(self, s: Settlement) -> int | None:
        """One round trip when the journal holds the unsettled call `s.taken` describes (the common
        case); otherwise (settled before, no `taken`, or a journal that disagrees) the Ledger's
        statements, which read what was really taken, in a transaction of their own."""
        if s.taken is not None:
            settled, balance = await self._hot.run(lambda conn: mysql_trip.settle(conn, s, self._last_used))
            if settled:
                return balance
        return await self._submit(lambda ledger: ledger.settle(s))

    async def health(self) -> dict[str, object]:
        info: dict[str, object] = {"store": "mysql", "database": self.where, "retries": self.retries}
        info["charge_batches"] = {"transactions": self._charges.batches, "charges": self._charges.batched}
        if self._billed is not None:
            info["billed_batches"] = {"transactions": self._billed.batches, "settlements": self._billed.batched}
        try:
            await self._run(lambda ledger: ledger.balance(0))
        except StoreUnavailable as e:
            return {**info, "ok": False, "error": str(e)}
        return {**info, "ok": True}

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)  # queued transactions finish, as in the SQLite store
        self._hot.close()  # the loop's idle connections; a job under way ends, then closes its own
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            _close_quietly(conn)


class BilledBatches:
    """Billed settlements queue here and go together in one transaction (mysql_batch.py): under
    load, those that queue while a batch is written share the next one. Settlements written in the
    background (the answer left already, nobody waits) also wait up to one flush interval for
    others to join: at low load too, calls share a transaction instead of paying a round trip and a
    COMMIT each. One batch at a time per gateway, so the queue, not the pool, absorbs a burst.

    A crash loses what waits here: the calls' journal rows stay unsettled and the sweeper refunds
    them, so the consumer never pays for them and the publisher loses the billed calls not written
    yet: one flush interval's, the batch being written and, under a load MySQL cannot keep up with,
    the backlog queued behind it (bounded by settlement.MAX_BACKGROUND_SETTLEMENTS)."""

    MAX = 200  # settlements per transaction (the statements grow with it; the lock time too)
    FLUSH_SECONDS = 0.02  # how long background settlements wait for others to share their transaction

    def __init__(self, store: MysqlStore) -> None:
        self._store = store
        self._queue: deque[tuple[Settlement, asyncio.Future[bool]]] = deque()
        self._writer: asyncio.Future[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # set: the flush interval ends now
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # transactions of more than one settlement written (for /health)
        self.batched = 0  # the settlements they carried

    async def submit(self, settlement: Settlement) -> bool:
        """True once written in a batch; False if the batch left it out (settle it alone)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a store used from a new loop: the old one's queue and writer died with it
            self._loop, self._queue, self._writer, self._wake = loop, deque(), None, None
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.append((settlement, future))
        if (not settlement.background or len(self._queue) >= self.MAX) and self._wake and not self._wake.done():
            self._wake.set_result(None)  # a hook waits for this one, or the batch is full: no more waiting
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        return await future

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if len(self._queue) < self.MAX and all(s.background for s, _ in self._queue):
                    self._wake = loop.create_future()
                    timer = loop.call_later(self.FLUSH_SECONDS, _wake_up, self._wake)
                    try:
                        await self._wake
                    finally:
                        timer.cancel()
                        self._wake = None
                await self._write_one()
        except BaseException:
            for _, future in self._queue:  # cancelled (the loop is closing): their owners stop too
                future.cancel()
            self._queue.clear()
            raise

    async def _write_one(self) -> None:
        jobs = [self._queue.popleft() for _ in range(min(self.MAX, len(self._queue)))]
        try:
            done = await self._store.settle_billed([s for s, _ in jobs])
        except Exception as e:
            # The batch was rolled back. Each settlement now goes alone: one that cannot be
            # written (a listing deleted mid-call, say) fails by itself, and never takes the
            # delivered, billed calls batched with it to the sweeper's refund.
            log.warning("mcpmeter: a batch of %d billed settlements failed (%s); settling each alone",
                        len(jobs), e)
            done = [False] * len(jobs)
        except BaseException:
            for _, future in jobs:
                future.cancel()
            raise
        if len(jobs) > 1:
            self.batches += 1
            self.batched += sum(done)
        for (_, future), ok in zip(jobs, done, strict=True):
            if not future.done():
                future.set_result(ok)


def _wake_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


class ChargeBatches:
    """Charges that arrive while one is being written queue here and go together in the next
    transaction (mysql_trip.charge_batch): one round trip and one COMMIT for many calls under load,
    measured at about half of MariaDB's CPU per charge (0.43-0.49 ms alone, 0.21-0.25 ms in batches
    of 16-32). A charge with nothing under way goes at once, alone, from its caller (no task): at
    concurrency 1 nothing changes. One transaction at a time per gateway: the queue absorbs a burst."""

    MAX = 64  # charges per transaction: their row locks are held until its COMMIT

    def __init__(self, store: MysqlStore) -> None:
        self._store = store
        self._queue: deque[tuple[ChargeRequest, asyncio.Future[ChargeResult]]] = deque()
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.Task[None] | None = None  # a strong reference (the loop keeps weak ones)
        self.batches = 0  # transactions of more than one charge written (for /health)
        self.batched = 0  # the charges they carried

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a store used from a new loop: the old one's queue died with it
            self._loop, self._busy, self._queue = loop, False, deque()
        if self._busy:
            future: asyncio.Future[ChargeResult] = loop.create_future()
            self._queue.append((request, future))
            return await future
        self._busy = True
        try:
            return await self._store.charge_alone(request)
        finally:
            self._next()

    def _next(self) -> None:
        """The charges queued meanwhile go next, in a writer task; with none, the store is free."""
        if self._queue:
            self._writer = asyncio.ensure_future(self._write())
        else:
            self._busy = False

    async def _write(self) -> None:
        jobs: list[tuple[ChargeRequest, asyncio.Future[ChargeResult]]] = []
        try:
            while self._queue:
                jobs = self._take()
                if jobs:
                    await self._run(jobs)
        except BaseException:
            for _, future in [*jobs, *self._queue]:  # cancelled (the loop is closing): their callers stop too
                future.cancel()
            self._queue.clear()
            raise
        finally:
            self._busy = False

    def _take(self) -> list[tuple[ChargeRequest, asyncio.Future[ChargeResult]]]:
        """The next batch: up to MAX queued charges, in arrival order, each user's on one listing
        (mysql_trip.fits; the others stay first in the queue). A charge whose caller went away
        before its transaction began is dropped, unwritten."""
        jobs: list[tuple[ChargeRequest, asyncio.Future[ChargeResult]]] = []
        later: list[tuple[ChargeRequest, asyncio.Future[ChargeResult]]] = []
        listings: dict[int, int] = {}
        while self._queue and len(jobs) < self.MAX:
            job = self._queue.popleft()
            if not job[1].done():
                (jobs if mysql_trip.fits(listings, job[0]) else later).append(job)
        self._queue.extendleft(reversed(later))
        return jobs

    async def _run(self, jobs: list[tuple[ChargeRequest, asyncio.Future[ChargeResult]]]) -> None:
        requests = [request for request, _ in jobs]
        outcomes: list[ChargeResult | BaseException]
        try:
            if len(jobs) == 1:
                outcomes = [await self._store.charge_alone(requests[0])]
            else:
                outcomes = list(await self._store.charge_batch(requests))
                self.batches += 1
                self.batched += len(jobs)
        except Exception as e:
            if len(jobs) == 1:
                outcomes = [e]
            else:
                # The batch failed and was rolled back (or, its connection lost after the COMMIT was
                # sent, perhaps committed: then each charge alone answers what the batch decided, see
                # mysql_trip.py on running a charge again). Each charge now goes alone, one after the
                # other (at once, lone charges of one user deadlock on its free-tier row): one that
                # cannot be written (a request id of a settled call) fails by itself.
                log.warning("mcpmeter: a batch of %d charges failed (%s); charging each alone", len(jobs), e)
                outcomes = []
                for request in requests:
                    try:
                        outcomes.append(await self._store.charge_alone(request))
                    except Exception as alone:
                        outcomes.append(alone)
        for (_, future), outcome in zip(jobs, outcomes, strict=True):
            if future.done():
                continue  # its caller went away mid-transaction: the sweeper refunds a debit nobody settles
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def ensure_schema(conn: pymysql.connections.Connection, settings: MysqlSettings) -> None:
    """Bring a reference database up to the meter's schema; only what is missing is added."""
    cur = conn.cursor()
    cur.execute("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()")
    tables = {str(r[0]).lower() for r in cur.fetchall()}
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise ConfigError(
            f"MySQL database DB_NAME={settings.database!r} has no table(s) {', '.join(missing)}: "
            f"initialise it with schema.sql (mysql -h {settings.host} -u {settings.user} "
            f"{settings.database} < schema.sql)")
    cur.execute("SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()")
    columns = {(str(t).lower(), str(c).lower()) for t, c in cur.fetchall()}
    cur.execute(
        "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND NON_UNIQUE = 0 ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX"
    )
    unique: dict[tuple[str, str], list[str]] = {}
    for table, index, column in cur.fetchall():
        unique.setdefault((str(table).lower(), str(index)), []).append(str(column).lower())
    for table in sorted((set(ADDED_COLUMNS) | set(ADDED_UNIQUE_KEYS)) & tables):  # the rest are made below
        clauses = [f"ADD COLUMN {ddl}" for name, ddl in ADDED_COLUMNS.get(table, []) if (table, name) not in columns]
        clauses += [
            f"ADD UNIQUE KEY `{name}` ({', '.join(f'`{c}`' for c in cols)})"
            for name, cols in ADDED_UNIQUE_KEYS.get(table, [])
            if not any(t == table and tuple(c) == cols for (t, _), c in unique.items())
        ]
        if clauses:
            _alter(cur, settings, f"ALTER TABLE `{table}` {', '.join(clauses)}")
    for ddl in ADDED_TABLES:
        # Only a missing one: even CREATE TABLE IF NOT EXISTS needs CREATE and a writable server.
        if ddl.split("`", 2)[1] not in tables:
            _alter(cur, settings, ddl)
    cur.execute("SELECT ROUTINE_NAME FROM information_schema.ROUTINES"
                " WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_TYPE = 'PROCEDURE'")
    present = {str(r[0]) for r in cur.fetchall()}
    for name, ddl in mysql_trip.PROCEDURES.items():
        if name not in present:
            _alter(cur, settings, ddl)


def _alter(cur: Any, settings: MysqlSettings, ddl: str) -> None:
    try:
        cur.execute(ddl)
        log.info("mcpmeter: upgraded the MySQL schema: %s", ddl.split("(")[0].strip())
    except pymysql.Error as e:
        error = code(e)
        if error in (1060, 1061, 1304):  # duplicate column, key or procedure: another gateway added it meanwhile
            return
        if error == 1062:
            # Existing rows repeat a request id, so the unique key cannot be added. Refunds stay
            # exactly once (the call journal decides them); only the belt-and-braces key is missing.
            log.warning("mcpmeter: cannot add a unique key (%s); duplicate rows exist: %s", ddl, reason(e))
            return
        if error in (1142, 1044, 1045, 1370):
            raise ConfigError(
                f"MySQL user DB_USER={settings.user!r} may not change the schema of DB_NAME="
                f"{settings.database!r} ({reason(e)}); run schema.sql's additions as an administrator "
                "or grant ALTER, CREATE and CREATE ROUTINE") from None
        raise


def _close_quietly(conn: pymysql.connections.Connection) -> None:
    try:
        conn.close()
    except Exception:  # already closed, or the server is gone: nothing to release
        pass


def _config_message(s: MysqlSettings, e: BaseException) -> str:
    if code(e) == UNKNOWN_DB:
        return (f"MySQL database DB_NAME={s.database!r} does not exist on {s.host}:{s.port}; create it "
                f"and load schema.sql (see its header), or set DB_NAME: {reason(e)}")
    return (f"MySQL refused DB_USER={s.user!r} (DB_PASSWORD {'set' if s.password else 'empty'}) for "
            f"DB_NAME={s.database!r} on {s.host}:{s.port}: {reason(e)}")
