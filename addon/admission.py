"""Admission: everything the request hook decides before a call leaves for the upstream.

In order: the route and its syntax, the origin, the consumer (authentication), the listing, the
rate limit; then, counted against it (ids are not probed faster than it allows), the session's
owner and a tasks/result for another user's or a refunded task; the Idempotency-Key, the circuit
breaker, the charge, and the forward itself (target URL, headers, deadline, and the registries that
later answer the call).
Any refusal is raised as a GatewayError for the request hook to answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from . import (billing, compat, display, endpoints, forwarding, idempotency, legacy_sse, origins, paths, redaction,
               shadow)
from . import pending as resumption
from .auth import Credential, challenge
from .cache import MISS
from .call import META, Call, Label
from .config import SLUG_RE
from .errors import GatewayError
from .jsonrpc import (JsonId, PricedCall, check_http_method, check_request_charset, check_request_encoding,
                      inspect_request)
from .legacy_sessions import identity as legacy_identity
from .model import ChargeRequest, Consumer, ConsumerStatus, Listing, ListingStatus, Transport, Verdict
from .ratelimit import LimitVerdict, Window, bucket, headers as limit_headers, windows_for
from .store.wallets import WalletStore

# Kept per call and per session (refund markers, session owners, the unknown-listing cache): bounded
# here, not by the body limit. Upstreams issue UUID-like session ids; slugs are the reference's
# `mcps.slug`, a VARCHAR(255).
MAX_SESSION_ID_CHARS = 512
MAX_SLUG_CHARS = 255

if TYPE_CHECKING:
    from .gateway import Mcpmeter


class Admission:
    def __init__(self, gw: Mcpmeter) -> None:
        self.gw = gw

    async def admit(self, flow: http.HTTPFlow, call: Call, credential: Credential | None,
                    wrapped: list[str]) -> None:
        """Meter the request and forward it, or answer it (own endpoints, a replay); raise to refuse.
        `wrapped`: the values of the consumer's X-Forward-Authorization (-Cookie) headers, which the
        flow shows redacted (redaction.take_forwarded_credentials)."""
        gw = self.gw
        assert gw.config is not None and gw.store is not None and gw.cache is not None
        if await endpoints.answer(gw, flow, call, credential):
            return
        req = flow.request
        self._check_origin(flow)
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
        if forwarding.folded(req.headers.fields):  # RFC 9112 §5.2: rejected, or unfolded before forwarding
            raise GatewayError("invalid_request", reason="a header field is folded over several lines (obs-fold)")
        if forwarding.untokened(req.headers.fields) or req.trailers and forwarding.untokened(req.trailers.fields):
            # RFC 9112 §5.1 (`Cookie : x`): rejected. Not repeated: the name is any bytes (its value is redacted).
            raise GatewayError("invalid_request", reason=(
                "a header or trailer field name is not a token (whitespace before the colon, a control or "
                "non-ASCII character)"))

        consumer = await self.consumer(credential) if credential else None
        if consumer is None:
            raise self._unauthorized(flow, sent=credential is not None or "authorization" in req.headers)
        call.consumer = consumer
        if consumer.status is ConsumerStatus.SUSPENDED:
            raise GatewayError("account_suspended")
        listing = await self.listing(slug)
        call.listing = listing
        _check_live(listing)
        assert listing is not None and listing.upstream_url

        if len(req.raw_content or b"") > gw.config.max_body_bytes:
            raise GatewayError("payload_too_large", limit_bytes=gw.config.max_body_bytes)
        sessions = req.headers.get_all("mcp-session-id")
        if len(sessions) > 1:  # the upstream might read another one than the one checked here
            raise GatewayError("invalid_request", reason="one Mcp-Session-Id header at most")
        session = sessions[0] if sessions else None
        if session is not None and len(session) > MAX_SESSION_ID_CHARS:  # kept per call (markers, owners)
            raise GatewayError("invalid_request",
                               reason=f"Mcp-Session-Id longer than {MAX_SESSION_ID_CHARS} characters")
        if listing.transport is Transport.SSE and subpath:
            session = call.legacy_session = legacy_identity(listing.id, subpath, query)
        elif session and listing.transport is not Transport.SSE:
            call.session = (listing.id, session)
        elif req.method == "GET" and listing.transport is not Transport.SSE:
            # Without a session, a GET naming an event resumes the stream that carried it: its answers
            # settle (or are withheld from) the call parked under that event (addon/pending.py).
            resumed = req.headers.get_all("last-event-id")
            if len(resumed) > 1:  # the upstream might resume after another one than the one matched here
                raise GatewayError("invalid_request", reason="one Last-Event-ID header at most")
            if resumed:
                call.session = gw.pending.resumed(resumption.resume_key(listing.id, resumed[0]))
        method: str | None = None
        request_ids: tuple[JsonId, ...] = ()
        if req.method == "POST":
            check_request_charset(req.headers.get_all("content-type"))  # the bytes the upstream reads are UTF-8
            check_request_encoding(req.headers.get_all("content-encoding"))  # ... and the bytes the meter read
            inspection = inspect_request(
                req.raw_content or b"", gw.config.billable_methods,
                req.headers.get("mcp-method"), req.headers.get("mcp-name"),
            )
            call.priced, request_ids = inspection.call, inspection.ids
            method = flow.metadata[META]["method"] = inspection.method

        limit = _Limit(bucket(listing.id, consumer.user_id),
                       windows_for(listing.rate_limit_per_minute or gw.config.default_rpm,
                                   listing.rate_limit_per_day or gw.config.default_rpd))
        # A call paid from a wallet is counted by the script that spends for it (one round trip before
        # forwarding): its limit is judged at the charge, after the checks below; a check that refuses
        # it counts it on the way out, so that ids are not probed faster than the limit allows either way.
        at_charge = self._limited_at_charge(flow, call, listing)
        if not at_charge:
            await self._rate_limit(flow, call, limit)
        try:
            # After the rate limit: probing other keys' session ids counts.
            if session and await gw.cache.session_owner(listing.id, session) not in (None, consumer.principal):
                raise GatewayError("session_forbidden")
            if (call.session is not None and request_ids and gw.pending.watching(call.session)
                    and gw.pending.in_flight(call.session, request_ids)):
                raise GatewayError("invalid_request",
                                   reason="a call of this session with this id is still running")
            if call.legacy_session and req.method == "POST" and not gw.legacy.open_for(call.legacy_session,
                                                                                       consumer.principal):
                # A legacy POST reaches only a session this key holds open here (legacy_sessions.open_for).
                raise GatewayError("session_forbidden")
            continues = False  # a retry carrying a requestState this key was issued: its first round paid
            if req.method == "POST":  # after the rate limit: its task refusals (403, 410) must not probe ids for free
                continues = gw.deferred.on_request(call, req.raw_content or b"", method, session)
            if await self._idempotent(flow, call, listing):  # a replay counts against the rate limit, like any
                return  # answered with the first attempt's stored outcome: not forwarded, not charged
            to = self._destination(listing, subpath, query)  # before the charge: a refusal here costs nothing
            if at_charge and not await gw.circuits.closed(listing):
                # A circuit not closed may hand this call its one probe slot: a call past its limit must not
                # hold it (every other consumer refused 503 meanwhile), so the limit is judged first here.
                at_charge = False
                await self._rate_limit(flow, call, limit)
            call.probe = await gw.circuits.admit(listing, priced=call.priced is not None, token=call.request_id)
        except Exception:  # a refusal, or a check that failed (500, 503): counted as if judged first
            if at_charge:
                await self._rate_limit(flow, call, limit)  # over the limit: answered 429, as if judged first
            raise
        try:
            if call.priced is not None and not continues:
                await self._charge(flow, call, consumer, listing, call.priced, limit if at_charge else None)
            elif at_charge:
                await self._rate_limit(flow, call, limit)  # continues a held round: counted, not charged
            # Unpriced traffic (initialize, lists, GET streams) never reaches the database: no balance read.
            if call.session is not None and flow.metadata[META].get("method") == resumption.CANCELLED_METHOD:
                gw.streams.cancel(call, req.raw_content or b"")  # and the notification goes on to the upstream
            self._forward(flow, call, listing, to, wrapped)
        except Exception:
            if call.probe:  # refused (402, cap, store) or failed before it left: someone else may probe
                call.probe = False
                await gw.circuits.release(listing, call.request_id)
            raise

    # --- the rate limit ------------------------------------------------------------------------

    def _limited_at_charge(self, flow: http.HTTPFlow, call: Call, listing: Listing) -> bool:
        """Whether the charge judges this call's rate limit too: a call paid from a wallet (its store
        spends in Redis, where the limit is), neither in shadow mode (refusals let through, the charge
        recorded only) nor carrying an Idempotency-Key (whose claim must not outlive a 429)."""
        gw = self.gw
        assert gw.config is not None
        return (call.priced is not None and isinstance(gw.store, WalletStore)
                and gw.store.in_wallet(billing.price_of(listing, call.priced.tool_name),
                                       listing.free_calls_per_consumer)
                and not shadow.applies(gw.config, listing) and idempotency.HEADER not in flow.request.headers)

    async def _rate_limit(self, flow: http.HTTPFlow, call: Call, limit: _Limit) -> None:
        gw = self.gw
        assert gw.cache is not None
        self._judged(flow, call, limit, await gw.cache.hit(limit.bucket, limit.windows))

    def _judged(self, flow: http.HTTPFlow, call: Call, limit: _Limit, verdict: LimitVerdict) -> None:
        gw = self.gw
        assert gw.config is not None and call.listing is not None
        call.limit_headers = limit_headers(verdict, limit.windows)
        if not verdict.allowed and shadow.applies(gw.config, call.listing):
            shadow.note_refusal(flow, "rate_limited")  # shadow mode: recorded, let through
        elif not verdict.allowed:
            # Retry-After and RateLimit-* from call.limit_headers, as on every refusal from here on
            raise GatewayError("rate_limited", scope=verdict.scope, retry_after=verdict.retry_after)

    # --- who and what (dryrun.py asks the same) --------------------------------------------

    async def consumer(self, credential: Credential) -> Consumer | None:
        cache, store = self.gw.cache, self.gw.store
        assert cache is not None and store is not None
        cached = await cache.get_consumer(credential.hash)
        if cached is MISS:
            cached = await store.find_consumer(credential)
            await cache.put_consumer(credential.hash, cached)
        if cached is not None and cached.expires_at is not None and cached.expires_at <= time.time():
            return None
        return cached

    async def listing(self, slug: str) -> Listing | None:
        cache, store = self.gw.cache, self.gw.store
        assert cache is not None and store is not None
        if len(slug) > MAX_SLUG_CHARS:
            return None  # no listing has it: not looked up, nor remembered as unknown (the cache's bytes)
        cached = await cache.get_listing(slug)
        if cached is MISS:
            cached = await store.find_listing(slug)
            await cache.put_listing(slug, cached)
        return cached

    def _check_origin(self, flow: http.HTTPFlow) -> None:
        """A browser page on a foreign origin may not use the gateway (DNS rebinding): 403 before
        authentication. No Origin (not a browser, or same-origin GET) passes."""
        config = self.gw.config
        assert config is not None
        sent = flow.request.headers.get_all("origin")
        if not sent:
            return
        allowed = set(config.allowed_origins)
        if config.public_url and (public := origins.of_url(config.public_url)):
            allowed.add(public)
        if len(sent) > 1 or origins.normalize(sent[0]) not in allowed:
            raise GatewayError("origin_forbidden")

    def _unauthorized(self, flow: http.HTTPFlow, sent: bool) -> GatewayError:
        metadata_url = endpoints.public_url(self.gw.config, flow) + endpoints.RESOURCE_METADATA
        return GatewayError("invalid_token", headers={
            "WWW-Authenticate": challenge(metadata_url, "invalid_token" if sent else None)})

    # --- the Idempotency-Key, the charge, the forward -----------------------------------------

    async def _idempotent(self, flow: http.HTTPFlow, call: Call, listing: Listing) -> bool:
        """Idempotency-Key (addon/idempotency.py): the header is the gateway's, never forwarded. A
        priced call claims its key; True when it was answered with the stored outcome instead."""
        cache = self.gw.cache
        assert cache is not None and call.consumer is not None
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
                                      self.gw.streams.timeout(listing) + idempotency.IN_FLIGHT_MARGIN_SECONDS)
        record = await cache.idem_claim(claim.key, claim.value, claim.ttl_seconds)
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
        # The upstream's header bytes as they came: mitmproxy read those that are not UTF-8 as surrogate escapes.
        flow.response = http.Response.make(answer.status, b"", [
            (k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in answer.headers])
        flow.response.raw_content = answer.body
        flow.response.headers["content-length"] = str(len(answer.body))
        flow.response.headers[idempotency.REPLAYED] = "true"
        flow.response.headers.update(call.limit_headers)
        flow.metadata[META].update(decision=Label.REPLAYED,
                                   replay_of=flow.response.headers.get("x-mcpmeter-request-id"))
        who = display.consumer_label(flow, call.consumer.user_id)
        display.gateway_answered(flow, f"{who} · {listing.slug} · replayed (Idempotency-Key), not charged", ":repeat:")
        return True

    async def _charge(self, flow: http.HTTPFlow, call: Call, consumer: Consumer, listing: Listing,
                      priced: PricedCall, limit: _Limit | None) -> None:
        """Charge the call; with `limit`, judge its rate limit in the same round trip (a wallet call)."""
        gw = self.gw
        assert gw.config is not None and gw.store is not None
        price = billing.price_of(listing, priced.tool_name)
        request = ChargeRequest(
            request_id=call.request_id, user_id=consumer.user_id, project_id=consumer.project_id,
            listing_id=listing.id, tool_name=priced.tool_name, price=price,
            # The store's clock decides the month (the database's on MySQL, shared by every gateway).
            free_allowance=listing.free_calls_per_consumer, period=None,
        )
        if shadow.applies(gw.config, listing):  # record what it would cost; charge nothing
            request = await shadow.charge_request(gw.store, flow, request)
        store = gw.store
        if limit is not None and not (isinstance(store, WalletStore) and store.in_wallet(request.price,
                                                                                          request.free_allowance)
                                      and not shadow.applies(gw.config, listing)):
            # A reload since the checks turned wallets (or shadow mode) off: the limit judged alone, as
            # for a call the wallet does not pay, then the charge by the store there is now.
            await self._rate_limit(flow, call, limit)
            limit = None
        call.charge, call.store = request, store  # settled against this store, even after a reload
        if limit is not None:
            assert isinstance(store, WalletStore)
            verdict, charged = await store.charge_limited(request, limit.bucket, limit.windows)
            if charged is None:  # the limit refused it: nothing was charged
                call.charge = None
            self._judged(flow, call, limit, verdict)
            assert charged is not None  # (a call the limit refused is refused by _judged)
            result = charged
        else:
            result = await store.charge(request)
        # The settlement counts in the month the charge counted in (every store names it; this
        # gateway's own month only were one not to).
        call.charge = request.in_period(result.period or billing.period(call.called_at))
        if result.verdict is Verdict.FREE:  # tools/list shows this gateway's own claims at once
            gw.free_used.pop((listing.id, consumer.user_id, call.charge.month), None)
        call.balance = result.balance
        flow.metadata[META].update(tool=priced.tool_name, price=price)
        if not result.accepted:
            call.charge = None
            details: dict[str, Any] = {"balance_micro_cents": result.balance, "required_micro_cents": price}
            raise GatewayError(result.verdict.value, **details)
        call.charged = result

    @staticmethod
    def _destination(listing: Listing, subpath: str, query: str) -> forwarding.Destination:
        assert listing.upstream_url
        try:
            if listing.transport is Transport.SSE:
                url = legacy_sse.target_url(listing.upstream_url, subpath, query)
            else:
                url = forwarding.target_url(listing.upstream_url, subpath, query)
            return forwarding.destination(url)
        except paths.InvalidPath as e:  # the client's part is checked in admit already: a listing URL's
            raise GatewayError("invalid_path", reason=str(e)) from None

    def _forward(self, flow: http.HTTPFlow, call: Call, listing: Listing, to: forwarding.Destination,
                 wrapped: list[str]) -> None:
        gw = self.gw
        assert gw.config is not None
        fields = redaction.reveal_forwarded_credentials(flow.request.headers.items(multi=True), wrapped)
        call.wrapped = wrapped
        aim(flow.request, to)
        body = flow.request.raw_content or b""
        # Trailer fields (HTTP/2; HTTP/1 ones are dropped as read, compat) are nothing the meter checked, and
        # mitmproxy crashes the client's connection writing them to an HTTP/1 upstream.
        flow.request.trailers = None
        # A new header block at once (clear() pops one field at a time), bytes as mitmproxy keeps them.
        flow.request.headers = http.Headers([
            (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
            for name, value in forwarding.upstream_headers(fields, listing.upstream_headers, to.netloc,
                                                           len(body) if body or flow.request.method == "POST"
                                                           else None)])
        # Values only on the wire: the publisher's headers, and credentials the consumer wrapped in X-Forward-*.
        compat.hide_upstream_headers(flow.request, [*listing.upstream_headers, *redaction.CREDENTIAL_HEADERS])
        gw.streams.start_deadline(flow, call, gw.streams.timeout(listing))
        # An answer not streamed is buffered whole by mitmproxy: a ceiling, past which the call fails (refunded).
        compat.limit_answer_body(flow, gw.config.max_answer_bytes, gw.config.max_holding_bytes)
        gw.calls[flow.id] = call
        call.flow = flow
        if call.session is not None and call.priced is not None:  # a notifications/cancelled can name it
            gw.pending.track(call.session, call.priced.rpc_id, flow, call)
        if listing.transport is Transport.SSE and call.priced is not None and call.legacy_session:
            gw.legacy.register(flow, call)
        flow.metadata[META]["decision"] = Label.FORWARDED
        call.forwarded = time.monotonic()
        gw.deferred.forwarded(call)


def aim(request: http.Request, to: forwarding.Destination) -> None:
    """Send the request to `to`: scheme, host, port and an HTTP/2 client's :authority as the `url`
    setter sets them, the path exactly as checked, not as reparsed (forwarding.destination), in
    origin-form over HTTP/1."""
    data = request.data
    data.scheme, data.host, data.port = to.scheme, to.host, to.port
    data.path = to.target.encode("ascii")
    if data.authority and (request.is_http2 or request.is_http3):
        data.authority = to.authority
    else:  # an HTTP/1 absolute-form target (`POST http://host/x`) goes on in origin-form: the path as checked
        data.authority = b""


def _check_live(listing: Listing | None) -> None:
    if listing is None:
        raise GatewayError("no_such_mcp")
    if listing.status is ListingStatus.ARCHIVED:
        raise GatewayError("mcp_archived")
    if listing.status is ListingStatus.PAUSED:
        raise GatewayError("mcp_paused")
    if listing.status is not ListingStatus.LIVE or not listing.upstream_url:
        raise GatewayError("mcp_not_yet_live")


@dataclass(frozen=True, slots=True)
class _Limit:
    """A call's rate-limit bucket (the user's, per listing) and its windows."""
    bucket: str
    windows: Sequence[Window]
