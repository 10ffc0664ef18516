"""One metered call: its state from the request hook to its settlement, and what it was decided.

A `Call` is created per flow by the request hook and carried through the hooks, the stream
watcher and the settlement; deferred.py, receipts.py and metrics.py read it too. Its fields are
grouped by who writes them: admission, the upstream's answer, the stream, the legacy SSE session,
resumption, settlement.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from enum import StrEnum

from mitmproxy import http

from . import billing, idempotency, legacy_sse, stream_edit
from . import pending as resumption
from .billing import Failure
from .decoding import StreamDecoder
from .jsonrpc import SDK_MAX_DEPTH, JsonId, Outcome, PricedCall, answer_messages, scanned_outcome, sdk_reads
from .model import ChargeRequest, ChargeResult, Consumer, Listing, Transport, Verdict
from .scan import Message, values_deeper
from .sse import Event, SseParser
from .store import Store

META = "mcpmeter"  # the key of the gateway's decisions in flow.metadata


class Wait(StrEnum):
    """What a call whose own flow is over still waits for, before it settles."""

    STREAM = "stream"  # a legacy SSE POST answered 202: its answer comes on the session's stream
    RESUMPTION = "resumption"  # parked: its POST stream ended unanswered, a resumed stream may answer


class Label(StrEnum):
    """`flow.metadata[META]["decision"]`: what the gateway did with a flow, for addons and mitmweb."""

    FORWARDED = "forwarded"  # admitted and on its way upstream; replaced by a settled label
    PASSTHROUGH = "passthrough"  # unpriced traffic, settled without money
    PENDING = "pending"  # parked: awaits a resumed stream (addon/stream_watch.py)
    REFUSED = "refused"
    REPLAYED = "replayed"  # answered from its Idempotency-Key's stored outcome
    HEALTH = "health"
    METADATA = "metadata"
    BILLED = "billed"
    FREE = "free"
    REFUNDED = "refunded"
    SHADOW = "shadow"


@dataclass(eq=False)
class Call:
    """The metering state of one forwarded flow, from request to settlement."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    called_at: float = field(default_factory=time.time)
    # --- admission (addon/admission.py): who, what, and the money taken
    consumer: Consumer | None = None
    listing: Listing | None = None
    priced: PricedCall | None = None
    charge: ChargeRequest | None = None
    charged: ChargeResult | None = None
    store: Store | None = field(default=None, repr=False)  # the store that charged it: it settles it
    balance: int | None = None
    limit_headers: dict[str, str] = field(default_factory=dict)
    rpc_id: JsonId | None = None  # the JSON-RPC id a refusal answers (rpc_errors.peek_id)
    idempotency: idempotency.Claim | None = None  # this call's claim on its Idempotency-Key
    forwarded: float | None = None  # monotonic time the call left for the upstream
    probe: bool = False  # holds its half-open circuit's probe slot, under its request id (circuits.py)
    # The credentials the consumer wrapped for the upstream (X-Forward-Authorization...), on the wire only:
    # an answer field repeating one is dropped (gateway._drop_upstream_fields).
    wrapped: list[str] = field(default_factory=list, repr=False)
    # Its flow (the `flow` property), set when forwarded: a stop settles it. Weak: a held call
    # (deferred.py) outlives its flow's hooks, and must not keep the flow and its bodies alive.
    flow_ref: weakref.ReferenceType[http.HTTPFlow] | None = field(default=None, repr=False)
    # --- the upstream's answer
    status: int | None = None
    outcome: Outcome | None = None
    failure: Failure | None = None
    unread: bool = False  # a buffered answer that inflates past the meter's decode limit
    deadline: asyncio.TimerHandle | None = None  # the upstream timeout (addon/stream_watch.py)
    # --- a streamed answer (addon/stream_watch.py)
    parser: SseParser | None = None
    decoder: StreamDecoder | None = None  # a compressed stream, decoded for the meter with a ceiling
    # The stream ended for the client before an event it could not read (Failure.UNREADABLE_EVENT): nothing
    # from there on passes. The last event id the client got, which it resumes after (`scope`).
    cut: bool = False
    cut_after: str | None = None
    # --- a legacy SSE session (addon/legacy_sessions.py)
    legacy_session: str = ""  # the session's identity (legacy_sessions.identity), POSTs and stream
    rewriter: legacy_sse.EndpointRewriter | None = None  # the session's GET stream
    editor: stream_edit.StreamEditor | None = None  # what is written into an SSE answer's events
    # --- streamable HTTP sessions: resumption and cancellation (addon/pending.py)
    # (listing id, Mcp-Session-Id); for a GET without a session resuming by Last-Event-ID, the resume
    # key of that event: the scope in which its stream's answers settle calls (see `scope`)
    session: resumption.Scope | None = None
    waits: Wait | None = None  # its flow's hooks are over and its answer is still to come
    # Refunded for an answer under its id seen on another stream of the session (a resumed GET): its
    # own stream's answer, if one comes after all, is never delivered (as a cancelled call's).
    withheld: bool = False
    # --- settlement (addon/settlement.py)
    settlement: asyncio.Future[None] | None = None
    refunded: bool = False
    landed: bool = False  # its settlement was written (else it waits in the journal for the sweeper, refunded)
    decided: billing.Decision | None = None  # a held call's settlement, decided by a later message (deferred.py)

    @property
    def flow(self) -> http.HTTPFlow | None:
        return self.flow_ref() if self.flow_ref is not None else None

    @flow.setter
    def flow(self, flow: http.HTTPFlow | None) -> None:
        self.flow_ref = weakref.ref(flow) if flow is not None else None

    @property
    def scope(self) -> resumption.Scope | None:
        """Where this call's answers are matched on resumed streams (addon/pending.py): its session; without
        one, on a streamable listing, the last event id its stream carried, which its client resumes after
        (a stateless server keeping events replays that stream to a GET naming it). None: not resumable."""
        if self.session is not None:
            return self.session
        if self.cut:
            last = self.cut_after  # the client got nothing from the unreadable event on
        else:
            last = self.parser.last_event_id if self.parser is not None else None
        if last is None or self.listing is None or self.listing.transport is Transport.SSE:
            return None
        return resumption.resume_key(self.listing.id, last)

    def drop_stream_buffers(self) -> None:
        """Its flow's hooks are over: what its stream's readers hold of an unfinished event goes. A held
        call (deferred.py) outlives its flow, up to MAX_HELD of them, and a stream cut mid-event left
        up to max_event_bytes in the parser and as much in the editor. The objects stay (a parser
        says the answer was streamed; a decoder whether it outgrew the limit)."""
        for reader in (self.parser, self.editor, self.decoder):
            if reader is not None:
                reader.discard()

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    @property
    def billed_header(self) -> str:
        if self.charged is None or self.refunded:
            return "0"
        if self.charged.verdict is Verdict.FREE:
            return "free"
        return str(self.charged.amount)


