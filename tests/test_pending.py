"""addon/pending.py: which calls a cancellation names, which revisions cancel on close, refunded markers
and the filter that keeps a refunded call's answer from the client."""

from __future__ import annotations

import json
import time

import pytest

from mitmproxy import http

from addon import pending, stream_edit
from addon.pending import Pending, cancelled_request_id, client_key, close_cancels, id_key
from addon.scan import MAX_MESSAGES
from addon.stream_edit import StreamEditor
from addon.sse import SseParser

S = (1, "session-a")


def test_ids_keep_their_json_type() -> None:
    assert id_key(1) == id_key(1.0) != id_key("1")
    assert id_key(True) is None and id_key(None) is None and id_key([1]) is None


def test_an_id_is_withheld_as_the_sdk_clients_spell_it() -> None:
    """client_key: what a client takes for one request's id ("01" and 1: the Python SDK's int(), JavaScript's
    Number()); no spelling crosses between a number and a string no client reads as one."""
    assert client_key(1) == client_key("1") == client_key("01") == client_key(" 1") == client_key(1.0)
    assert client_key("1.0") == client_key("0x1") == client_key("1e0") == client_key("\u0661") == client_key(1)
    assert client_key("07") == client_key(7) and client_key("") == client_key(0)
    assert client_key("a") == id_key("a") != client_key("1") and client_key(True) is None
    assert client_key(2) != client_key("1") != client_key("1x")


def test_closing_the_stream_cancels_from_2026_07_28_on() -> None:
    def h(v: str | None) -> http.Headers:
        return http.Headers(**({"MCP-Protocol-Version": v} if v is not None else {}))

    assert close_cancels(h("2026-07-28")) and close_cancels(h("2027-01-01"))
    assert not close_cancels(h("2025-11-25")) and not close_cancels(h(None)) and not close_cancels(h("9"))


def test_a_cancellation_names_a_request_id() -> None:
    def body(**m: object) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", **m}).encode()

    assert cancelled_request_id(body(params={"requestId": 7, "reason": "x"})) == 7
    assert cancelled_request_id(body(params={"requestId": "a"})) == "a"
    assert cancelled_request_id(body(id=1, params={"requestId": 7})) is None  # a request, not a notification
    assert cancelled_request_id(body(params={"requestId": True})) is None
    assert cancelled_request_id(body(params={})) is None
    assert cancelled_request_id(b'{"method":"notifications/cancelled","params":{"requestId":1,"requestId":2}}') is None


def test_refunded_markers_are_bounded_and_expire() -> None:
    p = Pending(max_markers=2)
    for rpc_id in (1, 2, 3):
        p.mark_refunded(S, rpc_id)
    assert not p.is_refunded(S, 1) and p.is_refunded(S, 2) and p.is_refunded(S, 3)
    assert not p.is_refunded(S, "three") and not p.is_refunded((2, "session-a"), 3)
    short = Pending(marker_seconds=0.0)
    short.mark_refunded(S, 1)
    time.sleep(0.01)
    assert not short.is_refunded(S, 1) and not short.refunded


def test_a_scope_has_refunded_markers_while_one_of_its_markers_is_kept() -> None:
    """has_refunded: what lets a legacy session's stream pass unheld (legacy_sessions), kept exact."""
    p, other = Pending(max_markers=2), (1, "session-b")
    p.mark_refunded(S, 1)
    p.mark_refunded(S, 1)  # the same marker again
    p.mark_refunded(other, 2)
    assert p.has_refunded(S) and p.has_refunded(other)
    p.unmark(S, 1)  # a new call took the id over
    assert not p.has_refunded(S) and p.has_refunded(other)
    p.mark_refunded(S, 3)
    p.mark_refunded(S, 4)  # over max_markers: other's goes
    assert p.has_refunded(S) and not p.has_refunded(other)
    short = Pending(marker_seconds=0.005)
    short.mark_refunded(S, 1)
    assert short.has_refunded(S)
    time.sleep(0.01)
    assert not short.is_refunded(S, 1) and not short.has_refunded(S)  # expired, read: dropped
    short.mark_refunded(S, 2)
    time.sleep(0.01)
    short.mark_refunded(other, 3)  # expired ones go from the front as new ones come
    assert not short.has_refunded(S) and short.has_refunded(other)


