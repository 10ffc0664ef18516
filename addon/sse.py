"""Incremental server-sent-events parser: bytes in as they arrive, events out. Pure.

Follows the WHATWG event-stream rules that matter for MCP: LF, CRLF or CR line ends
split anywhere across chunks, multi-line `data:`, comments, and events whose data is
empty (MCP servers send such a priming event) which are not dispatched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    data: str
    id: str | None


class SseParser:
    # An event bigger than this is not an MCP message we could act on; drop it rather than grow.
    MAX_EVENT_BYTES = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._size = 0
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse one chunk; b"" marks the end of the stream."""
        final = not chunk
        self._buf += chunk
        events: list[Event] = []
        while True:
            cut = _line_end(self._buf, final)
            if cut is None:
                break
            end, nxt = cut
            line = self._buf[:end]
            self._buf = self._buf[nxt:]
            if (event := self._line(line.decode("utf-8", "replace"))) is not None:
                events.append(event)
        if len(self._buf) > self.MAX_EVENT_BYTES:
            self._buf = b""
        if final:
            self._buf = b""
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value)
            if self._size <= self.MAX_EVENT_BYTES:
                self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        data, event = "\n".join(self._data), self._event
        self._data, self._size, self._event = [], 0, ""
        if not data:  # no data line, or only empty ones: a priming event
            return None
        return Event(event=event or "message", data=data, id=self._id)


def _line_end(buf: bytes, final: bool) -> tuple[int, int] | None:
    """(end of line, start of next) for the first complete line in buf."""
    lf, cr = buf.find(b"\n"), buf.find(b"\r")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, lf + 1
    if cr + 1 < len(buf):
        return cr, cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
    # A trailing CR may be the first half of CRLF: wait for the next chunk unless none comes.
    return (cr, cr + 1) if final else None
