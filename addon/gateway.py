"""The mitmproxy addon: the hot path of the SPEC as hooks over the pure core and the adapters.

request         authenticate, resolve the listing, rate-limit, price, charge, then forward
responseheaders stamp the metering headers; watch SSE streams for the call's answer
response        settle (bill or refund) and stamp the final headers of buffered answers
error           settle failed calls (refund, or bill a client that walked away) and answer
                upstream failures with JSON 502/504

Every hook is guarded: an unexpected error answers JSON 500 and never forwards a call
unmetered (mitmproxy itself would let the flow continue).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import command, ctx, exceptions, http

from . import (billing, commands, compat, deferred, display, dryrun, forwarding, guard, idempotency, legacy_sse,
               origins, paths, receipts, redaction, rpc_errors, shadow)
from . import pending as resumption
from .auth import Credential, challenge, parse_authorization
from .billing import Failure
from .cache import MISS, Cache, open_cache
from .cache.idempotency import conclude as conclude_idempotency
from .circuits import Circuits
from .clients import classify
from .config import SLUG_RE, Config, ConfigError, load
from .decoding import StreamDecoder, TooLarge, decode_bounded
from .errors import GatewayError
from .jsonrpc import (
    JsonId, Outcome, PricedCall, answer_messages, body_outcome, check_http_method, inspect_request,
    scanned_outcome,
)
from .metrics import Metrics, cache_degraded
from .model import (ChargeRequest, ChargeResult, Consumer, ConsumerStatus, Listing, ListingStatus, Settlement,
                    Transport, Verdict)
from .ratelimit import headers as limit_headers, windows_for
from .sse import DEFAULT_MAX_EVENT_BYTES, Event, SseParser
from .store import Store, StoreUnavailable, UnknownUser, open_store

log = logging.getLogger("mcpmeter")

META = "mcpmeter"
SETTLE_ATTEMPTS = 5
MAX_BACKGROUND_SETTLEMENTS = 1000  # beyond this, responses wait for their settlement (backpressure)
STOP_DRAIN_SECONDS = 8.0  # then, settlements still being written get this long before the store closes
STOP_GRACE_SECONDS = 10.0  # on a stop, paid calls in flight get this long to be answered, then are refunded
PUBLIC_HEALTH_FIELDS = ("store", "cache", "ok", "degraded")
HARD_BODY_LIMIT_FACTOR = 4  # bodies up to 4x the limit are read and dropped to answer 413 cleanly


@dataclass(eq=False)
class Call:
    """The metering state of one forwarded flow, from request to settlement."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    called_at: float = field(default_factory=time.time)
    consumer: Consumer | None = None
    listing: Listing | None = None
    priced: PricedCall | None = None
    charge: ChargeRequest | None = None
    charged: ChargeResult | None = None
    balance: int | None = None
    limit_headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    outcome: Outcome | None = None
    failure: Failure | None = None
    refunded: bool = False
    parser: SseParser | None = None
    decoder: StreamDecoder | None = None  # a compressed stream, decoded for the meter with a ceiling
    unread: bool = False  # a buffered answer that inflates past the meter's decode limit
    deadline: asyncio.TimerHandle | None = None
    settlement: asyncio.Future[None] | None = None
    route: str = ""  # path and query as the client sent them
    legacy_session: str = ""  # a legacy SSE session's identity (see _legacy_session), POSTs and stream
    rewriter: legacy_sse.EndpointRewriter | None = None  # a legacy SSE session's GET stream
    awaiting_stream: bool = False  # a legacy SSE POST whose answer comes on the session's stream
    rpc_id: JsonId | None = None  # the JSON-RPC id a refusal answers (rpc_errors.peek_id)
    forwarded: float | None = None  # monotonic time the call left for the upstream
    flow: http.HTTPFlow | None = field(default=None, repr=False)  # set when forwarded: a stop settles it
    idempotency: idempotency.Claim | None = None  # this call's claim on its Idempotency-Key
    session: tuple[int, str] | None = None  # (listing id, Mcp-Session-Id) of a streamable HTTP request
    parked: bool = False  # its POST stream ended after an event id, unanswered: awaits a resumed stream
    decided: billing.Decision | None = None  # a held call's settlement, decided by a later message (deferred.py)

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    @property
    def billed_header(self) -> str:
        if self.charged is None or self.refunded:
            return "0"
        if self.charged.verdict is Verdict.FREE:
            return "free"
        return str(self.charged.amount)


