"""Settlement: the one owner of the work that bills or refunds a call after its answer.

Every settlement runs as a task of `Settlements` (`own`), so a stop can wait for all of them
(`drain`) before the store closes. A call settles once (`call.settlement` holds the task); the
ways in are named for when they run: now (in a hook), in the background (a billed answer that
need not wait), soon (outside its flow's hooks), held (decided by a later message, deferred.py),
anyway (a hook failed). Idempotency-Key outcomes are stored by the same owner.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from . import answers, billing, idempotency, shadow
from .billing import Failure
from .cache.idempotency import conclude as conclude_idempotency
from .call import META, Call, Label, decision
from .clients import classify
from .errors import GatewayError
from .jsonrpc import Outcome
from .model import Settlement, Verdict
from .store import Store, StoreUnavailable

if TYPE_CHECKING:
    from .gateway import Mcpmeter

log = logging.getLogger("mcpmeter")

# The waits between a settlement's attempts. After a failed connect the MySQL store refuses at once for
# DOWN_FOR (1 s, mysql_conn.py): the last wait is longer, so a cut shorter than the retries is outlasted
# (retries that all fell within that window never reached the database, and the call went to the sweeper).
SETTLE_BACKOFF = (0.05, 0.1, 0.2, 0.4, 1.2)
SETTLE_ATTEMPTS = len(SETTLE_BACKOFF) + 1
# Stores closed (a config reload retired them, or their meter stopped), for every meter of the process:
# a held call (deferred.py) outlives the meter that charged it across a script reload.
_closed: weakref.WeakSet[Store] = weakref.WeakSet()
MAX_BACKGROUND_SETTLEMENTS = 1000  # beyond this, responses wait for their settlement (backpressure)
RETIRE_MARGIN_SECONDS = 10.0  # a replaced store outlives the longest upstream timeout by this much at most


class Settlements:
    def __init__(self, gw: Mcpmeter) -> None:
        self.gw = gw
        self.background: set[asyncio.Future[None]] = set()  # every task `own` started, until done
        # Settlements of billed answers that nothing waits for (in_background): a hook passes them by.
        self.unwaited: weakref.WeakSet[asyncio.Future[None]] = weakref.WeakSet()
        self.retiring: dict[Store, asyncio.Task[None]] = {}  # stores a reload replaced, kept for their calls
        self.closed = _closed  # retired stores, closed

    def own(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Start a settlement as a task of this addon's, which `drain` waits for."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for the settlements still being written (tests, and an orderly stop); False if some
        were still running after `timeout` seconds (they are left running, never cancelled)."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while self.background:
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(list(self.background), timeout=left)
        return True

    def retire(self, store: Store, upstream_timeout: float) -> None:
        """A reload replaced `store`: close it once the calls it charged are settled (each settles
        against the store that charged it), after their longest possible wait at most."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: no call was ever charged on one
            loop = None
        if loop is None or not self._charged_by(store):
            self._close(store)
            return
        self.retiring[store] = loop.create_task(self._retire(store, loop.time() + upstream_timeout
                                                             + RETIRE_MARGIN_SECONDS))

    def close_retiring(self) -> None:
        """A stop: the replaced stores close now (what they have not settled, the sweeper will)."""
        for store, task in list(self.retiring.items()):
            task.cancel()
            self._close(store)
        self.retiring.clear()

    async def _retire(self, store: Store, until: float) -> None:
        loop = asyncio.get_running_loop()
        while self._charged_by(store) and loop.time() < until:
            await asyncio.sleep(0.1)
        if self.background:  # the settlements under way, some of them against this store
            await asyncio.wait(list(self.background), timeout=max(0.0, until - loop.time()) + 1.0)
        self.retiring.pop(store, None)
        self._close(store)

    def _charged_by(self, store: Store) -> bool:
        """Whether a call `store` charged is still in flight and unsettled."""
        calls = [*self.gw.calls.values(), *(c for _, c in self.gw.legacy.calls())]
        return any(c.store is store and c.settlement is None for c in calls) or bool(self.background)

    def _close(self, store: Store) -> None:
        self.closed.add(store)
        store.close()

    def close_store(self, store: Store) -> None:
        """The meter stops: its store closes (calls it charged and that a meter loaded next holds settle
        on that meter's store)."""
        self._close(store)

    # --- the ways in ---------------------------------------------------------------------

    async def settle(self, flow: http.HTTPFlow, call: Call) -> None:
        """Settle in a hook: start it unless it is under way, and wait for it (unless it is a billed
        answer's, written in the background)."""
        if call.settlement is None:
            call.settlement = self.own(self.now(flow, call))
        if call.settlement not in self.unwaited:
            await call.settlement

    def start(self, flow: http.HTTPFlow, call: Call) -> None:
        """Settle without waiting: the answer was seen (the stream goes on) or the call is given up.
        A billed answer's settlement is written in the background, as a buffered one's: mitmproxy
        ends a streamed answer (its last chunk) only after the response hook returns, so a hook
        waiting for the write would hold the client's stream open for a database round trip."""
        call.cancel_deadline()
        if self.can_wait(call):
            self.in_background(flow, call)
        else:
            call.settlement = self.own(self.now(flow, call))

    def soon(self, flow: http.HTTPFlow, call: Call) -> None:
        """Settle a call outside its own flow's hooks (a legacy answer, a cancellation), as an owned task."""
        call.cancel_deadline()
        call.settlement = self.own(self._logged(self.now(flow, call), "settling %s failed", call))

    def in_background(self, flow: http.HTTPFlow, call: Call) -> None:
        """A billed answer goes out at once; its usage row is written after."""
        answers.annotate(flow, call, *decision(call), self.gw.results)  # mitmweb does not wait for the database
        call.settlement = self.own(self._logged(self.now(flow, call, background=True),
                                                "settling %s failed; the sweeper will", call))
        self.unwaited.add(call.settlement)

    def held(self, flow: http.HTTPFlow, call: Call, decided: billing.Decision) -> None:
        """Settle a held call (deferred.py) as a later message decided."""
        call.decided = decided
        self.own(self._logged(self.now(flow, call, background=True),
                              "settling held %s failed; the sweeper will", call))

    async def anyway(self, flow: http.HTTPFlow, call: Call, delivered: bool) -> None:
        """A settling hook failed: settle all the same, billing an answer the client gets and
        refunding otherwise, and stamp the metering headers if they are not sent yet."""
        try:
            if call.settlement is None and call.outcome is None and call.failure is None:
                ok = call.status is not None and call.status < 400
                if delivered and ok:
                    call.outcome = Outcome.RESULT
                else:
                    call.failure = Failure.INTERNAL
            await self.settle(flow, call)
        except Exception:
            log.exception("mcpmeter: could not settle %s; the sweeper will", call.request_id)
        try:
            if flow.response is not None and call.parser is None:  # a buffered answer: headers not sent yet
                answers.stamp(flow, call)
        except Exception:
            log.exception("mcpmeter: could not stamp the answer to %s", call.request_id)

    def can_wait(self, call: Call) -> bool:
        """An answer (buffered, or a stream whose answer passed) may end before its settlement is
        written: billed, not refunded, not held."""
        if (call.charged is None or call.listing is None or call.settlement is not None
                or len(self.background) >= MAX_BACKGROUND_SETTLEMENTS or self.gw.deferred.will_hold(call)):
            return False  # not paid for, settling already (a stop), settlements backing up, or held: wait
        return not decision(call)[0].refund

    @staticmethod
    async def _logged(work: Coroutine[Any, Any, None], failed: str, call: Call) -> None:
        try:
            await work
        except Exception:
            log.exception("mcpmeter: " + failed, call.request_id)

    # --- the settlement itself -----------------------------------------------------------

    async def now(self, flow: http.HTTPFlow, call: Call, background: bool = False) -> None:
        gw = self.gw
        meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
        if call.charge is None or call.charged is None:
            if call.priced is not None and call.listing is not None:
                decided, status = decision(call)
                if call.forwarded is not None and call.consumer is not None:  # a round's continuation,
                    # forwarded free: the upstream ran it
                    await gw.circuits.record(call.listing, call.consumer.user_id, status, call.failure,
                                             call.request_id if call.probe else None)
                if (gw.deferred.round_over(call, decided) and decided.refund  # a continuation settles its first round
                        and call.outcome is None and (scope := call.scope) is not None):
                    gw.pending.mark_refunded(scope, call.priced.rpc_id)  # refunded it: never delivered now
            meta["decision"] = Label.PASSTHROUGH
            gw.metrics.settled(call, None, call.status)
            meta["balance"] = call.balance
            return
        # The store that charged the call, unless a reload closed it since (a held call, deferred.py).
        store = call.store if call.store is not None and call.store not in self.closed else gw.store
        assert gw.config is not None and store is not None
        assert call.listing is not None and call.consumer is not None
        decided, status = decision(call)
        if call.decided is None:
            # How the upstream answered this call, once: when its own answer settles it or holds it. A
            # held call settled later by another message (its round's continuation, its task's terminal
            # state) is not recorded again: that message's own call says how the upstream did then.
            await gw.circuits.record(call.listing, call.consumer.user_id, status, call.failure,
                                     call.request_id if call.probe else None)
        if call.decided is not None:
            decided = call.decided  # a held call, settled as a later message decided (deferred.py)
        elif await gw.deferred.hold(flow, call, decided):
            return  # a task, or an input_required round: a later message settles it (deferred.py)
        if decided.refund and (call.outcome is None or call.withheld) and call.priced is not None:
            if (scope := call.scope) is not None:
                gw.pending.mark_refunded(scope, call.priced.rpc_id)  # its answer is never delivered now
            else:
                gw.legacy.mark_refunded(call)  # (on its legacy session's stream, if it has one)
        gw.metrics.settled(call, decided.refund, status)
        settlement = Settlement(
            charge=call.charge, refund=decided.refund, status=status, duration_ms=call.elapsed_ms(),
            called_at=call.called_at, key_id=call.consumer.key_id, token_id=call.consumer.token_id,
            client=classify(flow.request.headers.get("user-agent")),
            user_agent=flow.request.headers.get("user-agent"), fee_bps=gw.config.platform_fee_bps,
            # A billed call's balance is the charge's; it is read again only for answers whose headers
            # are not sent yet (X-Mcpmeter-Balance is fresh) and for refunds. So the billed settlements
            # of streamed answers, like those written in the background, can be batched (mysql_batch.py).
            taken=call.charged, need_balance=not background and (decided.refund or call.parser is None),
            background=background,
            reason=shadow.settled_reason(flow, decided.refund) or decided.reason,
        )
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                balance = await store.settle(settlement)
                call.balance = call.balance if balance is None else balance
                call.landed = True
                break
            except StoreUnavailable as e:
                if attempt == SETTLE_ATTEMPTS - 1:
                    # The debit and its ledger row are committed and the call journal still says
                    # unsettled: nothing is lost, the refund or usage row waits for reconciliation.
                    log.error("mcpmeter: could not settle %s (%s): %s", call.request_id, decided.reason, e)
                    return
                await asyncio.sleep(SETTLE_BACKOFF[attempt])
        call.refunded = decided.refund
        if decided.refund and call.charged.verdict is Verdict.FREE:  # the slot came back
            gw.free_used.pop((call.listing.id, call.consumer.user_id, call.charge.month), None)
        answers.annotate(flow, call, decided, status, gw.results)

    # --- Idempotency-Key outcomes (addon/idempotency.py) ------------------------------------

    async def remember(self, flow: http.HTTPFlow, call: Call) -> None:
        """Store the call's outcome under its key before the answer leaves: a retry finds it."""
        if (task := self.conclude_key(flow, call)) is not None:
            await asyncio.shield(task)

    def conclude_key(self, flow: http.HTTPFlow, call: Call, refused: bool = False) -> asyncio.Future[None] | None:
        """The call is over: store its outcome under its Idempotency-Key, or release the key."""
        claim, call.idempotency = call.idempotency, None
        if claim is None or self.gw.cache is None:
            return None
        answer = None
        response = flow.response
        # Paid for: charged, or (forwarded uncharged) the retry that continues a held input_required round,
        # whose answer settles the round it continues: retried with its key, it must not run again as an
        # ordinary call (its state is used up) and pay a second time for one logical call.
        continues = call.charged is None and call.forwarded is not None and call.priced is not None
        paid = call.charged is not None or continues
        walked_away = (not refused and paid and call.listing is not None and call.outcome is None
                       and call.failure is Failure.CLIENT_GONE and not decision(call)[0].refund)
        if walked_away and not (continues or call.landed):
            pass  # its settlement unwritten, the journal's sweeper refunds it: released, as a refund with no answer
        elif walked_away:
            # Billed with no answer: the client left before it, and the upstream ran the tool. A retry must
            # neither run it again nor pay again (the key's purpose): it is told the answer was lost. So
            # too when the answer's head had come (a buffered body still being read: nothing to replay but
            # an empty body) or a stream had begun (what passed ends without the answer: a replay of it
            # leaves the retrying client waiting for an answer that never comes).
            call.rpc_id = call.priced.rpc_id if call.priced else None  # a JSON-RPC error, as its refusals are
            lost = answers.error_response(GatewayError("idempotency_answer_lost"), call, None)
            answer = idempotency.answer_of(lost.status_code, lost.headers.items(multi=True), lost.raw_content or b"",
                                           {"X-Mcpmeter-Request-Id": call.request_id,
                                            "X-Mcpmeter-Billed": _billed(call)})
        elif not refused and paid and call.listing is not None and response is not None:
            refund = decision(call)[0].refund
            if (idempotency.should_store(billed=not refund, upstream_answered=call.failure is None)
                    and not claim.overflow):
                body = bytes(claim.captured) if claim.captured is not None else (response.raw_content or b"")
                metering = {"X-Mcpmeter-Request-Id": call.request_id,
                            "X-Mcpmeter-Billed": "0" if refund else _billed(call)}
                if refund:
                    metering["X-Mcpmeter-Refunded"] = "1"
                answer = idempotency.answer_of(response.status_code, response.headers.items(multi=True), body, metering)
        idempotency.drop_capture(claim)  # (its bytes are the answer's now, if it is stored)
        return self.own(conclude_idempotency(self.gw.cache, claim, answer))


def _billed(call: Call) -> str:
    """X-Mcpmeter-Billed of a billed call, as its replay says it (0: a round's continuation, forwarded free)."""
    if call.charged is None:
        return "0"
    return "free" if call.charged.verdict is Verdict.FREE else str(call.charged.amount)
