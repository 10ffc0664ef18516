"""The MySQL store's per-call transactions on mitmproxy's event loop, through aiomysql: no thread hop.

A charge and a settlement (one CALL each) and a batch of billed settlements
(two round trips) send all their statements at once (mysql_trip.py, mysql_batch.py): what is left
on the client is writing a packet and parsing a few small ones, which costs less than handing the
work to a worker thread and back. Measured with the store alone, 32 concurrent charges on this
2-core machine: 0.48 ms of the gateway's CPU per charge through pymysql on the thread pool, 0.20 to
0.25 ms through aiomysql (pymysql's protocol code, driven by asyncio) on the loop, and 1.3 to
1.7 times the charges per second. The Ledger's statement-by-statement work (sql.py: lookups,
refunds the journal disagrees with, the sweeper, the commands) stays on the thread pool.

The rules are the thread pool's (mysql.py `_transaction`), with one difference: a deadlock victim
or a lock wait timeout runs again; a lost connection, pooled or brand-new (the thread pool runs again
only on a pooled one), runs the job again once, on a new connection: a job's COMMIT is in its text,
so a lost answer may hide work that landed, which only running it again tells, and every job here is
a whole transaction that is safe to run twice even then (a settlement's flip matches nothing, and a
charge finds its request's journal row and answers what the first run decided, writing nothing; see
mysql_trip.py); a failed connect marks the store down for DOWN_FOR seconds, and a job whose round
trips take longer than IO_TIMEOUT each fails with its connection closed. A job runs to its end even if its caller is
cancelled meanwhile, as on a worker thread, so a settlement is never cut off half-way; closing the
store closes the idle connections, and those of jobs under way when they end. Only the loop's own
shutdown cancels a job mid-way: its connection is closed, and what the server did with the text
is decided by its COMMIT, as for a lost connection; the journal explains it (the sweeper refunds a
charge nobody settled).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiomysql
import pymysql
from pymysql.constants import COMMAND

from .base import StoreUnavailable
from .mysql_conn import (ATTEMPTS, CANNOT_CONNECT, CONNECT_TIMEOUT, IO_TIMEOUT, LOST, RETRY_BUDGET, RETRYABLE, code,
                         connect_args, gone, reason)

if TYPE_CHECKING:
    from .mysql import MysqlStore

T = TypeVar("T")
Job = Callable[[Any], Awaitable[T]]  # a whole transaction on one aiomysql connection, COMMIT included


class LoopConnections:
    """Up to `size` aiomysql connections of one event loop, each carrying one job at a time."""

    def __init__(self, store: MysqlStore, size: int) -> None:
        self._store = store
        self._size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Any] = []
        self._closed = False
        self._jobs: set[asyncio.Future[Any]] = set()
        self.open: set[Any] = set()  # every live connection, idle or busy (closed by `close`)

    async def run(self, job: Job[T], round_trips: int = 1) -> T:
        """Run `job` to its end even if the caller is cancelled meanwhile (as a worker thread would):
        a settlement's write is never cut off half-way because its waiter went away."""
        self._bind()
        task = asyncio.ensure_future(self._run(job, IO_TIMEOUT * round_trips))
        if not task.done():
            self._jobs.add(task)  # a strong reference: the loop keeps only weak ones
            task.add_done_callback(self._jobs.discard)
            task.add_done_callback(_finished)
        return await asyncio.shield(task)

    async def _run(self, job: Job[T], timeout: float) -> T:
        async with self._slots:
            attempt, started, reconnected, fresh = 0, time.monotonic(), False, False
            while True:
                attempt += 1
                conn = await self._acquire(fresh)
                fresh = False
                try:
                    async with asyncio.timeout(timeout):
                        result = await job(conn)
                except (pymysql.Error, TimeoutError) as e:
                    error = e if isinstance(e, pymysql.Error) else pymysql.err.OperationalError(
                        LOST, f"no answer from MySQL in {timeout:g} s")
                    lost = await self._abort(conn, error)
                    retry = attempt < ATTEMPTS and time.monotonic() - started < RETRY_BUDGET
                    if code(error) in RETRYABLE and retry:
                        self._store.retries += 1
                        await asyncio.sleep(random.uniform(0.001, 0.005) * attempt)
                        continue
                    if lost and not reconnected and retry:
                        # Pooled or brand-new, the connection is gone (dropped by the server, or cut after
                        # it committed and answered): once more, on a new one. A charge so learns what
                        # its first run committed instead of failing a call that may be paid.
                        reconnected = fresh = True
                        continue
                    raise StoreUnavailable(f"mysql: {reason(error)}") from e
                except BaseException:
                    self._discard(conn)  # cancelled mid-protocol (the loop is closing): its state is unknown
                    raise
                self._release(conn)
                return result

    def _bind(self) -> None:
        """Connections belong to the loop that opened them; a store used from a new loop starts afresh."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            for conn in list(self.open):
                self._discard(conn)
            self._idle.clear()
            self._loop, self._slots = loop, asyncio.Semaphore(self._size)

    async def _acquire(self, fresh: bool) -> Any:
        """An idle connection (unless `fresh`), or a new one; fails fast while the server is down,
        and once the store is closed."""
        if self._closed:
            raise StoreUnavailable("mysql store is closed")
        if self._idle and not fresh:
            return self._idle.pop()
        store = self._store
        store.raise_if_down()
        await store.prepare()  # the schema, the charge procedure included, before the first CALL
        try:
            # aiomysql's connect_timeout covers the TCP connect only: this covers the handshake too.
            async with asyncio.timeout(CONNECT_TIMEOUT):
                conn = await self._connect()
        except (pymysql.Error, OSError, TimeoutError) as e:
            error = e if isinstance(e, pymysql.Error) else pymysql.err.OperationalError(
                CANNOT_CONNECT, f"cannot connect in {CONNECT_TIMEOUT:g} s" if isinstance(e, TimeoutError) else str(e))
            store.mark_down(error)
            raise StoreUnavailable(f"mysql at {store.where} unreachable: {reason(error)}") from e
        self.open.add(conn)
        return conn

    def _release(self, conn: Any) -> None:
        if self._closed:  # a job that was under way when the store closed: it ran to its end
            _say_goodbye(conn)
            self._discard(conn)
        else:
            self._idle.append(conn)

    async def _connect(self) -> Any:
        return await aiomysql.connect(db=self._store.settings.database, **connect_args(self._store.settings))

    async def _abort(self, conn: Any, error: pymysql.Error) -> bool:
        """Roll back a failed job; True if the connection is gone (then it is closed and forgotten)."""
        if gone(error, conn.closed):
            self._discard(conn)
            return True
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                await conn.rollback()
        except BaseException as e:
            self._discard(conn)
            if not isinstance(e, Exception):
                raise  # cancelled mid-rollback
            return True
        self._release(conn)
        return False

    def _discard(self, conn: Any) -> None:
        self.open.discard(conn)
        try:
            conn.close()
        except Exception:  # its loop is closed: the socket went with it
            pass

    def close(self) -> None:
        """Close the idle connections; jobs under way run to their end, then close theirs."""
        self._closed = True
        for conn in self._idle:
            _say_goodbye(conn)
            self._discard(conn)
        self._idle.clear()


def _finished(task: asyncio.Future[Any]) -> None:
    """A job whose caller was cancelled: its outcome is nobody's, so it is retrieved here."""
    if not task.cancelled():
        task.exception()


