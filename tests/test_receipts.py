"""addon.receipts: prices and receipts written into MCP messages, JSON bodies and SSE events. Pure."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from addon import billing, receipts
from addon.call import event_outcome
from addon.jsonrpc import Outcome
from addon.model import Listing, Verdict
from addon.receipts import Plan, edit_json
from addon.stream_edit import StreamEditor
from addon.sse import SseParser
from mitmproxy import http

LISTING = Listing(id=1, slug="s", status="live", upstream_url="http://u/mcp", default_price=1000,
                  tool_prices={"slow": 5000}, free_calls_per_consumer=3)
RECEIPT = {"request_id": "r", "decision": "billed", "reason": "result", "amount_micro_cents": 1000,
           "balance_micro_cents": 9000}


def paid(outcome: Outcome) -> dict[str, Any]:
    return RECEIPT


def plan(method: str = "tools/call", rpc_id: Any = 1, free_left: int | None = None) -> Plan:
    return Plan(rpc_id, method, LISTING, free_left, paid if method == "tools/call" else None)


# --- what goes in ---------------------------------------------------------------------------------

@pytest.mark.parametrize("refund, verdict, amount, balance, expected", [
    (False, Verdict.DEBITED, 1000, 9000, ("billed", 1000, 9000)),
    (False, Verdict.FREE, 0, 9000, ("free", 0, 9000)),
    (False, Verdict.UNPRICED, 0, 9000, ("free", 0, 9000)),
    (True, Verdict.DEBITED, 1000, 9000, ("refunded", 0, 10_000)),  # the balance after the refund
    (True, Verdict.FREE, 0, 9000, ("refunded", 0, 9000)),
])
def test_receipt_balance_is_derived_from_the_charge(refund: bool, verdict: Verdict, amount: int, balance: int,
                                                    expected: tuple[str, int, int]) -> None:
    r = receipts.receipt("id", billing.Decision(refund, "why"), verdict, amount, balance)
    assert (r["decision"], r["amount_micro_cents"], r["balance_micro_cents"]) == expected
    assert r["request_id"] == "id" and r["reason"] == "why"
    assert ("refunded_micro_cents" in r) == refund


def test_tools_list_gets_each_tools_price_and_the_default_for_tools_without_a_rule() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "slow", "inputSchema": {}}, {"name": "other", "_meta": {"theirs": 1}}, {"nameless": True}]}}
    assert plan("tools/list", free_left=2).edit(message)
    slow, other, nameless = message["result"]["tools"]
    assert slow["_meta"] == {"mcpmeter/price": {"micro_cents": 5000, "free_calls_left": 2,
                                                "currency": "USD micro-cents"}}
    assert other["_meta"] == {"theirs": 1, "mcpmeter/price": {"micro_cents": 1000, "free_calls_left": 2,
                                                              "currency": "USD micro-cents"}}
    assert nameless == {"nameless": True}
    assert list(slow) == ["name", "inputSchema", "_meta"]  # key order kept, ours last


def test_initialize_advertises_the_pricing() -> None:
    message = {"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": "2025-06-18"}}
    assert plan("initialize", rpc_id=0).edit(message)
    assert message["result"]["_meta"]["mcpmeter/pricing"] == {
        "default_micro_cents": 1000, "tools": {"slow": 5000}, "free_calls_per_month": 3, "currency": "USD micro-cents"}


def test_receipt_goes_in_result_meta_or_error_data() -> None:
    result = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "_meta": {"x": 1}}}
    assert plan().edit(result) and result["result"]["_meta"] == {"x": 1, "mcpmeter/receipt": RECEIPT}
    error = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "m", "data": {"why": "x"}}}
    assert plan().edit(error) and error["error"]["data"] == {"why": "x", "mcpmeter/receipt": RECEIPT}
    bare = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "m"}}
    assert plan().edit(bare) and bare["error"]["data"] == {"mcpmeter/receipt": RECEIPT}
    stringy = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "m", "data": "server text"}}
    assert not plan().edit(stringy) and stringy["error"]["data"] == "server text"  # not ours to replace


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "id": 2, "result": {}},  # another request's answer
    {"jsonrpc": "2.0", "id": "1", "result": {}},  # a string id is not the number 1
    {"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage"},  # a server request
    {"jsonrpc": "2.0", "method": "notifications/progress"},
])
def test_other_messages_are_left_alone(message: dict[str, Any]) -> None:
    before = json.dumps(message)
    assert not plan().edit(message) and json.dumps(message) == before


@pytest.mark.parametrize("text", [
    '{"jsonrpc":"2.0","id":1,"id":1,"result":{"_meta":{}}}',  # duplicate keys: re-serialising would drop one
    '{"jsonrpc":"2.0","id":1,"result":{"x":NaN}}',
    '{"jsonrpc":"2.0","id":1,"result":' + "[" * 100_000 + "]" * 100_000 + "}",  # past the recursion limit
    '{"jsonrpc":"2.0","id":1,"result":',
    '{"jsonrpc":"2.0","id":1,"result":{"t":"\\ud800","_meta":{}}}',  # an escaped lone surrogate: no UTF-8 to write
    b'{"jsonrpc":"2.0","id":1,"result":{"t":"\xff"}}',  # not UTF-8
    '{"jsonrpc":"2.0","id":1,"result":{"isError":true},"result":{}}',  # which result is it?
])
def test_what_the_strict_parse_refuses_is_not_rewritten(text: str | bytes) -> None:
    assert edit_json(text, plan()) is None


@pytest.mark.parametrize(("text", "spliced"), [
    ('{"jsonrpc":"2.0","id":1,"result":{"content":[]}}', '{"jsonrpc":"2.0","id":1,"result":{"_meta":R,"content":[]}}'),
    ('{"jsonrpc":"2.0","id":1,"result":{ }}', '{"jsonrpc":"2.0","id":1,"result":{"_meta":R }}'),
    # Splicing keeps every other byte the upstream sent: duplicates and escapes are not re-read.
    ('{"jsonrpc":"2.0","id":1,"id":1,"result":{"t":"\\ud800"}}',
     '{"jsonrpc":"2.0","id":1,"id":1,"result":{"_meta":R,"t":"\\ud800"}}'),
    ('{"id":1,"jsonrpc":"2.0","result" :\n {"a":{"result":{}}} \n}',
     '{"id":1,"jsonrpc":"2.0","result" :\n {"_meta":R,"a":{"result":{}}} \n}'),
])
def test_a_receipt_is_spliced_into_the_upstreams_own_text(text: str, spliced: str) -> None:
    new = edit_json(text, plan())
    assert new is not None
    receipt = json.loads(new.replace(" \n}", "}").replace("\n", ""))["result"]["_meta"]
    assert new == spliced.replace("R", json.dumps(receipt, separators=(",", ":")))
    assert list(receipt) == ["mcpmeter/receipt"] and receipt["mcpmeter/receipt"]["decision"] == "billed"


def test_a_nested_result_first_is_not_mistaken_for_the_answer() -> None:
    text = '{"id":"x","result":{"result":{}},"jsonrpc":"2.0"}'  # not the last member: the strict path
    p = Plan("x", "tools/call", LISTING, None, paid)
    new = json.loads(edit_json(text, p) or "")
    assert list(new["result"]) == ["result", "_meta"] and new["jsonrpc"] == "2.0"


def test_json_rewrite_keeps_key_order_and_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    text = '[{"id":2,"jsonrpc":"2.0","result":{}}, {"result":{"z":1,"a":"é"},"jsonrpc":"2.0","id":1}]'
    new = json.loads(edit_json(text, plan()) or "")
    assert new[0] == {"id": 2, "jsonrpc": "2.0", "result": {}}
    assert list(new[1]) == ["result", "jsonrpc", "id"] and list(new[1]["result"]) == ["z", "a", "_meta"]
    monkeypatch.setattr(receipts, "MAX_REWRITE_BYTES", len(text) - 1)
    assert edit_json(text, plan()) is None  # over the limit: unchanged


# --- SSE: whole events at every split point ---------------------------------------------------------

ANSWER = '{"jsonrpc":"2.0","id":1,\r\ndata: "result":{"content":[{"type":"text","text":"é€"}]}}'
STREAM = (
    b"id: 0\r\ndata:\r\n\r\n"  # priming event
    b": keep-alive\r\n\r\n"
    b'event: message\r\nid: 1\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\r\n\r\n'
    b"event: message\r\nid: 2\r\ndata: " + ANSWER.encode() + b"\r\nretry: 10\r\n\r\n"
    b'data: {"jsonrpc":"2.0","method":"after"}\n\n'
)
ANSWERED = json.loads('{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"é€"}]}}')


class Watched:
    """The meter's parser and the editor fed as the stream watcher feeds them (stream_watch.py)."""

    def __init__(self, p: Plan, limit: int = receipts.MAX_REWRITE_BYTES) -> None:
        self.parser, self.editor, self.rpc_id = SseParser(), StreamEditor(p, None, limit), p.rpc_id
        self.answered = False

    def feed(self, chunk: bytes) -> bytes:
        events, answer = self.parser.feed(chunk), None
        for event in events:  # the watcher reads the answer first and hands its reading over
            if not self.answered and event.event == "message" and (outcome := event_outcome(event, self.rpc_id)):
                self.answered, answer = True, (event, outcome)
        return self.editor.feed(chunk, events, self.parser.pending_from, answer)