def test_an_editor_that_may_not_blank_holds_nothing() -> None:
    """may_blank() False: an event in progress passes as it comes; True: it is held, and blanked."""
    p = Pending()
    answer = b'data: {"jsonrpc":"2.0","id":5,"result":{}}\n\n'
    parser = SseParser()
    editor = StreamEditor(None, lambda event: p.blank_event(S, event),
                          may_blank=lambda: p.has_refunded(S))
    assert editor.feed(answer[:10], parser.feed(answer[:10]), parser.pending_from) == answer[:10]
    assert editor.feed(answer[10:], parser.feed(answer[10:]), parser.pending_from) == answer[10:]
    p.mark_refunded(S, 5)
    assert editor.feed(answer[:10], parser.feed(answer[:10]), parser.pending_from) == b""
    assert editor.feed(answer[10:], parser.feed(answer[10:]), parser.pending_from) == b"\n"
    assert len(editor.blanked) == 1


def test_only_answers_to_refunded_calls_are_blanked() -> None:
    p = Pending()
    p.mark_refunded(S, 5)
    assert p.blank_if_refunded(S, '{"jsonrpc":"2.0","id":5,"result":{}}') == ""
    assert p.blank_if_refunded(S, '{"jsonrpc":"2.0","id":5,"error":{"code":1,"message":"x"}}') == ""
    assert p.blank_if_refunded(S, '{"jsonrpc":"2.0","id":5,"method":"sampling/createMessage"}') is None
    assert p.blank_if_refunded(S, '{"jsonrpc":"2.0","id":6,"result":{}}') is None
    assert p.blank_if_refunded((1, "other"), '{"jsonrpc":"2.0","id":5,"result":{}}') is None


def test_parked_calls_are_found_by_the_answers_of_their_session() -> None:
    p, flow, call = Pending(), object(), object()
    p.track(S, 3, flow, call)  # type: ignore[arg-type]
    p.park(S, 3, flow, call)  # type: ignore[arg-type]
    assert p.find(S, 3) == (flow, call) and p.has_parked(S)
    messages = SseParser().feed(b'data: {"jsonrpc":"2.0","id":3,"result":{}}\n\n')
    from addon.jsonrpc import answer_messages
    assert p.answered(S, answer_messages(messages[0].data.encode())) == [(flow, call)]
    assert p.answered(S, answer_messages(b'{"jsonrpc":"2.0","id":"3","result":{}}')) == []
    p.untrack(S, 3, call)
    assert p.find(S, 3) is None and not p.has_parked(S) and not p.tracked


class Blanking:
    """A session's stream as the watcher takes it: the meter's parse, and the editor blanking refunded answers."""

    def __init__(self, p: Pending, limit: int = 1 << 20) -> None:
        self.parser = SseParser()
        self.editor = StreamEditor(None, lambda event: p.blank_event(S, event), limit)

    def feed(self, chunk: bytes) -> bytes:
        return self.editor.feed(chunk, self.parser.feed(chunk), self.parser.pending_from)


def test_a_refunded_answer_is_blanked_at_every_split_point() -> None:
    stream = (b"id: 1\r\ndata:\r\n\r\n: comment\n\nid: 2\ndata: {\"jsonrpc\":\"2.0\",\"id\":5,\"result\":{\"x\":1}}\n\n"
              b"id: 3\ndata: {\"jsonrpc\":\"2.0\",\"id\":6,\"result\":{}}\n\n")
    for cut in range(len(stream) + 1):
        p = Pending()
        p.mark_refunded(S, 5)
        blanking = Blanking(p)
        out = b"".join(blanking.feed(chunk) for chunk in [c for c in (stream[:cut], stream[cut:]) if c] + [b""])
        events = SseParser().feed(out)
        assert [e.data for e in events] == ['{"jsonrpc":"2.0","id":6,"result":{}}'], cut
        assert b"id: 2" in out and b'"id":5' not in out
        assert out == stream.replace(b'data: {"jsonrpc":"2.0","id":5,"result":{"x":1}}\n', b""), cut


