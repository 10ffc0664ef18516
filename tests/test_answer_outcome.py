"""The meter's reading of an answer against what the official MCP Python SDK client concludes from it.

A call is billed when its result was delivered, refunded when the client could not use it: so every
answer the meter bills must be one the SDK client hands to its caller as a result, and every answer the
SDK client turns into an error must be refunded. The oracle is the SDK itself (mcp 2.x in .venv): its
message adapter, its content-type dispatch and its event-stream reader.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Any

import httpx2
import pytest
from httpx2._sse import EventSource
from mcp.shared.dispatcher import coerce_request_id
from mcp_types.jsonrpc import JSONRPCError, JSONRPCResponse, jsonrpc_message_adapter
from mitmproxy import http

from addon.call import clients_read
from addon.jsonrpc import Outcome, answer_messages, body_outcome, media_type, scanned_outcome
from addon.scan import Message, MessageScanner
from addon.sse import Event
from tests.test_gateway_hooks import (  # noqa: F401  # gw and isolated are fixtures
    Gw, gw, isolated, make_flow, meta, sent,
)

pytestmark = pytest.mark.timeout(30)

GOOD = '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"done"}]}}'
NOTE = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{}}'


# --- the oracle: what mcp's streamable-HTTP client hands to the caller of request 1 -----------------

def _sdk_message(raw: bytes | str) -> str | None:
    """'result', 'error', None (not an answer: a request or a notification); 'invalid' if the SDK
    cannot read it as a JSON-RPC message at all (it answers the request with PARSE_ERROR)."""
    try:
        m = jsonrpc_message_adapter.validate_json(raw, by_name=False)
    except Exception:
        return "invalid"
    if isinstance(m, JSONRPCResponse):
        return "result"
    if isinstance(m, JSONRPCError):
        return "error"
    return None


def sdk_sees(content_type: str, body: bytes, request_id: int = 1) -> str:
    """'result', 'error' (a JSON-RPC error, the SDK's own parse and transport errors included) or 'nothing'."""
    ct = content_type.lower()
    if ct.startswith("application/json"):
        seen = _sdk_message(body)
        if seen == "invalid":
            return "error"
        m = jsonrpc_message_adapter.validate_json(body, by_name=False)
        if seen is not None and coerce_request_id(m.id) == request_id:  # type: ignore[union-attr]
            return seen
        return "nothing"
    if ct.startswith("text/event-stream"):
        async def run() -> str:
            async def handler(req: Any) -> httpx2.Response:
                return httpx2.Response(200, headers={"content-type": content_type}, content=body)
            async with httpx2.AsyncClient(transport=httpx2.MockTransport(handler)) as c:
                async with c.stream("POST", "http://x/") as r:
                    try:
                        async for e in EventSource(r):
                            if e.event != "message" or not e.data:
                                continue
                            seen = _sdk_message(e.data)
                            if seen == "invalid":
                                return "error"  # PARSE_ERROR answers the request, the stream is closed
                            if seen is not None:
                                return seen  # any response on the POST stream: its id is replaced by the request's
                    except httpx2.SSEError:
                        return "error"
            return "error"  # "SSE stream ended without a response"
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, run()).result()
    return "error"  # "Unexpected content type"


async def meter_on(gw: Gw, content_type: str, body: bytes) -> tuple[http.HTTPFlow, bytes]:
    """A priced call (id 1) answered 200 with this body: the flow, and what reached the client."""
    flow = make_flow()
    await gw.addon.request(flow)
    streamed = media_type(content_type) == "text/event-stream"
    flow.response = http.Response.make(200, b"" if streamed else body, {"Content-Type": content_type})
    await gw.addon.responseheaders(flow)
    delivered = body
    if flow.response.stream:
        stream = flow.response.stream
        assert callable(stream)
        delivered = sent(stream(body)) + sent(stream(b""))
    await gw.addon.response(flow)
    await gw.addon.drain()
    if not flow.response.stream:
        delivered = flow.response.raw_content or b""
    return flow, delivered


AGREE = {("result", "billed"), ("error", "refunded"), ("nothing", "refunded")}


