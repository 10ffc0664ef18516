"""The events of an SSE answer, edited in place as they pass, from the meter's own parse of the stream.

Two edits, one parse (the stream watcher's SseParser, which gives each event's place in the stream):
- the plan's prices and receipt written into the event that answers the request (receipts.Plan);
- on a session's streams, the `data:` lines of an event answering a refunded call dropped, its
  `id:` line kept (clients do not dispatch an event without data, and their resumption point still
  advances): a refunded call's answer is never delivered (addon/pending.py).

The editor holds back only the event not yet complete, at most `limit` bytes, and nothing once there
is nothing left to edit. Only an event to edit is split into fields again; a chunk of whole events
none of which is to be edited goes out as it came.

Fail closed: while the stream may carry a refunded call's answer (`may_blank`), an event the editor
cannot hold whole (it outgrows `limit` before it ends, or part of it went out before a refund made
blanking possible and it then turns out to answer a refunded call) or cannot judge (a batch over
max_event_bytes answering more calls than the parser's scanner keeps: sse.Event.dropped) is not let
out, nor anything after it: the stream is *severed* (`severed`), and the watcher cuts its upstream.
The client never gets that event's end, so never dispatches it. Without anything to blank, a bigger
event passes as it comes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from .budget import Share
from .jsonrpc import Outcome
from .receipts import MAX_REWRITE_BYTES, Plan, edit_event_data, may_edit
from .sse import Event

log = logging.getLogger("mcpmeter")

_LINE_END = re.compile(rb"(\r\n|\r|\n)")

Line = tuple[bytes, bytes]  # its text, its line end
OTHER_LINES_BYTES = 1024 * 1024  # room in a held event for its lines other than data (id, event, comments)


def hold_limit(max_event_bytes: int, blanking: bool) -> int:
    """How many bytes of an event in progress an editor holds. Receipts need the answer whole, up to
    MAX_REWRITE_BYTES. On a session's streams every event the meter reads whole (data up to
    max_event_bytes, sse.py) must be held whole, with its other lines: an answer to a refunded call
    goes out blanked. A bigger one severs the stream while it may carry a refunded call's answer."""
    return max(MAX_REWRITE_BYTES, max_event_bytes + OTHER_LINES_BYTES) if blanking else MAX_REWRITE_BYTES