def run(stream: bytes, cuts: list[int], limit: int = receipts.MAX_REWRITE_BYTES, p: Plan | None = None) -> bytes:
    watched = Watched(p or plan(), limit)
    out, start = b"", 0
    for cut in [*cuts, len(stream)]:
        if cut > start:
            out += watched.feed(stream[start:cut])
        start = cut
    return out + watched.feed(b"")


def expected_stream() -> bytes:
    # The receipt is spliced in first, the upstream's own bytes kept (what a re-serialisation gives
    # is checked by test_json_rewrite_keeps_key_order_and_a_batch).
    meta = '"_meta":' + receipts.dumps({"mcpmeter/receipt": RECEIPT}) + ","
    return STREAM.replace(b"data: " + ANSWER.encode(),
                          b"data: " + ANSWER.replace('"result":{', '"result":{' + meta).encode())


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_sse_answer_is_rewritten_whole_at_every_split_point(cut: int) -> None:
    assert run(STREAM, [cut]) == expected_stream()


@pytest.mark.parametrize("cut", range(0, len(STREAM.replace(b"\r\n", b"\n")) + 1, 7))
def test_sse_with_lf_line_ends_at_split_points_and_event_by_event(cut: int) -> None:
    stream, expected = STREAM.replace(b"\r\n", b"\n"), expected_stream().replace(b"\r\n", b"\n")
    assert run(stream, [cut]) == expected
    ends = [i + 2 for i in range(len(stream)) if stream[i:i + 2] == b"\n\n"]
    assert run(stream, ends) == expected  # one whole event per chunk