def test_a_cancelled_json_answer_is_an_error_for_the_same_id() -> None:
    assert json.loads(pending.cancelled_body("a")) == {"jsonrpc": "2.0", "id": "a", "error": {
        "code": -32800, "message": "request cancelled; not delivered and refunded by mcpmeter"}}


def test_blanking_is_linear_in_the_bytes_however_the_lines_fall() -> None:
    p = Pending()
    p.mark_refunded(S, 5)
    blanking = Blanking(p)
    started = time.perf_counter()
    out = blanking.feed(b"\n" * 400_000) + blanking.feed(b": x\r" * 250_000) + blanking.feed(b"\r\n")
    out += blanking.feed(b"")
    assert len(out) == 400_000 + 1_000_002
    assert time.perf_counter() - started < 5  # quadratic would take minutes


def test_an_event_over_the_limit_severs_a_stream_that_may_carry_a_refunded_answer() -> None:
    """Fail closed: whom it answers is known only at its end, and it cannot be held that long. Events
    before it go out (blanked if refunded); nothing from it on."""
    p = Pending()
    p.mark_refunded(S, 5)
    blanking = Blanking(p, limit=64)
    small = b'id: 9\ndata: {"jsonrpc":"2.0","id":5,"result":{}}\n\n'
    assert blanking.feed(b"data\ndata: {\"id\":5,\"result\":1}\n\n") == b"\n"  # a bare `data` field is data too
    big = b'data: {"jsonrpc":"2.0","id":6,"result":{"pad":"' + b"x" * 200 + b'"}}\n\n'
    assert blanking.feed(small + big[:100]) == b"id: 9\n\n" and blanking.editor.severed
    assert blanking.feed(big[100:]) == b"" and blanking.feed(small) == b"" and blanking.feed(b"") == b""


def test_an_event_over_the_limit_passes_as_it_comes_while_nothing_may_be_blanked() -> None:
    p = Pending()
    parser = SseParser()
    editor = StreamEditor(None, lambda event: p.blank_event(S, event), 64, may_blank=lambda: p.has_refunded(S))
    big = b'data: {"jsonrpc":"2.0","id":5,"result":{"pad":"' + b"x" * 200 + b'"}}\n\n'
    out = b"".join(editor.feed(c, parser.feed(c), parser.pending_from) for c in (big[:100], big[100:]))
    assert out == big and not editor.severed


def test_an_event_begun_before_a_refund_and_answering_it_severs_the_stream() -> None:
    """Its start went out while nothing could be blanked; its end (and all after it) never does. One
    that answers no refunded call goes out."""
    for answered, severed in ((5, True), (6, False)):
        p = Pending()
        parser = SseParser()
        editor = StreamEditor(None, lambda event, p=p: p.blank_event(S, event), may_blank=lambda p=p: p.has_refunded(S))
        answer = b'data: {"jsonrpc":"2.0","id":%d,"result":{}}\n\n' % answered
        after = b'data: {"jsonrpc":"2.0","id":7,"result":{}}\n\n'
        assert editor.feed(answer[:20], parser.feed(answer[:20]), parser.pending_from) == answer[:20]
        p.mark_refunded(S, 5)
        rest = answer[20:] + after
        events = parser.feed(rest)
        admitted = editor.admit(events)
        out = editor.feed(rest, admitted, parser.pending_from)
        assert editor.severed is severed
        assert (out, admitted) == ((b"", []) if severed else (rest, events))


def test_every_event_the_meter_reads_whole_is_held_whole_and_blanked_if_refunded() -> None:
    """An answer to a refunded call goes out blanked whatever its size, up to what the meter reads whole
    (max_event_bytes of data, sse.py), with id and comment lines besides: a consumer making a tool echo a
    big answer cannot get one it was refunded for by its size. Bigger ones the meter scans as they pass."""
    max_event = 2 * 1024 * 1024  # over MAX_REWRITE_BYTES, so the hold limit follows it
    for size in (max_event - 46, max_event - 45):  # data of max_event - 1 and max_event bytes
        data = b'{"jsonrpc":"2.0","id":5,"result":{"text":"' + b"x" * size + b'"}}'
        assert len(data) in (max_event - 1, max_event)
        event = b": pad\n" * 100 + b"id: 77\ndata: " + data + b"\n\n"
        for cut in (1, 500, len(event) - 2, len(event) - 1):
            p = Pending()
            p.mark_refunded(S, 5)
            parser = SseParser(max_event)
            editor = StreamEditor(None, lambda e, p=p: p.blank_event(S, e),
                                  stream_edit.hold_limit(max_event, blanking=True))
            out = b"".join(editor.feed(c, parser.feed(c), parser.pending_from)
                           for c in (event[:cut], event[cut:], b""))
            assert out == b": pad\n" * 100 + b"id: 77\n\n", (size, cut)