@pytest.mark.parametrize("content_type, body", [
    # billed while the SDK client got an error
    ("text/plain", GOOD.encode()),
    ("text/event-streamx", b"data: " + GOOD.encode() + b"\n\n"),
    ("application/json", b'{"id":1,"result":{"content":[]}}'),
    ("application/json", b'{"jsonrpc":"1.0","id":1,"result":{"content":[]}}'),
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":"ok"}'),
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":null}'),
    ("application/json", b'{"jsonrpc":"2.0","id":1.0,"result":{"content":[]}}'),
    ("application/json", b"\xef\xbb\xbf" + GOOD.encode()),
    ("application/json", GOOD.encode("utf-16")),
    ("application/json", GOOD.encode("utf-32")),
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":{"a":"\\ud800"}}'),
    ("text/event-stream", b"data: \xef\xbb\xbf" + GOOD.encode() + b"\n\n"),
    ("text/event-stream", b'data: {"jsonrpc":"2.0","id":1.0,"result":{}}\n\n'),
    ("text/event-stream", b'data: {"id":1,"result":{}}\n\n'),
    # an event the SDK client cannot read ends its request (PARSE_ERROR): the answer after it is never read
    *(("text/event-stream", b"data: " + bad + b"\n\ndata: " + GOOD.encode() + b"\n\n") for bad in (
        b"\xef\xbb\xbf" + NOTE, b'{"jsonrpc":"2.0","id":1.0,"result":{}}', NOTE.replace(b'"jsonrpc":"2.0",', b""),
        NOTE.replace(b"{}", b"[]"), b"[" + NOTE + b"]", b"hello", b" ", NOTE[:-1],
        NOTE.replace(b"{}", b'{"a":"\\ud800"}'),
        NOTE.replace(b"{}", b"[" * 200 + b"]" * 200), NOTE.replace(b"{}", b'{"a":' + b"1" * 4301 + b"}"),
        b'{"jsonrpc":"2.0","id":2,"error":{"code":1.5,"message":"m"}}', b'{"jsonrpc":"2.0","id":2,"result":[]}')),
    # refunded while the SDK client got the result
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":{"content":[]},"error":null}'),
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":{"content":[]},"error":"x"}'),
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":{"content":[]},"method":null}'),
    ("text/event-stream", b'data: {"jsonrpc":"2.0","id":1,"result":{"content":[]},"error":null}\n\n'),
    ("application/json; x=text/event-stream", GOOD.encode()),
    ("Application/JSON ; charset=utf-8", GOOD.encode()),
    ("text/event-stream ;charset=utf-8", b"data: " + GOOD.encode() + b"\n\n"),
    # agreed already: kept so
    ("application/json", GOOD.encode()),
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":-1,"message":"m"}}'),
    ("application/json", b'{"jsonrpc":"2.0","id":1,"result":{},"method":"sampling/createMessage"}'),
    ("text/event-stream", b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\ndata: '
     + GOOD.encode() + b"\n\n"),
    # events the SDK client reads (or ignores) before the answer: the answer still counts
    *(("text/event-stream", before + b"data: " + GOOD.encode() + b"\n\n") for before in (
        b'data: {"jsonrpc":"2.0","id":1.0,"method":"notifications/progress"}\n\n',  # a notification, id ignored
        b'data: {"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{"a":[1,NaN]}}\n\n',
        b'data: {"jsonrpc":"2.0","method":5,"method":"notifications/message","x":1e999}\n\n',
        b'data: {"jsonrpc":"2.0","method":"x","params":{"a":' + b"[" * 199 + b"]" * 199 + b"}}\n\n",
        b"event: other\ndata: hello\n\n", b"id: 7\ndata:\n\n", b": a comment\n\n")),
])
async def test_meter_agrees_with_the_sdk_client(gw: Gw, content_type: str, body: bytes) -> None:
    flow, delivered = await meter_on(gw, content_type, body)
    assert flow.response is not None
    client = sdk_sees(flow.response.headers.get("content-type", ""), delivered)
    money = "refunded" if meta(flow)["decision"] == "refunded" else "billed"
    assert (client, money) in AGREE, (client, money, meta(flow).get("reason"), delivered[:200])


