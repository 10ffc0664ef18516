"""Group commit: the store work of concurrent calls shares one transaction, one commit, one thread hop.

A job is a function of a Ledger plus a commit predicate. A job arriving while no batch is
running goes alone, at once, as a plain transaction (concurrency 1 pays nothing extra).
Jobs arriving while batches run wait for a free slot and then go together: each inside a
savepoint, released when the job succeeds and its predicate says commit (a refused charge
rolls back to its savepoint alone), then one COMMIT for all. A database error fails the
whole transaction, which the adapter may run again from the start (every job is a pure
function of the database), and otherwise reaches every job of the batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
L = TypeVar("L")  # the Ledger; generic here to keep this module free of SQL

MAX_BATCH = 64  # the default cap on jobs per transaction


@dataclass(eq=False)
class _Job(Generic[L]):
    fn: Callable[[L], Any]
    commit: Callable[[Any], bool]
    future: asyncio.Future[Any]


class GroupCommit(Generic[L]):
    def __init__(
        self,
        run: Callable[[Callable[[L], Any], Callable[[Any], bool]], Awaitable[Any]],
        savepoint: Callable[[L, str], None],
        db_errors: tuple[type[BaseException], ...],
        parallel: int,
        max_batch: int = MAX_BATCH,
    ) -> None:
        """`run(fn, commit)` runs one transaction off the event loop; `savepoint(ledger, sql)` runs
        SAVEPOINT / RELEASE / ROLLBACK TO statements; `parallel` is how many transactions may run at once."""
        self._run, self._savepoint, self._db_errors = run, savepoint, db_errors
        self._slots = asyncio.Semaphore(max(parallel, 1))
        self._max_batch = max(max_batch, 1)
        self._queue: deque[_Job[L]] = deque()
        self._flusher: asyncio.Future[None] | None = None
        self._batches: set[asyncio.Future[Any]] = set()

    async def submit(self, fn: Callable[[L], T], commit: Callable[[T], bool]) -> T:
        if not self._queue and not self._slots.locked():
            # Nothing waits and a slot is free: the job goes alone, at once, as one task (a flusher,
            # a batch task and a future cost more than the rest of an uncontended job's loop work).
            # Shielded, like a batch: a cancelled caller neither cuts the transaction nor frees its
            # slot before it ends.
            await self._slots.acquire()  # free: taken without waiting
            try:
                alone = asyncio.ensure_future(self._run(fn, commit))
            except BaseException:
                self._slots.release()
                raise
            alone.add_done_callback(lambda _: self._slots.release())
            self._batches.add(alone)  # held like a batch until it ends
            alone.add_done_callback(self._batches.discard)
            return await asyncio.shield(alone)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(fn, commit, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            await self._slots.acquire()
            jobs = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            if not jobs:
                self._slots.release()
                break
            batch = asyncio.ensure_future(self._run_batch(jobs))
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)

    async def _run_batch(self, jobs: list[_Job[L]]) -> None:
        try:
            if len(jobs) == 1:
                job = jobs[0]
                outcomes: list[tuple[bool, Any]] = [(True, await self._run(job.fn, job.commit))]
            else:
                outcomes = await self._run(self._together(jobs), lambda _: True)
        except BaseException as e:  # the transaction failed: every job of it failed
            outcomes = [(False, e)] * len(jobs)
        finally:
            self._slots.release()
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if job.future.done():  # its caller went away (cancelled)
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    def _together(self, jobs: list[_Job[L]]) -> Callable[[L], list[tuple[bool, Any]]]:
        def run(ledger: L) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            for i, job in enumerate(jobs):
                name = f"mcpmeter_job_{i}"
                self._savepoint(ledger, f"SAVEPOINT {name}")
                try:
                    result = job.fn(ledger)
                except self._db_errors:
                    raise  # the transaction itself is broken: the adapter retries or fails the batch
                except Exception as e:
                    self._savepoint(ledger, f"ROLLBACK TO SAVEPOINT {name}")
                    outcomes.append((False, e))
                else:
                    if not job.commit(result):
                        self._savepoint(ledger, f"ROLLBACK TO SAVEPOINT {name}")
                    outcomes.append((True, result))
                self._savepoint(ledger, f"RELEASE SAVEPOINT {name}")
            return outcomes

        return run