def _say_goodbye(conn: Any) -> None:
    """COM_QUIT on an idle connection before its socket closes (the transport sends what it holds
    first), as aiomysql's async `ensure_closed` does: the server ends the session cleanly instead of
    counting and logging an aborted connection."""
    writer = getattr(conn, "_writer", None)
    if writer is None:
        return
    try:
        writer.write(b"\x01\x00\x00\x00" + bytes([COMMAND.COM_QUIT]))
    except Exception:  # the loop or the socket is gone already
        pass


async def one_trip(conn: Any, text: str, args: Any) -> tuple[int, tuple[Any, ...] | None]:
    """Send `text` and read every result (a failing statement raises here, before its COMMIT): the
    first statement's row count (rows matched) and the row the text SELECTs, if any."""
    cur = await conn.cursor()
    await cur.execute(text, args)
    first = cur.rowcount
    rows = await selected(cur)
    return first, (tuple(rows[-1]) if rows and rows[-1] is not None else None)


async def selected(cur: Any) -> list[Any]:
    """Every result of the text `cur` just sent, read in order (a failing statement raises here,
    before its COMMIT): the first row of each SELECT, None for one that found none."""
    rows: list[Any] = []
    while True:
        if cur.description is not None:
            rows.append(await cur.fetchone())
        if not await cur.nextset():
            return rows
