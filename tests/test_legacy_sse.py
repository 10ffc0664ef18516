"""The legacy stream's endpoint rewriter, as a pure function of the bytes fed (`legacy_sse.EndpointRewriter`)."""

from __future__ import annotations

import time

import pytest

from addon import legacy_sse
from addon.legacy_sse import MAX_HELD_BYTES, EndpointRewriter

UPSTREAM = "http://10.9.8.7:4112/legacy/sse"
ABSOLUTE = "http://10.9.8.7:4112/legacy/messages/?session_id=abc"
ROUTE = "/s/messages/?session_id=abc"

# (the upstream's bytes, what the client must get): every valid layout of the endpoint event
LAYOUTS = {
    "plain": (f"event: endpoint\ndata: {ABSOLUTE}\n\n", f"event: endpoint\ndata: {ROUTE}\n\n"),
    "relative": ("event: endpoint\ndata: messages/?session_id=abc\n\n", f"event: endpoint\ndata: {ROUTE}\n\n"),
    "no space, CRLF": (f"event:endpoint\r\ndata:{ABSOLUTE}\r\n\r\n", f"event:endpoint\r\ndata: {ROUTE}\r\n\r\n"),
    "CR only": (f"event: endpoint\rdata: {ABSOLUTE}\r\r", f"event: endpoint\rdata: {ROUTE}\r\r"),
    "id between": (f"event: endpoint\nid: 1\ndata: {ABSOLUTE}\n\n", f"event: endpoint\nid: 1\ndata: {ROUTE}\n\n"),
    "data first": (f"data: {ABSOLUTE}\nevent: endpoint\n\n", f"data: {ROUTE}\nevent: endpoint\n\n"),
    "comments and retry": (f": c\nretry: 5\nevent: endpoint\n: c\ndata: {ABSOLUTE}\n\n",
                           f": c\nretry: 5\nevent: endpoint\n: c\ndata: {ROUTE}\n\n"),
    "two data lines": ("event: endpoint\ndata: http://10.9.8.7:4112\ndata: /legacy/messages/?session_id=abc\n\n",
                       f"event: endpoint\ndata: {ROUTE}\n\n"),
    "last event field wins": (f"event: message\ndata: {ABSOLUTE}\nevent: endpoint\n\n",
                              f"event: message\ndata: {ROUTE}\nevent: endpoint\n\n"),
    "byte order mark": (f"\ufeffevent: endpoint\ndata: {ABSOLUTE}\n\n", f"\ufeffevent: endpoint\ndata: {ROUTE}\n\n"),
    "mixed line ends": (f"event: endpoint\r\ndata: {ABSOLUTE}\r\r\n", f"event: endpoint\r\ndata: {ROUTE}\r\r\n"),
}
BEFORE = ": hello\r\n\r\ndata: {\"not\": \"the endpoint\"}\n\n\n"  # events before it pass unchanged
AFTER = ("event: message\rdata: {\"jsonrpc\": \"2.0\", \"id\": 1, \"result\": {}}\r\r"
         ": ping\n\nevent: endpoint\ndata: x\n\n")
AFTER_OUT = AFTER.replace("event: endpoint", "event: mcpmeter-ignored-endpoint")  # one endpoint per session


def run(stream: bytes, size: int) -> tuple[bytes, EndpointRewriter]:
    """Feed `stream` in chunks of `size`, then its end: what the client gets."""
    rewriter = EndpointRewriter(UPSTREAM, "s")
    out: list[bytes] = []
    for at in range(0, len(stream), size):
        chunks = rewriter.feed(stream[at:at + size])
        assert isinstance(chunks, list) and b"" not in chunks  # nothing to send is [], never an empty chunk
        out += chunks
    assert rewriter.feed(b"") == []
    return b"".join(out), rewriter


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_rewritten_wherever_the_chunks_split(layout: str) -> None:
    sent, expected = (s.encode() for s in LAYOUTS[layout])
    stream = BEFORE.encode() + sent + AFTER.encode()
    for size in (1, 2, 3, 5, 8, 13, len(stream)):
        out, rewriter = run(stream, size)
        assert out == BEFORE.encode() + expected + AFTER_OUT.encode(), (size, out)
        assert rewriter.route == ROUTE and not rewriter.closed


def test_every_split_in_two_gives_the_same_bytes() -> None:
    sent, expected = (s.encode() for s in LAYOUTS["mixed line ends"])
    stream = BEFORE.encode() + sent + AFTER.encode()
    for cut in range(1, len(stream) + 1):  # (b"" would be the end of the stream)
        rewriter = EndpointRewriter(UPSTREAM, "s")
        out = b"".join(rewriter.feed(stream[:cut]) + rewriter.feed(stream[cut:]) if cut < len(stream)
                       else rewriter.feed(stream))
        assert out == BEFORE.encode() + expected + AFTER_OUT.encode(), cut