@pytest.mark.parametrize("content_type", ["text/plain", "text/html; charset=utf-8", "application/jsonx",
                                          "text/event-streamx", "application/x-ndjson"])
async def test_a_2xx_that_is_neither_json_nor_sse_is_refunded_with_its_reason(gw: Gw, content_type: str) -> None:
    flow, _ = await meter_on(gw, content_type, GOOD.encode())
    assert meta(flow)["decision"] == "refunded"
    assert meta(flow)["reason"] == "unexpected_content_type"


async def test_a_2xx_without_a_content_type_is_refunded(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = http.Response.make(200, GOOD.encode(), {})
    flow.response.headers.pop("content-type", None)
    assert "content-type" not in flow.response.headers
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    await gw.addon.drain()
    assert meta(flow)["decision"] == "refunded" and meta(flow)["reason"] == "unexpected_content_type"


@pytest.mark.parametrize("content_type, body", [
    # Decided, not agreed (README, "The rule behind the table"): the answer must carry the request's id
    # as sent. The SDKs correlate "1" (and "01") with 1, and take any response on a POST stream as the
    # request's; the meter refunds these, the upstream's mistake, rather than bill an answer it cannot
    # tell from another call's (an answer to a refunded call is dropped by the same exact id).
    ("application/json", b'{"jsonrpc":"2.0","id":"1","result":{"content":[]}}'),
    ("application/json", b'{"jsonrpc":"2.0","id":"01","result":{"content":[]}}'),
    ("text/event-stream", b'data: {"jsonrpc":"2.0","id":2,"result":{"content":[]}}\n\n'),
    # An event stream is UTF-8 (WHATWG); a charset parameter is not honoured.
    ("text/event-stream; charset=utf-16", ("data: " + GOOD + "\n\n").encode("utf-16")),
])
async def test_answers_the_meter_refunds_by_decision(gw: Gw, content_type: str, body: bytes) -> None:
    flow, _ = await meter_on(gw, content_type, body)
    assert meta(flow)["decision"] == "refunded" and meta(flow)["reason"] == "no_answer"


# --- the pure readers, message by message, against the SDK's message adapter ------------------------

MESSAGES = [
    GOOD,
    '{"jsonrpc":"2.0","id":1,"result":{"isError":true}}',
    '{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"m"}}',
    '{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"m"}}',
    '{"jsonrpc":"2.0","id":1,"result":{},"error":null}',
    '{"jsonrpc":"2.0","id":1,"result":{},"error":"x"}',
    '{"jsonrpc":"2.0","id":1,"result":{},"method":null}',
    '{"jsonrpc":"2.0","id":1,"result":{},"method":5}',
    '{"jsonrpc":"2.0","id":1,"result":{},"method":"x"}',
    '{"jsonrpc":"2.0","id":1,"result":"ok"}',
    '{"jsonrpc":"2.0","id":1,"result":[]}',
    '{"jsonrpc":"2.0","id":1,"error":null}',
    '{"jsonrpc":"2.0","id":1.0,"result":{}}',
    '{"jsonrpc":"2.0","id":1.0,"error":{"code":1,"message":"m"}}',
    '{"jsonrpc":"2.0","id":true,"result":{}}',
    '{"jsonrpc":"2.0","id":2,"result":{}}',
    '{"id":1,"result":{}}',
    '{"jsonrpc":2.0,"id":1,"result":{}}',
    '{"jsonrpc":"2.0 ","id":1,"result":{}}',
    '{"jsonrpc":"1.0","id":1,"result":{},"jsonrpc":"2.0"}',
    '{"jsonrpc":"2.0","id":1,"result":{},"jsonrpc":"1.0"}',
    '{"jsonrpc":"2.0","id":2,"result":{},"id":1}',
    '{"jsonrpc":"2.0","id":1,"result":{"a":"\\ud800"}}',
    '{"jsonrpc":"2.0","id":1,"result":{"a":"\\ud83d\\ude00"}}',
    '{"jsonrpc":"2.0","id":1,"result":"x","result":{}}',
]


def scan(data: bytes) -> list[Message] | None:
    """What the scanner alone reads of a whole JSON text (None: not one)."""
    scanner = MessageScanner()
    scanner.feed(data)
    return scanner.finish()


def _expected(raw: bytes) -> Outcome | None:
    seen = _sdk_message(raw)
    if seen not in ("result", "error"):
        return None
    m = jsonrpc_message_adapter.validate_json(raw, by_name=False)
    if m.id != 1:  # type: ignore[union-attr]
        return None
    if seen == "error":
        return Outcome.RPC_ERROR
    return Outcome.TOOL_ERROR if m.result.get("isError") is True else Outcome.RESULT  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", MESSAGES)
def test_body_outcome_is_the_sdk_reading(raw: str) -> None:
    assert body_outcome(raw.encode(), 1) == _expected(raw.encode())


@pytest.mark.parametrize("raw", MESSAGES)
def test_the_scanner_reads_as_the_parser(raw: str) -> None:
    """The scanner (events over max_event_bytes, bodies too deep to parse) concludes the same."""
    if "\\ud800" in raw:
        pytest.skip("a lone surrogate in a value the scanner skips: see README, What counts as an answer")
    assert scanned_outcome(scan(raw.encode()), 1) == _expected(raw.encode())


@pytest.mark.parametrize("body", [b"\xef\xbb\xbf" + GOOD.encode(), GOOD.encode("utf-16"), GOOD.encode("utf-32-le"),
                                  GOOD.encode("utf-16-be")])
def test_only_utf8_without_a_byte_order_mark_is_an_answer(body: bytes) -> None:
    assert body_outcome(body, 1) is None
    assert _sdk_message(body) == "invalid"


def test_a_body_too_deep_to_parse_is_an_answer_only_in_strict_utf8() -> None:
    """Too deep for the json module, the body is read by the scanner: its bytes are still held to the
    SDKs' decoding (strict UTF-8, no byte order mark), as a parsed body's are."""
    deep = "[" * 100_000 + "]" * 100_000
    good = f'{{"jsonrpc":"2.0","id":1,"result":{{"content":[],"deep":{deep}}}}}'.encode()
    assert body_outcome(good, 1) is Outcome.RESULT
    for body in (good.replace(b'"content"', b'"cont\xffent"'),  # one byte that is not UTF-8
                 b"\xef\xbb\xbf" + good, good.decode().encode("utf-16")):
        assert body_outcome(body, 1) is None


def test_answer_messages_still_sees_answers_the_meter_does_not_bill() -> None:
    """Refunded calls' answers are dropped from streams by answer_messages: it stays lenient (drops more)."""
    for raw in (b'{"jsonrpc":"2.0","id":1.0,"result":{}}', b'{"id":1,"result":{}}',
                b'{"jsonrpc":"2.0","id":1,"result":{},"method":null}'):
        messages = answer_messages(raw)
        assert messages is not None and len(messages) == 1
        m = messages[0]
        assert not m.has_method and m.has_result and m.id_value() == 1, json.loads(raw)


# --- which events the SDK client reads at all: at the first it cannot, it ends the request --------------

def _note(params: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","method":"notifications/progress","params":' + params + b"}"


def _error(code: bytes, message: bytes = b'"m"', rpc_id: bytes = b"2") -> bytes:
    return b'{"jsonrpc":"2.0","id":' + rpc_id + b',"error":{"code":' + code + b',"message":' + message + b"}}"


EVENT_DATA = [m.encode() for m in MESSAGES] + [
    NOTE, _note(b"null"), _note(b"[]"), _note(b'"x"'), _note(b"1"), NOTE.replace(b',"params":{}', b""),
    NOTE.replace(b"{}}", b"{},}"),
    b'{"jsonrpc":"2.0","method":"x","params":{},"params":[]}',
    b'{"jsonrpc":"2.0","method":"x","params":[],"params":{}}',
    b'{"jsonrpc":"2.0","method":"x","method":5}', b'{"jsonrpc":"2.0","method":5,"method":"x"}',
    b'{"jsonrpc":"2.0","method":"x","id":1.0}', b'{"jsonrpc":"2.0","method":"x","id":{}}',
    b'{"jsonrpc":"2.0","method":"x","id":null}', b'{"jsonrpc":"2.0","method":"x","params":[],"id":1,"result":{}}',
    b'{"jsonrpc":"2.0","id":"s","method":"sampling/createMessage","params":{"a":[1,NaN,-Infinity,1e999]}}',
    b'{"jsonrpc":"2.0","id":-0,"result":{}}', b'{"jsonrpc":"2.0","id":1e0,"result":{}}',
    b'{"jsonrpc":"2.0","id":12345678901234567890123,"result":{}}', b'{"jsonrpc":"2.0","id":null,"result":{}}',
    b'{"jsonrpc":"2.0","id":"' + b"a" * 10_000 + b'","result":{}}', b'{"jsonrpc":"2.0","id":[1],"result":{}}',
    b'{"jsonrpc":"2.0","error":{"code":1,"message":"m"}}', _error(b"1", rpc_id=b"null"),
    _error(b"1", rpc_id=b"1.5"),
    *(_error(code) for code in (
        b"1", b"-32603", b"1.0", b"1.5", b"1e3", b"1e300", b"true", b"false", b"null", b"[]", b"{}", b"NaN",
        b"9007199254740993.0", b"123456789012345678901234567890", b'"1"', b'" +1 "', b'"\\t1\\n"', b'"1.00"',
        b'"1."', b'"1_0"', b'"1__0"', b'"_1"', b'"0x10"', b'"1e3"', b'""', b'"-0"', b'"00012"', b'"\\u0661"',
        b'"\\u00a01"', b'"1' + b"0" * 5000 + b'"')),
    _error(b"1", b"5"), _error(b"1", b"null"), _error(b'1,"code":"x"'), _error(b'"x","code":1'),
    _error(b"1", b'"m","message":5'), b'{"jsonrpc":"2.0","id":2,"error":{"message":"m"}}',
    b'{"jsonrpc":"2.0","id":2,"error":{"code":1,"message":"m","data":{"code":"x","message":5}}}',
    b'{"jsonrpc":"2.0","id":2,"result":{},"error":{"code":1}}', b'{"jsonrpc":"2.0","id":2,"result":[],"error":[]}',
    b"[" + NOTE + b"]", b"[]", b"{}", b"5", b'"x"', b"null", b"hello", b" ", b"\t" + NOTE + b"\n", NOTE + b" x",
    NOTE[:-1], b"\xef\xbb\xbf" + NOTE, _note(b'{"a":"\\ud800"}'), _note(b'{"a":"\\ud83d\\ude00"}'),
    _note(b'{"a":"tab\there"}'), _note(b'{"a":01}'), _note(b'{"a":' + b"1" * 4300 + b"}"),
    _note(b'{"a":' + b"1" * 4301 + b"}"), _note(b'{"a":1.' + b"1" * 5000 + b"}"),
    *(_note(b'{"a":' + b"[" * d + inner + b"]" * d + b"}") for d in (197, 198, 199, 200)
      for inner in (b"", b"1", b'"x"', b"[]", b"{}", b" ")),
    *(_note(b'{"a":' + b'{"a":' * d + b"1" + b"}" * d + b"}") for d in (197, 198, 199)),
]


def _scanner_blind(raw: bytes) -> bool:
    """What an event over max_event_bytes is not checked for: the scanner skips values and reads a scalar
    as a run of bytes (lone surrogates, a byte order mark, control characters, long integers, depth, the
    grammar of scalars and separators)."""
    return (b"\\ud800" in raw or raw.startswith(b"\xef\xbb\xbf") or b"\there" in raw or b"1" * 4301 in raw
            or raw.count(b"[") + raw.count(b"{") > 190 or raw.endswith((b" x", b",}")) or raw in (b"hello", b" ")
            or b":01" in raw)


@pytest.mark.parametrize("raw", EVENT_DATA, ids=range(len(EVENT_DATA)))
def test_clients_read_is_the_sdk_reading(raw: bytes) -> None:
    """An event is read by the meter as the SDK's message adapter reads it, parsed or scanned."""
    sdk = _sdk_message(raw) != "invalid"
    assert clients_read(Event("message", raw.decode("utf-8", "replace"), None), answer_messages(raw)) is sdk
    if _scanner_blind(raw):
        return
    scanned = scan(raw)
    assert clients_read(Event("message", "", None, messages=scanned, oversized=True), scanned) is sdk