def test_sse_multi_line_data_answer_keeps_its_lines() -> None:
    answer = b'data: {"jsonrpc":"2.0",\ndata: "id":1,"result":{"content":[]}}\n\n'
    out = run(answer, [len(answer)])
    assert out.count(b"data: ") == 2 and b"mcpmeter/receipt" in out
    data = b"\n".join(line[6:] for line in out.strip().split(b"\n"))
    assert json.loads(data)["result"]["_meta"]["mcpmeter/receipt"] == RECEIPT


def test_sse_bytewise_and_the_events_a_parser_sees() -> None:
    out = run(STREAM, list(range(1, len(STREAM))))
    assert out == expected_stream()
    parser = SseParser()
    events = parser.feed(out) + parser.feed(b"")
    assert [e.id for e in events] == ["1", "2", "2"]  # id: lines kept where they were
    answer = json.loads(events[1].data)
    assert answer["result"]["_meta"]["mcpmeter/receipt"] == RECEIPT


def test_sse_events_after_the_answer_pass_as_they_come() -> None:
    watched = Watched(plan())
    head, _, tail = STREAM.partition(b"retry: 10\r\n\r\n")
    assert watched.feed(head + b"retry: 10\r\n\r\n").endswith(b"retry: 10\r\n\r\n")
    assert watched.editor.finished
    assert watched.feed(tail[:7]) == tail[:7]  # not held back: the answer has passed


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_sse_oversize_answer_passes_unchanged(cut: int) -> None:
    assert run(STREAM, [cut], limit=60) == STREAM


