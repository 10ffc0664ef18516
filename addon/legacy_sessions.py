"""Legacy SSE (2024-11-05) sessions: POSTed calls whose answers come on the session's GET stream.

A POST is answered 202; its result arrives later as an event on the stream the session opened.
The calls awaiting that event are kept here by session and JSON-RPC id, oldest first (an id
POSTed twice is answered twice, each answer settles one). The stream's end fails those left.

A call refunded without its answer (its timeout, the meter's stop, an upstream failure) leaves a
refunded marker for its session (addon/pending.py, scope (listing id, session identity)): an event
answering its id that comes later on the session's stream goes out without its data lines
(stream_edit.StreamEditor), and settles nothing. A new call under that id takes the id over.

The stream's delivered message events are read for tasks and input_required rounds too (deferred.py),
in the session's scope (listing, key, session identity): a POSTed call's CreateTaskResult or
input_required answer holds it, and statuses and tasks/result answers settle it, as on streamable HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mitmproxy import http

from . import budget, compat, paths
from .billing import Failure
from .call import Call, Wait, event_outcome
from .errors import GatewayError
from .jsonrpc import JsonId, Outcome, answer_messages
from .model import Transport
from .pending import SessionKey
from .sse import DEFAULT_MAX_EVENT_BYTES, Event
from .stream_edit import StreamEditor, hold_limit

if TYPE_CHECKING:
    from .gateway import Mcpmeter

log = logging.getLogger("mcpmeter")


def identity(listing_id: int, subpath: str, query: str) -> str:
    """A legacy SSE session's identity: its session id, not the route's spelling (paths.session_identity)."""
    try:
        return f"legacy:{listing_id}:{paths.session_identity(subpath, query)}"
    except paths.InvalidPath as e:
        raise GatewayError("invalid_request", reason=str(e)) from None


class LegacySessions:
    def __init__(self, gw: Mcpmeter) -> None:
        self.gw = gw
        # session identity -> JSON-RPC id -> the POSTed calls awaiting their answer, oldest first.
        self.awaiting: dict[str, dict[JsonId, list[tuple[http.HTTPFlow, Call]]]] = {}
        # session identity -> the GET streams open on this gateway that announced it (their calls).
        self.streams: dict[str, list[Call]] = {}

    def open_for(self, session: str, principal: str) -> bool:
        """Whether `principal` holds a stream of the session `session` open on this gateway: the only
        session a POST may reach. A POST is settled from that stream, by that identity; any other
        route (another spelling of the session id the upstream reads as the same, an extra query
        parameter, an encoded letter in a path that names the session, a session whose stream another
        gateway watches) could reach a session whose answers settle nothing here: refunded at the
        timeout, while the result is delivered on the stream."""
        return any(s.consumer is not None and s.consumer.principal == principal
                   for s in self.streams.get(session, ()))

    def calls(self) -> list[tuple[http.HTTPFlow, Call]]:
        return [fc for waiting in self.awaiting.values() for calls in waiting.values() for fc in calls]

    def register(self, flow: http.HTTPFlow, call: Call) -> None:
        """Registered before forwarding: the answer can reach the session's stream before the 202."""
        assert call.priced is not None and call.listing is not None
        self.awaiting.setdefault(call.legacy_session, {}).setdefault(call.priced.rpc_id, []).append((flow, call))
        self.gw.pending.unmark((call.listing.id, call.legacy_session), call.priced.rpc_id)  # (pending.track)

    def refund(self, flow: http.HTTPFlow, call: Call, failure: Failure) -> None:
        """A call awaiting its answer on the stream is refunded without it: marked at once (its settlement
        is written later), so an answer coming from now on goes out blanked."""
        self.unregister(call)
        call.failure = failure
        self.mark_refunded(call)
        self.gw.settlements.soon(flow, call)

    def mark_refunded(self, call: Call) -> None:
        """A call of a session refunded without its answer: that answer is never delivered now, unless
        another call of the session awaits an answer under the same id (it took the id over: an answer
        to that id settles it, billed, as it is delivered)."""
        if call.priced is None or call.listing is None or not call.legacy_session:
            return
        rpc_id = call.priced.rpc_id
        if any(c is not call for _, c in self.awaiting.get(call.legacy_session, {}).get(rpc_id, ())):
            return
        self.gw.pending.mark_refunded((call.listing.id, call.legacy_session), rpc_id)

    def await_stream(self, flow: http.HTTPFlow, call: Call) -> bool:
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
        call.waits = Wait.STREAM
        self.gw.calls.pop(flow.id, None)
        self.gw.streams.start_deadline(flow, call, max(0.0, self.gw.streams.remaining(call)))
        return True

    def watch(self, stream: Call, out: list[bytes], ended: bool, had_route: bool) -> list[bytes]:
        """The session's GET stream passed `out` (rewritten): bind the session when its endpoint
        route is announced, settle the calls its events answer, and blank those answering refunded
        calls. What goes out to the client."""
        assert stream.rewriter is not None
        if not had_route and stream.rewriter.route is not None and stream.listing is not None:
            _, subpath, query = paths.split_route(stream.rewriter.route)
            stream.legacy_session = identity(stream.listing.id, subpath, query)
            self.streams.setdefault(stream.legacy_session, []).append(stream)
            stream.editor = self._editor((stream.listing.id, stream.legacy_session))
            if stream.consumer is not None:
                # The session belongs to the key that opened the stream.
                assert self.gw.cache is not None
                asyncio.ensure_future(self.gw.cache.bind_session(stream.listing.id, stream.legacy_session,
                                                                 stream.consumer.principal))
        sent = out
        if stream.rewriter.route is not None and stream.parser is not None and stream.editor is not None:
            sent = []
            # The parser and the editor read the rewritten stream from its endpoint event on: the
            # same offsets. b"": the end (the editor lets out what it held).
            for piece in [*out, b""] if ended else out:
                # (none past a cut settles a call: it is not delivered)
                events = stream.editor.admit(stream.parser.feed(piece))
                if edited := stream.editor.feed(piece, events, stream.parser.pending_from):
                    sent.append(edited)
                blanked = stream.editor.blanked
                self._answer(stream, [e for e in events if not any(e is b for b in blanked)])
                if stream.editor.severed:
                    self._sever(stream)
                    break
        if ended:  # the final b"": a held-back chunk ([] returned) is not the end
            self.end_stream(stream)
        return sent

    def _sever(self, stream: Call) -> None:
        """The editor cut the session's stream (an event that may answer a refunded call, too big to
        hold or begun before the refund): nothing more of it reaches the client, its upstream is closed,
        and the calls still awaiting an answer there are refunded (none was delivered)."""
        assert stream.rewriter is not None
        stream.rewriter.cut("an event that may answer a refunded call could not be withheld")
        if (flow := stream.flow) is not None and not compat.abort_upstream(flow):
            log.error("mcpmeter: could not close the upstream of a legacy SSE stream after cutting it")
        self.end_stream(stream)

    def _editor(self, scope: SessionKey) -> StreamEditor:
        """Blanks the answers to the session's refunded calls; holds nothing while it has none."""
        pending, config = self.gw.pending, self.gw.config
        max_event = config.max_event_bytes if config is not None else DEFAULT_MAX_EVENT_BYTES
        return StreamEditor(None, lambda event: pending.blank_event(scope, event),
                            hold_limit(max_event, blanking=True), lambda: pending.may_blank(scope),
                            budget.holding(config))

    def _answer(self, stream: Call, events: list[Event]) -> None:
        """Settle the calls these events answer (none sent out blanked: they answer a refunded call), and
        read them for tasks and rounds (deferred.py) as a streamable session's streams are read."""
        session = stream.legacy_session
        scope = ((stream.listing.id, stream.consumer.principal, session)  # (deferred.Scope) as its POSTs'
                 if stream.listing is not None and stream.consumer is not None else None)
        for event in events:
            if event.event != "message":  # MCP clients ignore other event types: not an answer they get
                continue
            answered = self._answered(session, event)
            if scope is not None:  # before its settlement: a CreateTaskResult or input_required holds the call
                self.gw.deferred.watch_legacy(stream, answered[1] if answered else None, event, scope)
            if answered is None:
                continue
            flow, call, outcome = answered
            self.unregister(call)
            call.outcome = outcome
            # The answer may overtake the POST's own 202: then the response hook settles it.
            if call.waits is Wait.STREAM:
                call.status = 200  # recorded as answered, not as the 202 that acknowledged the POST
                self.gw.settlements.soon(flow, call)

    def _answered(self, session: str, event: Event) -> tuple[http.HTTPFlow, Call, Outcome] | None:
        """The call awaiting its answer in the session that `event` answers, and how."""
        waiting = self.awaiting.get(session)
        if not waiting:
            return None
        messages = (event.messages if event.oversized
                    else answer_messages(event.data.encode("utf-8", "surrogatepass")))
        ids = [m.id_value() for m in messages or () if not m.has_method]
        rpc_id = next((i for i in ids if isinstance(i, (str, int, float)) and i in waiting), None)
        if rpc_id is None:
            return None
        flow, call = waiting[rpc_id][0]
        assert call.priced is not None
        outcome = event_outcome(event, call.priced.rpc_id)
        return None if outcome is None else (flow, call, outcome)

    def unregister(self, call: Call) -> None:
        """The call no longer awaits an answer on its session's stream (a stream: is no longer open)."""
        if call.rewriter is not None and call.legacy_session in self.streams:
            self._close_stream(call)
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

    def _close_stream(self, stream: Call) -> None:
        others = [s for s in self.streams.pop(stream.legacy_session, []) if s is not stream]
        if others:  # (an upstream announcing one session on two streams)
            self.streams[stream.legacy_session] = others

    def cut(self) -> None:
        """The meter stops: the session streams it watches pass nothing more and are ended. A script
        reload leaves them open, and the meter loaded next does not watch them: an answer coming on one
        after the stop refunded its call would be delivered, and a new POST there is refused
        (`open_for`). The client opens a new session, through the meter loaded now."""
        for streams in list(self.streams.values()):
            for stream in streams:
                if stream.rewriter is not None:
                    stream.rewriter.cut()
                if (flow := stream.flow) is not None and flow.live:
                    compat.abort_upstream(flow)
        self.streams.clear()

    def end_stream(self, stream: Call, client_gone: bool = False) -> None:
        """The session's stream is over: calls still awaiting an answer never get one. The upstream
        ending it failed them (refunded); a client that walked away is billed, as on streamable HTTP
        (2024-11-05 has no cancellation: the upstream ran the call)."""
        if stream.rewriter is None or stream.rewriter.route is None or not stream.legacy_session:
            return
        self._close_stream(stream)
        for calls in self.awaiting.pop(stream.legacy_session, {}).values():
            for flow, waiting in calls:
                waiting.failure = Failure.CLIENT_GONE if client_gone else Failure.UPSTREAM
                if waiting.waits is Wait.STREAM:
                    self.gw.settlements.soon(flow, waiting)

