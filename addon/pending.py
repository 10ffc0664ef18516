"""Calls that outlive their POST stream, and answers that must never be delivered. In memory, per gateway.

The rule (README, "The rule behind the table"): a result delivered, or retrievable by resumption until the
listing's timeout, is paid for; a call that failed, was cancelled before its answer, or whose timeout passed
with no deliverable answer is refunded, and a refunded call's answer is never delivered afterwards.

- A streamable-HTTP call whose POST stream the server ended normally after an event carrying an `id:`,
  without the answer (2025-11-25, SEP-1699), is *parked* here: it settles when its answer passes on a
  resumed GET stream of the same session (and key), or is refunded at its timeout.
- Priced calls in flight are *tracked* per session, so a `notifications/cancelled` naming one can find it.
- A call refunded without an answer (timeout, cancellation, upstream failure) leaves a *refunded* marker:
  an event answering its id on a later stream of that session goes out without its `data:` lines
  (`blank_if_refunded`, applied by stream_edit.StreamEditor), so the client never receives it.
  Markers are bounded in number and expire.
- A call without a session (a stateless server that keeps an event store) has no session to be tracked
  in, and its JSON-RPC id names nothing: independent stateless clients share a key and all number their
  calls from 0 or 1. What names its stream is the event its client resumes after: the last `id:` its
  POST stream carried, which the client sends back as `Last-Event-ID` on a GET (the server replays that
  stream). So it is parked, and its refunded marker kept, under (listing id, that event id): a GET without
  a session resuming that event is watched as a session's GET stream is. Only the key that made the call
  settles it; on another key's stream its answer goes out blanked while it is parked (never a result
  handed to one key while another's call is refunded), as after its refund on every stream. A resumed
  GET the server ends in turn before the answer passes the scope on to its last event (`carry`), which
  the client resumes after next.

Scopes are (listing id, Mcp-Session-Id) or, without a session, (listing id, sha256 of the event id
resumed). A call is settled only by an answer under its id as sent, of the same JSON type (`id_key`: 1 and
"1" differ), but what is withheld from a client is matched as the SDK clients match an answer to their
request (`client_key`: "1", "01" and 1.0 answer 1, rpc_ids.py): blanking only ever widens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from mitmproxy import http

from . import rpc_ids
from .jsonrpc import JsonId, parse_strict, read_answer
from .scan import Message
from .sse import Event

SessionKey = tuple[int, str]  # (listing id, Mcp-Session-Id)
ResumeKey = tuple[int, bytes]  # (listing id, sha256 of an event id): bytes, never equal to a session's str
Scope = SessionKey | ResumeKey
IdKey = tuple[bool, Any]  # (is a string, value): 1 and "1" are different ids, 1 and 1.0 the same

log = logging.getLogger("mcpmeter")

CANCELLED_METHOD = "notifications/cancelled"
CLOSE_CANCELS_FROM = "2026-07-28"  # from this revision on, closing a POST stream cancels its call
MAX_REFUNDED_MARKERS = 100_000
REFUNDED_MARKER_SECONDS = 3600.0


def id_key(rpc_id: Any) -> IdKey | None:
    if isinstance(rpc_id, bool) or not isinstance(rpc_id, (str, int, float)):
        return None
    return isinstance(rpc_id, str), rpc_id


def client_key(rpc_id: Any) -> IdKey | None:
    """The id as an SDK client matches an answer to its request: a string it reads as a number is that
    number ("01" and 1 are one id to it, rpc_ids.py). What refunded markers are kept and matched by."""
    key = id_key(rpc_id)
    if key is None or not key[0]:
        return key
    number = rpc_ids.number(rpc_id)
    return key if number is None else (False, number)


def answered_ids(messages: list[Message] | None) -> list[Any]:
    """The ids these messages answer (a result or an error, not a request), as sent."""
    return [m.id_value() for m in messages or () if not m.has_method and (m.has_result or m.has_error)]


def answers(messages: list[Message] | None, rpc_id: Any) -> bool:
    """Whether an SDK client takes one of these messages for the answer to its request `rpc_id`, however
    the answer spells the id (client_key): what is withheld from it when the call is refunded."""
    key = client_key(rpc_id)
    return key is not None and any(client_key(answered) == key for answered in answered_ids(messages))


def resume_key(listing_id: int, event_id: str) -> ResumeKey:
    """The scope of a call without a session, by the event its client resumes after. Hashed: an event id
    may be 64 KiB long (sse.py), and markers are kept by the hundred thousand. `surrogatepass`: the
    parser's ids and mitmproxy's header values are str from bytes; any str encodes."""
    return listing_id, hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).digest()


def close_cancels(headers: http.Headers) -> bool:
    """The client speaks a revision where closing the POST stream before the answer cancels the call.
    Revisions are dates (YYYY-MM-DD): they compare as strings."""
    version = headers.get("mcp-protocol-version", "").strip()
    return len(version) == 10 and version >= CLOSE_CANCELS_FROM


def cancelled_request_id(body: bytes) -> JsonId | None:
    """The `params.requestId` of a `notifications/cancelled` body, or None."""
    try:
        message = parse_strict(body)
    except Exception:
        return None
    if not isinstance(message, Mapping) or message.get("method") != CANCELLED_METHOD or "id" in message:
        return None
    params = message.get("params")
    rpc_id = params.get("requestId") if isinstance(params, Mapping) else None
    # A string or an integer only, as the SDKs' servers read it: the Python SDK ignores a cancellation
    # naming 1.0, so refunding call 1 for it would let the call run on, and its side effects, for free.
    return rpc_id if isinstance(rpc_id, (str, int)) and not isinstance(rpc_id, bool) else None


class Pending:
    def __init__(self, max_markers: int = MAX_REFUNDED_MARKERS,
                 marker_seconds: float = REFUNDED_MARKER_SECONDS) -> None:
        self.tracked: dict[Scope, dict[IdKey, tuple[http.HTTPFlow, Any]]] = {}
        self.parked: dict[Scope, dict[IdKey, tuple[http.HTTPFlow, Any]]] = {}
        # scope -> client key -> the parked ids (id_key) spelled otherwise ("01" under 1): _foreign's index
        self._spelled: dict[Scope, dict[IdKey, set[IdKey]]] = {}
        # (scope, client key) -> (expiry, the refunded call's id_key): its answer withheld however spelled
        self.refunded: OrderedDict[tuple[Scope, IdKey], tuple[float, IdKey]] = OrderedDict()
        self._marked: dict[Scope, int] = {}  # scope -> its markers in `refunded` (has_refunded, cheaply)
        # Without a session: an event resumed after -> the scope it continues (itself: a marked scope), with
        # its expiry. Bounded and expiring as the markers are.
        self.resumes: OrderedDict[ResumeKey, tuple[ResumeKey, float]] = OrderedDict()
        self.max_markers, self.marker_seconds = max_markers, marker_seconds

    # --- calls in flight (for cancellation) ----------------------------------------------------

    def track(self, session: Scope, rpc_id: JsonId, flow: http.HTTPFlow, call: Any) -> None:
        if (key := id_key(rpc_id)) is not None:
            self.tracked.setdefault(session, {})[key] = (flow, call)
            self.unmark(session, rpc_id)

    def untrack(self, session: Scope, rpc_id: JsonId, call: Any) -> None:
        key = id_key(rpc_id)
        for table in (self.tracked, self.parked):
            calls = table.get(session)
            if calls is not None and key in calls and calls[key][1] is call:
                del calls[key]
                if not calls:
                    del table[session]
                if table is self.parked:
                    self._respell(session, rpc_id, add=False)

    def in_flight(self, session: Scope, ids: Iterable[Any]) -> bool:
        """Whether one of these request ids names a priced call of the session still unanswered
        (running or parked). JSON-RPC ids must not be reused within a session, and here they cannot
        be: the meter tells a call's answer on another stream (a resumed GET) only by its id, so a
        second request under it (priced or not) would have its answer settle the first call: billed
        for the other's result, or refunded for the other's error while its own result is delivered."""
        for rpc_id in ids:
            found = self.find(session, rpc_id)
            if found is not None and found[1].outcome is None and found[1].settlement is None:
                return True
        return False

    def find(self, session: Scope, rpc_id: JsonId) -> tuple[http.HTTPFlow, Any] | None:
        """The priced call of this session with this id: parked first, else in flight."""
        key = id_key(rpc_id)
        if key is None:  # not an id a call can have
            return None
        return self.parked.get(session, {}).get(key) or self.tracked.get(session, {}).get(key)

    # --- calls parked until a resumed stream answers them ----------------------------------------

    def park(self, session: Scope, rpc_id: JsonId, flow: http.HTTPFlow, call: Any) -> bool:
        """Park the call; False when its place is another call's, still unsettled. In a session ids are not
        reused (in_flight); without one, two calls of one id resuming one event id mean a server whose
        event ids name no single stream: nothing could tell their answers apart."""
        if (key := id_key(rpc_id)) is None:
            return False
        calls = self.parked.setdefault(session, {})
        held = calls.get(key)
        if held is not None and held[1] is not call and held[1].outcome is None and held[1].settlement is None:
            return False
        calls[key] = (flow, call)
        self._respell(session, rpc_id, add=True)
        return True

    def _respell(self, session: Scope, rpc_id: JsonId, add: bool) -> None:
        """Keep _spelled: a parked id that an SDK client reads as another (a number spelled as a string)."""
        key, spelled = id_key(rpc_id), client_key(rpc_id)
        if key is None or spelled is None or spelled == key:
            return
        index = self._spelled.setdefault(session, {})
        keys = index.setdefault(spelled, set())
        if add:
            keys.add(key)
        else:
            keys.discard(key)
        if not keys:
            del index[spelled]
        if not index:
            del self._spelled[session]

    def has_parked(self, session: Scope) -> bool:
        return session in self.parked

    def watching(self, session: Scope) -> bool:
        """Whether the session has calls (parked or running) an answer on its GET streams would settle."""
        return session in self.parked or session in self.tracked

    def answered(self, session: Scope, messages: list[Any] | None) -> list[tuple[http.HTTPFlow, Any]]:
        """The calls of `session`, parked or running, that these messages (an event's) answer."""
        parked, running = self.parked.get(session, {}), self.tracked.get(session, {})
        found = []
        for m in messages or ():
            if not m.has_method and (m.has_result or m.has_error) and (key := id_key(m.id_value())) is not None:
                if (entry := parked.get(key) or running.get(key)) is not None:
                    found.append(entry)
        return found

    def parked_calls(self) -> list[tuple[http.HTTPFlow, Any]]:
        return [fc for calls in self.parked.values() for fc in calls.values()]

    # --- refunded answers, never delivered ------------------------------------------------------

    def mark_refunded(self, session: Scope, rpc_id: JsonId) -> None:
        if (key := client_key(rpc_id)) is None or (exact := id_key(rpc_id)) is None:
            return
        now = time.monotonic()
        if (session, key) not in self.refunded:
            self._marked[session] = self._marked.get(session, 0) + 1
        for dropped in self._keep(self.refunded, (session, key), (now + self.marker_seconds, exact), now,
                                  lambda marker: marker[0]):
            self._unmarked(dropped[0])
        if isinstance(session[1], bytes):  # a call without a session: its scope stays resumable as long
            self._resumable(cast(ResumeKey, session), cast(ResumeKey, session), now)

    def unmark(self, session: Scope, rpc_id: JsonId) -> None:
        """A new call under the id of a refunded one, however spelled (ids must not be reused, but may be):
        answers to that id are the new call's from now on, not blanked (an SDK client takes any spelling
        for its answer; one naming the id as it was sent settles it, billed)."""
        if (key := client_key(rpc_id)) is not None and self.refunded.pop((session, key), None) is not None:
            self._unmarked(session)

    def has_refunded(self, session: Scope) -> bool:
        """Whether the scope holds a refunded marker (perhaps expired): its streams' answers may be blanked."""
        return session in self._marked

    def _unmarked(self, session: Scope) -> None:
        if (left := self._marked.get(session, 0) - 1) > 0:
            self._marked[session] = left
        else:
            self._marked.pop(session, None)

    def _keep(self, table: OrderedDict[Any, Any], key: Any, value: Any, now: float,
              expiry: Callable[[Any], float]) -> list[Any]:
        """Keep `key`; the keys dropped for it, expired or over max_markers."""
        table[key] = value
        table.move_to_end(key)
        dropped = []
        # Oldest first, all with the same lifetime: expired entries go from the front (else they
        # stayed until max_markers newer ones pushed them out).
        while table and (len(table) > self.max_markers or expiry(next(iter(table.values()))) <= now):
            dropped.append(table.popitem(last=False)[0])
        return dropped

    # --- without a session: the events a call's stream is resumed after ---------------------------

    def resumed(self, key: ResumeKey) -> ResumeKey:
        """The scope a GET naming this event resumes: the call's own, when the event came on an earlier
        resumed stream of it (the server closed that one too, SEP-1699 lets it), else the event's."""
        entry = self.resumes.get(key)
        return entry[0] if entry is not None and entry[1] > time.monotonic() else key

    def carry(self, scope: Scope, last_event_id: str | None) -> None:
        """A GET resuming `scope` (a call without a session) ended after `last_event_id`: its client resumes
        after that event now, in the same scope, while the scope holds a parked call or a refund marker."""
        if last_event_id is None or not isinstance(scope[1], bytes):
            return  # nothing new to resume after, or a session's stream (matched by the session)
        resume = cast(ResumeKey, scope)
        later = resume_key(resume[0], last_event_id)
        now = time.monotonic()
        marked = (entry := self.resumes.get(resume)) is not None and entry[0] == resume and entry[1] > now
        if later != resume and (resume in self.parked or marked):
            self._resumable(later, resume, now)

    def _resumable(self, key: ResumeKey, scope: ResumeKey, now: float) -> None:
        self._keep(self.resumes, key, (scope, now + self.marker_seconds), now, lambda entry: entry[1])

    def is_refunded(self, session: Scope, rpc_id: Any) -> bool:
        """Whether an answer under this id, however spelled, would be a refunded call's to an SDK client."""
        return self._marker(session, rpc_id) is not None

    def _marker(self, session: Scope, rpc_id: Any) -> IdKey | None:
        """The id_key of the refunded call an answer under this id would be taken for, if any."""
        if (key := client_key(rpc_id)) is None or (marker := self.refunded.get((session, key))) is None:
            return None
        if marker[0] < time.monotonic():
            del self.refunded[(session, key)]
            self._unmarked(session)
            return None
        return marker[1]

    def may_blank(self, session: Scope, principal: str | None = None) -> bool:
        """Whether an answer on a stream of `session` (of `principal`'s key) can be one to blank now, the
        stream's own call aside: a refund marker in the scope, or (without a session) another key's call
        parked there. While not, a stream's events pass as they come (stream_edit.StreamEditor)."""
        return self.has_refunded(session) or (isinstance(session[1], bytes) and principal is not None
                                              and session in self.parked)

    def blank_event(self, session: Scope, event: Event, live: JsonId | None = None,
                    live_refunded: bool = False, principal: str | None = None) -> bool:
        """Whether the event answers a refunded call (blank_if_refunded), read from its data, or from what
        the parser's scanner read of it when it was too big to keep (sse.Event.oversized). One whose scanner
        dropped summaries (sse.Event.dropped) is not judged: the editor cuts the stream there first
        (stream_edit.StreamEditor.unjudged)."""
        if not event.oversized:
            return self.blank_if_refunded(session, event.data, live, live_refunded, principal) is not None
        return self._blank(session, event.messages, event.dropped, live, live_refunded, principal) is not None

    def blank_if_refunded(self, session: Scope, data: str, live: JsonId | None = None,
                          live_refunded: bool = False, principal: str | None = None) -> str | None:
        """An event's data: "" (the event is not dispatched by clients) when it answers a refunded call,
        unless it also answers `live`, the call its stream carries, not refunded: a batch answering
        both goes out whole (that call is billed for it; never billed for an answer withheld). A batch too
        deep for the json module, whose scanner did not keep every answer (jsonrpc.Answer.dropped), may
        answer a refunded call unseen: while the scope may hold one, it is blanked whole, `live` or not
        (fail closed; its watcher then settles no call by it: stream_edit.StreamEditor.withholds).

        `live_refunded`: the stream's own call was refunded (cancelled). Its answer is blanked whatever
        the session's markers say: a later call reusing its id takes the marker over (its answers are
        its own), and must not unblank the refunded call's answer on the refunded call's own stream.

        `principal`: the key whose stream this is. An answer to a call parked in the scope by another
        key is withheld as a refunded one's: that key cannot settle it, so it would be refunded at its
        timeout with its result out (a stateless server replays a stream to whoever names its event). A
        session's streams need no such check: another key presenting the session is refused (admission)."""
        if not self._may_blank_any(session, live_refunded, principal):
            return None
        answer = read_answer(data.encode("utf-8", "surrogatepass"))
        return self._blank(session, answer.messages, answer.dropped, live, live_refunded, principal)

    def _may_blank_any(self, session: Scope, live_refunded: bool, principal: str | None) -> bool:
        """A cheap first look: whether any answer could be blanked at all."""
        if not isinstance(session[1], bytes):
            principal = None
        return bool(self.refunded) or live_refunded or (principal is not None and session in self.parked)

    def _blank(self, session: Scope, messages: list[Message] | None, dropped: int, live: JsonId | None,
               live_refunded: bool, principal: str | None) -> str | None:
        if not isinstance(session[1], bytes):
            principal = None
        if not self._may_blank_any(session, live_refunded, principal):
            return None
        if dropped and (live_refunded or self.may_blank(session, principal)):
            return ""  # answers not read: one may be a refunded call's (as the editor asks: may_blank)
        live_key = id_key(live)
        answered = answered_ids(messages)
        # (live None: the stream carries no call; an answer without an id is nobody's)
        own = live_refunded and live is not None and answers(messages, live)
        if not own and not any(self.is_refunded(session, rpc_id) or self._foreign(session, rpc_id, principal)
                               for rpc_id in answered):
            return None
        # The stream's own call, answered as sent, is billed for this event unless refunded itself (a marker
        # left by another spelling of its id is another call's: a raw client may run 1 and "1" at once).
        keep = (live is not None and any(id_key(rpc_id) == live_key for rpc_id in answered) and not live_refunded
                and self._marker(session, live) != live_key and not self._foreign(session, live, principal))
        return None if keep else ""

    def _foreign(self, session: Scope, rpc_id: Any, principal: str | None) -> bool:
        """Whether a call parked in the scope under this id, however spelled (client_key), is another key's
        than `principal`, unsettled."""
        if principal is None or (calls := self.parked.get(session)) is None or (key := client_key(rpc_id)) is None:
            return False
        keys = {key, *self._spelled.get(session, {}).get(key, ())}
        if (exact := id_key(rpc_id)) is not None:
            keys.add(exact)
        return any((entry := calls.get(k)) is not None and entry[1].consumer is not None
                   and entry[1].consumer.principal != principal
                   and entry[1].outcome is None and entry[1].settlement is None for k in keys)


def cancelled_body(rpc_id: JsonId) -> bytes:
    """What a client gets instead of the JSON answer of a call it cancelled (and was refunded for)."""
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "error": {
        "code": -32800, "message": "request cancelled; not delivered and refunded by mcpmeter"}}).encode()
