"""The mitmproxy addon: the hot path of the SPEC as hooks over the pure core and the adapters.

request         authenticate, resolve the listing, rate-limit, price, charge, then forward
responseheaders stamp the metering headers; watch SSE streams for the call's answer
response        settle (bill or refund) and stamp the final headers of buffered answers
error           settle failed calls (refund, or bill a client that walked away) and answer
                upstream failures with JSON 502/504

Every hook is guarded: an unexpected error answers JSON 500 and never forwards a call
unmetered (mitmproxy itself would let the flow continue).

The hooks dispatch to the parts of the hot path, each a module of its own:
admission.py (before forwarding), stream_watch.py (answers as they pass, deadlines, parked and
cancelled calls), legacy_sessions.py (legacy SSE answers on the session's stream),
settlement.py (the owner of every settlement task), answers.py (error answers, headers, flow
annotations), endpoints.py (/health, /metrics, OAuth metadata) and commands.py (a sub-addon).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from typing import Any

from mitmproxy import ctx, exceptions, http

from . import (answers, budget, commands, compat, deferred, display, dryrun, endpoints, forwarding, gctune, guard,
               receipts, redaction, rpc_errors)
from . import pending as resumption
from .admission import Admission
from .auth import Credential, parse_authorization
from .billing import Failure
from .cache import Cache, open_cache
from .call import META, Call, Label, Wait
from .circuits import Circuits
from .config import Config, ConfigError, load, sweep_interval
from .errors import GatewayError
from .jsonrpc import SSE, media_type
from .legacy_sessions import LegacySessions
from .metrics import Metrics, cache_degraded
from .settlement import Settlements
from .store import Store, StoreUnavailable, open_store
from .stream_watch import StreamWatch

log = logging.getLogger("mcpmeter")

__all__ = ["META", "Call", "Mcpmeter"]

STOP_DRAIN_SECONDS = 8.0  # then, settlements still being written get this long before the store closes
STOP_GRACE_SECONDS = 10.0  # on a stop, paid calls in flight get this long to be answered, then are refunded
HARD_BODY_LIMIT_FACTOR = 4  # bodies up to 4x the limit are read and dropped to answer 413 cleanly


class Mcpmeter:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.store: Store | None = None
        self.cache: Cache | None = None
        self.free_used = receipts.free_used_cache()  # tools/list's free-call counts, read from `store`
        self.calls: dict[str, Call] = {}  # forwarded calls by flow id, until their flow's hooks end
        self.sweeper: asyncio.Task[None] | None = None
        self.stopping = False  # stop() has begun: no new call is admitted
        self.admitting = 0  # calls inside the request hook (authenticating, charging)
        # The parts of the hot path (see the module docstring); each holds this addon for its state.
        self.admission = Admission(self)
        self.settlements = Settlements(self)  # every settlement task: drained by stop() before the store closes
        self.streams = StreamWatch(self)
        self.legacy = LegacySessions(self)
        self.pending = resumption.Pending()  # streamable HTTP: calls parked, tracked, refunded (addon/pending.py)
        self.metrics = Metrics(backlog=lambda: len(self.settlements.background),
                               cache_degraded=lambda: cache_degraded(self.cache))
        self.circuits = Circuits(lambda: self.cache, lambda: self.config.circuit_breaker if self.config else None,
                                 self.metrics.circuit_state)
        self.commands = commands.Commands(lambda: self.store)
        self.addons = [self.commands]  # mitmproxy registers the sub-addon's commands
        self.results = self.commands.results  # the debugging commands' answers and this gateway's calls
        self.replays = dryrun.Originals()  # who made each flow, so replaying it is a dry run as them
        self.probes = endpoints.Probes()  # /health's probes of the store and cache, one of each at a time
        # Tasks and input_required rounds: calls held until a later message settles them (addon/deferred.py).
        self.deferred = deferred.Deferred(self.settlements.held, lambda: self.config, lambda: self.store)

    # --- lifecycle ---------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "mcpmeter_config",
            str | None,
            None,
            "Path to the mcpmeter YAML configuration (see config.example.yaml). Environment "
            "variables override it: MCPMETER_STORE=sqlite|mysql, MCPMETER_CACHE=memory|redis, "
            "DB_*, REDIS_*, UPSTREAM_TIMEOUT_MS, DEFAULT_RPM, DEFAULT_RPD, ... Unset: the embedded "
            "SQLite store and in-process caches with an empty catalogue.",
        )
        loader.add_option(
            "mcpmeter_show_streams",
            str,
            "auto",
            "Keep a copy of each streamed answer (its first 1 MiB) so mitmweb can show it: auto (on "
            "under mitmweb, off under mitmdump), on or off. The copy stays on the flow in memory (and in "
            "flows saved with -w); it is never written to the database or the logs.",
            choices=["auto", "on", "off"],
        )
        compat.install()

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # Eager connects to the reverse target before the addon has decided anything.
            ctx.options.connection_strategy = "lazy"
        if "keep_host_header" in updated and not ctx.options.keep_host_header:
            # The client's Host names this gateway in the OAuth resource metadata URL.
            ctx.options.keep_host_header = True
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # A body over it goes upstream as it comes, before the `request` hook: to the reverse target,
            # unmetered, past max_body_bytes and max_reading_bytes. The meter reads every body whole.
            log.warning("mcpmeter: stream_large_bodies=%s is turned off: every request body is metered whole",
                        ctx.options.stream_large_bodies)
            ctx.options.stream_large_bodies = None
        if "mcpmeter_config" not in updated:
            return
        try:
            config = load(ctx.options.mcpmeter_config)
            if config == self.config:
                return  # e.g. mitmproxy rolling back a rejected change: keep what runs
            store = open_store(config)
        except ConfigError as e:
            raise exceptions.OptionsError(f"mcpmeter_config: {e}") from None
        old_store, old_cache, old_config = self.store, self.cache, self.config
        self.config, self.store, self.cache = config, store, open_cache(config)
        self.free_used = receipts.free_used_cache()  # counts read from this store
        logging.getLogger("mcpmeter").setLevel(_log_level(config.log_level))
        if old_store is not None:  # closed once the calls it charged are settled
            self.settlements.retire(old_store, (old_config or config).max_upstream_timeout_ms / 1000)
        if old_cache is not None:
            _close_later(old_cache)
        log.info("mcpmeter: %s store, %s cache, billing %s", config.store, config.cache,
                 ", ".join(config.billable_methods))

    def running(self) -> None:
        gctune.tune()  # the start-up heap frozen: full collections walk only what came after (addon/gctune.py)
        master = getattr(ctx, "master", None)
        if master is not None and (left := _held_over.pop(master, None)) is not None:
            # A script reload: the calls the replaced meter held (tasks, input_required rounds) are this
            # process's, settled here by the messages that pass from now on (addon/deferred.py); so are
            # its parked calls and refund markers (addon/pending.py): an answer on a resumed stream this
            # meter watches settles a parked call (through the meter that charged it, `owner`), and a
            # refunded call's answer stays withheld, whichever meter refunded it, before or after.
            held, self.pending = left
            held.settle, held.config, held.store = self.settlements.held, lambda: self.config, lambda: self.store
            self.deferred = held
        if self.sweeper is None:
            self.sweeper = asyncio.ensure_future(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        """Refund paid calls whose gateway (this one, before a restart, or another) died mid-call."""
        while True:
            config, store = self.config, self.store
            if config is not None and store is not None:
                try:
                    await self.deferred.mark_unmarked()  # held calls first: the ordinary sweep would take their rows
                    if refunded := await store.sweep(config.stale_call_seconds, config.platform_fee_bps):
                        log.warning("mcpmeter: refunded %d call(s) left unsettled by a stopped gateway", refunded)
                    await self.deferred.sweep()  # held tasks and rounds past their own limits
                except StoreUnavailable:
                    pass
                except Exception:
                    log.exception("mcpmeter: sweeping unsettled calls failed")
            await asyncio.sleep(sweep_interval(config) if config else 60.0)

    def done(self) -> asyncio.Task[None] | None:
        """Stop: settle every call, then close the cache and the store (see `stop`).

        mitmproxy 12.3 calls `done` two ways. On shutdown (SIGINT/SIGTERM) Master.run ends with
        Master.done -> AddonManager.trigger_event -> invoke_addon, which awaits whatever a hook
        returns, before the event loop ends. On a script reload AddonManager.remove calls
        invoke_addon_sync, which refuses an `async def` hook (AddonManagerError: the reload breaks
        half way) and drops what it returns, while the loop runs on. So `done` is a plain function
        that returns the stop as a task: awaited to the end on shutdown, left to finish in the
        background after a reload (referenced in `_closing`). With nothing to settle, it closes now.
        The stops of meters a reload replaced may still be settling their calls: a shutdown waits for
        them too (the event loop ends after `done`, cancelling whatever task is left).
        """
        self.stopping = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        if (master := getattr(ctx, "master", None)) is not None:
            _held_over[master] = self.deferred, self.pending  # for the meter a reload loads next, if one comes
        earlier = list(_closing)
        idle = not self.settlements.background and not self.admitting and not self._unsettled()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop, so no task was ever started on one
            loop = None
        if idle or loop is None:
            self._close()
            if not earlier or loop is None:
                return None
            task = loop.create_task(_await_all(earlier))
        else:
            task = loop.create_task(_await_all([self.stop(), *earlier]))
            # On a reload, the hooks of the calls still in flight go to the meter loaded next: it hands
            # them back to this one (`_replaced_owner`), which charged them and settles them.
            _replaced.append(self)
            task.add_done_callback(lambda _: _replaced.remove(self) if self in _replaced else None)
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        return task

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Drain, then close: every billed answer that went out gets its usage row.

        New calls are refused (503 gateway_stopping) from the first moment. Calls being admitted
        (possibly charged, not yet forwarded) and paid calls in flight get `grace` seconds to be
        answered and settle as usual; those still unanswered then are aborted and refunded (an
        answer that comes after that is sent marked refunded, billed 0, or withheld on a resumed
        stream). After a script reload the meter loaded next hands this one's flows back to it
        (`owner`), and the legacy session streams it watches end after the grace (LegacySessions.cut).
        Then every settlement task is awaited, and only then are the cache and the store closed.
        """
        self.stopping = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self.admitting or self._unsettled()) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for flow, call in self._unsettled():
            log.warning("mcpmeter: stopping; refunding %s, still unanswered after %.0f s", call.request_id, grace)
            call.failure = call.failure or Failure.INTERNAL
            if call.waits is Wait.RESUMPTION:
                self.streams.settle_parked(flow, call)
            elif call.waits is Wait.STREAM:
                self.legacy.refund(flow, call, call.failure)
            else:
                call.cancel_deadline()
                if flow.live:
                    compat.abort_upstream(flow)
                call.settlement = self.settlements.own(self.settlements.now(flow, call))
        self.legacy.cut()  # its session streams: no answer passes after the refunds just made
        # Bounded: a stop never hangs. What is still unwritten stays unsettled in the journal, where
        # the sweeper of any gateway settles it (refunds it) later.
        if not await self.settlements.drain(STOP_DRAIN_SECONDS):
            log.error("mcpmeter: stopping; %d settlement(s) still unwritten after %.0f s, left to the sweeper",
                      len(self.settlements.background), STOP_DRAIN_SECONDS)
        if (drain := getattr(self.store, "drain", None)) is not None and not await drain(STOP_DRAIN_SECONDS):
            log.error("mcpmeter: stopping; wallet settlements still unwritten after %.0f s: their holds give"
                      " their price back when they settle", STOP_DRAIN_SECONDS)
        if self.cache is not None:
            try:
                await asyncio.wait_for(self.cache.close(), 3.0)
            except Exception:
                log.warning("mcpmeter: stopping; the cache did not close cleanly", exc_info=True)
            self.cache = None
        self._close()

    def _replaced_owner(self, flow: http.HTTPFlow) -> Mcpmeter | None:
        """The meter a script reload replaced that charged this flow's call, when this one does not know
        the flow: mitmproxy sends a flow's later hooks to the meter loaded now. Left unanswered there, a
        delivered answer passed unmetered and was then refunded by the old meter's stop."""
        if flow.id in self.calls:
            return None
        return next((old for old in _replaced if old is not self and flow.id in old.calls), None)

    def owner(self, flow: http.HTTPFlow) -> Mcpmeter:
        """The meter that settles the call of `flow`: a call parked before a script reload (or running then)
        found in the shared Pending goes to the replaced meter that charged it, whose stop waits for its
        settlement before closing its store."""
        return self._replaced_owner(flow) or self

    def _unsettled(self) -> list[tuple[http.HTTPFlow, Call]]:
        """Paid calls forwarded and not yet settled (nor settling)."""
        pending = [(c.flow, c) for c in self.calls.values() if c.flow is not None]
        pending += self.legacy.calls()
        return [(f, c) for f, c in pending if c.charged is not None and c.settlement is None]

    def _close(self) -> None:
        # No hook reaches this meter any more: the Pending a reload hands on keeps none of its calls.
        for call in self.calls.values():
            if call.priced is not None and (scope := call.scope) is not None:
                self.pending.untrack(scope, call.priced.rpc_id, call)
        self.legacy.cut()
        self.settlements.close_retiring()
        if self.cache is not None:
            _close_later(self.cache)
            self.cache = None
        if self.store is not None:
            self.settlements.close_store(self.store)

    # --- hooks -------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # First, before anything can fail: a flow that dies before `request` keeps no credential.
        _credentials[flow] = _redact(flow)
        if flow.response or flow.error or not flow.live or self.config is None:
            return
        length = flow.request.headers.get("content-length", "")
        limit = self.config.max_body_bytes
        if not (length.isdigit() and int(length) > limit):
            # Chunked and HTTP/2 bodies have no length to check here: stop reading at the limit.
            compat.limit_request_body(flow, limit, self._too_large, self.config.max_reading_bytes, self._busy)
        else:
            answer = self._too_large(flow, limit)
            if int(length) <= HARD_BODY_LIMIT_FACTOR * limit:
                # mitmproxy reads (and drops) the body, then sends this: clients that write their whole
                # body before reading get a clean answer. It is held meanwhile, so it counts among the bodies
                # being read (an HTTP/2 connection carries many): past them it stops being read, refused so.
                flow.response = answer
                compat.limit_request_body(flow, int(length), self._announced_too_large,
                                          self.config.max_reading_bytes, self._announced_too_large)
            else:
                # Too big to even read: refuse at once; compat turns the kill into this answer.
                compat.answer_failed_flow(flow, answer)
                flow.kill()

    def _too_large(self, flow: http.HTTPFlow, limit: int) -> http.Response:
        """The 413 for a request body over `limit` (a method: compat keeps it weakly by the flow)."""
        return self._unread(flow, GatewayError("payload_too_large", limit_bytes=limit))

    def _announced_too_large(self, flow: http.HTTPFlow, _: int) -> http.Response:
        """The 413 for a body whose Content-Length passed max_body_bytes, stopped while it was read and dropped."""
        return self._too_large(flow, self.config.max_body_bytes if self.config else 0)

    def _busy(self, flow: http.HTTPFlow, limit: int) -> http.Response:
        """The 503 for a body that would pass the bytes of all bodies being read (compat keeps it weakly)."""
        log.warning("mcpmeter: %d bytes of request bodies being read already (max_reading_bytes %d); refusing one",
                    budget.READING.held, limit)
        return self._unread(flow, GatewayError("gateway_busy", headers={"Retry-After": "1"}))

    def _unread(self, flow: http.HTTPFlow, error: GatewayError) -> http.Response:
        """The answer to a request refused before its body was read (no call, no consumer known yet)."""
        flow.metadata[META] = {"decision": Label.REFUSED, "error": error.spec.code}
        flow.comment, flow.marked = f"refused {error.spec.status} {error.spec.code}", ":no_entry:"
        return answers.error_response(error, Call(str(uuid.uuid4())), self._top_up_url())

    async def request(self, flow: http.HTTPFlow) -> None:
        redaction.redact_trailers(flow.request.trailers)  # set since requestheaders, answered or not
        if flow.response or flow.error or not flow.live:
            return
        call = Call(request_id=str(uuid.uuid4()))
        credential, wrapped, exposed = _credentials.pop(flow) if flow in _credentials else _redact(flow)
        if dryrun.is_replay(flow):
            return await dryrun.answer(self, flow, call)  # never forwarded, charged or counted
        self.replays.remember(flow, credential)
        if exposed:  # refused before anything is looked up: never forwarded, never used
            await self._refuse(flow, call, GatewayError("invalid_request", reason=(
                f"{exposed} holds what looks like a gateway key (mcpm_...): send it only as "
                "'Authorization: Bearer', never in the URL or another header, and consider it exposed")))
            return
        if self.stopping:  # draining for a stop: take no new money
            await self._refuse(flow, call, GatewayError("gateway_stopping", headers={"Retry-After": "1"}))
            return
        self.admitting += 1  # a stop waits for this call: it may be charged and not yet forwarded
        try:
            await self.admission.admit(flow, call, credential, wrapped)
            if flow.response is None:
                guard.claim(flow)  # metered and forwarded: the fail-closed guard lets it pass
                assert self.config is not None
                compat.close_idle_upstream(flow, self.config.upstream_idle_seconds)
        except GatewayError as e:
            await self._refuse(flow, call, e)
        except StoreUnavailable as e:
            log.warning("mcpmeter: store unavailable, refusing %s: %s", call.request_id, e)
            await self._refuse(flow, call, GatewayError("store_unavailable", headers={"Retry-After": "1"}))
        except Exception:
            log.exception("mcpmeter: request %s failed; answering 500, not forwarding", call.request_id)
            await self._fail_closed(flow, call)
        finally:
            self.admitting -= 1
            if call.forwarded is None or flow.response is not None:
                self.deferred.not_forwarded(call)  # answered here or cut short: a round its retry took goes back

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.status_code < 200 and flow.live:
            # mitmproxy takes an upstream's first head for the answer. A 1xx is none: a 101 would turn the
            # client's connection into a raw pipe to the upstream (calls down it unmetered; the gateway never
            # asks to switch: Upgrade is stripped), a 100 or 103 would leave the client waiting for ever.
            # A failed upstream, then: the error hook refunds the call and answers 502.
            compat.abort_upstream(flow)
            flow.kill()
            return
        if flow.response is not None:
            forwarding.unfold(flow.response.headers)  # before anything reads them
            forwarding.drop_untokened(flow.response.headers)  # read by neither mitmproxy nor the gateway
        if (owner := self._replaced_owner(flow)) is not None:
            return await owner.responseheaders(flow)
        call = self.calls.get(flow.id)
        if call is None or flow.response is None:
            return
        _drop_upstream_fields(flow.response.headers, call)
        if call.listing is not None and call.listing.upstream_url and forwarding.names_links(flow.response.headers):
            forwarding.client_links(flow.response.headers, flow.request.url, call.listing.upstream_url,
                                    call.listing.transport, call.listing.slug)
        try:
            call.status = flow.response.status_code
            session = flow.response.headers.get("mcp-session-id")
            if session and call.consumer is not None and call.listing is not None:
                assert self.cache is not None
                await self.cache.bind_session(call.listing.id, session, call.consumer.principal)
            if media_type(flow.response.headers.get("content-type")) == SSE:  # as the SDKs tell it
                if self.streams.refuse_unreadable(flow, call) or self.streams.refuse_legacy_post(flow, call):
                    return
                await self.streams.attach(flow, call)  # the meter reads the stream as it passes
                if call.priced is None:
                    call.cancel_deadline()
                answers.stamp(flow, call)
        except Exception:
            log.exception("mcpmeter: responseheaders %s failed", call.request_id)

    async def response(self, flow: http.HTTPFlow) -> None:
        if (owner := self._replaced_owner(flow)) is not None:
            return await owner.response(flow)
        compat.upstream_answered(flow)
        if flow.response is not None:
            # Sent after this hook: an HTTP/2 upstream's trailers would reach the client unchecked (forging
            # X-Mcpmeter-* fields), and mitmproxy crashes the connection writing them to an HTTP/1 client.
            flow.response.trailers = None
        call = self.calls.get(flow.id)
        if call is None or flow.response is None:
            return
        try:
            call.cancel_deadline()
            if self.streams.park(flow, call):
                return  # a server-closed stream: the answer may come on a resumed stream of the session
            if call.parser is None:
                self.deferred.watch_body(call, flow.response)  # task statuses, input_required
                call.status = flow.response.status_code
                if call.failure is Failure.CANCELLED and call.priced is not None:
                    self.streams.withhold(flow, call)
                elif call.priced is not None and call.outcome is None:
                    call.outcome = self.streams.body_outcome(flow, call)
                if self.legacy.await_stream(flow, call):
                    answers.stamp(flow, call)
                    return
            if call.parser is None and self.settlements.can_wait(call):
                # The debit and its ledger row are committed and the headers need nothing from the
                # settlement (the balance comes from the debit's transaction): answer now, record after.
                self.settlements.in_background(flow, call)
            else:
                await self.settlements.settle(flow, call)
            await receipts.write_body(flow, call, self.store, self.free_used)  # prices and the receipt in a JSON answer
            if call.parser is None:
                answers.stamp(flow, call)
            await self.settlements.remember(flow, call)  # before the answer leaves: a retry finds it stored
        except Exception:
            log.exception("mcpmeter: response %s failed; settling it all the same", call.request_id)
            await self.settlements.anyway(flow, call, delivered=True)
        finally:
            if call.waits is None:
                self.finish(flow, call)

    async def error(self, flow: http.HTTPFlow) -> None:
        if (owner := self._replaced_owner(flow)) is not None:
            return await owner.error(flow)
        _credentials.pop(flow, None)  # died between requestheaders and request
        call = self.calls.get(flow.id)
        if call is None:
            redaction.take_forwarded_credentials(flow.request.headers)  # never forwarded (a reload: not taken yet)
            return
        try:
            call.cancel_deadline()
            gone = compat.client_gone(flow)
            if call.failure is None and gone:
                # 2026-07-28: closing the POST stream before the answer cancels the call; so does leaving
                # before it left for the upstream (gone while it was admitted): nothing ran.
                sent = compat.request_sent(flow)
                if not sent:
                    self.deferred.not_forwarded(call)  # a round this retry took stays usable
                cancels = resumption.close_cancels(flow.request.headers) or not sent
                call.failure = Failure.CANCELLED if cancels else Failure.CLIENT_GONE
            elif call.failure is None:
                call.failure = Failure.UPSTREAM
            self.legacy.end_stream(call, client_gone=gone)
            await self.settlements.settle(flow, call)
            nobody = call.failure is Failure.CLIENT_GONE or (call.failure is Failure.CANCELLED and gone)
            # Nothing sent yet: no answer, a 1xx killed unsent, or a buffered head whose body failed. A stream's
            # head went out (the failure cuts it).
            unsent = flow.response is None or flow.response.status_code < 200 or not flow.response.stream
            if unsent and not nobody:
                code = "upstream_timeout" if call.failure is Failure.TIMEOUT else "upstream_failed"
                call.status = 504 if call.failure is Failure.TIMEOUT else 502
                call.rpc_id = call.priced.rpc_id if call.priced else None
                error = GatewayError(code, request_id=call.request_id)
                answer = answers.error_response(error, call, self._top_up_url())
                if call.charged is not None and call.refunded:
                    answer.headers["X-Mcpmeter-Refunded"] = "1"
                compat.answer_failed_flow(flow, answer)
        except Exception:
            log.exception("mcpmeter: error hook %s failed; settling it all the same", call.request_id)
            await self.settlements.anyway(flow, call, delivered=call.outcome is not None)
        finally:
            self.finish(flow, call)

    def finish(self, flow: http.HTTPFlow, call: Call) -> None:
        """The call's flow is done with: no deadline, no registry holds it, its key is concluded."""
        self.settlements.conclude_key(flow, call)
        self._forget(flow, call)

    def _forget(self, flow: http.HTTPFlow, call: Call) -> None:
        """No deadline, no registry holds the call or its flow, and no buffer its stream's bytes."""
        call.cancel_deadline()
        call.drop_stream_buffers()
        self.calls.pop(flow.id, None)
        self.legacy.unregister(call)
        if call.priced is not None and (scope := call.scope) is not None:
            self.pending.untrack(scope, call.priced.rpc_id, call)
        elif call.session is not None and call.parser is not None:  # a resumed GET stream is over
            self.pending.carry(call.session, call.parser.last_event_id)  # (without a session) the next resumes after it

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for the settlements still being written (see Settlements.drain): tests call it."""
        return await self.settlements.drain(timeout)

    def show_streams(self) -> bool:
        chosen = ctx.options.mcpmeter_show_streams
        return display.under_mitmweb(ctx.master) if chosen == "auto" else chosen == "on"

    def _top_up_url(self) -> str | None:
        return self.config.top_up_url if self.config else None

    # --- answers of the gateway's own -------------------------------------------------------

    async def _refuse(self, flow: http.HTTPFlow, call: Call, error: GatewayError) -> None:
        self.settlements.conclude_key(flow, call, refused=True)  # nothing to replay: a retry runs normally
        # A refusal names the balance only when the charge read it (402): a flood of 429s, or of
        # requests for a paused listing, must not reach the database.
        call.rpc_id = call.priced.rpc_id if call.priced else rpc_errors.peek_id(flow.request.raw_content)
        flow.response = answers.error_response(error, call, self._top_up_url())
        self.metrics.refused(error.spec.code)
        answers.mark_refused(flow, call, error)

    async def _fail_closed(self, flow: http.HTTPFlow, call: Call) -> None:
        try:
            if call.charged is not None and call.charge is not None:
                call.failure, call.status = Failure.INTERNAL, 500
                await self.settlements.settle(flow, call)
        except Exception:
            log.exception("mcpmeter: could not refund %s after an internal error", call.request_id)
        finally:
            self._forget(flow, call)  # else a session's call stayed tracked, its flow with it, for ever
            flow.request.url = "http://mcpmeter.invalid/"  # belt and braces: never the real upstream
            await self._refuse(flow, call, GatewayError("internal_error", request_id=call.request_id))


def _drop_upstream_fields(headers: http.Headers, call: Call) -> None:
    """What an upstream may not say in its answer's header or trailer fields: X-Mcpmeter-* (only the
    gateway says those), and a field repeating one of the publisher's upstream header values or of the
    credentials the consumer wrapped for the upstream (both are on the wire only)."""
    redaction.drop_gateway_headers(headers)
    secrets = [*(call.listing.upstream_headers.values() if call.listing is not None else ()), *call.wrapped]
    if echoed := redaction.drop_echoed_secrets(headers, secrets):
        log.warning("mcpmeter: %s: the upstream's %s repeated a publisher header value or a wrapped credential; "
                    "dropped", call.request_id, ", ".join(echoed))


# requestheaders -> request: the consumer's credential and the values of the credentials it wraps for
# the upstream (X-Forward-Authorization...), kept off the flow (flow.metadata is saved with it). Weak
# keys: an entry goes with its flow, whichever way the flow ends.
# ... and where the request showed a bearer key elsewhere (redacted on the flow, so only this says so).
_credentials: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[Credential | None, list[str], str | None]] = (
    weakref.WeakKeyDictionary())


def _redact(flow: http.HTTPFlow) -> tuple[Credential | None, list[str], str | None]:
    """Keep the consumer's credentials, and those it wraps for the upstream, out of the flow mitmweb
    shows (from this hook on) and saves; return the bearer key, the wrapped values and where else the
    request held a key, if it did (the URL, a header: replaced on the flow; the request is refused)."""
    if forwarding.untokened(flow.request.headers.fields):  # refused (admission), or by mitmproxy after this hook
        redaction.redact_untokened(flow.request.headers)
    credential = parse_authorization(flow.request.headers.get("authorization"))
    redaction.redact_credentials(flow.request.headers, credential.prefix if credential else None)
    in_headers = redaction.redact_header_keys(flow.request.headers)
    redacted = redaction.redact_target_key(flow.request.path)
    if redacted is not None:
        flow.request.path = redacted
    exposed = ("the URL" if redacted is not None else
               f"the {in_headers[0][:64]} header" if in_headers else None)
    return credential, redaction.take_forwarded_credentials(flow.request.headers), exposed


_closing: set[asyncio.Task[None]] = set()  # tasks must be referenced until done
# Meters stopping with calls in flight (a script reload keeps this module): see Mcpmeter._replaced_owner.
_replaced: list[Mcpmeter] = []
# The calls held (deferred.py), and the parked calls and refund markers (pending.py), of the meter that
# stopped last, per master: a script reload's next meter takes them over (`running`); a shutdown leaves
# the held calls to the journal's sweep.
_held_over: weakref.WeakKeyDictionary[Any, tuple[deferred.Deferred, resumption.Pending]] = (
    weakref.WeakKeyDictionary())


async def _await_all(work: list[Any]) -> None:
    """Wait for every stop, each to its end, whichever fails."""
    for result in await asyncio.gather(*work, return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.error("mcpmeter: stopping failed", exc_info=result)


def _close_later(cache: Cache) -> None:
    try:
        task = asyncio.get_running_loop().create_task(cache.close())
    except RuntimeError:  # no loop running: nothing was opened on one
        return
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _log_level(name: str) -> int:
    return {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
            "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL}[name.lower()]
