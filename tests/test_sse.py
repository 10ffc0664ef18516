"""addon.sse.SseParser: the WHATWG event-stream rules MCP streams rely on, fed in every chunking."""

from __future__ import annotations

import json

import pytest

from addon.scan import MAX_MESSAGES, Message
from addon.sse import Event, SseParser


def parse_whole(stream: bytes) -> list[Event]:
    p = SseParser()
    return p.feed(stream) + p.feed(b"")


def parse_bytewise(stream: bytes) -> list[Event]:
    p = SseParser()
    events: list[Event] = []
    for i in range(len(stream)):
        events += p.feed(stream[i : i + 1])
    return events + p.feed(b"")


def parse_split(stream: bytes, *cuts: int) -> list[Event]:
    p = SseParser()
    events: list[Event] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        if cut > start:  # an empty chunk would mark the end of the stream
            events += p.feed(stream[start:cut])
        start = cut
    return events + p.feed(b"")


def msg(data: str, id: str | None = None, event: str = "message") -> Event:
    return Event(event=event, data=data, id=id)


# A realistic MCP stream: priming event with an id and empty data, a comment, a progress
# notification, then the result, with a multi-byte character to split.
MCP_STREAM = (
    b"id: 0\ndata:\n\n"
    b": keep-alive\n\n"
    b'event: message\nid: 1\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
    b'event: message\nid: 2\ndata: {"jsonrpc":"2.0","id":1,\ndata: "result":{"t":"\xc3\xa9\xe2\x82\xac"}}\n\n'
)
MCP_EVENTS = [
    msg('{"jsonrpc":"2.0","method":"notifications/progress"}', id="1"),
    msg('{"jsonrpc":"2.0","id":1,\n"result":{"t":"é€"}}', id="2"),
]


CASES = [
    (MCP_STREAM, MCP_EVENTS),
    (b"data: a\n\n", [msg("a")]),
    (b"data: a\r\n\r\n", [msg("a")]),
    (b"data: a\r\r", [msg("a")]),
    (b"data: a\n\ndata: b\n\n", [msg("a"), msg("b")]),
    (b"data: a\r\n\r\ndata: b\r\n\r\n", [msg("a"), msg("b")]),
    (b"data: a\r\rdata: b\r\r", [msg("a"), msg("b")]),
    (b"data: a\r\ndata: b\rdata: c\n\r\n", [msg("a\nb\nc")]),  # mixed line ends within one event
    (b"data: a\r\n\n", [msg("a")]),  # CRLF then LF: two line ends
    (b"data: a\n\r", [msg("a")]),  # LF then a final CR: the stream's end completes the CR
    (b"data: line1\ndata: line2\ndata: line3\n\n", [msg("line1\nline2\nline3")]),
    (b"data:no-space\n\n", [msg("no-space")]),
    (b"data:  two spaces\n\n", [msg(" two spaces")]),  # only one leading space is removed
    (b"data: a: b: c\n\n", [msg("a: b: c")]),
    (b"data\n\n", []),  # a field named data with an empty value, like a priming event
    (b"data\ndata: x\n\n", [msg("\nx")]),
    (b": comment\ndata: a\n: another\n\n", [msg("a")]),
    (b":\n\n", []),
    (b": only comments\n\n: more\n\n", []),
    (b"event: endpoint\ndata: /messages?session_id=abc\n\n", [msg("/messages?session_id=abc", event="endpoint")]),
    (b"event:\ndata: x\n\n", [msg("x")]),  # an empty event type is "message"
    (b"event: a\n\ndata: x\n\n", [msg("x")]),  # the event type does not outlive its event
    (b"id: 5\ndata: x\n\n", [msg("x", id="5")]),
    (b"id: 5\ndata: x\n\ndata: y\n\n", [msg("x", id="5"), msg("y", id="5")]),  # the last event id persists
    (b"id: 5\ndata: x\n\nid\ndata: y\n\n", [msg("x", id="5"), msg("y", id="")]),  # ... until reset
    (b"id: 5\ndata:\n\ndata: y\n\n", [msg("y", id="5")]),  # a priming event's id counts
    (b"id: a\x00b\ndata: x\n\n", [msg("x")]),  # an id with NUL is ignored
    (b"retry: 1000\ndata: x\n\n", [msg("x")]),
    (b"foo: bar\ndata: x\nDATA: y\n\n", [msg("x")]),  # unknown fields are ignored, names are case-sensitive
    (b"data:\n\n", []),  # a priming event is not dispatched
    (b"data: \n\n", []),
    (b"data:\r\n\r\n", []),
    (b"\n\n\n\r\n\r\r", []),  # blank lines with nothing pending
    (b"data: a\n", []),  # no blank line: the event is incomplete when the stream ends
    (b"data: a\n\ndata: b\n", [msg("a")]),
    (b"data: a", []),  # an incomplete line
    (b"", []),
]