def test_a_held_chunk_returns_nothing_to_send_and_the_end_comes_later() -> None:
    rewriter = EndpointRewriter(UPSTREAM, "s")
    assert rewriter.feed(b"event: endp") == []
    assert rewriter.feed(f"oint\ndata: {ABSOLUTE}\n".encode()) == []
    assert rewriter.feed(b"\n: ping\n\n") == [f"event: endpoint\ndata: {ROUTE}\n\n: ping\n\n".encode()]
    assert rewriter.feed(b"more") == [b"more"]
    assert rewriter.feed(b"") == []


def test_an_endpoint_event_without_data_is_dropped_and_the_next_one_rewritten() -> None:
    """WHATWG clients never dispatch it; it must not count as the endpoint and let the next one out unrewritten."""
    out, rewriter = run(f"event: endpoint\n\nevent: endpoint\ndata: {ABSOLUTE}\n\n".encode(), 4)
    assert out == f"event: endpoint\ndata: {ROUTE}\n\n".encode() and rewriter.route == ROUTE


@pytest.mark.parametrize("endpoint", [
    "http://evil.example/legacy/messages/", "http://10.9.8.7:4113/legacy/messages/", "/other/messages/",
    "messages/..%2f..%2fadmin", "https://10.9.8.7:4112/legacy/messages/",
])
def test_an_endpoint_outside_the_listing_drops_the_stream(endpoint: str) -> None:
    """Fail closed: neither the upstream's endpoint nor anything after it reaches the client."""
    out, rewriter = run(f": hi\n\nevent: endpoint\ndata: {endpoint}\n\nevent: message\ndata: {{}}\n\n".encode(), 7)
    assert out == b": hi\n\n"
    assert rewriter.closed and rewriter.route is None
    assert rewriter.feed(b"data: more\n\n") == []


def test_an_event_over_the_held_bound_drops_the_stream() -> None:
    rewriter = EndpointRewriter(UPSTREAM, "s")
    assert rewriter.feed(b"data: " + b"x" * MAX_HELD_BYTES) == []
    assert rewriter.closed
    assert rewriter.feed(f"\nevent: endpoint\ndata: {ABSOLUTE}\n\n".encode()) == []


def test_a_stream_that_ends_before_its_endpoint_keeps_its_unfinished_event() -> None:
    out, rewriter = run(f": hi\n\nevent: endpoint\ndata: {ABSOLUTE}\n".encode(), 3)  # no blank line: never dispatched
    assert out == b": hi\n\n" and rewriter.closed


def test_held_bytes_are_read_in_linear_time() -> None:
    stream = b"event: endpoint\n:" + b"y" * (MAX_HELD_BYTES - 100) + f"\ndata: {ABSOLUTE}\n\n".encode()
    started = time.process_time()
    out, rewriter = run(stream, 1)
    assert rewriter.route == ROUTE and out.endswith(f"data: {ROUTE}\n\n".encode())
    assert time.process_time() - started < 5  # quadratic would be ~2^32 steps


def test_gateway_endpoint_is_what_the_rewriter_uses() -> None:
    assert legacy_sse.gateway_endpoint(ABSOLUTE, UPSTREAM, "s") == ROUTE


LATER = (f"data: {'z' * 100_000}\r\n\r\nevent: endpoint\r\ndata: {ABSOLUTE}\r\n\r\n"
         f"event:endpoint\rdata: {ABSOLUTE}\r\rdata: {ABSOLUTE}\nevent: endpoint\n\n"
         "event: endpointx\ndata: {}\n\nevent: endpoint")  # the last line never ends: never dispatched


def test_later_endpoint_events_are_renamed_wherever_the_chunks_split() -> None:
    """Clients that take every endpoint event would follow a later one to the upstream, unmetered."""
    first = f"event: endpoint\ndata: {ABSOLUTE}\n\n"
    expected = (f"event: endpoint\ndata: {ROUTE}\n\n"
                + LATER.replace("event: endpoint\r\n", "event: mcpmeter-ignored-endpoint\r\n")
                .replace("event:endpoint\r", "event: mcpmeter-ignored-endpoint\r")
                .replace("event: endpoint\n\n", "event: mcpmeter-ignored-endpoint\n\n")).encode()
    expected = expected.removesuffix(b"event: endpoint")  # held, then dropped at the end of the stream
    for size in (1, 2, 3, 7, 4096, 1 << 20):
        out, rewriter = run((first + LATER).encode(), size)
        assert out == expected, size
        assert rewriter.route == ROUTE


def test_after_the_endpoint_long_lines_pass_as_they_come() -> None:
    rewriter = EndpointRewriter(UPSTREAM, "s")
    assert rewriter.feed(f"event: endpoint\ndata: {ABSOLUTE}\n\nda".encode()) == [
        f"event: endpoint\ndata: {ROUTE}\n\nda".encode()]
    assert rewriter.feed(b"ta: " + b"z" * 100_000) == [b"ta: " + b"z" * 100_000]  # nothing held
    assert rewriter.feed(b"\n\nevent: end") == [b"\n\n"]  # may be an endpoint type line: held
    assert rewriter.feed(b"pointer\n") == [b"event: endpointer\n"]
