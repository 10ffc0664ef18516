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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import command, ctx, exceptions, http

from . import billing, compat, forwarding, legacy_sse
from .auth import Credential, challenge, parse_authorization
from .billing import Failure
from .cache import MISS, Cache, open_cache
from .clients import classify
from .config import SLUG_RE, Config, ConfigError, load
from .decoding import StreamDecoder, TooLarge, decode_bounded
from .errors import GatewayError
from .jsonrpc import (
    JsonId, Outcome, PricedCall, answer_outcome, body_outcome, check_http_method, inspect_request, scanned_outcome,
)
from .model import ChargeRequest, ChargeResult, Consumer, Listing, Settlement, Verdict
from .ratelimit import headers as limit_headers, windows_for
from .sse import DEFAULT_MAX_EVENT_BYTES, Event, SseParser
from .store import Store, StoreUnavailable, open_store

log = logging.getLogger("mcpmeter")

META = "mcpmeter"
SETTLE_ATTEMPTS = 5
MAX_BACKGROUND_SETTLEMENTS = 1000  # beyond this, responses wait for their settlement (backpressure)
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
    balance_task: asyncio.Future[int] | None = None
    limit_headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    outcome: Outcome | None = None
    failure: Failure | None = None
    refunded: bool = False
    parser: SseParser | None = None
    decoder: StreamDecoder | None = None  # a compressed stream, decoded for the meter with a ceiling
    deadline: asyncio.TimerHandle | None = None
    settlement: asyncio.Future[None] | None = None
    route: str = ""  # path and query as the client sent them
    rewriter: legacy_sse.EndpointRewriter | None = None  # a legacy SSE session's GET stream
    awaiting_stream: bool = False  # a legacy SSE POST whose answer comes on the session's stream

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
        self.calls: dict[str, Call] = {}
        self.sweeper: asyncio.Task[None] | None = None
        self.background: set[asyncio.Future[None]] = set()  # settlements of answered, billed calls
        # Legacy SSE: (listing id, session route) -> JSON-RPC id -> a POSTed call awaiting its answer.
        self.awaiting: dict[tuple[int, str], dict[JsonId, tuple[http.HTTPFlow, Call]]] = {}

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
                except StoreUnavailable:
                    pass
                except Exception:
                    log.exception("mcpmeter: sweeping unsettled calls failed")
            await asyncio.sleep(min(60.0, config.stale_call_seconds / 4) if config else 60.0)

    def done(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.cache is not None:
            _close_later(self.cache)
        if self.store is not None:
            self.store.close()

    # --- hooks -------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.config is None:
            return
        length = flow.request.headers.get("content-length", "")
        limit = self.config.max_body_bytes

        def too_large() -> http.Response:
            _redact(flow)  # `request`, which redacts the key, never runs for this flow
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
        credential = _redact(flow)
        try:
            await self._meter(flow, call, credential)
        except GatewayError as e:
            await self._refuse(flow, call, e)
        except StoreUnavailable as e:
            log.warning("mcpmeter: store unavailable, refusing %s: %s", call.request_id, e)
            await self._refuse(flow, call, GatewayError("store_unavailable", headers={"Retry-After": "1"}))
        except Exception:
            log.exception("mcpmeter: request %s failed; answering 500, not forwarding", call.request_id)
            await self._fail_closed(flow, call)

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = self.calls.get(flow.id)
        if call is None or flow.response is None:
            return
        try:
            call.status = flow.response.status_code
            session = flow.response.headers.get("mcp-session-id")
            if session and call.consumer is not None:
                await self.cache.bind_session(session, call.consumer.principal)
            if "text/event-stream" in flow.response.headers.get("content-type", "").lower():
                call.parser = SseParser(self.config.max_event_bytes if self.config else DEFAULT_MAX_EVENT_BYTES)
                coding = flow.response.headers.get("content-encoding", "").strip()
                if coding and coding.lower() != "identity" and self.config is not None:  # asked for identity
                    call.decoder = StreamDecoder(coding, self.config.max_body_bytes)
                if call.listing is not None and call.listing.transport == "sse" and call.listing.upstream_url:
                    call.rewriter = legacy_sse.EndpointRewriter(call.listing.upstream_url, call.listing.slug)
                flow.response.stream = self._stream_watcher(flow, call)
                if call.priced is None:
                    self._cancel_deadline(call)
                await self._stamp(flow, call)
        except Exception:
            log.exception("mcpmeter: responseheaders %s failed", call.request_id)

    async def response(self, flow: http.HTTPFlow) -> None:
        call = self.calls.get(flow.id)
        if call is None or flow.response is None:
            return
        try:
            self._cancel_deadline(call)
            if call.parser is None:
                call.status = flow.response.status_code
                if call.priced is not None and call.outcome is None:
                    call.outcome = self._body_outcome(flow.response, call.priced.rpc_id)
                if self._await_stream(flow, call):
                    await self._stamp(flow, call)
                    return
            if call.parser is None and self._billed_without_refund(call):
                # The debit and its ledger row are committed and the headers need nothing from the
                # settlement (the balance comes from the debit's transaction): answer now, record after.
                self._settle_in_background(flow, call)
            else:
                await self._settle(flow, call)
            if call.parser is None:
                await self._stamp(flow, call)
        except Exception:
            log.exception("mcpmeter: response %s failed; settling it all the same", call.request_id)
            await self._settle_anyway(flow, call, delivered=True)
        finally:
            if not call.awaiting_stream:
                self._finish(flow, call)

    async def error(self, flow: http.HTTPFlow) -> None:
        call = self.calls.get(flow.id)
        if call is None:
            return
        try:
            self._cancel_deadline(call)
            if call.failure is None:
                call.failure = Failure.CLIENT_GONE if compat.client_gone(flow) else Failure.UPSTREAM
            self._end_session_stream(call)
            await self._settle(flow, call)
            if flow.response is None and call.failure is not Failure.CLIENT_GONE:
                code = "upstream_timeout" if call.failure is Failure.TIMEOUT else "upstream_failed"
                call.status = 504 if call.failure is Failure.TIMEOUT else 502
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
        if path == "/.well-known/oauth-protected-resource" or path.startswith(
            "/.well-known/oauth-protected-resource/"
        ):
            return self._resource_metadata(flow, call)
        call.route = req.path
        slug, _, subpath = path.lstrip("/").partition("/")
        if not slug:
            raise GatewayError("not_found")
        if not SLUG_RE.match(slug):
            raise GatewayError("invalid_slug")
        flow.metadata[META] = {"request_id": call.request_id, "slug": slug}
        check_http_method(req.data.method.decode("ascii", "replace"), req.raw_content or b"")  # as sent: case counts

        consumer = await self._consumer(credential) if credential else None
        if consumer is None:
            raise self._unauthorized(flow, sent=credential is not None or "authorization" in req.headers)
        call.consumer = consumer
        if consumer.status == "suspended":
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
        if listing.transport == "sse" and subpath:
            session = _legacy_session(listing, req.path)
        if session:
            owner = await self.cache.session_owner(session)
            if owner is not None and owner != consumer.principal:
                raise GatewayError("session_forbidden")
        if req.method == "POST":
            inspection = inspect_request(
                req.raw_content or b"", self.config.billable_methods,
                req.headers.get("mcp-method"), req.headers.get("mcp-name"),
            )
            call.priced = inspection.call
            flow.metadata[META]["method"] = inspection.method

        windows = windows_for(listing.rate_limit_per_minute or self.config.default_rpm,
                              listing.rate_limit_per_day or self.config.default_rpd)
        limit = await self.cache.hit(f"{listing.id}:{consumer.principal}", windows)
        call.limit_headers = limit_headers(limit, windows)
        if not limit.allowed:
            raise GatewayError("rate_limited", headers=call.limit_headers, scope=limit.scope,
                               retry_after=limit.retry_after)

        if call.priced is not None:
            await self._charge(flow, call, consumer, listing, call.priced)
        else:
            call.balance_task = asyncio.ensure_future(self.store.balance(consumer.user_id))
        self._forward(flow, call, listing, subpath, query)

    async def _consumer(self, credential: Credential) -> Consumer | None:
        cached = await self.cache.get_consumer(credential.hash)
        if cached is MISS:
            cached = await self.store.find_consumer(credential)
            await self.cache.put_consumer(credential.hash, cached)
        if cached is not None and cached.expires_at is not None and cached.expires_at <= time.time():
            return None
        return cached

    async def _listing(self, slug: str) -> Listing | None:
        cached = await self.cache.get_listing(slug)
        if cached is MISS:
            cached = await self.store.find_listing(slug)
            await self.cache.put_listing(slug, cached)
        return cached

    async def _charge(self, flow: http.HTTPFlow, call: Call, consumer: Consumer, listing: Listing,
                      priced: PricedCall) -> None:
        price = billing.price_of(listing, priced.tool_name)
        call.charge = ChargeRequest(
            request_id=call.request_id, user_id=consumer.user_id, project_id=consumer.project_id,
            listing_id=listing.id, tool_name=priced.tool_name, price=price,
            free_allowance=listing.free_calls_per_consumer, period=billing.period(call.called_at),
        )
        result = await self.store.charge(call.charge)
        call.balance = result.balance
        flow.metadata[META].update(tool=priced.tool_name, price=price)
        if not result.accepted:
            call.charge = None
            details: dict[str, Any] = {"balance_micro_cents": result.balance, "required_micro_cents": price}
            raise GatewayError(result.verdict.value, **details)
        call.charged = result

    def _forward(self, flow: http.HTTPFlow, call: Call, listing: Listing, subpath: str, query: str) -> None:
        assert self.config is not None and listing.upstream_url
        if listing.transport == "sse":
            url = legacy_sse.target_url(listing.upstream_url, subpath, query)
        else:
            url = forwarding.target_url(listing.upstream_url, subpath, query)
        fields = [(k, v) for k, v in flow.request.headers.items(multi=True)]
        flow.request.url = url
        flow.request.headers.clear()
        for name, value in forwarding.upstream_headers(fields, listing.upstream_headers,
                                                       forwarding.authority(url)):
            flow.request.headers.add(name, value)
        timeout_ms = self.config.upstream_timeout_ms
        if listing.upstream_timeout_seconds:
            timeout_ms = listing.upstream_timeout_seconds * 1000
        timeout_ms = min(timeout_ms, self.config.max_upstream_timeout_ms)
        call.deadline = asyncio.get_running_loop().call_later(timeout_ms / 1000, self._on_deadline, flow, call)
        self.calls[flow.id] = call
        if listing.transport == "sse" and call.priced is not None:
            # Registered before forwarding: the answer can reach the session's stream before the 202.
            self.awaiting.setdefault((listing.id, call.route), {})[call.priced.rpc_id] = (flow, call)
        flow.metadata[META]["decision"] = "forwarded"

    # --- streams and deadlines ------------------------------------------------------------

    def _stream_watcher(self, flow: http.HTTPFlow, call: Call) -> Callable[[bytes], bytes]:
        """mitmproxy calls this with each chunk as it passes; it must never raise."""

        def watch(chunk: bytes) -> bytes:
            try:
                if call.rewriter is not None:
                    ended, had_route = not chunk, call.rewriter.route is not None
                    chunk = call.rewriter.feed(chunk)
                    if not had_route and call.rewriter.route is not None and call.consumer is not None:
                        # The session's POST route belongs to the key that opened the stream.
                        asyncio.ensure_future(self.cache.bind_session(
                            _legacy_session(call.listing, call.rewriter.route), call.consumer.principal))
                    if call.rewriter.route is not None and call.parser is not None and call.listing is not None:
                        self._answer_awaiting(call.listing.id, call.rewriter.route, call.parser.feed(chunk))
                    if ended:  # the final b"": a held-back chunk (b"" returned) is not the end
                        self._end_session_stream(call)
                elif call.priced is not None and call.outcome is None and call.parser is not None:
                    data = call.decoder.feed(chunk) if call.decoder is not None and chunk else chunk
                    for event in call.parser.feed(data) if data or not chunk else ():
                        outcome = _event_outcome(event, call.priced.rpc_id)
                        if outcome is not None:
                            # Settle now: the answer is what was paid for, whatever the stream does next.
                            call.outcome = outcome
                            self._cancel_deadline(call)
                            call.settlement = asyncio.ensure_future(self._settle_now(flow, call))
                            break
            except Exception:
                log.exception("mcpmeter: stream watcher %s failed", call.request_id)
                if call.outcome is not None and call.settlement is None:  # seen, then something broke
                    call.settlement = asyncio.ensure_future(self._settle_now(flow, call))
            return chunk

        return watch

    def _await_stream(self, flow: http.HTTPFlow, call: Call) -> bool:
        """A legacy SSE call answered 202: its result will come on the session's GET stream."""
        if (call.priced is None or call.outcome is not None or call.listing is None
                or call.listing.transport != "sse" or call.status is None or not 200 <= call.status < 300):
            return False
        call.awaiting_stream = True
        self.calls.pop(flow.id, None)
        return True

    def _answer_awaiting(self, listing_id: int, route: str, events: list[Any]) -> None:
        waiting = self.awaiting.get((listing_id, route))
        if not waiting:
            return
        for event in events:
            try:
                message = json.loads(event.data)
            except ValueError:
                continue
            rpc_id = message.get("id") if isinstance(message, dict) else None
            if rpc_id is None or isinstance(rpc_id, (dict, list)) or rpc_id not in waiting:
                continue
            flow, call = waiting[rpc_id]
            assert call.priced is not None
            if (outcome := answer_outcome(message, call.priced.rpc_id)) is not None:
                del waiting[rpc_id]
                call.outcome = outcome
                # The answer may overtake the POST's own 202: then the response hook settles it.
                if call.awaiting_stream:
                    self._settle_awaiting(flow, call)

    def _end_session_stream(self, call: Call) -> None:
        """The session's stream is over: calls still awaiting an answer never get one."""
        if call.rewriter is None or call.rewriter.route is None or call.listing is None:
            return
        for flow, waiting in self.awaiting.pop((call.listing.id, call.rewriter.route), {}).values():
            waiting.failure = Failure.UPSTREAM
            self._settle_awaiting(flow, waiting)

    def _settle_awaiting(self, flow: http.HTTPFlow, call: Call) -> None:
        self._cancel_deadline(call)

        async def settle() -> None:
            try:
                await self._settle_now(flow, call)
            except Exception:
                log.exception("mcpmeter: settling %s failed", call.request_id)

        call.settlement = asyncio.ensure_future(settle())

    def _on_deadline(self, flow: http.HTTPFlow, call: Call) -> None:
        call.deadline = None
        if call.awaiting_stream and call.outcome is None and call.settlement is None:
            assert call.listing is not None and call.priced is not None
            self.awaiting.get((call.listing.id, call.route), {}).pop(call.priced.rpc_id, None)
            call.failure = Failure.TIMEOUT
            self._settle_awaiting(flow, call)
            return
        if call.outcome is not None or call.settlement is not None or not flow.live:
            return
        if call.priced is None and flow.response is not None:
            return
        call.failure = Failure.TIMEOUT
        if not compat.abort_upstream(flow):
            log.error("mcpmeter: could not abort the upstream of %s after its timeout", call.request_id)

    def _cancel_deadline(self, call: Call) -> None:
        if call.deadline is not None:
            call.deadline.cancel()
            call.deadline = None

    def _body_outcome(self, response: http.Response, rpc_id: JsonId) -> Outcome | None:
        """What a buffered answer says, decoded by the meter with a ceiling (never by mitmproxy)."""
        assert self.config is not None
        limit = self.config.max_body_bytes
        try:
            body = decode_bounded(response.raw_content or b"", response.headers.get("content-encoding"), limit)
        except TooLarge:
            log.warning("mcpmeter: a compressed answer inflates past max_body_bytes (%d); not read further", limit)
            return None
        return None if body is None else body_outcome(body, rpc_id)

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
                await self._stamp(flow, call)
        except Exception:
            log.exception("mcpmeter: could not stamp the answer to %s", call.request_id)

    def _billed_without_refund(self, call: Call) -> bool:
        if call.charged is None or call.listing is None or len(self.background) >= MAX_BACKGROUND_SETTLEMENTS:
            return False  # not paid for, or settlements are backing up: wait for this one
        return not _decision(call)[0].refund

    async def drain(self) -> None:
        """Wait for the settlements still being written (tests, and an orderly stop)."""
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)

    def _settle_in_background(self, flow: http.HTTPFlow, call: Call) -> None:
        async def settle() -> None:
            try:
                await self._settle_now(flow, call, background=True)
            except Exception:
                log.exception("mcpmeter: settling %s failed; the sweeper will", call.request_id)

        _annotate(flow, call, *_decision(call))  # what mitmweb shows does not wait for the database
        call.settlement = task = asyncio.ensure_future(settle())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _settle(self, flow: http.HTTPFlow, call: Call) -> None:
        if call.settlement is None:
            call.settlement = asyncio.ensure_future(self._settle_now(flow, call))
        await call.settlement

    async def _settle_now(self, flow: http.HTTPFlow, call: Call, background: bool = False) -> None:
        meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
        if call.charge is None or call.charged is None:
            if call.balance_task is not None:
                call.balance = await _maybe(call.balance_task)
            meta["decision"] = "passthrough"
            meta["balance"] = call.balance
            return
        assert self.config is not None and call.listing is not None and call.consumer is not None
        decision, status = _decision(call)
        settlement = Settlement(
            charge=call.charge, refund=decision.refund, status=status, duration_ms=call.elapsed_ms(),
            called_at=call.called_at, key_id=call.consumer.key_id, token_id=call.consumer.token_id,
            client=classify(flow.request.headers.get("user-agent")),
            user_agent=flow.request.headers.get("user-agent"), fee_bps=self.config.platform_fee_bps,
            taken=call.charged, need_balance=not background,
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
        _annotate(flow, call, decision, status)

    async def _stamp(self, flow: http.HTTPFlow, call: Call) -> None:
        """The metering headers, on a response whose headers have not been sent yet."""
        if call.balance is None and call.balance_task is not None:
            call.balance = await _maybe(call.balance_task)
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
        self.calls.pop(flow.id, None)
        if call.priced is not None and call.listing is not None and call.listing.transport == "sse":
            waiting = self.awaiting.get((call.listing.id, call.route))
            if waiting is not None and waiting.get(call.priced.rpc_id, (None, None))[1] is call:
                del waiting[call.priced.rpc_id]
            if not waiting:
                self.awaiting.pop((call.listing.id, call.route), None)

    # --- answers of the gateway's own -------------------------------------------------------

    async def _refuse(self, flow: http.HTTPFlow, call: Call, error: GatewayError) -> None:
        if call.consumer is not None and call.balance is None and self.store is not None:
            try:
                call.balance = await self.store.balance(call.consumer.user_id)
            except Exception:  # the balance is a courtesy; a refusal must be answered whatever happens
                log.warning("mcpmeter: no balance for the refusal of %s", call.request_id, exc_info=True)
        flow.response = self._error_response(error, call)
        meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
        meta.update(decision="refused", error=error.spec.code)
        slug = meta.get("slug", "-")
        flow.comment = f"{slug} · refused {error.status} {error.spec.code}"
        flow.marked = ":no_entry:"

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
        body = dict(json.loads(error.body()), request_id=call.request_id)
        return http.Response.make(error.status, json.dumps(body).encode(), headers)

    def _unauthorized(self, flow: http.HTTPFlow, sent: bool) -> GatewayError:
        metadata_url = self._public_url(flow) + "/.well-known/oauth-protected-resource"
        return GatewayError("invalid_token", headers={
            "WWW-Authenticate": challenge(metadata_url, "invalid_token" if sent else None)})

    def _public_url(self, flow: http.HTTPFlow) -> str:
        if self.config and self.config.public_url:
            return self.config.public_url
        host = flow.request.headers.get("host") or f"{flow.request.host}:{flow.request.port}"
        return f"{flow.request.scheme}://{host}"

    async def _health(self, flow: http.HTTPFlow, call: Call) -> None:
        if flow.request.method.upper() not in ("GET", "HEAD"):
            raise GatewayError("method_not_allowed")
        assert self.store is not None and self.cache is not None
        checks: dict[str, Any] = {}
        for name, probe in (("store", self.store.health), ("cache", self.cache.health)):
            try:
                checks[name] = await asyncio.wait_for(probe(), timeout=1.0)
            except Exception as e:  # health reports, it does not fail
                checks[name] = {"ok": False, "error": str(e) or type(e).__name__}
        ok = bool(checks["store"].get("ok"))
        body = {"status": "ok" if ok else "degraded", **checks}
        flow.response = http.Response.make(200 if ok else 503, json.dumps(body).encode(),
                                           {"Content-Type": "application/json",
                                            "X-Mcpmeter-Request-Id": call.request_id})
        flow.metadata[META] = {"decision": "health"}

    def _resource_metadata(self, flow: http.HTTPFlow, call: Call) -> None:
        base = self._public_url(flow)
        body = {
            "resource": base,
            "authorization_servers": [base],
            "bearer_methods_supported": ["header"],
            "resource_name": "mcpmeter",
        }
        flow.response = http.Response.make(200, json.dumps(body).encode(), {
            "Content-Type": "application/json", "X-Mcpmeter-Request-Id": call.request_id})
        flow.metadata[META] = {"decision": "metadata"}

    # --- commands for local billing debugging -----------------------------------------------

    @command.command("mcpmeter.balance")
    def balance_command(self, user_id: int) -> None:
        """Log a consumer's balance in µ¢ (read from the store)."""
        self._spawn(self.store.balance(user_id), lambda b: f"user {user_id}: balance {b} µ¢")

    @command.command("mcpmeter.topup")
    def topup_command(self, user_id: int, micro_cents: int) -> None:
        """Add credit to a consumer, with its ledger row, and log the new balance."""
        if micro_cents <= 0:
            raise exceptions.CommandError("micro_cents must be positive")
        self._spawn(self.store.topup(user_id, micro_cents, "top-up from mitmproxy command"),
                    lambda b: f"user {user_id}: topped up {micro_cents} µ¢, balance {b} µ¢")

    @command.command("mcpmeter.calls")
    def calls_command(self, limit: int = 10) -> None:
        """Log the most recent metered calls."""
        self._spawn(self.store.recent_calls(max(1, min(limit, 200))), lambda rows: "\n".join(
            f"{r.called_at} {r.slug} {r.tool_name} status {r.status} billed {r.billed} µ¢ {r.request_id}"
            for r in rows) or "no calls recorded yet")

    def _spawn(self, work: Any, describe: Callable[[Any], str]) -> None:
        async def run() -> None:
            try:
                log.warning("mcpmeter: %s", describe(await work))
            except Exception as e:
                log.warning("mcpmeter: command failed: %s", e)

        asyncio.ensure_future(run())


def _event_outcome(event: Event, rpc_id: JsonId) -> Outcome | None:
    if event.oversized:
        return scanned_outcome(event.messages, rpc_id)
    return body_outcome(event.data.encode("utf-8", "surrogatepass"), rpc_id)


def _decision(call: Call) -> tuple[billing.Decision, int]:
    """Whether the forwarded call is refunded, and the status it is recorded with."""
    assert call.listing is not None
    decision = billing.decide(call.status, call.outcome, call.failure, call.listing.bill_tool_errors)
    if call.outcome is not None:
        return decision, call.status or 200
    failed = {Failure.TIMEOUT: 504, Failure.UPSTREAM: 502, Failure.CLIENT_GONE: 499, Failure.INTERNAL: 500}
    return decision, failed.get(call.failure, call.status or 0) if call.failure else (call.status or 0)


def _annotate(flow: http.HTTPFlow, call: Call, decision: billing.Decision, status: int) -> None:
    """The metering decision on the flow: metadata for addons, comment and mark for mitmweb."""
    assert call.charged is not None and call.charge is not None and call.listing is not None
    verdict = call.charged.verdict
    label = "refunded" if decision.refund else ("free" if verdict is Verdict.FREE else "billed")
    flow.metadata.setdefault(META, {"request_id": call.request_id}).update(
        decision=label, reason=decision.reason, billed=0 if decision.refund else call.charged.amount,
        balance=call.balance, status=status)
    amount = "free tier" if verdict is Verdict.FREE else f"{call.charged.amount} µ¢"
    flow.comment = (f"{call.listing.slug} · {call.charge.tool_name} · {label} "
                    f"({amount}{', ' + decision.reason if decision.refund else ''}) · balance {call.balance} µ¢")
    flow.marked = {"billed": ":moneybag:", "free": ":gift:", "refunded": ":leftwards_arrow_with_hook:"}[label]


def _legacy_session(listing: Listing | None, route: str) -> str:
    return f"legacy:{listing.id if listing else 0}:{route}"


def _check_live(listing: Listing | None) -> None:
    if listing is None:
        raise GatewayError("no_such_mcp")
    if listing.status == "archived":
        raise GatewayError("mcp_archived")
    if listing.status == "paused":
        raise GatewayError("mcp_paused")
    if listing.status != "live" or not listing.upstream_url:
        raise GatewayError("mcp_not_yet_live")


def _redact(flow: http.HTTPFlow) -> Credential | None:
    """Keep the bearer key out of the flow mitmweb shows and saves; return what it was."""
    header = flow.request.headers.get("authorization")
    if header is None:
        return None
    credential = parse_authorization(header)
    flow.request.headers["authorization"] = f"Bearer {credential.prefix} (redacted)" if credential else "(redacted)"
    return credential


async def _maybe(task: asyncio.Future[int]) -> int | None:
    try:
        return await task
    except Exception:
        return None


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