@pytest.mark.parametrize("stream, expected", CASES)
def test_all_at_once(stream: bytes, expected: list[Event]) -> None:
    assert parse_whole(stream) == expected


@pytest.mark.parametrize("stream, expected", CASES)
def test_one_byte_at_a_time(stream: bytes, expected: list[Event]) -> None:
    assert parse_bytewise(stream) == expected


@pytest.mark.parametrize("stream, expected", CASES)
def test_every_two_chunk_split(stream: bytes, expected: list[Event]) -> None:
    for cut in range(len(stream) + 1):
        assert parse_split(stream, cut) == expected, f"split at {cut}: {stream[:cut]!r} | {stream[cut:]!r}"


def test_every_three_chunk_split_of_the_mcp_stream() -> None:
    stream = b"data: a\r\n\r\nid: 7\r\ndata: b\r\ndata: c\r\n\r\n"
    expected = [msg("a"), msg("b\nc", id="7")]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert parse_split(stream, i, j) == expected, (i, j)


def test_events_come_out_as_soon_as_their_blank_line_arrives() -> None:
    p = SseParser()
    assert p.feed(b"data: a\n") == []
    assert p.feed(b"\n") == [msg("a")]
    assert p.feed(b"data: b\r\n") == []
    assert p.feed(b"\r\n") == [msg("b")]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    p = SseParser()
    assert p.feed(b"data: a\r") == []  # a CR ends the line at once; a LF right after belongs to it
    assert p.feed(b"\n") == []  # it did: still one line end, no blank line yet
    assert p.feed(b"\r") == [msg("a")]  # the blank line
    assert p.feed(b"\n") == []  # the second half of that CRLF, not another blank line
    assert p.feed(b"") == []


def test_a_lone_cr_is_a_line_end_as_soon_as_it_arrives() -> None:
    p = SseParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\r") == [msg("a")]  # CR and CRLF end a line alike: no need to wait for the next byte
    assert p.feed(b"data: b\r\r") == [msg("b")]


def test_a_trailing_cr_dispatches_without_the_end_of_stream() -> None:
    p = SseParser()
    assert p.feed(b"data: a\r\r") == [msg("a")]
    assert p.feed(b"") == []


def test_end_of_stream_discards_an_incomplete_event() -> None:
    p = SseParser()
    assert p.feed(b"data: a\ndata: b") == []
    assert p.feed(b"") == []