def test_a_batch_answering_the_streams_own_call_and_a_refunded_one_goes_out_whole() -> None:
    """The stream's own call is billed for its answer, so it is delivered (never billed for an answer
    withheld); a batch answering only refunded calls is blanked."""
    p = Pending()
    p.mark_refunded(S, 5)
    both = '[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":5,"result":{}}]'
    assert p.blank_if_refunded(S, both, live=1) is None
    assert p.blank_if_refunded(S, both, live=None) == ""
    assert p.blank_if_refunded(S, both, live=2) == ""
    p.mark_refunded(S, 1)  # the stream's own call refunded too (cancelled): nothing of it goes out
    assert p.blank_if_refunded(S, both, live=1) == ""


def test_a_new_call_under_a_refunded_calls_id_gets_its_answer() -> None:
    p = Pending()
    p.mark_refunded(S, 5)
    answer = '{"jsonrpc":"2.0","id":5,"result":{}}'
    assert p.blank_if_refunded(S, answer, live=5) == ""
    p.track(S, 5, http_flow(), object())  # the client reused the id (it must not, but may)
    assert p.blank_if_refunded(S, answer, live=5) is None
    assert not p.is_refunded(S, 5)


def http_flow() -> http.HTTPFlow:
    from mitmproxy.test import tflow
    return tflow.tflow()


def test_a_stream_without_a_call_of_its_own_blanks_no_answer_without_an_id() -> None:
    # live_refunded speaks of the stream's own call: with none (live None), an answer whose id is
    # null or unreadable is no refunded call's, and passes.
    pending = Pending()
    data = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}})
    assert pending.blank_if_refunded(S, data, None, live_refunded=True) is None
    assert pending.blank_if_refunded(S, data, 1, live_refunded=True) is None
    answer = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}})
    assert pending.blank_if_refunded(S, answer, 1, live_refunded=True) == ""


class Parked:
    """A call as Pending reads it: its key, and whether it is answered or settled."""

    def __init__(self, principal: str) -> None:
        self.consumer = type("Consumer", (), {"principal": principal})()
        self.outcome = self.settlement = None


def test_a_call_without_a_session_is_scoped_by_the_event_its_client_resumes_after() -> None:
    assert pending.resume_key(1, "e-7") == pending.resume_key(1, "e-7")
    assert pending.resume_key(1, "e-7") not in (pending.resume_key(2, "e-7"), pending.resume_key(1, "e-8"))
    digest = pending.resume_key(1, "x" * 65536)[1]  # kept by the hundred thousand: bounded whatever the id
    assert len(digest) == 32
    assert pending.resume_key(1, "\udcff") != pending.resume_key(1, "\ufffd")  # any str, never a raise
    # a session id spelling the digest is another scope (str, not bytes)
    assert (1, digest.hex()) != pending.resume_key(1, "x" * 65536) and (1, digest.decode("latin-1")) != (1, digest)


