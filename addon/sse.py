"""Incremental server-sent-events parser: bytes in as they arrive, events out. Pure.

Follows the WHATWG event-stream rules that matter for MCP: LF, CRLF or CR line ends
split anywhere across chunks, multi-line `data:`, comments, and events whose data is
empty (MCP servers send such a priming event) which are not dispatched.

Each event says where its bytes lie in the stream (`start`, `end`: from its first line to the end
of its blank line), and `pending_from` where the event not yet complete begins, so a writer can
edit an event in place without splitting the stream again (receipts.StreamEditor).

Linear in the bytes fed, with bounded memory: an event's data is held up to
`max_event_bytes`, and while its `share` of what all parsers hold allows (budget.py); a bigger
event is not held but read on the fly by a `MessageScanner`, so the event still comes out
(with empty `data`, the scanner's `messages` and how many it `dropped`) and the call it answers still settles. Other
lines (comments, `event:`, `id:`) longer than the limit are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .budget import Share
from .scan import Message, MessageScanner

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    data: str
    id: str | None
    # an event over max_event_bytes: its data is not kept, this is what it said (None: not one JSON value)
    messages: list[Message] | None = None
    oversized: bool = False
    # of an oversized event, the messages the scanner read but did not keep (past scan.MAX_MESSAGES): a
    # batch that long answers more than `messages` says (stream_edit.StreamEditor cannot judge it)
    dropped: int = 0
    # Where its bytes lie in the stream: from its first line to just past its blank line (not part of
    # what the event says: two events saying the same are equal wherever they were).
    start: int = field(default=-1, compare=False)
    end: int = field(default=-1, compare=False)
    # The last `id:` before the event began: where a client that got every byte before `start` resumes.
    resumes_after: str | None = field(default=None, compare=False)


class SseParser:
    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, share: Share | None = None) -> None:
        """`share`: what an event held across chunks takes of the bytes all parsers hold (None: unbounded).
        Past it, an event is read by the scanner, as one over max_event_bytes is."""
        self.max_event_bytes = max_event_bytes
        self.share = share
        self._buf = bytearray()
        self._searched = 0  # bytes of _buf known to hold no line end
        self._cr_pending = False  # the previous chunk ended with CR: a LF starting this one belongs to it
        self._partial: str | None = None  # "data" or "skip": a long line already being consumed
        self._data: list[bytes] = []
        self._lines = 0  # data lines in the event
        self._size = 0
        self._scanner: MessageScanner | None = None  # the event outgrew the limit
        self._event = ""
        self._id: str | None = None
        self._id_before: str | None = None  # the last id as the event being read began
        self._offset = 0  # stream offset of _buf[0]
        self._head: bytes | None = b""  # the stream's first bytes, until it is known they are no BOM
        self._event_start = 0  # stream offset where the event being read began

    def discard(self) -> None:
        """The stream is over without its end (cut, or its flow's hooks are done): what is held of an
        unfinished event goes (up to max_event_bytes), as a client drops an event never completed.
        The ids seen stay; nothing more may be fed."""
        self._buf, self._searched = bytearray(), 0
        self._reset()

    @property
    def pending_from(self) -> int:
        """The stream offset where the event not yet dispatched begins: every byte before it belongs
        to an event already returned by `feed` (or to one that dispatched nothing)."""
        return self._event_start

    @property
    def last_event_id(self) -> str | None:
        """The last `id:` seen, even on an event not dispatched (a priming event): a client resumes from it."""
        return self._id

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse one chunk; b"" marks the end of the stream."""
        if self._head is not None:  # the stream's first bytes: a byte order mark there is not part of it
            head = self._head + chunk
            if chunk and len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head  # maybe a mark cut in two: wait for the rest
                return []
            self._head = None
            if head.startswith(_BOM):
                head = head[len(_BOM):]
                self._offset = self._event_start = len(_BOM)
            if not chunk:  # the end, right after the first bytes
                return (self.feed(head) if head else []) + self.feed(b"")
            if not head:
                return []
            chunk = head
        final = not chunk
        if (not final and not self._buf and not self._cr_pending and self._event_start == self._offset
                and self._partial is None and not self._lines and not self._event and len(chunk) <= self.max_event_bytes
                and chunk.endswith(b"\n\n") and b"\r" not in chunk and b"\n\n\n" not in chunk
                and not chunk.startswith(b"\n")):
            return self._whole_events(chunk)
        events: list[Event] = []
        buf = self._buf
        if self._cr_pending and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the end of a CRLF cut in two: it belongs to the line before
            if self._event_start == self._offset:
                self._event_start += 1
            self._offset += 1
        self._cr_pending = False
        buf += chunk
        start = 0
        lf = cr = -2  # the next LF / CR at or after start; -1 none, -2 not looked for yet
        while True:
            at = max(start, self._searched)
            if lf < at and lf != -1:
                lf = buf.find(b"\n", at)
            if cr < at and cr != -1:
                cr = buf.find(b"\r", at)
            if lf == -1 and cr == -1:
                break
            end = lf if cr == -1 or (lf != -1 and lf < cr) else cr
            nxt = end + 1
            if buf[end] == 0x0D:
                if nxt < len(buf):
                    nxt += buf[nxt] == 0x0A
                else:
                    self._cr_pending = True
            if (event := self._line(bytes(buf[start:end]), self._offset + nxt)) is not None:
                events.append(event)
            start = nxt
        del buf[:start]
        self._offset += start
        self._searched = len(buf)
        if final:
            self._offset += len(buf)
            self._event_start = self._offset
            buf.clear()  # an unterminated last line, and an event without its blank line, never count
            self._searched = 0
            self._reset()
        elif len(buf) > _LONG_LINE:
            self._consume_partial()
        return events

    def _whole_events(self, chunk: bytes) -> list[Event]:
        """The usual chunk, split at C speed: between events, LF line ends only, whole events (it
        ends with its last event's blank line, no event is empty), none bigger than the limit. The
        same events, ids and offsets as the line by line path."""
        events = []
        at = self._offset
        for block in chunk[:-2].split(b"\n\n"):
            data: list[bytes] = []
            before = self._id
            for line in block.split(b"\n"):
                if line[:1] != b":":  # a comment
                    name, value = _field(line)
                    if name == b"data":
                        data.append(value)
                    else:
                        self._other_field(name, value)
            end = at + len(block) + 2
            text = b"\n".join(data).decode("utf-8", "replace")
            if text:  # no data line, or a single empty one: a priming event, not dispatched
                events.append(Event(event=self._event or "message", data=text, id=self._id, start=at, end=end,
                                    resumes_after=before))
            self._event = ""
            at = end
        self._offset = self._event_start = at
        self._id_before = self._id
        return events

    # --- lines -----------------------------------------------------------------------------------

    def _line(self, raw: bytes, ends_at: int) -> Event | None:
        """One line, without its end; `ends_at` is the stream offset just past its line end."""
        partial, self._partial = self._partial, None
        if partial == "data":
            self._add_data(raw, continued=True)
            return None
        if partial == "skip":
            return None
        if not raw:
            event = self._dispatch(ends_at)
            self._event_start, self._id_before = ends_at, self._id
            return event
        if raw[:1] == b":":
            return None
        name, value = _field(raw)
        if name == b"data":
            self._add_data(value)
        else:
            self._other_field(name, value)
        return None

    def _other_field(self, name: bytes, value: bytes) -> None:
        if name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")

    def _consume_partial(self) -> None:
        """A line too long to hold: pass what has come of it on (data) or drop it (anything else)."""
        buf = self._buf
        if self._partial is None:
            if buf.startswith(b"data:"):
                head = 6 if buf[5:6] == b" " else 5
                self._partial = "data"
                self._add_data(bytes(buf[head:]))
            else:
                self._partial = "skip"
                if buf.startswith(b"event:"):
                    # An event type this long is not "message" (what a client reads it as): say so,
                    # whatever the chunking, instead of keeping the type set before.
                    self._event = _LONG_TYPE
        elif self._partial == "data":
            self._add_data(bytes(buf), continued=True)
        self._offset += len(buf)
        buf.clear()
        self._searched = 0

    def _add_data(self, piece: bytes, continued: bool = False) -> None:
        if not continued:
            if self._lines:
                piece = b"\n" + piece
            self._lines += 1
        if self._scanner is not None:
            self._scanner.feed(piece)
            self._size += len(piece)
            return
        self._size += len(piece)
        if self._size <= self.max_event_bytes and (self.share is None or self.share.reserve(len(piece))):
            self._data.append(piece)
            return
        self._scanner = MessageScanner()  # from here on the event is read, not held
        for held in self._data:
            self._scanner.feed(held)
        self._scanner.feed(piece)
        self._data = []
        if self.share is not None:
            self.share.give_all()

    def _dispatch(self, ends_at: int) -> Event | None:
        event: Event | None
        if self._scanner is not None:
            event = Event(event=self._event or "message", data="", id=self._id, messages=self._scanner.finish(),
                          oversized=True, dropped=self._scanner.dropped, start=self._event_start, end=ends_at,
                          resumes_after=self._id_before)
        else:
            data = b"".join(self._data).decode("utf-8", "replace")
            # no data line, or a single empty one: a priming event
            event = Event(event=self._event or "message", data=data, id=self._id, start=self._event_start,
                          end=ends_at, resumes_after=self._id_before) if data else None
        self._reset()
        return event

    def _reset(self) -> None:
        self._data, self._lines, self._size, self._scanner, self._event = [], 0, 0, None, ""
        self._partial = None
        if self.share is not None:
            self.share.give_all()


_LONG_LINE = 64 * 1024  # a line held longer than this is consumed as it comes
_LONG_TYPE = "\0too long"  # the type of an event whose `event:` line was too long to hold (never "message")
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark: the stream's first bytes may be one, skipped (WHATWG)


def _field(line: bytes) -> tuple[bytes, bytes]:
    """A line's field name and value, the one space after the colon dropped (a line without a colon
    is a field with an empty value)."""
    name, _, value = line.partition(b":")
    return name, value[1:] if value[:1] == b" " else value