class StreamEditor:
    def __init__(self, plan: Plan | None, blank: Callable[[Event], bool] | None = None,
                 limit: int = MAX_REWRITE_BYTES, may_blank: Callable[[], bool] | None = None,
                 share: Share | None = None) -> None:
        """`plan`: what to write into the answer (None: nothing); `blank(event)`: whether an event
        answers a refunded call (None: not a session's stream); `may_blank()`: whether `blank` can
        say yes now (None: always). While it cannot, nothing is held: the stream passes as it comes.
        `share`: what is held takes of the bytes all answers hold (budget.py; None: unbounded); past it an
        event is too big to hold, as one over `limit` is."""
        self.plan, self.blank, self.limit, self.may_blank, self.share = plan, blank, limit, may_blank, share
        self.blanked: list[Event] = []  # the events the last `feed` sent out blanked
        self.severed = False  # failed closed: nothing more of this stream goes out
        self._held = bytearray()
        self._from = 0  # the stream offset of _held[0]
        self._cut_at: int | None = None  # where `admit` decided the stream is severed
        self._adrift = False  # no parse to follow the stream by any more: it passes, or is severed

    def holds(self, offset: int) -> bool:
        """Whether no byte of the stream from `offset` on has gone out yet."""
        return self._from <= offset

    def discard(self) -> None:
        """The stream is over: the bytes held back (an unfinished event) are never sent."""
        self._held = bytearray()
        self._keep(0)

    @property
    def finished(self) -> bool:
        """Nothing is left to edit: the rest of the stream goes untouched (and need not be parsed)."""
        return (self.plan is None or self.plan.done) and self.blank is None and not self._held

    def admit(self, events: list[Event]) -> list[Event]:
        """Before the watcher reads the events of a chunk (settles calls by them): those that will reach
        the client. An event that began going out before blanking was possible (too big to hold, or no
        refund yet) and answers a refunded call, or one that cannot be judged (`unjudged`), severs the
        stream at once: neither it (what of it is still held) nor anything after it goes out, so nothing
        from it on may settle a call as delivered. `feed` keeps to this (and decides it itself if the
        watcher did not ask)."""
        if self._cut_at is not None:  # (decided for this chunk already: the task reader asks first, deferred.py)
            return [event for event in events if event.end <= self._cut_at]
        if self.severed:
            return []  # nothing more goes out
        if self.blank is None or not self._blanking():
            return events
        if self._adrift:  # unparsed: none of it goes out now (feed severs it)
            return []
        for i, event in enumerate(events):
            if self.unjudged(event) or (event.start < self._from and self.blank(event)):
                self._cut_at = max(event.start, self._from)
                return events[:i]
        return events

    def unjudged(self, event: Event) -> bool:
        """Whether `admit` cuts the stream at this event because it cannot tell whether it answers a
        refunded call: the scanner read more answers in it than it keeps (sse.Event.dropped), while
        the stream may carry one (fail closed, as for an event too big to hold)."""
        return bool(event.dropped) and not self.severed and self.blank is not None and self._blanking()

    def answered(self) -> None:
        """The call's answer has passed (edited, or too big to edit): the plan has nothing left to write."""
        if self.plan is not None:
            self.plan.done = True

    def feed(self, chunk: bytes, events: list[Event], pending_from: int | None,
             answer: tuple[Event, Outcome] | None = None) -> bytes:
        """`chunk` (b"": the end) and the events the parser found once it was fed; `pending_from` is
        the parser's (None: the stream was not parsed, so it all goes out, and the rest unedited, until
        it may carry a refunded call's answer: then it is severed);
        `answer`, the event the watcher read as the call's answer and what it said (not read again).
        What may go out now. Never raises: on a failure (or without a parse) everything held goes out,
        unless it may answer a refunded call: then the stream is severed."""
        self.blanked = []
        if self.severed:
            return b""
        if self._adrift:  # unparsed: nothing can be found to withhold, so nothing passes once something might be
            if self.blank is not None and self._blanking():
                self._sever()
                return b""
            self._from += len(chunk)
            return chunk
        events = self.admit(events)
        edits = [(event, kind) for event in events if (kind := self._kind(event)) is not None]
        if (self._cut_at is None and not self._held and chunk and not edits and pending_from is not None
                and (pending_from == self._from + len(chunk) or self._nothing_left())):
            self._from += len(chunk)  # whole events, or nothing to edit now, none to edit: out as they came
            return chunk
        held = self._held
        held += chunk
        try:
            return self._release(edits, pending_from, not chunk, answer)
        except Exception:
            log.exception("mcpmeter: could not edit a stream")
            if self.blank is not None and self._blanking():
                self._sever()  # what is held may answer a refunded call: none of it goes out
                return b""
            self._give_up()
            out = bytes(held)
            held.clear()
            return out

    def withholds(self, event: Event) -> bool:
        """Whether `feed` sends this (admitted) event out blanked: no call is settled by it, the client never
        gets its data. An event held whole is blanked whatever its size (one over max_event_bytes by what
        the parser's scanner read of it)."""
        return self.blank is not None and self._blanking() and self.blank(event)

    def _kind(self, event: Event) -> str | None:
        """How the event is to be edited: "blank", "plan" or not at all (None)."""
        if self.withholds(event):
            return "blank"
        if (self.plan is not None and event.event == "message" and not event.oversized
                and event.end - event.start <= min(self.limit, MAX_REWRITE_BYTES) and may_edit(self.plan, event.data)):
            return "plan"
        return None

    def _blanking(self) -> bool:
        """`blank` can say yes now."""
        return self.may_blank is None or self.may_blank()

    def _nothing_left(self) -> bool:
        """Nothing to edit now: nothing is held back."""
        return (self.plan is None or self.plan.done) and (self.blank is None or not self._blanking())

    def _sever(self) -> None:
        self.severed = True
        self._held = bytearray()
        self._keep(0)
        self._cut_at = None

    def _keep(self, n: int) -> bool:
        """Whether `n` bytes may stay held, within the share of all that answers hold (then counted)."""
        if self.share is None:
            return True
        self.share.give_all()
        return n == 0 or self.share.reserve(n)

    def _give_up(self) -> None:
        """No parse to follow the stream by from here (the watcher failed, or this did): nothing more is
        edited. A session's stream stays watched (`finished` stays False): it is severed once it may carry a
        refunded call's answer."""
        self.answered()
        self._adrift = True

    def _release(self, edits: list[tuple[Event, str]], pending_from: int | None, final: bool,
                 answer: tuple[Event, Outcome] | None) -> bytes:
        held = self._held
        out: list[bytes | bytearray] = []
        at = 0  # in held: what is before it is out (or replaced)
        for event, kind in edits:
            start, end = event.start - self._from, event.end - self._from
            if start < at:
                continue  # part of it is out already (too big to hold while nothing could be blanked)
            lines = _lines(bytes(held[start:end]))
            if kind == "blank":
                edited: bytes | None = b"".join(text + ending for text, ending in lines if _name(text) != b"data")
            elif self.plan is None or self.plan.done:
                continue
            else:
                outcome = answer[1] if answer is not None and answer[0] is event else None
                edited = self._write(lines, outcome)
            if edited is not None:
                out.append(held[at:start])
                out.append(edited)
                at = end
                if kind == "blank":
                    self.blanked.append(event)
        if self._cut_at is not None or (pending_from is None and self.blank is not None and self._blanking()):
            # Severed: what comes before the cut goes out (edited), nothing after it.
            cut_at = self._cut_at if self._cut_at is not None else self._from
            out.append(held[at:max(at, cut_at - self._from)])
            self._sever()
            return b"".join(out)
        if pending_from is None:
            self._give_up()  # no parse to follow the stream by from here: it passes unedited
        blanking = self.blank is not None and self._blanking()
        if self._nothing_left() or pending_from is None or final or (pending_from < self._from and not blanking):
            cut = len(held)  # nothing to edit, not parsed, the end, or the event in progress partly out already
        else:
            # (0: the event in progress is partly out already; its rest is held until it ends: see `admit`)
            cut = max(0, pending_from - self._from)
            if len(held) - cut > self.limit or not self._keep(len(held) - cut):
                if blanking:  # too big to hold, and it may answer a refunded call: it never ends (fail closed)
                    out.append(held[at:cut])
                    self._sever()
                    return b"".join(out)
                cut = len(held)  # too big to hold, nothing to blank: it goes out as it comes
        out.append(held[at:cut])
        del held[:cut]
        if not held:
            self._keep(0)
        self._from += cut
        return b"".join(out)

    def _write(self, lines: list[Line], outcome: Outcome | None) -> bytes | None:
        """The event with the plan applied to its data, or None to leave it."""
        assert self.plan is not None
        data, first = [], None
        for i, (text, _) in enumerate(lines):
            if _name(text) == b"data":
                value = text[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
                first = i if first is None else first
        if first is None:
            return None
        try:
            new = edit_event_data(b"\n".join(data).decode("utf-8"), self.plan, outcome)
            if new is None:
                return None
            replacement = new.encode("utf-8")
        except Exception:  # never disturb the stream
            log.exception("mcpmeter: could not edit an event")
            return None
        out = bytearray()
        for i, (text, ending) in enumerate(lines):
            if i == first:  # a multi-line data field stays multi-line (a spliced receipt keeps its newlines)
                for part in replacement.split(b"\n"):
                    out += b"data: " + part + ending
            elif _name(text) != b"data":
                out += text + ending
        return bytes(out)


def _lines(event: bytes) -> list[Line]:
    """An event's lines (its bytes, blank line included), each with its line end."""
    parts = _LINE_END.split(event)  # text, line end, text, line end, ..., ""
    return list(zip(parts[0::2], parts[1::2], strict=False))


def _name(text: bytes) -> bytes:
    """A line's field name (the whole line when it has no colon, as SSE reads it)."""
    return text.partition(b":")[0]