def test_an_answer_to_another_keys_parked_call_is_blanked_and_one_place_holds_one_call() -> None:
    p, scope = Pending(), pending.resume_key(1, "e-1")
    alice, bob = Parked("k1"), Parked("k2")
    assert p.park(scope, 1, http_flow(), alice)
    answer = '{"jsonrpc":"2.0","id":1,"result":{}}'
    assert p.blank_if_refunded(scope, answer, principal="k2") == ""  # Bob's stream: withheld
    assert p.blank_if_refunded(scope, answer, principal="k1") is None  # Alice's: hers to settle
    assert p.blank_if_refunded(scope, '{"jsonrpc":"2.0","id":2,"result":{}}', principal="k2") is None
    assert not p.park(scope, 1, http_flow(), bob)  # the place is Alice's call's, unsettled
    alice.settlement = object()  # type: ignore[assignment]
    assert p.blank_if_refunded(scope, answer, principal="k2") is None  # paid: delivered to anyone
    assert p.park(scope, 1, http_flow(), bob)
    assert p.park(S, 1, http_flow(), Parked("k1"))  # a session: only its own key's streams are watched
    assert p.blank_if_refunded(S, answer, principal="k2") is None


def test_the_events_a_sessionless_call_is_resumed_after_are_carried_only_while_it_is_pending_or_refunded() -> None:
    p = Pending(max_markers=2)
    scope = pending.resume_key(1, "e-1")
    p.carry(scope, "e-2")  # nothing parked or refunded under it: nothing to carry
    assert p.resumed(pending.resume_key(1, "e-2")) == pending.resume_key(1, "e-2") and not p.resumes
    p.carry((1, "a-session"), "e-2")  # a session's streams are matched by the session
    assert not p.resumes
    p.mark_refunded(scope, 1)
    p.carry(scope, "e-2")
    assert p.resumed(pending.resume_key(1, "e-2")) == scope
    p.carry(scope, "e-3")  # bounded as the markers are: the oldest entry (the scope's own) goes
    assert p.resumed(pending.resume_key(1, "e-3")) == scope and len(p.resumes) == 2
    assert p.resumed(pending.resume_key(1, "e-2")) == scope
    p.carry(scope, "e-4")  # no longer known as refunded here: not carried on
    assert p.resumed(pending.resume_key(1, "e-4")) == pending.resume_key(1, "e-4")
    short = Pending(marker_seconds=0.0)
    short.park(scope, 1, http_flow(), Parked("k1"))
    short.carry(scope, "e-2")
    time.sleep(0.01)
    assert short.resumed(pending.resume_key(1, "e-2")) == pending.resume_key(1, "e-2")  # expired


REFUNDED_SPELLINGS = ['"1"', '"01"', '" 1"', '"+1"', '"1.0"', '"1e0"', '"0x1"', '"\\u0661"', "1.0", "1e0"]


@pytest.mark.parametrize("spelled", REFUNDED_SPELLINGS)
def test_a_refunded_calls_answer_is_blanked_however_the_upstream_spells_its_id(spelled: str) -> None:
    """An SDK client takes an answer under "1" (or "01", "1.0"...) for its request 1's: so does the meter
    when it withholds a refunded call's answer, though it never bills one under another spelling."""
    p = Pending()
    p.mark_refunded(S, 1)
    answer = f'{{"jsonrpc":"2.0","id":{spelled},"result":{{}}}}'
    assert p.blank_if_refunded(S, answer) == ""
    assert p.blank_if_refunded(S, f'[{answer}, {{"jsonrpc":"2.0","id":2,"result":{{}}}}]', live=2) is None  # 2's
    assert p.blank_if_refunded(S, '{"jsonrpc":"2.0","id":"2","result":{}}') is None
    assert p.blank_if_refunded(S, '{"jsonrpc":"2.0","id":"1a","result":{}}') is None
    own = Pending()  # a cancelled call's own stream, whatever markers say
    assert own.blank_if_refunded(S, answer, live=1, live_refunded=True) == ""


def test_a_refunded_string_ids_answer_is_blanked_under_its_number() -> None:
    p = Pending()
    p.mark_refunded(S, "07")  # the Python SDK keys a request "07" as 7
    for spelled in ("7", '"7"', '"007"', '"07"', "7.0"):
        assert p.blank_if_refunded(S, f'{{"jsonrpc":"2.0","id":{spelled},"result":{{}}}}') == "", spelled
    p.track(S, 7, http_flow(), object())  # a new call under that id (spelled otherwise) takes it over
    assert p.blank_if_refunded(S, '{"jsonrpc":"2.0","id":"07","result":{}}') is None
    assert not p.has_refunded(S)