class Mcpmeter:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.store: Store | None = None
        self.cache: Cache | None = None
        self.free_used = receipts.free_used_cache()  # tools/list's free-call counts, read from `store`
        self.calls: dict[str, Call] = {}
        self.sweeper: asyncio.Task[None] | None = None
        # Every settlement task (see `_own`): drained by stop() before the store closes.
        self.background: set[asyncio.Future[None]] = set()
        self.stopping = False  # stop() has begun: no new call is admitted
        self.admitting = 0  # calls inside the request hook (authenticating, charging)
        # Legacy SSE: session identity (_legacy_session) -> JSON-RPC id -> the POSTed calls awaiting
        # their answer, oldest first (an id POSTed twice is answered twice, each answer settles one).
        self.awaiting: dict[str, dict[JsonId, list[tuple[http.HTTPFlow, Call]]]] = {}
        self.pending = resumption.Pending()  # streamable HTTP: calls parked, tracked, refunded (addon/pending.py)
        self.metrics = Metrics(backlog=lambda: len(self.background), cache_degraded=lambda: cache_degraded(self.cache))
        self.circuits = Circuits(lambda: self.cache, lambda: self.config.circuit_breaker if self.config else None,
                                 self.metrics.circuit_state)
        self.results = commands.Results()  # the debugging commands' answers and this gateway's calls
        self.replays = dryrun.Originals()  # who made each flow, so replaying it is a dry run as them
        # Tasks and input_required rounds: calls held until a later message settles them (addon/deferred.py).
        self.deferred = deferred.Deferred(self._settle_held, lambda: self.config, lambda: self.store)

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
        if "mcpmeter_config" not in updated:
            return
        try:
            config = load(ctx.options.mcpmeter_config)
            if config == self.config:
                return  # e.g. mitmproxy rolling back a rejected change: keep what runs
            store = open_store(config)
        except ConfigError as e:
            raise exceptions.OptionsError(f"mcpmeter_config: {e}") from None
        old_store, old_cache = self.store, self.cache
        self.config, self.store, self.cache = config, store, open_cache(config)
        self.free_used = receipts.free_used_cache()  # counts read from this store
        logging.getLogger("mcpmeter").setLevel(_log_level(config.log_level))
        if old_store is not None:
            old_store.close()
        if old_cache is not None:
            _close_later(old_cache)
        log.info("mcpmeter: %s store, %s cache, billing %s", config.store, config.cache,
                 ", ".join(config.billable_methods))

    def running(self) -> None:
        if self.sweeper is None:
            self.sweeper = asyncio.ensure_future(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        """Refund paid calls whose gateway (this one, before a restart, or another) died mid-call."""
        while True:
            config, store = self.config, self.store
            if config is not None and store is not None:
                try:
                    if refunded := await store.sweep(config.stale_call_seconds, config.platform_fee_bps):
                        log.warning("mcpmeter: refunded %d call(s) left unsettled by a stopped gateway", refunded)
                    await self.deferred.sweep()  # held tasks and rounds past their own limits
                except StoreUnavailable:
                    pass
                except Exception:
                    log.exception("mcpmeter: sweeping unsettled calls failed")
            await asyncio.sleep(min(60.0, config.stale_call_seconds / 4) if config else 60.0)

    def done(self) -> asyncio.Task[None] | None:
        """Stop: settle every call, then close the cache and the store (see `stop`).

        mitmproxy 12.3 calls `done` two ways. On shutdown (SIGINT/SIGTERM) Master.run ends with
        Master.done -> AddonManager.trigger_event -> invoke_addon, which awaits whatever a hook
        returns, before the event loop ends. On a script reload AddonManager.remove calls
        invoke_addon_sync, which refuses an `async def` hook (AddonManagerError: the reload breaks
        half way) and drops what it returns, while the loop runs on. So `done` is a plain function
        that returns the stop as a task: awaited to the end on shutdown, left to finish in the
        background after a reload (referenced in `_closing`). With nothing to settle, it closes now.
        """
        self.stopping = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        if not self.background and not self.admitting and not self._unsettled():
            self._close()
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop, so no task was ever started on one
            self._close()
            return None
        task = loop.create_task(self.stop())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        return task

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Drain, then close: every billed answer that went out gets its usage row.

        New calls are refused (503 gateway_stopping) from the first moment. Calls being admitted
        (possibly charged, not yet forwarded) and paid calls in flight get `grace` seconds to be
        answered and settle as usual; those still unanswered then are aborted and refunded (an
        answer that comes after that is sent marked refunded, billed 0). After a script reload the
        old instance's calls get no more hooks (they reach the new instance, which does not know
        them), so they are refunded at the end of the grace.
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
            if call.parked:
                self._settle_parked(flow, call)
            elif call.awaiting_stream:
                self._unregister(call)
                self._settle_soon(flow, call)
            else:
                self._cancel_deadline(call)
                if flow.live:
                    compat.abort_upstream(flow)
                call.settlement = self._own(self._settle_now(flow, call))
        # Bounded: a stop never hangs. What is still unwritten stays unsettled in the journal, where
        # the sweeper of any gateway settles it (refunds it) later.
        if not await self.drain(STOP_DRAIN_SECONDS):
            log.error("mcpmeter: stopping; %d settlement(s) still unwritten after %.0f s, left to the sweeper",
                      len(self.background), STOP_DRAIN_SECONDS)
        if self.cache is not None:
            try:
                await asyncio.wait_for(self.cache.close(), 3.0)
            except Exception:
                log.warning("mcpmeter: stopping; the cache did not close cleanly", exc_info=True)
            self.cache = None
        self._close()

    def _unsettled(self) -> list[tuple[http.HTTPFlow, Call]]:
        """Paid calls forwarded and not yet settled (nor settling)."""
        pending = [(c.flow, c) for c in self.calls.values() if c.flow is not None]
        pending += [fc for waiting in self.awaiting.values() for calls in waiting.values() for fc in calls]
        return [(f, c) for f, c in pending if c.charged is not None and c.settlement is None]

    def _close(self) -> None:
        if self.cache is not None:
            _close_later(self.cache)
            self.cache = None
        if self.store is not None:
            self.store.close()

    # --- hooks -------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # First, before anything can fail: a flow that dies before `request` keeps no credential.
        _credentials[flow] = _redact(flow)
        if flow.response or flow.error or not flow.live or self.config is None:
            return
        length = flow.request.headers.get("content-length", "")
        limit = self.config.max_body_bytes

        def too_large() -> http.Response:
            flow.metadata[META] = {"decision": "refused", "error": "payload_too_large"}
            flow.comment, flow.marked = "refused 413 payload_too_large", ":no_entry:"
            return self._error_response(GatewayError("payload_too_large", limit_bytes=limit), Call(str(uuid.uuid4())))

        if not (length.isdigit() and int(length) > limit):
            # Chunked and HTTP/2 bodies have no length to check here: stop reading at the limit.
            compat.limit_request_body(flow, limit, too_large)
        else:
            answer = too_large()
            if int(length) <= HARD_BODY_LIMIT_FACTOR * limit:
                # mitmproxy reads (and drops) the body, then sends this: clients that write their whole
                # body before reading get a clean answer.
                flow.response = answer
            else:
                # Too big to even read: refuse at once; compat turns the kill into this answer.
                compat.answer_failed_flow(flow, answer)
                flow.kill()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        call = Call(request_id=str(uuid.uuid4()))
        credential = _credentials.pop(flow) if flow in _credentials else _redact(flow)
        if dryrun.is_replay(flow):
            return await dryrun.answer(self, flow, call)  # never forwarded, charged or counted
        self.replays.remember(flow, credential)
        if self.stopping:  # draining for a stop: take no new money
            await self._refuse(flow, call, GatewayError("gateway_stopping", headers={"Retry-After": "1"}))
            return
        self.admitting += 1  # a stop waits for this call: it may be charged and not yet forwarded
        try:
            await self._meter(flow, call, credential)
            if flow.response is None:
                guard.claim(flow)  # metered and forwarded: the fail-closed guard lets it pass
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

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = self.calls.get(flow.id)
        if call is None or flow.response is None:
            return
        redaction.drop_gateway_headers(flow.response.headers)  # only the gateway says X-Mcpmeter-*
        try:
            call.status = flow.response.status_code
            session = flow.response.headers.get("mcp-session-id")
            if session and call.consumer is not None:
                assert self.cache is not None
                await self.cache.bind_session(session, call.consumer.principal)
            if "text/event-stream" in flow.response.headers.get("content-type", "").lower():
                call.parser = SseParser(self.config.max_event_bytes if self.config else DEFAULT_MAX_EVENT_BYTES)
                coding = flow.response.headers.get("content-encoding", "").strip()
                if coding and coding.lower() != "identity" and self.config is not None:  # asked for identity
                    call.decoder = StreamDecoder(coding, self.config.max_body_bytes)
                if call.listing is not None and call.listing.transport is Transport.SSE and call.listing.upstream_url:
                    call.rewriter = legacy_sse.EndpointRewriter(call.listing.upstream_url, call.listing.slug)
                flow.response.stream = self._stream_watcher(flow, call)
                # Prices and the receipt in the events.
                await receipts.wrap_stream(flow, call, self.store, self.free_used)
                if call.session is not None and self.config is not None:  # refunded calls' answers never go out
                    resumption.drop_refunded(flow.response, call.session, self.pending, self.config.max_event_bytes)
                self.deferred.watch_stream(flow, call)  # task statuses, input_required (upstream bytes first)
                if self._show_streams():
                    display.keep_copy(flow)
                if call.idempotency is not None:  # the streamed answer's bytes, for a replay
                    flow.response.stream = idempotency.capture(flow.response.stream, call.idempotency)
                if call.priced is None:
                    self._cancel_deadline(call)
                self._stamp(flow, call)
        except Exception:
            log.exception("mcpmeter: responseheaders %s failed", call.request_id)

    async def response(self, flow: http.HTTPFlow) -> None:
        call = self.calls.get(flow.id)
        if call is None or flow.response is None:
            return
        try:
            self._cancel_deadline(call)
            if self._park(flow, call):
                return  # a server-closed stream: the answer may come on a resumed stream of the session
            if call.parser is None:
                self.deferred.watch_body(call, flow.response)  # task statuses, input_required
                call.status = flow.response.status_code
                if call.failure is Failure.CANCELLED and call.priced is not None:
                    self._withhold(flow, call)
                elif call.priced is not None and call.outcome is None:
                    call.outcome = self._body_outcome(flow.response, call)
                if self._await_stream(flow, call):
                    self._stamp(flow, call)
                    return
            if call.parser is None and self._billed_without_refund(call):
                # The debit and its ledger row are committed and the headers need nothing from the
                # settlement (the balance comes from the debit's transaction): answer now, record after.
                self._settle_in_background(flow, call)
            else:
                await self._settle(flow, call)
            await receipts.write_body(flow, call, self.store, self.free_used)  # prices and the receipt in a JSON answer
            if call.parser is None:
                self._stamp(flow, call)
            await self._remember(flow, call)  # before the answer leaves: a retry finds it stored
        except Exception:
            log.exception("mcpmeter: response %s failed; settling it all the same", call.request_id)
            await self._settle_anyway(flow, call, delivered=True)
        finally:
            if not (call.awaiting_stream or call.parked):
                self._finish(flow, call)

    async def error(self, flow: http.HTTPFlow) -> None:
        _credentials.pop(flow, None)  # died between requestheaders and request
        call = self.calls.get(flow.id)
        if call is None:
            redaction.redact_forwarded_credentials(flow.request.headers)  # never forwarded
            return
        try:
            self._cancel_deadline(call)
            gone = compat.client_gone(flow)
            if call.failure is None and gone:
                # 2026-07-28: closing the POST stream before the answer cancels the call.
                cancels = resumption.close_cancels(flow.request.headers)
                call.failure = Failure.CANCELLED if cancels else Failure.CLIENT_GONE
            elif call.failure is None:
                call.failure = Failure.UPSTREAM
            self._end_session_stream(call, client_gone=gone)
            await self._settle(flow, call)
            nobody = call.failure is Failure.CLIENT_GONE or (call.failure is Failure.CANCELLED and gone)
            if flow.response is None and not nobody:
                code = "upstream_timeout" if call.failure is Failure.TIMEOUT else "upstream_failed"
                call.status = 504 if call.failure is Failure.TIMEOUT else 502
                call.rpc_id = call.priced.rpc_id if call.priced else None
                answer = self._error_response(GatewayError(code, request_id=call.request_id), call)
                if call.charged is not None and call.refunded:
                    answer.headers["X-Mcpmeter-Refunded"] = "1"
                compat.answer_failed_flow(flow, answer)
        except Exception:
            log.exception("mcpmeter: error hook %s failed; settling it all the same", call.request_id)
            await self._settle_anyway(flow, call, delivered=call.outcome is not None)
        finally:
            self._finish(flow, call)

    # --- the hot path --------------------------------------------------------------------

    async def _meter(self, flow: http.HTTPFlow, call: Call, credential: Credential | None) -> None:
        assert self.config is not None and self.store is not None and self.cache is not None
        req = flow.request
        path, _, query = req.path.partition("?")
        if path == "/health":
            return await self._health(flow, call)
        if path == "/metrics":
            scraped = self.metrics.scrape(self.config, req.method, credential, "authorization" in req.headers)
            flow.response = http.Response.make(*scraped)
            return
        if path == "/.well-known/oauth-protected-resource" or path.startswith(
            "/.well-known/oauth-protected-resource/"
        ):
            return self._resource_metadata(flow, call)
        self._check_origin(flow)
        call.route = req.path
        slug, subpath, query = paths.split_route(req.path)
        if not slug:
            raise GatewayError("not_found")
        if not SLUG_RE.match(slug):
            raise GatewayError("invalid_slug")
        flow.metadata[META] = {"request_id": call.request_id, "slug": slug}
        try:  # before anything is built from them, and before authentication: nothing to look up
            paths.check_subpath(subpath)
            paths.check_query(query)
        except paths.InvalidPath as e:
            raise GatewayError("invalid_path", reason=str(e)) from None
        check_http_method(req.data.method.decode("ascii", "replace"), req.raw_content or b"")  # as sent: case counts

        consumer = await self._consumer(credential) if credential else None
        if consumer is None:
            raise self._unauthorized(flow, sent=credential is not None or "authorization" in req.headers)
        call.consumer = consumer
        if consumer.status is ConsumerStatus.SUSPENDED:
            raise GatewayError("account_suspended")
        listing = await self._listing(slug)
        call.listing = listing
        _check_live(listing)
        assert listing is not None and listing.upstream_url

        if len(req.raw_content or b"") > self.config.max_body_bytes:
            raise GatewayError("payload_too_large", limit_bytes=self.config.max_body_bytes)
        sessions = req.headers.get_all("mcp-session-id")
        if len(sessions) > 1:  # the upstream might read another one than the one checked here
            raise GatewayError("invalid_request", reason="one Mcp-Session-Id header at most")
        session = sessions[0] if sessions else None
        if listing.transport is Transport.SSE and subpath:
            session = call.legacy_session = _legacy_session(listing.id, subpath, query)
        elif session and listing.transport is not Transport.SSE:
            call.session = (listing.id, session)
        if session:
            owner = await self.cache.session_owner(session)
            if owner is not None and owner != consumer.principal:
                raise GatewayError("session_forbidden")
        continues = False  # a retry carrying a requestState this key was issued: its first round paid
        if req.method == "POST":
            inspection = inspect_request(
                req.raw_content or b"", self.config.billable_methods,
                req.headers.get("mcp-method"), req.headers.get("mcp-name"),
            )
            call.priced = inspection.call
            flow.metadata[META]["method"] = inspection.method
            continues = self.deferred.on_request(call, req.raw_content or b"", inspection.method, session)

        windows = windows_for(listing.rate_limit_per_minute or self.config.default_rpm,
                              listing.rate_limit_per_day or self.config.default_rpd)
        limit = await self.cache.hit(f"{listing.id}:{consumer.principal}", windows)
        call.limit_headers = limit_headers(limit, windows)
        if not limit.allowed and shadow.applies(self.config, listing):
            shadow.note_refusal(flow, "rate_limited")  # shadow mode: recorded, let through
        elif not limit.allowed:
            raise GatewayError("rate_limited", headers=call.limit_headers, scope=limit.scope,
                               retry_after=limit.retry_after)
        if await self._idempotent(flow, call, listing):  # a replay counts against the rate limit, like any request
            return  # answered with the first attempt's stored outcome: not forwarded, not charged

        await self.circuits.admit(listing, priced=call.priced is not None)
        if call.priced is not None and not continues:
            await self._charge(flow, call, consumer, listing, call.priced)
        # Unpriced traffic (initialize, lists, GET streams) never reaches the database: no balance read.
        if call.session is not None and flow.metadata[META].get("method") == resumption.CANCELLED_METHOD:
            self._cancel(call, req.raw_content or b"")  # and the notification goes on to the upstream
        self._forward(flow, call, listing, subpath, query)

    async def _idempotent(self, flow: http.HTTPFlow, call: Call, listing: Listing) -> bool:
        """Idempotency-Key (addon/idempotency.py): the header is the gateway's, never forwarded. A
        priced call claims its key; True when it was answered with the stored outcome instead."""
        assert self.cache is not None and call.consumer is not None
        headers = flow.request.headers
        try:
            key = idempotency.check_key(headers.get_all(idempotency.HEADER))
        except idempotency.InvalidKey as e:
            raise GatewayError("invalid_idempotency_key", reason=str(e)) from None
        if key is None:
            return False
        del headers[idempotency.HEADER]
        if call.priced is None or listing.transport is Transport.SSE:  # legacy SSE: answers come on the stream
            return False
        claim = idempotency.new_claim(idempotency.cache_key(listing.id, call.consumer.principal, key),
                                      flow.request.raw_content or b"",
                                      self._timeout(listing) + idempotency.IN_FLIGHT_MARGIN_SECONDS)
        record = await self.cache.idem_claim(claim.key, claim.value, claim.ttl_seconds)
        if record is None:
            call.idempotency = claim
            return False
        verdict = idempotency.judge(record, claim.fingerprint)
        if verdict.kind == "reused":
            raise GatewayError("idempotency_key_reused")
        if verdict.answer is None:
            raise GatewayError("idempotency_in_flight", headers={"Retry-After": idempotency.IN_FLIGHT_RETRY_AFTER},
                               retry_after=int(idempotency.IN_FLIGHT_RETRY_AFTER))
        answer = verdict.answer
        flow.response = http.Response.make(answer.status, b"", [(k.encode(), v.encode()) for k, v in answer.headers])
        flow.response.raw_content = answer.body
        flow.response.headers["content-length"] = str(len(answer.body))
        flow.response.headers[idempotency.REPLAYED] = "true"
        flow.response.headers.update(call.limit_headers)
        flow.metadata[META].update(decision="replayed", replay_of=flow.response.headers.get("x-mcpmeter-request-id"))
        who = display.consumer_label(flow, call.consumer.user_id)
        display.gateway_answered(flow, f"{who} · {listing.slug} · replayed (Idempotency-Key), not charged", ":repeat:")
        return True

    async def _remember(self, flow: http.HTTPFlow, call: Call) -> None:
        if (task := self._idempotency_over(flow, call)) is not None:
            await asyncio.shield(task)

    def _idempotency_over(self, flow: http.HTTPFlow, call: Call, refused: bool = False) -> asyncio.Future[None] | None:
        """The call is over: store its outcome under its Idempotency-Key, or release the key."""
        claim, call.idempotency = call.idempotency, None
        if claim is None or self.cache is None:
            return None
        answer = None
        response = flow.response
        if not refused and call.charged is not None and call.listing is not None and response is not None:
            refund = _decision(call)[0].refund
            if (idempotency.should_store(billed=not refund, upstream_answered=call.failure is None)
                    and not claim.overflow):
                body = bytes(claim.captured) if claim.captured is not None else (response.raw_content or b"")
                billed = "0" if refund else (
                    "free" if call.charged.verdict is Verdict.FREE else str(call.charged.amount))
                metering = {"X-Mcpmeter-Request-Id": call.request_id, "X-Mcpmeter-Billed": billed}
                if refund:
                    metering["X-Mcpmeter-Refunded"] = "1"
                answer = idempotency.answer_of(response.status_code, response.headers.items(multi=True), body, metering)
        return self._own(conclude_idempotency(self.cache, claim, answer))

    def _show_streams(self) -> bool:
        chosen = ctx.options.mcpmeter_show_streams
        return display.under_mitmweb(ctx.master) if chosen == "auto" else chosen == "on"

    async def _consumer(self, credential: Credential) -> Consumer | None:
        assert self.cache is not None and self.store is not None
        cached = await self.cache.get_consumer(credential.hash)
        if cached is MISS:
            cached = await self.store.find_consumer(credential)
            await self.cache.put_consumer(credential.hash, cached)
        if cached is not None and cached.expires_at is not None and cached.expires_at <= time.time():
            return None
        return cached

    async def _listing(self, slug: str) -> Listing | None:
        assert self.cache is not None and self.store is not None
        cached = await self.cache.get_listing(slug)
        if cached is MISS:
            cached = await self.store.find_listing(slug)
            await self.cache.put_listing(slug, cached)
        return cached

    async def _charge(self, flow: http.HTTPFlow, call: Call, consumer: Consumer, listing: Listing,
                      priced: PricedCall) -> None:
        assert self.config is not None and self.store is not None
        price = billing.price_of(listing, priced.tool_name)
        call.charge = ChargeRequest(
            request_id=call.request_id, user_id=consumer.user_id, project_id=consumer.project_id,
            listing_id=listing.id, tool_name=priced.tool_name, price=price,
            free_allowance=listing.free_calls_per_consumer, period=billing.period(call.called_at),
        )
        if shadow.applies(self.config, listing):  # record what it would cost; charge nothing
            call.charge = await shadow.charge_request(self.store, flow, call.charge)
        result = await self.store.charge(call.charge)
        if result.verdict is Verdict.FREE:  # tools/list shows this gateway's own claims at once
            self.free_used.pop((listing.id, consumer.user_id, call.charge.period), None)
        call.balance = result.balance
        flow.metadata[META].update(tool=priced.tool_name, price=price)
        if not result.accepted:
            call.charge = None
            details: dict[str, Any] = {"balance_micro_cents": result.balance, "required_micro_cents": price}
            raise GatewayError(result.verdict.value, **details)
        call.charged = result

    def _forward(self, flow: http.HTTPFlow, call: Call, listing: Listing, subpath: str, query: str) -> None:
        assert self.config is not None and listing.upstream_url
        try:
            if listing.transport is Transport.SSE:
                url = legacy_sse.target_url(listing.upstream_url, subpath, query)
            else:
                url = forwarding.target_url(listing.upstream_url, subpath, query)
        except paths.InvalidPath as e:  # checked in _meter already: only a listing URL can get here
            raise GatewayError("invalid_path", reason=str(e)) from None
        fields = [(k, v) for k, v in flow.request.headers.items(multi=True)]
        flow.request.url = url  # scheme, host and port; the path exactly as checked, not as reparsed:
        flow.request.path = forwarding.request_target(url)
        # A new header block at once (clear() pops one field at a time), bytes as mitmproxy keeps them.
        flow.request.headers = http.Headers([
            (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
            for name, value in forwarding.upstream_headers(fields, listing.upstream_headers,
                                                           forwarding.authority(url))])
        # Values only on the wire: the publisher's headers, and credentials the consumer wrapped in X-Forward-*.
        compat.hide_upstream_headers(flow.request, [*listing.upstream_headers, *redaction.CREDENTIAL_HEADERS])
        call.deadline = asyncio.get_running_loop().call_later(self._timeout(listing), self._on_deadline, flow, call)
        self.calls[flow.id] = call
        call.flow = flow
        if call.session is not None and call.priced is not None:  # a notifications/cancelled can name it
            self.pending.track(call.session, call.priced.rpc_id, flow, call)
        if listing.transport is Transport.SSE and call.priced is not None and call.legacy_session:
            # Registered before forwarding: the answer can reach the session's stream before the 202.
            self.awaiting.setdefault(call.legacy_session, {}).setdefault(call.priced.rpc_id, []).append((flow, call))
        flow.metadata[META]["decision"] = "forwarded"
        call.forwarded = time.monotonic()

    def _timeout(self, listing: Listing) -> float:
        """The listing's upstream timeout in seconds, capped."""
        assert self.config is not None
        timeout_ms = self.config.upstream_timeout_ms
        if listing.upstream_timeout_seconds:
            timeout_ms = listing.upstream_timeout_seconds * 1000
        return min(timeout_ms, self.config.max_upstream_timeout_ms) / 1000

    # --- streams and deadlines ------------------------------------------------------------

    def _stream_watcher(self, flow: http.HTTPFlow, call: Call) -> Callable[[bytes], bytes | list[bytes]]:
        """mitmproxy calls this with each chunk as it passes; it must never raise."""

        def watch(chunk: bytes) -> bytes | list[bytes]:
            out: bytes | list[bytes] = chunk
            try:
                if call.rewriter is not None:
                    ended, had_route = not chunk, call.rewriter.route is not None
                    out = []  # the rewriter failing lets nothing of the stream out unrewritten
                    out = call.rewriter.feed(chunk)
                    if not had_route and call.rewriter.route is not None and call.listing is not None:
                        _, subpath, query = paths.split_route(call.rewriter.route)
                        call.legacy_session = _legacy_session(call.listing.id, subpath, query)
                        if call.consumer is not None:
                            # The session belongs to the key that opened the stream.
                            assert self.cache is not None
                            asyncio.ensure_future(self.cache.bind_session(call.legacy_session, call.consumer.principal))
                    if call.rewriter.route is not None and call.parser is not None:
                        for piece in [*out, b""] if ended else out:  # b"": the end, for the parser
                            self._answer_awaiting(call.legacy_session, call.parser.feed(piece))
                    if ended:  # the final b"": a held-back chunk ([] returned) is not the end
                        self._end_session_stream(call)
                elif (call.priced is not None and call.outcome is None and call.parser is not None
                      and call.settlement is None):  # a cancelled call settled already: its answer is no longer read
                    data = call.decoder.feed(chunk) if call.decoder is not None and chunk else chunk
                    for event in call.parser.feed(data) if data or not chunk else ():
                        if event.event != "message":  # MCP clients ignore other event types
                            continue
                        outcome = _event_outcome(event, call.priced.rpc_id)
                        if outcome is not None:
                            # Settle now: the answer is what was paid for, whatever the stream does next.
                            call.outcome = outcome
                            self._cancel_deadline(call)
                            call.settlement = self._own(self._settle_now(flow, call))
                            break
                elif call.priced is None and call.session is not None and call.parser is not None:
                    # A GET stream of a session (a resumed one): answers to the session's parked calls settle them.
                    data = call.decoder.feed(chunk) if call.decoder is not None and chunk else chunk
                    for event in call.parser.feed(data) if data or not chunk else ():
                        self._answer_parked(call, event)
            except Exception:
                log.exception("mcpmeter: stream watcher %s failed", call.request_id)
                if call.outcome is not None and call.settlement is None:  # seen, then something broke
                    call.settlement = asyncio.ensure_future(self._settle_now(flow, call))
            return out

        return watch

    def _await_stream(self, flow: http.HTTPFlow, call: Call) -> bool:
        """A legacy SSE call answered 202: its result will come on the session's GET stream,
        or its deadline (the listing's timeout, counted from the call's start) refunds it."""
        if (call.priced is None or call.listing is None or call.listing.transport is not Transport.SSE
                or call.status is None or not 200 <= call.status < 300):
            return False
        if call.outcome is not None:
            if call.status == 202:  # the answer overtook the 202 on the stream: it was delivered
                call.status = 200
            return False
        if not any(c is call for _, c in self.awaiting.get(call.legacy_session, {}).get(call.priced.rpc_id, ())):
            return False  # no session to answer it (a POST without one): settled as a JSON answer
        call.awaiting_stream = True
        self.calls.pop(flow.id, None)
        remaining = max(0.0, self._timeout(call.listing) - (time.monotonic() - call.started))
        call.deadline = asyncio.get_running_loop().call_later(remaining, self._on_deadline, flow, call)
        return True

    def _answer_awaiting(self, session: str, events: list[Any]) -> None:
        waiting = self.awaiting.get(session)
        if not waiting:
            return
        for event in events:
            if event.event != "message":  # MCP clients ignore other event types: not an answer they get
                continue
            messages = (event.messages if event.oversized
                        else answer_messages(event.data.encode("utf-8", "surrogatepass")))
            ids = [m.id_value() for m in messages or () if not m.has_method]
            rpc_id = next((i for i in ids if isinstance(i, (str, int, float)) and i in waiting), None)
            if rpc_id is None:
                continue
            flow, call = waiting[rpc_id][0]
            assert call.priced is not None
            if (outcome := _event_outcome(event, call.priced.rpc_id)) is not None:
                self._unregister(call)
                call.outcome = outcome
                # The answer may overtake the POST's own 202: then the response hook settles it.
                if call.awaiting_stream:
                    call.status = 200  # recorded as answered, not as the 202 that acknowledged the POST
                    self._settle_soon(flow, call)

    def _unregister(self, call: Call) -> None:
        """The call no longer awaits an answer on its session's stream."""
        waiting = self.awaiting.get(call.legacy_session)
        if waiting is None or call.priced is None:
            return
        calls = [entry for entry in waiting.get(call.priced.rpc_id, []) if entry[1] is not call]
        if calls:
            waiting[call.priced.rpc_id] = calls
        else:
            waiting.pop(call.priced.rpc_id, None)
        if not waiting:
            self.awaiting.pop(call.legacy_session, None)

    def _end_session_stream(self, call: Call, client_gone: bool = False) -> None:
        """The session's stream is over: calls still awaiting an answer never get one. The upstream
        ending it failed them (refunded); a client that walked away is billed, as on streamable HTTP
        (2024-11-05 has no cancellation: the upstream ran the call)."""
        if call.rewriter is None or call.rewriter.route is None or not call.legacy_session:
            return
        for calls in self.awaiting.pop(call.legacy_session, {}).values():
            for flow, waiting in calls:
                waiting.failure = Failure.CLIENT_GONE if client_gone else Failure.UPSTREAM
                if waiting.awaiting_stream:
                    self._settle_soon(flow, waiting)

    def _settle_soon(self, flow: http.HTTPFlow, call: Call) -> None:
        """Settle a call outside its own flow's hooks (a legacy answer, a cancellation), as an owned task."""
        self._cancel_deadline(call)

        async def settle() -> None:
            try:
                await self._settle_now(flow, call)
            except Exception:
                log.exception("mcpmeter: settling %s failed", call.request_id)

        call.settlement = self._own(settle())

    def _on_deadline(self, flow: http.HTTPFlow, call: Call) -> None:
        call.deadline = None
        if call.parked:
            if call.outcome is None and call.settlement is None:
                self._settle_parked(flow, call, Failure.NO_ANSWER_BY_TIMEOUT)
            return
        if call.awaiting_stream and call.outcome is None and call.settlement is None:
            self._unregister(call)
            call.failure = Failure.TIMEOUT
            self._settle_soon(flow, call)
            return
        if call.outcome is not None or call.settlement is not None or not flow.live:
            return
        if call.priced is None and flow.response is not None:
            return
        call.failure = Failure.TIMEOUT
        if not compat.abort_upstream(flow):
            log.error("mcpmeter: could not abort the upstream of %s after its timeout", call.request_id)

    # --- resumption and cancellation (addon/pending.py) -------------------------------------

    def _park(self, flow: http.HTTPFlow, call: Call) -> bool:
        """A POST stream the server ended after an event id, without the answer (SEP-1699): the call
        stays pending until a resumed stream of its session answers it, or its timeout refunds it."""
        if (call.parser is None or call.priced is None or call.session is None or call.listing is None
                or call.charged is None or call.outcome is not None or call.failure is not None
                or call.settlement is not None or call.parser.last_event_id is None
                or call.status is None or not 200 <= call.status < 300):
            return False
        remaining = self._timeout(call.listing) - (time.monotonic() - call.started)
        if remaining <= 0:
            call.failure = Failure.NO_ANSWER_BY_TIMEOUT
            return False
        call.parked = True
        self.pending.park(call.session, call.priced.rpc_id, flow, call)
        call.deadline = asyncio.get_running_loop().call_later(remaining, self._on_deadline, flow, call)
        flow.metadata.setdefault(META, {"request_id": call.request_id})["decision"] = "pending"
        flow.comment = (f"{call.listing.slug} · {call.priced.tool_name} · pending: the server closed the stream; "
                        f"settled when a resumed stream answers, refunded after {remaining:.0f} s otherwise")
        return True

    def _settle_parked(self, flow: http.HTTPFlow, call: Call, failure: Failure | None = None) -> None:
        call.parked = False
        if failure is not None:
            call.failure = failure
        self._settle_soon(flow, call)
        self._finish(flow, call)

    def _answer_parked(self, stream: Call, event: Event) -> None:
        """An event on a GET stream of `stream`'s session: settle the calls of the same key it answers,
        parked ones, and running ones whose answer overtook the end of their POST stream."""
        assert stream.session is not None
        if event.event != "message" or not self.pending.watching(stream.session):
            return  # MCP clients ignore other event types: not an answer they get
        messages = event.messages if event.oversized else answer_messages(event.data.encode("utf-8", "surrogatepass"))
        for flow, call in self.pending.answered(stream.session, messages):
            if (stream.consumer is None or call.consumer is None or call.priced is None
                    or call.consumer.principal != stream.consumer.principal
                    or call.outcome is not None or call.settlement is not None):
                continue
            call.outcome = _event_outcome(event, call.priced.rpc_id)
            if call.outcome is None:
                continue
            if call.parked:
                self._settle_parked(flow, call)
            else:  # still running: settled now, its POST's hooks find it settled
                self._cancel_deadline(call)
                call.settlement = self._own(self._settle_now(flow, call))

    def _cancel(self, notice: Call, body: bytes) -> None:
        """notifications/cancelled naming a priced call of the same session and key: refunded, unless its
        answer was already delivered; its answer is withheld from then on."""
        rpc_id = resumption.cancelled_request_id(body)
        found = self.pending.find(notice.session, rpc_id) if rpc_id is not None and notice.session else None
        if found is None or notice.consumer is None:
            return
        flow, call = found
        if call.consumer is None or call.consumer.principal != notice.consumer.principal:
            return
        if call.outcome is not None or call.settlement is not None or call.failure is not None:
            return  # answered (billed), or already failing: settled by its own path
        assert notice.session is not None and rpc_id is not None
        self.pending.mark_refunded(notice.session, rpc_id)
        if call.parked:
            self._settle_parked(flow, call, Failure.CANCELLED)
            return
        call.failure = Failure.CANCELLED
        self._settle_soon(flow, call)

    def _withhold(self, flow: http.HTTPFlow, call: Call) -> None:
        """A JSON answer to a call cancelled (and refunded) while it ran: the client gets an error instead."""
        assert flow.response is not None and call.priced is not None
        if self._body_outcome(flow.response, call) is not None:
            flow.response.headers.pop("content-encoding", None)
            flow.response.headers["content-type"] = "application/json"
            flow.response.content = resumption.cancelled_body(call.priced.rpc_id)

    def _cancel_deadline(self, call: Call) -> None:
        if call.deadline is not None:
            call.deadline.cancel()
            call.deadline = None

    def _body_outcome(self, response: http.Response, call: Call) -> Outcome | None:
        """What a buffered answer says, decoded by the meter with a ceiling (never by mitmproxy)."""
        assert self.config is not None
        limit = self.config.max_body_bytes
        try:
            body = decode_bounded(response.raw_content or b"", response.headers.get("content-encoding"), limit)
        except TooLarge:
            log.warning("mcpmeter: a compressed answer inflates past max_body_bytes (%d); not read further", limit)
            call.unread = True  # delivered all the same: see billing.decide
            return None
        assert call.priced is not None
        return None if body is None else body_outcome(body, call.priced.rpc_id)

    # --- settlement -----------------------------------------------------------------------

    async def _settle_anyway(self, flow: http.HTTPFlow, call: Call, delivered: bool) -> None:
        """A settling hook failed: settle all the same, billing an answer the client gets and
        refunding otherwise, and stamp the metering headers if they are not sent yet."""
        try:
            if call.settlement is None and call.outcome is None and call.failure is None:
                ok = call.status is not None and call.status < 400
                if delivered and ok:
                    call.outcome = Outcome.RESULT
                else:
                    call.failure = Failure.INTERNAL
            await self._settle(flow, call)
        except Exception:
            log.exception("mcpmeter: could not settle %s; the sweeper will", call.request_id)
        try:
            if flow.response is not None and call.parser is None:  # a buffered answer: headers not sent yet
                self._stamp(flow, call)
        except Exception:
            log.exception("mcpmeter: could not stamp the answer to %s", call.request_id)

    def _billed_without_refund(self, call: Call) -> bool:
        if (call.charged is None or call.listing is None or call.settlement is not None
                or len(self.background) >= MAX_BACKGROUND_SETTLEMENTS or self.deferred.will_hold(call)):
            return False  # not paid for, settling already (a stop), settlements backing up, or held: wait
        return not _decision(call)[0].refund

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

    def _own(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Start a settlement as a task of this addon's, which `drain` waits for."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def _settle_in_background(self, flow: http.HTTPFlow, call: Call) -> None:
        async def settle() -> None:
            try:
                await self._settle_now(flow, call, background=True)
            except Exception:
                log.exception("mcpmeter: settling %s failed; the sweeper will", call.request_id)

        _annotate(flow, call, *_decision(call), self.results)  # what mitmweb shows does not wait for the database
        call.settlement = self._own(settle())

    async def _settle(self, flow: http.HTTPFlow, call: Call) -> None:
        if call.settlement is None:
            call.settlement = self._own(self._settle_now(flow, call))
        await call.settlement

    async def _settle_now(self, flow: http.HTTPFlow, call: Call, background: bool = False) -> None:
        meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
        if call.charge is None or call.charged is None:
            if call.priced is not None and call.listing is not None:
                self.deferred.round_over(call, _decision(call)[0])  # a continuation settles its first round
            meta["decision"] = "passthrough"
            self.metrics.settled(call, None, call.status)
            meta["balance"] = call.balance
            return
        assert self.config is not None and self.store is not None
        assert call.listing is not None and call.consumer is not None
        decision, status = _decision(call)
        if call.decided is not None:
            decision = call.decided  # a held call, settled as a later message decided (deferred.py)
        elif await self.deferred.hold(flow, call, decision):
            return  # a task, or an input_required round: a later message settles it (deferred.py)
        if decision.refund and call.outcome is None and call.session is not None and call.priced is not None:
            self.pending.mark_refunded(call.session, call.priced.rpc_id)  # its answer is never delivered now
        self.metrics.settled(call, decision.refund, status)
        await self.circuits.record(call.listing, status, call.failure)
        settlement = Settlement(
            charge=call.charge, refund=decision.refund, status=status, duration_ms=call.elapsed_ms(),
            called_at=call.called_at, key_id=call.consumer.key_id, token_id=call.consumer.token_id,
            client=classify(flow.request.headers.get("user-agent")),
            user_agent=flow.request.headers.get("user-agent"), fee_bps=self.config.platform_fee_bps,
            taken=call.charged, need_balance=not background,
            reason=shadow.settled_reason(flow, decision.refund) or decision.reason,
        )
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                balance = await self.store.settle(settlement)
                call.balance = call.balance if balance is None else balance
                break
            except StoreUnavailable as e:
                if attempt == SETTLE_ATTEMPTS - 1:
                    # The debit and its ledger row are committed and the call journal still says
                    # unsettled: nothing is lost, the refund or usage row waits for reconciliation.
                    log.error("mcpmeter: could not settle %s (%s): %s", call.request_id, decision.reason, e)
                    return
                await asyncio.sleep(0.05 * 2**attempt)
        call.refunded = decision.refund
        if decision.refund and call.charged.verdict is Verdict.FREE:  # the slot came back
            self.free_used.pop((call.listing.id, call.consumer.user_id, call.charge.period), None)
        _annotate(flow, call, decision, status, self.results)

    def _settle_held(self, flow: http.HTTPFlow, call: Call, decision: billing.Decision) -> None:
        """Settle a held call (deferred.py) as a later message decided."""
        call.decided = decision

        async def settle() -> None:
            try:
                await self._settle_now(flow, call, background=True)
            except Exception:
                log.exception("mcpmeter: settling held %s failed; the sweeper will", call.request_id)

        self._own(settle())

    def _stamp(self, flow: http.HTTPFlow, call: Call) -> None:
        """The metering headers, on a response whose headers have not been sent yet."""
        assert flow.response is not None
        h = flow.response.headers
        h["X-Mcpmeter-Request-Id"] = call.request_id
        h["X-Mcpmeter-Billed"] = call.billed_header
        h["X-Mcpmeter-Duration-Ms"] = str(call.elapsed_ms())
        if call.balance is not None:
            h["X-Mcpmeter-Balance"] = str(call.balance)
        if call.refunded:
            h["X-Mcpmeter-Refunded"] = "1"
        for name, value in call.limit_headers.items():
            h[name] = value

    def _finish(self, flow: http.HTTPFlow, call: Call) -> None:
        self._cancel_deadline(call)
        self._idempotency_over(flow, call)
        self.calls.pop(flow.id, None)
        self._unregister(call)
        if call.session is not None and call.priced is not None:
            self.pending.untrack(call.session, call.priced.rpc_id, call)

    # --- answers of the gateway's own -------------------------------------------------------

    async def _refuse(self, flow: http.HTTPFlow, call: Call, error: GatewayError) -> None:
        redaction.redact_forwarded_credentials(flow.request.headers)  # refused: they go nowhere
        self._idempotency_over(flow, call, refused=True)  # nothing to replay: a retry runs normally
        self.deferred.release(call)  # a refused input_required retry did not use its requestState
        # A refusal names the balance only when the charge read it (402): a flood of 429s, or of
        # requests for a paused listing, must not reach the database.
        call.rpc_id = call.priced.rpc_id if call.priced else rpc_errors.peek_id(flow.request.raw_content)
        flow.response = self._error_response(error, call)
        self.metrics.refused(error.spec.code)
        meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
        meta.update(decision="refused", error=error.spec.code)
        who = display.consumer_label(flow, call.consumer.user_id) if call.consumer else "no consumer"
        display.gateway_answered(flow, f"{who} · {meta.get('slug', '-')} · refused {error.status} {error.spec.code}",
                                 ":no_entry:")

    async def _fail_closed(self, flow: http.HTTPFlow, call: Call) -> None:
        try:
            if call.charged is not None and call.charge is not None:
                call.failure, call.status = Failure.INTERNAL, 500
                await self._settle(flow, call)
        except Exception:
            log.exception("mcpmeter: could not refund %s after an internal error", call.request_id)
        finally:
            self.calls.pop(flow.id, None)
            self._cancel_deadline(call)
            flow.request.url = "http://mcpmeter.invalid/"  # belt and braces: never the real upstream
            await self._refuse(flow, call, GatewayError("internal_error", request_id=call.request_id))

    def _error_response(self, error: GatewayError, call: Call) -> http.Response:
        headers = {"Content-Type": "application/json", **error.headers,
                   "X-Mcpmeter-Request-Id": call.request_id, "X-Mcpmeter-Billed": "0",
                   "X-Mcpmeter-Duration-Ms": str(call.elapsed_ms())}
        if call.balance is not None:
            headers["X-Mcpmeter-Balance"] = str(call.balance)
        body = rpc_errors.refusal_body(error, call.request_id, call.rpc_id,
                                       self.config.top_up_url if self.config else None)
        return http.Response.make(error.status, body, headers)

    def _unauthorized(self, flow: http.HTTPFlow, sent: bool) -> GatewayError:
        metadata_url = self._public_url(flow) + "/.well-known/oauth-protected-resource"
        return GatewayError("invalid_token", headers={
            "WWW-Authenticate": challenge(metadata_url, "invalid_token" if sent else None)})

    def _public_url(self, flow: http.HTTPFlow) -> str:
        """Where clients reach the gateway: `public_url`, else the request's Host if it is a plain
        host[:port] (it is reflected in the metadata and WWW-Authenticate), else 400."""
        if self.config and self.config.public_url:
            return self.config.public_url
        host = flow.request.host_header
        if not host or not origins.valid_host(host):
            raise GatewayError("invalid_request", reason="the Host header is not a valid host[:port]")
        return f"{flow.request.scheme}://{host}"

    def _check_origin(self, flow: http.HTTPFlow) -> None:
        """A browser page on a foreign origin may not use the gateway (DNS rebinding): 403 before
        authentication. No Origin (not a browser, or same-origin GET) passes."""
        assert self.config is not None
        sent = flow.request.headers.get_all("origin")
        if not sent:
            return
        allowed = set(self.config.allowed_origins)
        if self.config.public_url and (public := origins.of_url(self.config.public_url)):
            allowed.add(public)
        if len(sent) > 1 or origins.normalize(sent[0]) not in allowed:
            raise GatewayError("origin_forbidden")

    async def _health(self, flow: http.HTTPFlow, call: Call) -> None:
        if flow.request.method.upper() not in ("GET", "HEAD"):
            raise GatewayError("method_not_allowed", headers={"Allow": "GET, HEAD"})
        assert self.store is not None and self.cache is not None
        checks: dict[str, Any] = {}
        for name, probe in (("store", self.store.health), ("cache", self.cache.health)):
            try:
                check = await asyncio.wait_for(probe(), timeout=1.0)
            except Exception as e:  # health reports, it does not fail
                check = {"ok": False, "error": str(e) or type(e).__name__}
            if not check.get("ok"):
                log.warning("mcpmeter: health: %s %s", name, check)
            # /health is public: addresses and driver messages (hosts, database names) go to the log only.
            checks[name] = {k: v for k, v in check.items() if k in PUBLIC_HEALTH_FIELDS}
        ok = bool(checks["store"].get("ok"))
        body = {"status": "ok" if ok else "degraded", **checks, "circuits": self.circuits.snapshot()}
        flow.response = http.Response.make(200 if ok else 503, json.dumps(body).encode(),
                                           {"Content-Type": "application/json",
                                            "X-Mcpmeter-Request-Id": call.request_id})
        flow.metadata[META] = {"decision": "health"}
        display.gateway_answered(flow, f"health {body['status']}", ":information_source:")

    def _resource_metadata(self, flow: http.HTTPFlow, call: Call) -> None:
        if flow.request.method.upper() not in ("GET", "HEAD"):
            raise GatewayError("method_not_allowed", headers={"Allow": "GET, HEAD"})
        base = self._public_url(flow)
        body: dict[str, Any] = {"resource": base}
        if self.config and self.config.authorization_servers:
            # The servers that issue tokens for this gateway (RFC 9728 §2): only the configured ones,
            # never the gateway itself unless it is configured as one.
            body["authorization_servers"] = list(self.config.authorization_servers)
        body.update(bearer_methods_supported=["header"], resource_name="mcpmeter")
        flow.response = http.Response.make(200, json.dumps(body).encode(), {
            "Content-Type": "application/json", "X-Mcpmeter-Request-Id": call.request_id})
        flow.metadata[META] = {"decision": "metadata"}
        display.gateway_answered(flow, "OAuth protected-resource metadata", ":information_source:")

    # --- commands for local billing debugging -----------------------------------------------

    @command.command("mcpmeter.balance")
    def balance_command(self, user_id: int) -> str:
        """A consumer's balance in µ¢, read from the store (the command answers with the last read)."""
        user_id = commands.user_id_arg(user_id)
        store = self._store_for_command()
        key = ("balance", user_id)

        async def read() -> str:
            if not await store.user_exists(user_id):
                self.results.missing.add(user_id)
                return f"user {user_id}: no such user"
            self.results.missing.discard(user_id)
            return f"user {user_id}: balance {await store.balance(user_id)} µ¢"

        self.results.start(key, read)
        return self.results.answer(key, f"user {user_id}: reading the balance")

    @command.command("mcpmeter.topup")
    def topup_command(self, user_id: int, micro_cents: int) -> str:
        """Add credit to an existing consumer, with its ledger row (unknown users: nothing written)."""
        user_id, micro_cents = commands.user_id_arg(user_id), commands.amount_arg(micro_cents)
        if user_id in self.results.missing:
            raise exceptions.CommandError(f"user {user_id} does not exist: nothing written")
        store = self._store_for_command()

        async def topup() -> str:
            try:  # the store checks the user in the top-up's own transaction
                balance = await store.topup(user_id, micro_cents, "top-up from mitmproxy command")
            except UnknownUser:
                self.results.missing.add(user_id)
                return f"user {user_id}: no such user, nothing written"
            self.results.answers[("balance", user_id)] = (time.time(), f"user {user_id}: balance {balance} µ¢")
            return f"user {user_id}: topped up {micro_cents} µ¢, balance {balance} µ¢"

        self.results.start(("topup", user_id), topup)
        return (f"user {user_id}: topping up {micro_cents} µ¢ (the user is checked first); "
                f"`mcpmeter.balance {user_id}` shows the new balance")

    @command.command("mcpmeter.calls")
    def calls_command(self, limit: int = 10) -> str:
        """The most recent calls this gateway metered, newest first."""
        return self.results.calls(commands.limit_arg(limit))

    def _store_for_command(self) -> Store:
        if self.store is None:
            raise exceptions.CommandError("mcpmeter has no store yet (is mcpmeter_config loading?)")
        return self.store


def _event_outcome(event: Event, rpc_id: JsonId) -> Outcome | None:
    if event.oversized:
        return scanned_outcome(event.messages, rpc_id)
    return body_outcome(event.data.encode("utf-8", "surrogatepass"), rpc_id)


def _decision(call: Call) -> tuple[billing.Decision, int]:
    """Whether the forwarded call is refunded, and the status it is recorded with."""
    assert call.listing is not None
    unread = call.unread or (call.decoder is not None and call.decoder.too_large)
    decision = billing.decide(call.status, call.outcome, call.failure, call.listing.bill_tool_errors, unread)
    if call.outcome is not None:
        if call.listing.transport is Transport.SSE and call.status == 202:
            # A legacy SSE POST's 202 only accepted the message: the answer came on the session's stream.
            return decision, 200
        return decision, call.status or 200
    failed = {Failure.TIMEOUT: 504, Failure.UPSTREAM: 502, Failure.CLIENT_GONE: 499, Failure.INTERNAL: 500,
              Failure.CANCELLED: 499, Failure.NO_ANSWER_BY_TIMEOUT: 504}
    return decision, failed.get(call.failure, call.status or 0) if call.failure else (call.status or 0)


def _annotate(flow: http.HTTPFlow, call: Call, decision: billing.Decision, status: int,
              results: commands.Results | None = None) -> None:
    """The metering decision on the flow: metadata for addons, comment and mark for mitmweb."""
    assert call.charged is not None and call.charge is not None and call.listing is not None
    assert call.consumer is not None
    verdict = call.charged.verdict
    meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
    label = "refunded" if decision.refund else ("free" if verdict is Verdict.FREE else "billed")
    amount = "free tier" if verdict is Verdict.FREE else f"{call.charged.amount} µ¢"
    if (would := meta.get("shadow")) is not None:  # shadow mode: recorded unpriced, the would-be verdict shown
        label, amount = "shadow", f"would {shadow.describe(would)}, charged nothing"
    billed = 0 if decision.refund else call.charged.amount
    meta.update(decision=label, reason=decision.reason, billed=billed, balance=call.balance, status=status,
                user_id=call.consumer.user_id)
    price = meta.setdefault("price", call.charge.price)
    who = display.consumer_label(flow, call.consumer.user_id)
    flow.comment = (f"{who} · {call.listing.slug} · {call.charge.tool_name} · price {price} µ¢ · "
                    f"{label} ({amount}; {decision.reason}) · balance {call.balance} µ¢")
    flow.marked = {"billed": ":moneybag:", "free": ":gift:", "refunded": ":leftwards_arrow_with_hook:",
                   "shadow": ":ghost:"}[label]
    if results is not None:
        results.note(commands.Recent(
            time.time(), call.request_id, call.consumer.user_id, call.listing.slug, call.charge.tool_name,
            label, billed, status))


def _legacy_session(listing_id: int, subpath: str, query: str) -> str:
    """A legacy SSE session's identity: its session id, not the route's spelling (paths.session_identity)."""
    try:
        return f"legacy:{listing_id}:{paths.session_identity(subpath, query)}"
    except paths.InvalidPath as e:
        raise GatewayError("invalid_request", reason=str(e)) from None


def _check_live(listing: Listing | None) -> None:
    if listing is None:
        raise GatewayError("no_such_mcp")
    if listing.status is ListingStatus.ARCHIVED:
        raise GatewayError("mcp_archived")
    if listing.status is ListingStatus.PAUSED:
        raise GatewayError("mcp_paused")
    if listing.status is not ListingStatus.LIVE or not listing.upstream_url:
        raise GatewayError("mcp_not_yet_live")


# requestheaders -> request: the consumer's credential, kept off the flow (flow.metadata is saved
# with it). Weak keys: an entry goes with its flow, whichever way the flow ends.
_credentials: weakref.WeakKeyDictionary[http.HTTPFlow, Credential | None] = weakref.WeakKeyDictionary()


def _redact(flow: http.HTTPFlow) -> Credential | None:
    """Keep the consumer's credentials out of the flow mitmweb shows and saves; return the bearer key."""
    credential = parse_authorization(flow.request.headers.get("authorization"))
    redaction.redact_credentials(flow.request.headers, credential.prefix if credential else None)
    return credential


_closing: set[asyncio.Task[None]] = set()  # tasks must be referenced until done


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