def test_many_events_in_one_chunk_come_out_in_order() -> None:
    stream = b"".join(f"id: {i}\ndata: {i}\n\n".encode() for i in range(100))
    assert parse_whole(stream) == [msg(str(i), id=str(i)) for i in range(100)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse_whole(b"data: \xff\n\n") == [msg("\ufffd")]


def test_an_oversized_event_is_scanned_not_held_and_parsing_continues() -> None:
    p = SseParser(max_event_bytes=10)
    events = p.feed(b'data: {"id": 1,\ndata:  "result": {"isError": true}}\n\ndata: ok\n\n')
    big, small = events
    assert big.oversized and big.data == "" and big.messages == [
        Message(id_raw=b"1", has_result=True, is_error=True, result_obj=True, id_ok=True)]
    assert small == msg("ok")


def test_an_oversized_batch_says_how_many_answers_the_scanner_did_not_keep() -> None:
    """The scanner keeps MAX_MESSAGES summaries: the event says it answers more than its `messages` show."""
    for count, dropped in ((MAX_MESSAGES, 0), (MAX_MESSAGES + 3, 3)):
        batch = json.dumps([{"jsonrpc": "2.0", "id": i, "result": {}} for i in range(count)]).encode()
        [event] = SseParser(max_event_bytes=1000).feed(b"data: " + batch + b"\n\n")
        assert event.oversized and event.dropped == dropped
        assert [m.id_value() for m in event.messages or []] == list(range(MAX_MESSAGES))


@pytest.mark.parametrize("size", [1, 7, 4096, 70_000])
def test_an_event_far_over_the_limit_is_read_at_any_split(size: int) -> None:
    text = "x" * 300_000
    event = b'data: {"jsonrpc":"2.0","id":"k","result":{"content":[{"type":"text","text":"' + text.encode() + \
        b'"}],"isError":true}}\n\n'
    p = SseParser(max_event_bytes=1000)
    events = [e for i in range(0, len(event), size) for e in p.feed(event[i : i + size])]
    [e] = events
    assert e.messages == [Message(id_raw=b'"k"', has_result=True, is_error=True, version_ok=True, result_obj=True,
                                  id_ok=True)]
    assert len(p._buf) <= 70_000 + size and not p._data  # never the whole event in memory


def test_a_long_comment_line_is_skipped_in_bounded_memory() -> None:
    p = SseParser(max_event_bytes=1000)
    for _ in range(100):
        assert p.feed(b": " + b"c" * 65536) == []
        assert len(p._buf) <= 2 * 65536
    assert p.feed(b"\ndata: ok\n\n") == [msg("ok")]


def test_one_long_line_in_small_chunks_is_linear() -> None:
    """Each chunk is looked at once: 4 MB in 1 KB chunks is fast (the old parser re-copied the line)."""
    import time

    p = SseParser()
    chunk = b"y" * 1024
    started = time.process_time()
    assert p.feed(b"data: ") == []
    for _ in range(4096):
        p.feed(chunk)
    [e] = p.feed(b"\n\n")
    assert len(e.data) == 4096 * 1024
    assert time.process_time() - started < 2.0


# --- where each event lies (receipts.StreamEditor edits events in place by these offsets) -------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PIECES = st.sampled_from([b"data: {\"id\":1}", b"data:", b"data: x", b"event: message", b"event: other",
                           b"id: 7", b": ping", b"retry: 5", b"\n", b"\r", b"\r\n", b"\n\n", b"\r\n\r\n", b"x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=30).map(b"".join), st.lists(st.integers(0, 400), max_size=6))
def test_each_event_says_where_its_bytes_are(stream: bytes, cuts: list[int]) -> None:
    parser = SseParser()
    events: list[Event] = []
    fed = 0
    for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(stream)], strict=True):
        if b <= a:
            continue
        got = parser.feed(stream[a:b])
        fed = b
        for event in got:
            assert 0 <= event.start < event.end <= fed
        assert all(e.end <= parser.pending_from for e in got) and parser.pending_from <= fed
        events += got
    events += parser.feed(b"")
    assert events == parse_whole(stream)  # the same events, however the stream was cut
    last = 0
    for event in events:
        assert event.start >= last
        last = event.end
        alone = SseParser()
        # Its own bytes, alone, say the same (the id aside: an `id:` holds until another one replaces it).
        assert [(e.event, e.data) for e in alone.feed(stream[event.start:event.end])] == [(event.event, event.data)]
        assert stream[event.end - 1:event.end] in (b"\n", b"\r")


@pytest.mark.parametrize("cut", range(0, 6))
def test_a_byte_order_mark_opening_the_stream_is_skipped_as_clients_skip_it(cut: int) -> None:
    stream = b'\xef\xbb\xbfdata: {"id":1}\n\n\xef\xbb\xbfdata: x\n\n'  # only the stream's first one
    events = parse_split(stream, cut)
    assert [(e.data, e.start, e.end) for e in events] == [('{"id":1}', 3, 19)]  # the second: field "\ufeffdata"
    assert [e.data for e in parse_bytewise(b"\xef\xbb")] == [] and parse_whole(b"\xef\xbb\xbf") == []


@pytest.mark.parametrize("cut", [None, 40, 70_001, 70_010])
def test_an_event_line_too_long_to_hold_is_never_read_as_a_message(cut: int | None) -> None:
    """A client reads the long type (not "message", so it ignores the event); the meter agrees, whatever
    the chunking (line by line it skips the line it cannot hold, and must not fall back to "message")."""
    stream = b"event: " + b"x" * 70_000 + b'\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
    events = parse_whole(stream) if cut is None else parse_split(stream, cut)
    assert len(events) == 1 and events[0].event != "message"


def test_each_event_says_which_id_a_client_resumes_after_without_it() -> None:
    """The last id before the event began (a priming event's too): where a client that got every byte
    before the event resumes, if the stream is cut there."""
    stream = (b"id: 1\ndata:\n\n" + b"data: a\n\n" + b"id: 3\ndata: b\n\n" + b"data: c\n\n"
              + b"id: 5\ndata: " + b"d" * 300 + b"\n\n")
    expected = ["1", "1", "3", "3"]  # the priming event is not dispatched: its id is before "a"
    for cut in range(1, len(stream)):
        parser = SseParser(max_event_bytes=100)  # the last event is scanned, not held
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:]) + parser.feed(b"")
        assert [e.resumes_after for e in events] == expected, cut
    assert [e.resumes_after for e in parse_bytewise(stream)] == expected
    assert [e.resumes_after for e in parse_whole(stream)] == expected