def test_an_answer_to_another_keys_parked_call_is_blanked_however_spelled() -> None:
    p, scope = Pending(), pending.resume_key(1, "e-1")
    alice = Parked("k1")
    assert p.park(scope, 1, http_flow(), alice) and p.park(scope, "08", http_flow(), alice)
    for spelled in ('"1"', '"01"', "1.0", "8", '"8"', '"0x8"'):
        answer = f'{{"jsonrpc":"2.0","id":{spelled},"result":{{}}}}'
        assert p.blank_if_refunded(scope, answer, principal="k2") == "", spelled  # Bob's stream
        assert p.blank_if_refunded(scope, answer, principal="k1") is None  # Alice's (settles only as sent)
    p.untrack(scope, "08", alice)
    assert p.blank_if_refunded(scope, '{"jsonrpc":"2.0","id":8,"result":{}}', principal="k2") is None
    assert scope not in p._spelled  # (its index goes with the last call spelled otherwise)


def test_a_live_calls_own_answer_goes_out_whole_though_another_spelling_of_its_id_was_refunded() -> None:
    """Call "1" runs while call 1 of the session is refunded (the Python SDK would refuse the pair; a raw
    client may send it): "1"'s answer on its own stream is billed (it names "1" as sent), so it goes out
    whole; the answer under 1 is withheld. Only a marker of the stream's own call withholds its answer."""
    p = Pending()
    p.track(S, "1", http_flow(), object())
    p.mark_refunded(S, 1)
    own, other = '{"jsonrpc":"2.0","id":"1","result":{}}', '{"jsonrpc":"2.0","id":1,"result":{}}'
    assert p.blank_if_refunded(S, own, live="1") is None
    assert p.blank_if_refunded(S, other, live="1") == ""
    assert p.blank_if_refunded(S, own) == ""  # on a stream of no call: nobody's to bill
    p.mark_refunded(S, "1")  # the call itself refunded: its answer is withheld on its stream too
    assert p.blank_if_refunded(S, own, live="1") == ""


def test_a_session_stream_no_longer_parsed_is_severed_when_a_refund_comes() -> None:
    """Without the meter's parse (the watcher failed) the editor cannot find an answer to withhold: the
    stream passes while nothing can be withheld, and is cut as soon as something can (fail closed)."""
    p = Pending()
    editor = StreamEditor(None, lambda event: p.blank_event(S, event), may_blank=lambda: p.has_refunded(S))
    answer = b'data: {"jsonrpc":"2.0","id":5,"result":{}}\n\n'
    assert editor.feed(answer[:10], [], None) == answer[:10]
    assert not editor.finished  # still watched: a refund may come
    assert editor.feed(answer[10:], SseParser().feed(answer), len(answer)) == answer[10:]
    p.mark_refunded(S, 5)
    events = SseParser().feed(answer)
    assert editor.admit(events) == []  # nothing of it settles a call: it is not delivered
    assert editor.feed(answer, events, len(answer) * 2) == b"" and editor.severed


def batch_event(ids: list[int]) -> bytes:
    """One event answering each of `ids`, a batch as one data line."""
    return b"id: 8\ndata: " + json.dumps([{"jsonrpc": "2.0", "id": i, "result": {}} for i in ids]).encode() + b"\n\n"


@pytest.mark.parametrize("split", [None, 100, -3])
def test_a_batch_answering_more_calls_than_the_scanner_keeps_severs_a_stream_that_may_carry_a_refund(
        split: int | None) -> None:
    """Over max_event_bytes the event is judged by the scanner's summaries, MAX_MESSAGES at most: an answer
    past them is not read, so the event cannot be judged. Fail closed, as for an event too big to hold: the
    events before it go out, neither it nor anything after it does, and none of them settles a call."""
    p = Pending()
    p.mark_refunded(S, 5)
    before = b'data: {"jsonrpc":"2.0","id":6,"result":{}}\n\n'
    batch = batch_event([*range(100, 100 + MAX_MESSAGES), 5])  # the refunded call's answer last
    parser = SseParser(4096)
    editor = StreamEditor(None, lambda event: p.blank_event(S, event), stream_edit.hold_limit(4096, blanking=True),
                          may_blank=lambda: p.has_refunded(S))
    stream = before + batch + before
    pieces = [stream] if split is None else [stream[:len(before) + split], stream[len(before) + split:]]
    out, admitted = b"", []
    for piece in pieces:
        events = parser.feed(piece)
        admitted += editor.admit(events)
        out += editor.feed(piece, events, parser.pending_from)
    assert out == before and editor.severed
    assert [e.data for e in admitted] == [before[6:-2].decode()]
    assert editor.feed(b"", parser.feed(b""), parser.pending_from) == b""