@pytest.mark.parametrize("cut", range(0, len(STREAM) + 1, 5))
def test_sse_stream_without_the_answer_passes_byte_for_byte(cut: int) -> None:
    assert run(STREAM, [cut], p=plan(rpc_id=99)) == STREAM


@pytest.mark.parametrize("cut", range(1, len(STREAM), 9))
def test_sse_stream_no_longer_parsed_lets_everything_held_out_unedited(cut: int) -> None:
    """The watcher failing (or stopping) mid-stream: what the editor held goes out, nothing is lost,
    and the rest passes as it comes."""
    watched = Watched(plan())
    out = watched.feed(STREAM[:cut])
    out += watched.editor.feed(STREAM[cut:], [], None)
    assert watched.editor.finished
    answered = cut >= STREAM.index(b"retry: 10\r\n\r\n") + len(b"retry: 10\r\n\r\n")  # edited before it stopped
    assert out + watched.editor.feed(b"tail", [], None) == (expected_stream() if answered else STREAM) + b"tail"


def test_sse_editor_failing_lets_the_stream_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> bytes:
        raise RuntimeError("boom")
    watched = Watched(plan())
    head = watched.feed(STREAM[:20])
    monkeypatch.setattr(watched.editor, "_release", broken)
    assert head + watched.feed(STREAM[20:]) == STREAM and watched.editor.finished


def test_sse_unterminated_event_is_flushed_at_the_end() -> None:
    assert run(b"data: {\"id\":1", [3]) == b"data: {\"id\":1"
    assert run(b"data: x\r", [8]) == b"data: x\r"


@pytest.mark.parametrize("stream, chunk", [
    (b"a\n" * 1_000_000, None),  # 2 MB of LF-only lines in one chunk
    (b"a\r" * 1_000_000, None),  # 2 MB of CR-only lines in one chunk
    (b"data: " + b"x" * 512 * 1024, 1),  # a 512 KiB line, one byte at a time
])
def test_sse_rewrite_is_linear_in_bytes(stream: bytes, chunk: int | None) -> None:
    """SPEC I7: hostile shapes cost time linear in their size (the quadratic version took 25-50 s here).

    The bound is CPU time of this process (not wall clock) and about 5x what the linear code needs.
    """
    watched = Watched(plan(method="tools/list"))  # edits every event with data: never done
    parts = [stream] if chunk is None else [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    started = time.process_time()
    out = b"".join(watched.feed(part) for part in parts) + watched.feed(b"")
    assert time.process_time() - started < 5
    assert out == stream


# --- through the hooks (taddons) ------------------------------------------------------------------

from tests.test_gateway_hooks import (  # noqa: E402, F401  (fixtures: gw, isolated)
    BOB, OPENING, PRICE, Gw, gw, isolated, json_response, make_flow, pop_receipt, rpc, sent, sse_response,
    upstream_answers)

TOOLS = {"jsonrpc": "2.0", "id": 7,
         "result": {"tools": [{"name": "slow_count"}, {"name": "echo"}, {"name": "freebie"}]}}


async def test_tools_list_json_answer_shows_prices(gw: Gw) -> None:
    flow = make_flow(body=rpc("tools/list", 7))
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response(TOOLS))
    tools = json.loads(flow.response.content)["result"]["tools"]
    assert [t["_meta"]["mcpmeter/price"]["micro_cents"] for t in tools] == [5000, PRICE, 0]
    assert {t["_meta"]["mcpmeter/price"]["free_calls_left"] for t in tools} == {None}  # no free tier
    assert flow.response.headers["Content-Length"] == str(len(flow.response.raw_content))
    assert gw.db.balance(1) == OPENING  # unpriced