def decision(call: Call) -> tuple[billing.Decision, int]:
    """Whether the forwarded call is refunded, and the status it is recorded with."""
    assert call.listing is not None
    unread = call.unread or (call.decoder is not None and call.decoder.too_large)
    decided = billing.decide(call.status, call.outcome, call.failure, call.listing.bill_tool_errors, unread)
    if call.outcome is not None:
        if call.listing.transport is Transport.SSE and call.status == 202:
            # A legacy SSE POST's 202 only accepted the message: the answer came on the session's stream.
            return decided, 200
        return decided, call.status or 200
    failed = {Failure.TIMEOUT: 504, Failure.UPSTREAM: 502, Failure.CLIENT_GONE: 499, Failure.INTERNAL: 500,
              Failure.CANCELLED: 499, Failure.NO_ANSWER_BY_TIMEOUT: 504}
    return decided, failed.get(call.failure, call.status or 0) if call.failure else (call.status or 0)


def event_outcome(event: Event, rpc_id: JsonId) -> Outcome | None:
    """What an SSE message event says about the call `rpc_id`, if it answers it."""
    return scanned_outcome(event_messages(event), rpc_id)


def event_messages(event: Event) -> list[Message] | None:
    """What an SSE event's data says, message by message (None: not one JSON value)."""
    return event.messages if event.oversized else answer_messages(event.data.encode("utf-8", "surrogatepass"))


def clients_read(event: Event, messages: list[Message] | None) -> bool:
    """Whether the MCP Python SDK client reads the event's data (`messages`, event_messages) as a JSON-RPC
    message: at the first message event it cannot, it ends the request whose stream carries it with a
    parse error. The depth is checked here (the meter's json.loads reads deeper than the SDK's parser); an
    event over max_event_bytes is judged by what the scanner sees of it."""
    if not sdk_reads(messages):
        return False
    return event.oversized or not values_deeper(event.data.encode("utf-8", "surrogatepass"), SDK_MAX_DEPTH)


def upstream_timeout(max_ms: int, default_ms: int, listing: Listing) -> float:
    """The listing's upstream timeout in seconds, capped."""
    timeout_ms = default_ms
    if listing.upstream_timeout_seconds:
        timeout_ms = listing.upstream_timeout_seconds * 1000
    return min(timeout_ms, max_ms) / 1000