def test_a_batch_the_scanner_reads_whole_is_judged_and_one_too_long_passes_while_nothing_may_be_blanked() -> None:
    """Up to MAX_MESSAGES answers: blanked if one answers a refunded call. Without a refund, any batch
    passes as it came (nothing to withhold)."""
    p = Pending()
    parser = SseParser(4096)
    editor = StreamEditor(None, lambda event: p.blank_event(S, event), stream_edit.hold_limit(4096, blanking=True),
                          may_blank=lambda: p.has_refunded(S))
    long = batch_event([*range(100, 100 + MAX_MESSAGES), 5])
    assert editor.feed(long, editor.admit(parser.feed(long)), parser.pending_from) == long
    p.mark_refunded(S, 5)
    read = batch_event([*range(100, 99 + MAX_MESSAGES), 5])
    assert editor.feed(read, editor.admit(parser.feed(read)), parser.pending_from) == b"id: 8\n\n"
    assert not editor.severed


def deep_batch(ids: list[int]) -> str:
    """A batch json.loads cannot read (an element nested 100,000 deep) answering each of `ids` after it: held
    whole (under max_event_bytes), read by the scanner, which keeps MAX_MESSAGES summaries."""
    answers = ",".join(json.dumps({"jsonrpc": "2.0", "id": i, "result": {}}) for i in ids)
    return "[" + "[" * 100_000 + "]" * 100_000 + "," + answers + "]"


def test_a_batch_whose_answers_were_not_all_read_is_blanked_while_its_scope_may_hold_a_refund() -> None:
    """The refunded call's answer past the scanner's summaries is not seen: fail closed, the event is
    blanked whole, even when it answers the stream's own call (which is then not billed for it: the
    watcher asks the editor, StreamEditor.withholds). A scope with no refund lets it pass."""
    p = Pending()
    p.mark_refunded(S, 5)
    late = deep_batch([*range(100, 100 + MAX_MESSAGES), 5])  # the refunded call's answer last, not kept
    assert p.blank_if_refunded(S, late) == ""
    assert p.blank_if_refunded(S, deep_batch([1, *range(100, 100 + MAX_MESSAGES)]), live=1) == ""
    assert p.blank_if_refunded(S, deep_batch([*range(100, 99 + MAX_MESSAGES), 5])) == ""  # all read: found
    assert p.blank_if_refunded(S, deep_batch(list(range(100, 99 + MAX_MESSAGES)))) is None  # all read: none
    assert p.blank_if_refunded((1, "other"), late) is None  # nothing refunded there
    assert p.blank_if_refunded((1, "other"), late, live=1, live_refunded=True) == ""  # its own call cancelled


def test_a_held_batch_not_read_whole_is_blanked_by_the_editor() -> None:
    """Under max_event_bytes the event is held whole, so it can be blanked rather than cut: the stream goes
    on, the events around it pass."""
    p = Pending()
    p.mark_refunded(S, 5)
    parser = SseParser(1 << 20)
    editor = StreamEditor(None, lambda event: p.blank_event(S, event), stream_edit.hold_limit(1 << 20, blanking=True),
                          may_blank=lambda: p.has_refunded(S))
    before = b'data: {"jsonrpc":"2.0","id":6,"result":{}}\n\n'
    batch = b"id: 8\ndata: " + deep_batch([*range(100, 100 + MAX_MESSAGES), 5]).encode() + b"\n\n"
    stream = before + batch + before
    out = b"".join(editor.feed(c, editor.admit(parser.feed(c)), parser.pending_from)
                   for c in (stream[:1000], stream[1000:], b""))
    assert out == before + b"id: 8\n\n" + before and not editor.severed
