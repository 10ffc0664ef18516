"""One Lua script run for many concurrent calls: their runs share one Redis round trip.

A run with nothing under way goes alone, at once: one EVALSHA (concurrency 1 pays nothing extra).
Runs that arrive while one is under way queue, and go together next: one pipeline of their
EVALSHAs, one write and one read, one connection taken from the pool. Measured (a throwaway script,
32 concurrent callers, the gateway's 16-connection pool): 115 µs of the event loop's CPU per script
sent alone (a connection checkout, a write, a read and a wake-up each, and the pool's queue of
waiters), 29 µs per script in a pipeline of 32.

Each script stays atomic on its own, exactly as alone. The pipeline is not a transaction, and needs
none: a run touches its own keys (one rate-limit bucket), and another gateway's runs interleave
with these as they would anyway. A run never repeats: a script Redis does not know (NOSCRIPT, a
restarted or flushed server) did not run, and only that run is sent again with the script's text;
any other error reaches every run of its round trip, which the caller treats as Redis being down.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

MAX_BATCH = 256  # runs per round trip: a burst larger than this goes in several


@dataclass(eq=False, slots=True)
class _Run:
    keys: list[str]
    args: list[str]
    future: asyncio.Future[Any]


class ScriptRuns:
    def __init__(self, redis: aioredis.Redis, text: str, sha: str, max_batch: int = MAX_BATCH) -> None:
        self._redis, self._text, self._sha = redis, text, sha
        self._max_batch = max(max_batch, 1)
        self._queue: deque[_Run] = deque()
        self._busy = False  # a round trip is under way (alone, or the flusher's)
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0  # writes sent, alone or batched (tests and the bench read it)

    async def run(self, keys: list[str], args: list[str]) -> Any:
        """The script's reply for these keys and arguments."""
        if not self._busy and not self._queue:
            self._busy = True
            try:
                return await self._alone(keys, args)
            finally:
                self._busy = False
                self._kick()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Run(keys, args, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        if self._queue and not self._busy and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.ensure_future(self._flush())

    async def _alone(self, keys: list[str], args: list[str]) -> Any:
        self.round_trips += 1
        try:
            return await self._redis.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:  # a new or flushed server: EVAL sends the text and caches it
            self.round_trips += 1
            return await self._redis.eval(self._text, len(keys), *keys, *args)

    async def _flush(self) -> None:
        while self._queue and not self._busy:
            runs: list[_Run] = []
            while self._queue and len(runs) < self._max_batch:
                run = self._queue.popleft()
                if not run.future.done():  # (its caller gave up waiting: it is not sent)
                    runs.append(run)
            if not runs:
                continue
            self._busy = True
            try:
                replies = await self._together(runs)
            except Exception as e:
                for run in runs:
                    if not run.future.done():
                        run.future.set_exception(e)
                continue
            except BaseException:  # cancelled (the loop is closing): nobody will read the replies
                for run in runs:
                    run.future.cancel()
                raise
            finally:
                self._busy = False
            for run, reply in zip(runs, replies, strict=True):
                if run.future.done():
                    continue
                if isinstance(reply, BaseException):
                    run.future.set_exception(reply)
                else:
                    run.future.set_result(reply)

    async def _together(self, runs: list[_Run]) -> list[Any]:
        """One pipeline of the runs' EVALSHAs; those Redis did not have the script for, once more with EVAL."""
        self.round_trips += 1
        async with self._redis.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.evalsha(self._sha, len(run.keys), *run.keys, *run.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if again:
            self.round_trips += 1
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in again:
                    pipe.eval(self._text, len(runs[i].keys), *runs[i].keys, *runs[i].args)
                for i, reply in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                    replies[i] = reply
        if len(replies) != len(runs):  # (redis-py answers each command of a pipeline: cannot happen)
            raise RedisError(f"{len(replies)} replies to a pipeline of {len(runs)} scripts")
        return replies