async def test_tools_list_shows_free_calls_left_this_month(gw: Gw) -> None:
    for expected in (1, 0):
        flow = make_flow("/freebies", token=BOB, body=rpc("tools/list", 7))
        await gw.addon.request(flow)
        await upstream_answers(gw, flow, json_response(TOOLS))
        price = json.loads(flow.response.content)["result"]["tools"][0]["_meta"]["mcpmeter/price"]
        assert price == {"micro_cents": PRICE, "free_calls_left": expected, "currency": "USD micro-cents"}
        call = make_flow("/freebies", token=BOB)  # uses the free call
        await gw.addon.request(call)
        await upstream_answers(gw, call, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
        assert pop_receipt(json.loads(call.response.content))["decision"] == ("free" if expected else "billed")


async def test_tools_list_sse_answer_shows_prices(gw: Gw) -> None:
    flow = make_flow(body=rpc("tools/list", 7))
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    out = sent(flow.response.stream(b"data: " + json.dumps(TOOLS).encode()))
    out += sent(flow.response.stream(b"\n\n")) + sent(flow.response.stream(b""))
    tools = json.loads(out.removeprefix(b"data: "))["result"]["tools"]
    assert tools[0]["_meta"]["mcpmeter/price"]["micro_cents"] == 5000


async def test_initialize_advertises_the_listing_pricing(gw: Gw) -> None:
    flow = make_flow(body=rpc("initialize", 0, protocolVersion="2025-06-18"))
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": "x"}}))
    pricing = json.loads(flow.response.content)["result"]["_meta"]["mcpmeter/pricing"]
    assert pricing["default_micro_cents"] == PRICE and pricing["tools"] == {"slow_count": 5000, "freebie": 0}


async def test_answers_left_unchanged(gw: Gw) -> None:
    # A priced call answered with duplicate keys and its own _meta (so the receipt must be merged
    # by re-serialising, which would drop a duplicate): not rewritten, still settled.
    flow = make_flow()
    await gw.addon.request(flow)
    body = b'{"jsonrpc":"2.0","id":1,"result":{"a":1,"a":2,"_meta":{}}}'
    await upstream_answers(gw, flow, http.Response.make(200, body, {"Content-Type": "application/json"}))
    assert flow.response.content == body and gw.db.balance(1) == OPENING - PRICE
    flow = make_flow(body=rpc("tools/list", 7))  # an encoded body: left as it is
    await gw.addon.request(flow)
    answer = json_response(TOOLS)
    answer.encode("gzip")
    await upstream_answers(gw, flow, answer)
    assert json.loads(flow.response.content) == TOOLS


async def test_prices_written_only_into_an_application_json_answer(gw: Gw) -> None:
    # The media type decides, as the settlement and the SDKs read it: a JSON-looking type that is not
    # application/json is passed as sent; parameters and case do not matter.
    for content_type, written in [("Application/JSON; charset=utf-8", True), ("application/json-seq", False),
                                  ("text/x-json", False), ("application/problem+json", False)]:
        flow = make_flow(body=rpc("tools/list", 7))
        await gw.addon.request(flow)
        body = json.dumps(TOOLS).encode()
        await upstream_answers(gw, flow, http.Response.make(200, body, {"Content-Type": content_type}))
        tools = json.loads(flow.response.content)["result"]["tools"]
        assert ("mcpmeter/price" in tools[0].get("_meta", {})) is written, content_type


def test_sse_event_that_cannot_be_written_back_passes_unchanged() -> None:
    stream = (b'data: {"jsonrpc":"2.0","id":1,"result":{"t":"\\ud800","_meta":{}}}\r\n\r\n'
              b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n')
    assert run(stream, [9]) == stream  # unchanged and nothing lost; the answer has passed, so the rest too


# --- property: any stream, any cuts (the editor fed by the meter's parse) --------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
_OTHER_EVENT = st.sampled_from([
    ": keep-alive", "id: 5", "retry: 100", "event: ping\ndata: {\"id\":1}",  # not a message: never edited
    "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"id\":1}}",
    "data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{}}",  # another call's answer
    "data:", "data: not json", "data: {\"id\":1", "event: message\ndata: [1,\ndata: 2]"])
_ANSWER_EVENT = st.sampled_from([
    "event: message\nid: 9\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"content\":[]}}",
    "data: {\"jsonrpc\":\"2.0\",\n"
    "data: \"id\":1,\"result\":{\"isError\":true,\"content\":[{\"type\":\"text\",\"text\":\"é\"}]}}",
    "data: {\"result\":{\"a\":1},\"id\":1,\"jsonrpc\":\"2.0\"}",
    "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":-1,\"message\":\"x\"}}"])


def _stream(before: list[str], answer: str | None, after: list[str], end: str) -> bytes:
    events = [*before, *([answer] if answer else []), *after]
    return "".join(e.replace("\n", end) + end + end for e in events).encode()


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(max_examples=400, deadline=None)
@given(st.lists(_OTHER_EVENT, max_size=4), st.one_of(st.none(), _ANSWER_EVENT), st.lists(_OTHER_EVENT, max_size=3),
       _ENDS, st.lists(st.integers(0, 600), max_size=8))
def test_any_stream_cut_anywhere_keeps_its_events_and_gains_only_the_receipt(
        before: list[str], answer: str | None, after: list[str], end: str, cuts: list[int]) -> None:
    stream = _stream(before, answer, after, end)
    # The call answered in the stream and one never answered there; events held up to the usual
    # limit, and up to 60 bytes (bigger ones go out unedited as they come).
    for rpc_id, limit in ((1, receipts.MAX_REWRITE_BYTES), (99, receipts.MAX_REWRITE_BYTES), (1, 60)):
        watched = Watched(plan(rpc_id=rpc_id), limit)
        out = b"".join(watched.feed(part) for part in _cut(stream, cuts)) + watched.feed(b"")
        original = SseParser().feed(stream)
        got = SseParser().feed(out)
        if rpc_id == 99 or answer is None:
            assert out == stream  # nothing to write: byte for byte
            continue
        # The same events in the same order; only the answer's data differs, by the receipt alone.
        assert [(e.event, e.id) for e in got] == [(e.event, e.id) for e in original]
        changed = [(a, b) for a, b in zip(original, got, strict=True) if a.data != b.data]
        if limit < receipts.MAX_REWRITE_BYTES and not changed:
            assert out == stream  # the answer was too big to hold: it passed as it came
        else:
            assert len(changed) == 1  # the answer, and only it
        for was, now in changed:
            message = json.loads(now.data)
            holder = message["error"]["data"] if "error" in message else message["result"]["_meta"]
            receipt = holder.pop(receipts.RECEIPT)
            assert receipt == RECEIPT
            if "error" in message and not holder:
                del message["error"]["data"]
            elif "result" in message and not holder:
                del message["result"]["_meta"]
            assert message == json.loads(was.data)
