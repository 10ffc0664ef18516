"""Answers as they pass: the stream watcher, the upstream deadlines, and the streamable HTTP
session's parked calls and cancellations (SEP-1699, addon/pending.py).

A streamed call settles the moment its answer passes (whatever the stream does next); a
deadline aborts a call the upstream has not answered in time; a POST stream the server ended
unanswered parks its call until a resumed stream of the session answers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mitmproxy import http

from . import answers, budget, compat, display, idempotency, legacy_sse, receipts, rpc_errors
from . import pending as resumption
from .billing import Failure
from .call import META, Call, Label, Wait, clients_read, decision, event_messages, event_outcome, upstream_timeout
from .decoding import StreamDecoder, TooLarge, decode_bounded
from .errors import GatewayError
from .jsonrpc import JSON, Answer, Outcome, answer_messages, media_type, read_answer, scanned_outcome
from .model import Listing, Transport
from .sse import DEFAULT_MAX_EVENT_BYTES, Event, SseParser
from .stream_edit import StreamEditor, hold_limit

if TYPE_CHECKING:
    from .gateway import Mcpmeter

log = logging.getLogger("mcpmeter")


class StreamWatch:
    def __init__(self, gw: Mcpmeter) -> None:
        self.gw = gw

    def watcher(self, flow: http.HTTPFlow, call: Call) -> Callable[[bytes], bytes | list[bytes]]:
        """mitmproxy calls this with each chunk as it passes; it must never raise."""
        gw = self.gw
        fed = 0  # the bytes of the stream given so far: where `chunk` begins (the parser's offsets, undecoded)

        def watch(chunk: bytes) -> bytes | list[bytes]:
            nonlocal fed
            at, fed = fed, fed + len(chunk)
            if call.rewriter is not None:
                out: bytes | list[bytes] = []  # the rewriter failing lets nothing of the stream out unrewritten
                try:
                    ended, had_route = not chunk, call.rewriter.route is not None
                    out = call.rewriter.feed(chunk)
                    out = gw.legacy.watch(call, out, ended, had_route)
                except Exception:
                    log.exception("mcpmeter: stream watcher %s failed", call.request_id)
                return out
            if call.cut:
                return []  # ended for the client before an event it could not read
            editor = call.editor
            if editor is not None and editor.severed:
                return []  # cut (fail closed): nothing more of it is read or sent
            editing = editor is not None and not editor.finished
            events: list[Event] = []
            parsed = False
            answer: tuple[Event, Outcome] | None = None
            unreadable: Event | None = None
            try:
                answering = call.priced is not None and call.outcome is None and call.settlement is None
                parked = call.priced is None and call.session is not None  # a GET stream of a session (resumed)
                if call.parser is not None and (answering or parked or editing):
                    data = call.decoder.feed(chunk) if call.decoder is not None and chunk else chunk
                    events = call.parser.feed(data) if data or not chunk else []
                    parsed = call.decoder is None  # the parser's offsets are those of `chunk`
                    if editing and parsed:
                        assert editor is not None
                        events = editor.admit(events)  # none past a cut settles a call: it is not delivered
                    for event in events:
                        if parked:  # answers to the session's parked calls settle them
                            self._answer_parked(call, event)
                        elif answering and event.event == "message":  # MCP clients ignore other event types
                            assert call.priced is not None
                            messages = event_messages(event)
                            outcome = scanned_outcome(messages, call.priced.rpc_id)
                            if outcome is not None and editing and editor is not None and editor.withholds(event):
                                continue  # it goes out blanked (it may answer a refunded call): not delivered
                            if outcome is not None:
                                # Settle now: the answer is what was paid for, whatever the stream does next.
                                call.outcome = outcome
                                gw.settlements.start(flow, call)
                                answering = False
                                answer = event, outcome
                            elif not clients_read(event, messages):
                                unreadable = event
                                break
            except Exception:
                parsed = False
                log.exception("mcpmeter: stream watcher %s failed", call.request_id)
                if call.outcome is not None and call.settlement is None:  # seen, then something broke
                    call.settlement = gw.settlements.own(gw.settlements.now(flow, call))
            if unreadable is not None:
                return self._cut(flow, call, chunk, at, events, unreadable, parsed)
            if not editing:
                return chunk
            assert editor is not None
            # The events just parsed, edited (never an empty chunk: over HTTP/1.1 chunked encoding
            # it would end the client's body).
            pending_from = call.parser.pending_from if parsed and call.parser is not None else None
            out = editor.feed(chunk, events, pending_from, answer)
            if call.outcome is not None:
                editor.answered()  # (if its event could not be edited, it passed unedited)
            if editor.severed:
                self.sever(flow, call)
            return out or []

        return watch

    def _cut(self, flow: http.HTTPFlow, call: Call, chunk: bytes, at: int, events: list[Event], unreadable: Event,
             placed: bool) -> bytes:
        """Before its answer, the call's stream carries a message event the MCP Python SDK client cannot
        read (call.clients_read): that client ends the call there with a parse error and reads no further,
        so the call is refunded, and the stream ends there for every client (the TypeScript SDK reports
        the event and reads on: it must not get an answer nobody pays for). What goes out of `chunk` (which
        starts at stream offset `at`) is what comes before that event (its events edited as usual), then in
        its place a JSON-RPC error answering the call: both SDKs end the call with it, as the Python SDK
        would with its parse error (a cut stream alone, with an event id seen, has them resume it again and
        again). A compressed stream's places are not the chunk's (`placed` False): none of the chunk goes,
        and nothing can be written into it. The upstream is closed. Never raises: whatever fails, nothing
        more of the stream goes out."""
        first = unreadable if placed else events[0]  # the first event the client does not get
        call.cut, call.cut_after, call.failure = True, first.resumes_after, Failure.UNREADABLE_EVENT
        out = b""
        try:
            log.info("mcpmeter: %s: the upstream sent an event MCP clients cannot read before the answer; "
                     "the call is refunded and its stream ended there", call.request_id)
            head = chunk[:max(first.start - at, 0)] if placed else b""
            editor = call.editor
            held = editor is not None and not editor.finished and editor.holds(first.start)
            if held and head:  # (an editor that is not finished is fed every chunk: `placed`)
                assert editor is not None
                out = editor.feed(head, [e for e in events if e.end <= first.start], first.start)
            elif not held:
                out = head
            if editor is not None:
                editor.discard()
            if placed and call.priced is not None:
                error = GatewayError("upstream_unreadable")
                # Ahead of it, the end of the event if some of its bytes went out already (one too big to hold)
                ended = b"" if held or first.start >= at else b"\n\n"
                out += ended + b"data: " + rpc_errors.refusal_body(error, call.request_id, call.priced.rpc_id) \
                    + b"\n\n"
            self.gw.settlements.start(flow, call)
            asyncio.get_running_loop().call_soon(compat.abort_upstream, flow)
        except Exception:
            log.exception("mcpmeter: ending the stream of %s failed", call.request_id)
        return out

    async def attach(self, flow: http.HTTPFlow, call: Call) -> None:
        """An SSE answer: watch it, and wrap its stream for the receipts, resumption, deferred calls,
        mitmweb's copy and the Idempotency-Key's replay (in that order: the watcher sees upstream bytes)."""
        gw = self.gw
        assert flow.response is not None
        call.parser = SseParser(gw.config.max_event_bytes if gw.config else DEFAULT_MAX_EVENT_BYTES,
                                budget.holding(gw.config))
        coding = flow.response.headers.get("content-encoding", "").strip()
        if coding and coding.lower() != "identity" and gw.config is not None:  # asked for identity
            call.decoder = StreamDecoder(coding, gw.config.max_body_bytes)
        if call.listing is not None and call.listing.transport is Transport.SSE and call.listing.upstream_url:
            call.rewriter = legacy_sse.EndpointRewriter(call.listing.upstream_url, call.listing.slug)
        # What the watcher writes into the events as it parses them: prices and the receipt, and on a
        # session's streams the answers of refunded calls blanked (never delivered). Not into the
        # bytes of a legacy session stream (they answer other flows' calls) or compressed ones.
        if call.rewriter is None and call.decoder is None:
            plan = await receipts.stream_plan(flow, call, gw.store, gw.free_used)
            session, pending = call.session, gw.pending
            live = call.priced.rpc_id if call.priced is not None else None
            principal = call.consumer.principal if call.consumer is not None else None

            def cancelled() -> bool:
                # refunded while its stream stays open: cancelled, or refunded for an answer seen elsewhere
                return call.failure is Failure.CANCELLED or call.withheld

            def blank(event: Event) -> bool:
                assert session is not None
                return pending.blank_event(session, event, live, cancelled(), principal)

            def may_blank() -> bool:
                assert session is not None
                return cancelled() or pending.may_blank(session, principal)

            if plan is not None or session is not None:
                max_event = gw.config.max_event_bytes if gw.config else DEFAULT_MAX_EVENT_BYTES
                call.editor = StreamEditor(plan, blank if session is not None else None,
                                           hold_limit(max_event, blanking=session is not None),
                                           may_blank if session is not None else None,
                                           budget.holding(gw.config))
        unframe(flow)
        flow.response.stream = self.watcher(flow, call)
        gw.deferred.watch_stream(flow, call)  # task statuses, input_required (upstream bytes first)
        if gw.show_streams():
            display.keep_copy(flow)
        if call.idempotency is not None:  # the streamed answer's bytes, for a replay
            flow.response.stream = idempotency.capture(flow.response.stream, call.idempotency,
                                                       budget.holding(gw.config))

    def sever(self, flow: http.HTTPFlow, call: Call) -> None:
        """The editor cut the stream (it may carry a refunded call's answer it cannot withhold): its
        upstream is closed, and its own call, unanswered, fails (refunded: its answer never reached the
        client). Calls parked in its scope stay parked: a resumed stream may yet answer them."""
        log.warning("mcpmeter: stream of %s cut: an event too big to hold, begun before a refund, or not read "
                    "whole may answer a refunded call", call.request_id)
        if call.priced is not None and call.outcome is None and call.settlement is None and call.failure is None:
            call.failure = Failure.UPSTREAM
        if not compat.abort_upstream(flow):
            log.error("mcpmeter: could not close the upstream of %s after cutting its stream", call.request_id)

    def refuse_unreadable(self, flow: http.HTTPFlow, call: Call) -> bool:
        """A compressed event stream (Content-Encoding other than identity: the gateway asks for identity)
        on a stream that may carry a refunded call's answer: a session's (streamable HTTP) or a legacy
        session's. The meter cannot find its events to withhold one, so it is refused at its head:
        nothing of it is sent, the upstream is closed and the error hook answers 502 `upstream_failed`
        (its call refunded). True if refused."""
        assert flow.response is not None
        codings = [c.strip().lower() for c in flow.response.headers.get("content-encoding", "").split(",")]
        if all(c in ("", "identity") for c in codings):
            return False
        legacy = call.listing is not None and call.listing.transport is Transport.SSE
        if call.session is None and not legacy:
            return False  # nothing to withhold there: read through StreamDecoder as it passes
        log.warning("mcpmeter: a compressed event stream of %s refused: its events could not be withheld",
                    call.request_id)
        _refuse_stream(flow, call)
        return True

    def refuse_legacy_post(self, flow: http.HTTPFlow, call: Call) -> bool:
        """A priced POST of a legacy (`sse`) listing answered with an event stream. That is not the legacy
        transport (its POSTs are answered 202, their answers come on the session's GET stream) but, say,
        streamable HTTP served beside it in the listing's directory (/sse, /messages and /mcp on one
        server): its events would pass the endpoint rewriter as a stream's events before its endpoint,
        settling nothing (the call refunded, its result delivered), and a GET naming one of their ids
        would replay it where no answer is watched for. Refused at its head as a compressed stream is:
        nothing of it is sent, the upstream is closed, 502 `upstream_failed`, refunded. True if refused."""
        if (call.priced is None or call.listing is None or call.listing.transport is not Transport.SSE
                or flow.request.method != "POST"):
            return False
        log.warning("mcpmeter: the event stream answering legacy SSE POST %s refused: its answers come on "
                    "the session's stream", call.request_id)
        _refuse_stream(flow, call)
        return True

    # --- deadlines ------------------------------------------------------------------------

    def timeout(self, listing: Listing) -> float:
        """The listing's upstream timeout in seconds, capped."""
        config = self.gw.config
        assert config is not None
        return upstream_timeout(config.max_upstream_timeout_ms, config.upstream_timeout_ms, listing)

    def remaining(self, call: Call) -> float:
        """What is left of the call's timeout, counted from its start (negative: past it)."""
        assert call.listing is not None
        return self.timeout(call.listing) - (time.monotonic() - call.started)

    def start_deadline(self, flow: http.HTTPFlow, call: Call, seconds: float) -> None:
        call.deadline = asyncio.get_running_loop().call_later(seconds, self.on_deadline, flow, call)

    def on_deadline(self, flow: http.HTTPFlow, call: Call) -> None:
        call.deadline = None
        if call.waits is Wait.RESUMPTION:
            if call.outcome is None and call.settlement is None:
                self.settle_parked(flow, call, Failure.NO_ANSWER_BY_TIMEOUT)
            return
        if call.waits is Wait.STREAM and call.outcome is None and call.settlement is None:
            self.gw.legacy.refund(flow, call, Failure.TIMEOUT)
            return
        if call.outcome is not None or call.settlement is not None or not flow.live:
            return
        if call.priced is None and flow.response is not None:
            return
        call.failure = Failure.TIMEOUT
        if not compat.abort_upstream(flow):
            log.error("mcpmeter: could not abort the upstream of %s after its timeout", call.request_id)

    # --- resumption and cancellation (addon/pending.py) -------------------------------------

    def park(self, flow: http.HTTPFlow, call: Call) -> bool:
        """A POST stream the server ended after an event id, without the answer (SEP-1699): the call
        stays pending until a resumed stream of its session answers it, or its timeout refunds it.
        Without a session, the resumed stream is a GET naming that event id (Call.scope)."""
        if (call.parser is None or call.priced is None or call.listing is None
                or (call.charged is None and not self.gw.deferred.continues(call))  # paid, or continuing a paid round
                or call.outcome is not None or call.failure is not None
                or call.settlement is not None or call.parser.last_event_id is None
                or call.status is None or not 200 <= call.status < 300 or (scope := call.scope) is None):
            return False
        remaining = self.remaining(call)
        if remaining <= 0:
            call.failure = Failure.NO_ANSWER_BY_TIMEOUT
            return False
        if not self.gw.pending.park(scope, call.priced.rpc_id, flow, call):
            return False  # refunded as unanswered, its marker withholding both calls' answers
        call.waits = Wait.RESUMPTION
        self.start_deadline(flow, call, remaining)
        flow.metadata.setdefault(META, {"request_id": call.request_id})["decision"] = Label.PENDING
        flow.comment = (f"{call.listing.slug} · {call.priced.tool_name} · pending: the server closed the stream; "
                        f"settled when a resumed stream answers, refunded after {remaining:.0f} s otherwise")
        return True

    def settle_parked(self, flow: http.HTTPFlow, call: Call, failure: Failure | None = None) -> None:
        call.waits = None
        if failure is not None:  # refunded (its timeout, a cancellation): marked now, not when its
            call.failure = failure  # settlement gets there, after awaits an answer could pass in
            if call.priced is not None and (scope := call.scope) is not None:
                self.gw.pending.mark_refunded(scope, call.priced.rpc_id)
        self.gw.settlements.soon(flow, call)
        self.gw.finish(flow, call)

    def _answer_parked(self, stream: Call, event: Event) -> None:
        """An event on a GET stream of `stream`'s session: settle the calls of the same key it answers,
        parked ones, and running ones whose answer overtook the end of their POST stream."""
        assert stream.session is not None
        pending = self.gw.pending
        if event.event != "message" or not pending.watching(stream.session):
            return  # MCP clients ignore other event types: not an answer they get
        principal = stream.consumer.principal if stream.consumer is not None else None
        if pending.blank_event(stream.session, event, principal=principal):
            return  # it goes out blanked (it answers a refunded call, or another key's): nobody pays for it
        messages = event.messages if event.oversized else answer_messages(event.data.encode("utf-8", "surrogatepass"))
        for flow, call in pending.answered(stream.session, messages):
            if (stream.consumer is None or call.consumer is None or call.priced is None
                    or call.consumer.principal != stream.consumer.principal
                    or call.outcome is not None or call.settlement is not None):
                continue
            call.outcome = event_outcome(event, call.priced.rpc_id)
            if call.outcome is None:
                continue
            # Refunded for what passes here (an error, a tool error): whatever else answers its id later,
            # on its own stream or a resumed one, is not delivered (the meter tells answers only by their
            # id, and took this one for the call's). The settlement leaves the session's marker.
            call.withheld = decision(call)[0].refund
            owner = self.gw.owner(flow)  # a call charged before a script reload: the replaced meter's
            if call.waits is Wait.RESUMPTION:
                owner.streams.settle_parked(flow, call)
            else:  # still running: settled now, its POST's hooks find it settled
                owner.settlements.start(flow, call)

    def cancel(self, notice: Call, body: bytes) -> None:
        """notifications/cancelled naming a priced call of the same session and key: refunded, unless its
        answer was already delivered; its answer is withheld from then on."""
        pending = self.gw.pending
        rpc_id = resumption.cancelled_request_id(body)
        found = pending.find(notice.session, rpc_id) if rpc_id is not None and notice.session else None
        if found is None or notice.consumer is None:
            return
        flow, call = found
        if call.consumer is None or call.consumer.principal != notice.consumer.principal:
            return
        if call.outcome is not None or call.settlement is not None or call.failure is not None:
            return  # answered (billed), or already failing: settled by its own path
        assert notice.session is not None and rpc_id is not None
        pending.mark_refunded(notice.session, rpc_id)
        owner = self.gw.owner(flow)  # a call charged before a script reload: the replaced meter's
        if call.waits is Wait.RESUMPTION:
            owner.streams.settle_parked(flow, call, Failure.CANCELLED)
            return
        call.failure = Failure.CANCELLED
        owner.settlements.soon(flow, call)

    def withhold(self, flow: http.HTTPFlow, call: Call) -> None:
        """A JSON answer to a call cancelled (and refunded) while it ran: the client gets an error instead, as
        for a batch whose answers were not all read (jsonrpc.Answer.dropped: one may be the call's). Its
        answer is found under any spelling of its id an SDK client takes for it (pending.answers), as on a
        stream: "1" answers 1."""
        assert flow.response is not None and call.priced is not None
        answer = self._read_body(flow.response, call)
        if answer is not None and (answer.dropped or resumption.answers(answer.messages, call.priced.rpc_id)):
            flow.response.headers.pop("content-encoding", None)
            flow.response.headers["content-type"] = "application/json"
            flow.response.content = resumption.cancelled_body(call.priced.rpc_id)

    def body_outcome(self, flow: http.HTTPFlow, call: Call) -> Outcome | None:
        """What a buffered answer says about its call. A batch whose answers were not all read (jsonrpc.Answer.
        dropped) and that answers the call in none of those kept may answer it past them, unread: where an
        answer would be billed (a status under 400) it is not delivered (fail closed): the call fails
        (refunded, `upstream_failed`) and the client gets the gateway's 502 instead, as for an upstream
        that failed before answering."""
        assert flow.response is not None and call.priced is not None
        answer = self._read_body(flow.response, call)
        if answer is None:
            return None
        outcome = scanned_outcome(answer.messages, call.priced.rpc_id)
        if outcome is None and answer.dropped and flow.response.status_code < 400:
            self._refuse_unread(flow, call)
        return outcome

    def _refuse_unread(self, flow: http.HTTPFlow, call: Call) -> None:
        assert call.priced is not None and self.gw.config is not None
        log.warning("mcpmeter: %s: a JSON answer holds more answers than the meter reads, not the call's among "
                    "those read; refused (502) and refunded", call.request_id)
        call.failure = call.failure or Failure.UPSTREAM
        call.status, call.rpc_id = 502, call.priced.rpc_id
        error = GatewayError("upstream_failed", request_id=call.request_id)
        flow.response = answers.error_response(error, call, self.gw.config.top_up_url)

    def _read_body(self, response: http.Response, call: Call) -> Answer | None:
        """A buffered answer's messages, decoded by the meter with a ceiling (never by mitmproxy); None: not
        read (not JSON, or too large)."""
        assert self.gw.config is not None
        if media_type(response.headers.get("content-type")) != JSON:
            # The MCP SDK clients read a body only as application/json (or an event stream, not
            # buffered): anything else is an error to them, whatever it says. Not read.
            if (response.raw_content and 200 <= response.status_code < 300 and call.failure is None
                    and (call.listing is None or call.listing.transport is not Transport.SSE)):
                call.failure = Failure.UNEXPECTED_CONTENT_TYPE  # (a legacy SSE POST's body is no answer)
            return None
        limit = self.gw.config.max_body_bytes
        try:
            body = decode_bounded(response.raw_content or b"", response.headers.get("content-encoding"), limit)
        except TooLarge:
            log.warning("mcpmeter: a compressed answer inflates past max_body_bytes (%d); not read further", limit)
            call.unread = True  # delivered all the same: see billing.decide
            return None
        return None if body is None else read_answer(body)


def _refuse_stream(flow: http.HTTPFlow, call: Call) -> None:
    """An event stream refused at its head: the error hook answers 502 `upstream_failed`, its call refunded."""
    call.failure = Failure.UPSTREAM
    compat.abort_upstream(flow)
    flow.kill()


def unframe(flow: http.HTTPFlow) -> None:
    """An event stream the meter watches goes on without the upstream's Content-Length: the meter may
    change its length (the receipt written into the answer's event, a refunded call's answer blanked,
    a legacy endpoint renamed), and mitmproxy passes a streamed body's bytes as they come under the
    headers it was given: the client would read a cut event and take the bytes past it for the next
    response on its connection. HTTP/1.1 clients get it chunked (mitmproxy then frames each piece);
    HTTP/2 clients have frames, and HTTP/1.0 ones the connection's close."""
    assert flow.response is not None
    headers = flow.response.headers
    if "content-length" in headers:
        del headers["content-length"]
    if flow.request.http_version == "HTTP/1.1" and "transfer-encoding" not in headers:
        headers["transfer-encoding"] = "chunked"

