"""Credit held in bulk and spent in Redis: MySQL leaves the per-call path (`wallets: true`).

RFC 4006's credit control, TigerBeetle's pending/post/void: the MySQL store grants a consumer a hold
of up to `wallet_calls` calls' worth of credit (one transaction: the balance goes down by it, with
its ledger row), the gateway funds a wallet in Redis with it, and each paid call spends from the
wallet in one Lua script (wallet_scripts.py), atomically across every gateway: no SQL before
forwarding. After the answer, the settlement is an in-memory append; a flusher writes the settled
calls to MySQL in batches, one transaction each (wallet_sql.py `record`). A wallet lives
`wallet_seconds` (a top-up or a new month is seen at the next grant), then is retired: what is left
goes back to the consumer at once, and once the longest call has passed the hold settles, giving
back whatever no recorded call spent (the calls of a gateway that died, a wallet Redis lost).

What this store does not take over goes to the MySQL store it wraps, unchanged: calls of listings
with a free tier and zero-priced calls (charged by the one-trip procedure), lookups, top-ups, the
sweeper of the call journal, the commands.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..auth import Credential
from ..billing import period as this_month
from ..config import Config
from ..model import CallRecord, ChargeRequest, ChargeResult, Consumer, Listing, Settlement, Verdict
from ..preview import Preview, decide
from . import wallet_scripts as scripts, wallet_sql
from .base import StoreUnavailable
from .mysql import MysqlStore
from ..cache.redis import rate_args, rate_keys, rate_verdict
from ..cache.redis_scripts import ScriptRuns
from ..ratelimit import LimitVerdict, Window

log = logging.getLogger("mcpmeter")

POOL_SIZE = 16
CONNECT_TIMEOUT = 0.25
SOCKET_TIMEOUT = 0.5
# A settlement waits this long for others to share its transaction: what a SIGKILL may cost the
# publisher (those calls are never recorded; their price goes back to the consumer with the hold's rest).
# At 20 ms a batch carried 4 calls at c=1 and its transaction cost 0.2 ms of CPU per call (py-spy).
FLUSH_SECONDS = 0.05
MAX_BATCH = 200  # settlements per transaction
CLOSE_DRAIN_SECONDS = 60.0  # how long a closed store goes on writing what it had queued
WAIT_SECONDS = 2.0  # how long a settlement a hook awaits waits for its batch (the batch is never dropped)
HOLD_PAGES = 50  # pages of due holds one sweep goes through at most
GIVE_UP_AFTER = 3  # failures of a batch, the database answering, before its calls go one by one
_FAILURES = (RedisError, OSError, TimeoutError)


class WalletStore:
    def __init__(self, config: Config, mysql: MysqlStore | None = None) -> None:
        self.config = config
        self.mysql = mysql or MysqlStore(config)
        s = config.redis
        self._prefix = s.prefix
        self._redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
            max_connections=POOL_SIZE, timeout=SOCKET_TIMEOUT, host=s.host, port=s.port, db=s.db,
            password=s.password or None, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
            # Never retried by the driver: a script sent twice could spend twice.
            retry=Retry(NoBackoff(), 0), decode_responses=True))
        self._spend = ScriptRuns(self._redis, scripts.SPEND, scripts.sha(scripts.SPEND))
        self._rate_spend = ScriptRuns(self._redis, scripts.RATE_SPEND, scripts.sha(scripts.RATE_SPEND))
        self._runs: dict[str, ScriptRuns] = {}  # the other scripts' (grants, refunds, retirements)
        self._locks: dict[str, asyncio.Lock] = {}  # wallet key -> the grant under way in this process
        self._open: dict[str, tuple[ChargeRequest, ChargeResult]] = {}  # wallet calls charged here, unsettled
        self._queue: deque[tuple[Settlement, asyncio.Future[None]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._closing: asyncio.Task[None] | None = None  # close() waiting for the queue to be written
        self.settle_after = wallet_sql.settle_after(config)
        self.grants = 0
        self.batches = 0
        self.recorded = 0

    # --- the hot path -------------------------------------------------------------------------

    @staticmethod
    def in_wallet(price: int, free_allowance: int) -> bool:
        """Whether a call at this price is paid from a wallet (else by the journal's procedure)."""
        return price > 0 and free_allowance <= 0

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        if not self.in_wallet(request.price, request.free_allowance):
            return await self.mysql.charge(request)  # free tiers and unpriced calls: the journal's procedure
        key, period = self._wallet(request)
        result = await self._spend_from(key, request, period)
        return await self._paid(key, request, period, result)

    async def charge_limited(self, request: ChargeRequest, bucket: str,
                             windows: Sequence[Window]) -> tuple[LimitVerdict, ChargeResult | None]:
        """A wallet call's rate limit (the (listing, consumer) `bucket`, judged as RedisCache.hit judges
        it) and its charge in one Redis round trip (RATE_SPEND), so that a call pays one round trip
        before it is forwarded: the limit's verdict, and the charge's result (None when the limit
        refused the call: nothing counted, nothing spent)."""
        assert self.in_wallet(request.price, request.free_allowance)
        key, period = self._wallet(request)
        reply = await self._run(self._rate_spend, [*rate_keys(self._prefix, bucket, windows), key],
                                [*rate_args(windows), *self._spend_args(request, period)])
        try:
            verdict = rate_verdict(reply, windows, bucket)
        except RedisError as e:
            raise StoreUnavailable(str(e)) from e
        if not verdict.allowed:
            return verdict, None
        return verdict, await self._paid(key, request, period, self._spent(reply[2 + len(windows):], request, period))

    def _wallet(self, request: ChargeRequest) -> tuple[str, str]:
        if self._closed:
            raise StoreUnavailable("wallet store is closed")
        return scripts.wallet_key(self._prefix, request.user_id, request.project_id), request.period or this_month()

    async def _paid(self, key: str, request: ChargeRequest, period: str, spent: ChargeResult | None) -> ChargeResult:
        result = spent or await self._grant(key, request, period)
        if result.hold is not None:
            self._open[request.request_id] = request, result
        return result

    async def _spend_from(self, key: str, request: ChargeRequest, period: str) -> ChargeResult | None:
        return self._spent(await self._run(self._spend, [key], self._spend_args(request, period)), request, period)

    @staticmethod
    def _spend_args(request: ChargeRequest, period: str) -> list[str]:
        return [str(request.price), str(int(time.time())), period]

    @staticmethod
    def _spent(reply: Sequence[Any], request: ChargeRequest, period: str) -> ChargeResult | None:
        """SPEND's reply as a charge's result; None when the wallet could not pay."""
        if int(reply[0]) != 1:
            return None
        return ChargeResult(Verdict.DEBITED, request.price, int(reply[2]) + int(reply[3]), period,
                            hold=int(reply[1]))

    @staticmethod
    async def _run(runs: ScriptRuns, keys: list[str], args: list[str]) -> Any:
        try:
            return await runs.run(keys, args)
        except _FAILURES as e:
            raise StoreUnavailable(f"redis: {e or type(e).__name__}") from e

    async def _grant(self, key: str, request: ChargeRequest, period: str) -> ChargeResult:
        """The wallet cannot pay: retire it and hold more of the consumer's credit (one per process at a
        time per wallet; calls that wait for it spend from what it funded)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        waited = lock.locked()
        try:
            async with lock:
                if waited and (spent := await self._spend_from(key, request, period)) is not None:
                    return spent
                return await self._grant_once(key, request, period)
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]

    async def _grant_once(self, key: str, request: ChargeRequest, period: str) -> ChargeResult:
        taken = await self._script(scripts.TAKE, key, request.price, int(time.time()), period)
        if int(taken[0]) == 1:  # another gateway's grant funded a wallet that pays this call
            return ChargeResult(Verdict.DEBITED, request.price, int(taken[2]) + int(taken[3]), period,
                                hold=int(taken[1]))
        old = (int(taken[1]), int(taken[2])) if int(taken[0]) == 2 else None
        want = wallet_sql.want(request.price, self.config.wallet_calls)

        def grant(ledger: Any) -> wallet_sql.Grant:
            return wallet_sql.grant(ledger, request.user_id, request.project_id, period, request.price, want, old)

        granted = await self.mysql._run(grant)
        self.grants += 1
        if granted.verdict is Verdict.INSUFFICIENT_CREDIT and await self._retire_others(request):
            old = None  # closed by the first grant's transaction: its left-over is in the balance now
            granted = await self.mysql._run(grant)
            self.grants += 1
        if granted.hold is None:
            return ChargeResult(granted.verdict, 0, granted.balance, period)
        ttl = int(self.settle_after * 1000)
        funded = await self._script(scripts.FUND, key, granted.hold, granted.granted, period,
                                    int(time.time() + self.config.wallet_seconds), granted.balance, ttl, request.price)
        if int(funded[0]) == 1:
            return ChargeResult(Verdict.DEBITED, request.price, int(funded[1]) + int(funded[2]), period,
                                hold=granted.hold)
        # Another gateway funded this wallet meanwhile (a wallet its other calls may empty before this one
        # spends from it, again and again): this call is paid from this hold, committed, and the rest of
        # it goes back at once, its wallet never funded.
        hold, left = granted.hold, granted.granted - request.price
        await self.mysql._run(lambda ledger: wallet_sql.close(ledger, hold, left))
        return ChargeResult(Verdict.DEBITED, request.price, granted.balance + left, period, hold=hold)

    async def _retire_others(self, request: ChargeRequest) -> bool:
        """Retire the wallets of the consumer's other projects (their left-overs back to the balance,
        which all the consumer's projects share): one of them may hold the credit this call needs.
        True if one gave something back."""
        def others(ledger: Any) -> list[tuple[int, int]]:
            return wallet_sql.open_holds(ledger, request.user_id, request.project_id)

        returned = False
        for hold, project in await self.mysql._run(others):
            retired = await self._script(scripts.RETIRE, scripts.wallet_key(self._prefix, request.user_id, project),
                                         str(hold))
            if not retired:
                continue  # its wallet is gone or holds another hold: the sweeper closes this one
            left = int(retired[1])
            await self.mysql._run(functools.partial(wallet_sql.close, hold=hold, left=left))
            returned = returned or left > 0
        return returned

    async def _script(self, text: str, key: str, *args: Any) -> Any:
        """One run of a wallet script on one key (the runs of concurrent calls share a round trip)."""
        runs = self._runs.get(text)
        if runs is None:
            runs = self._runs[text] = ScriptRuns(self._redis, text, scripts.sha(text))
        return await self._run(runs, [key], [str(a) for a in args])

    async def settle(self, settlement: Settlement) -> int | None:
        taken = settlement.taken
        if taken is None or taken.hold is None:
            return await self.mysql.settle(settlement)
        rid = settlement.charge.request_id
        # Queued even when another store of this process charged it (a held call settled after a reload:
        # settlement.py): a settlement asked again is the same one, recorded once (wallet_sql.record).
        first = rid in self._open  # (the first settlement of a call this store charged)
        self._open.pop(rid, None)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((settlement, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        balance = taken.balance
        if settlement.refund:
            balance += taken.amount
            key = scripts.wallet_key(self._prefix, settlement.charge.user_id, settlement.charge.project_id)
            try:  # the balance shown from now on counts the refund (what it shows is all this changes)
                shown = await self._script(scripts.REFUNDED, key, taken.hold, taken.amount if first else 0)
                balance = int(shown[0]) + int(shown[1]) if shown else balance
            except StoreUnavailable:
                log.warning("mcpmeter: could not note the refund of %s in its wallet; its balance shows short of it"
                            " until the next grant", rid)
        try:
            await asyncio.wait_for(asyncio.shield(future),
                                   None if settlement.background else WAIT_SECONDS)
        except TimeoutError:
            log.warning("mcpmeter: the settlement of %s is not written yet; it stays queued", rid)
        return balance if settlement.need_balance else None

    async def _flush(self) -> None:
        while self._queue:
            if len(self._queue) < MAX_BATCH and not self._closed:
                await asyncio.sleep(FLUSH_SECONDS)
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            await self._write([s for s, _ in batch])
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _write(self, batch: list[Settlement]) -> None:
        """Record a batch, trying again while the database is down (recorded calls are skipped). A batch
        that fails while the database answers holds a call that cannot be written (its consumer or
        listing deleted: a foreign key): its calls go one by one, and one that still fails is given up
        (its price comes back to the consumer when its hold settles) rather than stop every later one."""
        record = functools.partial(wallet_sql.record, batch=batch)
        delay, failures = 0.05, 0
        while True:
            try:
                self.recorded += await self.mysql._run(record)
                self.batches += 1
                return
            except Exception as e:
                failures += 1
                if failures >= GIVE_UP_AFTER and await self.mysql._answers():
                    if len(batch) > 1:
                        for s in batch:
                            await self._write([s])
                        return
                    log.error("mcpmeter: wallet call %s cannot be recorded, given up (its hold gives its price"
                              " back when it settles): %s", batch[0].charge.request_id, e)
                    return
                log.warning("mcpmeter: could not record %d wallet call(s), trying again: %s", len(batch), e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def drain(self, timeout: float) -> bool:
        """Wait for the queued settlements to be written (a stop); False if some were still queued."""
        end = time.monotonic() + timeout
        while (self._queue or (self._flusher is not None and not self._flusher.done())) and time.monotonic() < end:
            if self._flusher is not None and not self._flusher.done():
                await asyncio.wait([self._flusher], timeout=max(0.0, end - time.monotonic()))
            else:
                self._flusher = asyncio.ensure_future(self._flush())
        return not self._queue and (self._flusher is None or self._flusher.done())

    # --- holds --------------------------------------------------------------------------------

    async def settle_holds(self, limit: int = 200, pages: int = HOLD_PAGES) -> int:
        """Retire wallets past their life and settle holds past the longest call; returns holds settled.
        Page after page (every hold made must be settled by a sweep: one page a sweep would fall behind
        a gateway granting more than `limit` holds a sweep interval), until a page is short or does nothing."""
        def due(ledger: Any) -> list[tuple[int, int, int, bool, bool]]:
            return wallet_sql.due(ledger, self.config.wallet_seconds, self.settle_after, limit)

        settled = 0
        for _ in range(pages):
            rows = await self.mysql._run(due)
            done = 0
            for hold, user, project, closed, settle_now in rows:
                if not closed:
                    try:
                        retired = await self._script(scripts.RETIRE, scripts.wallet_key(self._prefix, user, project),
                                                     str(hold))
                    except StoreUnavailable:
                        continue  # Redis down: its wallet may still be spent from; not closed, never settled
                    left = int(retired[1]) if retired else 0
                    await self.mysql._run(functools.partial(wallet_sql.close, hold=hold, left=left))
                    done += 1
                if settle_now:
                    n = await self.mysql._run(functools.partial(wallet_sql.settle, hold=hold))
                    settled, done = settled + n, done + n
            if len(rows) < limit or not done:
                break
        return settled

    # --- the rest of the Store protocol -----------------------------------------------------------

    async def sweep(self, older_than_seconds: float, fee_bps: int, limit: int = 100, held: str | None = None,
                    refund: bool = True, reason: str = "swept") -> int:
        done = await self.mysql.sweep(older_than_seconds, fee_bps, limit, held, refund, reason)
        if held is None:
            if settled := await self.settle_holds():
                log.info("mcpmeter: %d hold(s) settled", settled)
        return done

    async def hold(self, request_id: str, mark: str) -> bool:
        """A wallet call held open gets its journal row, marked (wallet_sql.mark_held): a gateway that
        stops while holding it leaves it to any gateway's held sweep, as the journal store's calls."""
        if (charged := self._open.get(request_id)) is None:
            return await self.mysql.hold(request_id, mark)
        request, result = charged
        return bool(await self.mysql._run(functools.partial(wallet_sql.mark_held, req=request, taken=result,
                                                            mark=mark)))

    async def find_consumer(self, credential: Credential) -> Consumer | None:
        return await self.mysql.find_consumer(credential)

    async def find_listing(self, slug: str) -> Listing | None:
        return await self.mysql.find_listing(slug)

    async def balance(self, user_id: int) -> int:
        return await self.mysql.balance(user_id)

    async def user_exists(self, user_id: int) -> bool:
        return await self.mysql.user_exists(user_id)

    async def free_calls_used(self, listing_id: int, user_id: int, period: str) -> int:
        return await self.mysql.free_calls_used(listing_id, user_id, period)

    async def preview(self, request: ChargeRequest) -> Preview:
        """The journal's preview, counting what the consumer's wallet holds: in MySQL an open hold is
        out of the balance and in the month's spend whole, while its left-over pays calls (or comes
        back at the next grant)."""
        seen = await self.mysql.preview(request)
        if not self.in_wallet(request.price, request.free_allowance):
            return seen  # charged by the journal's procedure
        period = request.period or this_month()
        key = scripts.wallet_key(self._prefix, request.user_id, request.project_id)
        try:
            hold, left, month = await self._redis.hmget(key, ["hold", "left", "period"])
        except _FAILURES:
            return seen  # (a preview only informs: shadow mode and dry runs answer all the same)
        if hold is None or left is None:
            return seen
        unspent = max(0, int(left))
        spent = seen.spent - unspent if month == period else seen.spent
        return decide(request.in_period(period), 0, seen.balance + unspent, seen.cap_cents, max(0, spent))

    async def topup(self, user_id: int, amount: int, description: str) -> int:
        return await self.mysql.topup(user_id, amount, description)

    async def recent_calls(self, limit: int) -> list[CallRecord]:
        return await self.mysql.recent_calls(limit)

    async def prepare(self) -> None:
        await self.mysql.prepare()

    async def health(self) -> dict[str, object]:
        info = await self.mysql.health()
        info["wallets"] = {"grants": self.grants, "batches": self.batches, "recorded": self.recorded,
                           "queued": len(self._queue),
                           # a call's spend: RATE_SPEND (with its rate limit), or SPEND alone (a grant's retry,
                           # a call whose limit was judged first)
                           "spend_round_trips": self._spend.round_trips + self._rate_spend.round_trips,
                           "rate_spend_round_trips": self._rate_spend.round_trips}
        try:
            await self._redis.ping()
        except _FAILURES as e:
            return {**info, "ok": False, "error": f"redis: {e or type(e).__name__}"}
        return info

    def close(self) -> None:
        """Refuse charges from now on; settlements still queued (a store a reload replaced: settlement.py
        closes it once its settlement tasks are done, a refund's after WAIT_SECONDS) are written first."""
        self._closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and (self._queue or (self._flusher is not None and not self._flusher.done())):
            self._closing = loop.create_task(self._close_after(CLOSE_DRAIN_SECONDS))
            return
        self._close_now()

    async def _close_after(self, timeout: float) -> None:
        await self.drain(timeout)
        self._close_now()

    def _close_now(self) -> None:
        if self._queue:
            log.error("mcpmeter: closing with %d wallet settlement(s) unwritten: their holds give their price"
                      " back when they settle", len(self._queue))
        if self._flusher is not None:
            self._flusher.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            loop.create_task(self._redis.aclose())
        self.mysql.close()
