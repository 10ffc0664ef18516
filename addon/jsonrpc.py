"""What a JSON-RPC request body asks for, and what a response message answers. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import GatewayError
from .scan import Message, MessageScanner, sdk_int

JsonId = str | int | float

# The requests that name a task by its taskId (a string): another user's held task is refused to them
# (deferred.Deferred.on_request).
NAMING_TASKS = ("tasks/result", "tasks/get", "tasks/cancel")
MAX_DEPTH = 64  # deeper bodies are refused: no MCP call needs them, and parsers disagree past some depth
SDK_MAX_DEPTH = 201  # the deepest value the MCP Python SDK client's JSON parser (jiter, in pydantic) reads
MAX_SAFE_INTEGER = 2**53 - 1  # the largest id every JSON implementation (JavaScript's doubles) reads exactly
MAX_STRING_ID = 200
# MCP (2025-11-25) says tool names SHOULD be 1 to 128 characters; eight times that is refused. A held call
# keeps its name in memory (up to 10,000 of them) and every record carries it: not bounded by the body size.
MAX_TOOL_NAME = 1024

_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]|[\]}]', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


class _Unreadable(ValueError):
    """A body two JSON parsers could read differently: refused rather than guessed at."""


@dataclass(frozen=True, slots=True)
class PricedCall:
    """A billable JSON-RPC request: it must be paid for before it is forwarded."""

    method: str
    rpc_id: JsonId
    tool_name: str  # params.name for tools/call, else the method


@dataclass(frozen=True, slots=True)
class Inspection:
    method: str | None  # of a single message; None for a batch or a non-request
    call: PricedCall | None  # the priced call, if the body is one
    # The ids of the body's requests (a string method and an id), a batch's included: a request must
    # not reuse the id of a session's call still unanswered (pending.Pending.in_flight).
    ids: tuple[Any, ...] = field(default=(), compare=False)


def _request_ids(messages: list[Any]) -> tuple[Any, ...]:
    return tuple(m["id"] for m in messages
                 if isinstance(m, Mapping) and isinstance(m.get("method"), str) and m.get("id") is not None)


def inspect_request(
    body: bytes,
    billable: Collection[str],
    mcp_method: str | None = None,
    mcp_name: str | None = None,
) -> Inspection:
    """Classify a POST body. Raises GatewayError for bodies the meter must refuse.

    A batch that holds a billable method is refused: pricing several calls under one
    request id would let one refund or one debit stand for many calls. So is one that holds a
    `tasks/*` request: a held task is settled from the answers to those, read one message at a time.
    """
    message = parse_strict(body)
    if isinstance(message, list):
        if not message or not all(isinstance(m, dict) for m in message):
            raise GatewayError("invalid_request", reason="empty or malformed batch")
        for m in message:
            _check_id(m)
        if any(isinstance(m.get("method"), str) and (m["method"] in billable or m["method"].startswith("tasks/"))
               for m in message):
            raise GatewayError("batch_not_supported")
        if mcp_method is not None or mcp_name is not None:
            raise GatewayError("header_mismatch")
        return Inspection(method=None, call=None, ids=_request_ids(message))
    if not isinstance(message, dict):
        raise GatewayError("invalid_request", reason="a JSON-RPC message is an object")
    _check_id(message)
    method = message.get("method")
    if method is not None and not isinstance(method, str):
        raise GatewayError("invalid_request", reason="method must be a string")
    params = message.get("params")
    _check_headers(method, params, mcp_method, mcp_name)
    if isinstance(method, str) and method.startswith("tasks/") and message.get("id") is None:
        # A held task is settled from the answer to this request, matched by its id (deferred.py):
        # without one, a lenient upstream's answer would pass unread.
        raise GatewayError("invalid_request", reason=f"{method[:50]!r} must carry a JSON-RPC id")  # the client's: cut
    if (method in NAMING_TASKS and isinstance(params, dict)
            and "taskId" in params and not isinstance(params["taskId"], str)):
        # A task id is a string (both SDKs' servers reject another type). Another one names no task the
        # gateway can tell held (another user's is refused, deferred.py), while a lenient upstream may
        # look it up as the string it spells (a JavaScript object's key: String(123) is "123").
        raise GatewayError("invalid_request", reason=f"{method}: params.taskId must be a string")
    ids = _request_ids([message])
    if method is None or method not in billable:
        return Inspection(method=method, call=None, ids=ids)
    rpc_id = message.get("id")
    if rpc_id is None or isinstance(rpc_id, bool) or not isinstance(rpc_id, (str, int, float)):
        # A priced method sent as a notification could run upstream with no answer to settle on.
        raise GatewayError("invalid_request", reason=f"{method} must carry a JSON-RPC id")
    if method == "tools/call":
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str) or not name:
            raise GatewayError("invalid_request", reason="tools/call needs params.name")
        if len(name) > MAX_TOOL_NAME:
            raise GatewayError("invalid_request", reason=f"a tool name is at most {MAX_TOOL_NAME} characters")
        return Inspection(method=method, call=PricedCall(method, rpc_id, name), ids=ids)
    return Inspection(method=method, call=PricedCall(method, rpc_id, method), ids=ids)


ALLOWED_HTTP_METHODS = ("GET", "POST", "DELETE", "HEAD", "OPTIONS")


def check_http_method(method: str, body: bytes) -> None:
    """Only POST carries JSON-RPC; the other MCP methods pass with an empty body, nothing else passes.

    A tools/call body sent with PUT, or with GET, would otherwise reach an upstream that may
    run it whatever the method, without ever being priced. Methods are case-sensitive.
    """
    if method not in ALLOWED_HTTP_METHODS:
        raise GatewayError("method_not_allowed", headers={"Allow": ", ".join(ALLOWED_HTTP_METHODS)})
    if method != "POST" and body:
        raise GatewayError("invalid_request", reason=f"a {method} request must not carry a body")


UTF8_CHARSETS = ("utf-8", "utf8")


def check_request_charset(content_types: list[str]) -> None:
    """A POST body is read as UTF-8 by the meter: refuse one its `Content-Type` says is in another
    charset. Servers that decode by the charset would read other bytes than the meter priced:
    Express's express.json() (body-parser, iconv-lite; the TypeScript SDK's createMcpExpressApp) and
    the TypeScript SDK's legacy SSE transport accept any `utf-*`, UTF-7 included, where `+ACI-` inside
    a JSON string is a quote: a `ping` to the meter can be a `tools/call` to the upstream. One
    Content-Type field at most (Node keeps the first of two), with at most one `charset` parameter,
    UTF-8. Parameters are split on every `;`, quoted or not: a quoted `;charset=` is refused too."""
    if len(content_types) > 1:
        raise GatewayError("invalid_request", reason="one Content-Type header at most")
    if not content_types:
        return
    charsets = [value.strip().strip('"').strip().lower()
                for name, sep, value in (p.partition("=") for p in content_types[0].split(";")[1:])
                if sep and name.strip().lower() == "charset"]
    if len(charsets) > 1 or any(c not in UTF8_CHARSETS for c in charsets):
        raise GatewayError("invalid_request", reason="a request body must be UTF-8 (Content-Type charset)")


def check_request_encoding(encodings: list[str]) -> None:
    """A POST body is priced as sent: refuse one a `Content-Encoding` says is compressed. Servers
    that inflate it (Express's body-parser: gzip, deflate, br) would run other bytes than the meter
    read; MCP clients do not compress requests."""
    if any(coding.strip().lower() not in ("", "identity") for value in encodings for coding in value.split(",")):
        raise GatewayError("invalid_request", reason="a request body must be sent as is (no Content-Encoding)")


def parse_strict(body: bytes) -> Any:
    """The JSON value of a request body, refusing what parsers could read differently.

    Duplicate keys (some parsers keep the first, Python the last), NaN and Infinity (not JSON),
    nesting deeper than MAX_DEPTH, invalid UTF-8 and lone surrogates (which other languages
    replace or reject) all raise GatewayError("invalid_json").
    """
    try:
        text = body.decode("utf-8")  # strict: json.loads(bytes) would let encoded surrogates through
        if nests_deeper(body, MAX_DEPTH):
            raise _Unreadable(f"nesting deeper than {MAX_DEPTH}")
        message = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        if _SURROGATE_ESCAPE.search(body):  # rare: only then pay for the full check
            json.dumps(message, ensure_ascii=False).encode("utf-8")
    except _Unreadable as e:
        raise GatewayError("invalid_json", reason=str(e)) from None
    except UnicodeError:
        raise GatewayError("invalid_json", reason="invalid UTF-8 or a lone surrogate") from None
    except (ValueError, RecursionError):
        raise GatewayError("invalid_json") from None
    return message


def nests_deeper(body: bytes, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep, in one pass that skips strings. Linear,
    never recursive."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # cannot nest deeper than the brackets it has: the common case costs two counts
    depth = 0
    for token in _TOKEN.finditer(body):
        t = token.group()
        if t in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif t in (b"]", b"}"):
            depth -= 1
    return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Unreadable(f"duplicate key {duplicate[:50]!r}")
    return obj


def _no_constant(name: str) -> Any:
    raise _Unreadable(f"{name} is not JSON")


def _check_id(message: Mapping[str, Any]) -> None:
    """An id every JSON-RPC peer reads the same, so the upstream's answer can always be matched."""
    if "id" not in message:
        return
    rpc_id = message["id"]
    if rpc_id is None:
        return
    if isinstance(rpc_id, bool) or not isinstance(rpc_id, (str, int)):
        raise GatewayError("invalid_request", reason="a JSON-RPC id is a string or an integer")
    if isinstance(rpc_id, int) and abs(rpc_id) > MAX_SAFE_INTEGER:
        raise GatewayError("invalid_request", reason=f"a numeric id is at most {MAX_SAFE_INTEGER} in size")
    if isinstance(rpc_id, str) and len(rpc_id) > MAX_STRING_ID:
        raise GatewayError("invalid_request", reason=f"a string id is at most {MAX_STRING_ID} characters")


def _check_headers(method: str | None, params: Any, mcp_method: str | None, mcp_name: str | None) -> None:
    """Revision 2026-07-28 repeats method and name in headers; an upstream may route on them."""
    if mcp_method is not None and mcp_method != method:
        raise GatewayError("header_mismatch")
    if mcp_name is not None:
        names = [params.get(k) for k in ("name", "uri")] if isinstance(params, dict) else []  # may be unhashable
        if mcp_name not in names:
            raise GatewayError("header_mismatch")


class Outcome(StrEnum):
    RESULT = "result"  # a successful result
    TOOL_ERROR = "tool_error"  # result.isError: true
    RPC_ERROR = "rpc_error"  # a JSON-RPC error object


JSON = "application/json"
SSE = "text/event-stream"


def media_type(content_type: str | None) -> str:
    """A Content-Type's media type, as the MCP SDKs compare it: before any `;`, stripped, lowercase."""
    return (content_type or "").partition(";")[0].strip().lower()


def answer_outcome(message: Any, rpc_id: JsonId) -> Outcome | None:
    """The outcome if `message` (parsed) is the response to the request `rpc_id`, else None."""
    return scanned_outcome([_summary(message)], rpc_id)


def scanned_outcome(messages: list[Message] | None, rpc_id: JsonId) -> Outcome | None:
    """What these messages say about the request `rpc_id`, read as the MCP SDK clients read an answer.

    Only a JSON-RPC 2.0 message (`"jsonrpc": "2.0"`, UTF-8 without a byte order mark) whose `method`
    is not a string and whose id is the request's, of the same JSON type, answers it: an `error` object
    makes it an error; else a `result` object a result (or a tool error). A `result` that is not an
    object, an `"id": 1.0` for the request 1, a missing `jsonrpc`: the SDK client cannot read it, so
    it is no result (and the call, without an answer, is refunded).
    """
    for m in messages or ():
        if not m.version_ok or m.has_method or not _same_id(m.id_value(), rpc_id):
            continue
        if m.error_obj:
            return Outcome.RPC_ERROR
        if m.result_obj:
            return Outcome.TOOL_ERROR if m.is_error else Outcome.RESULT
    return None


def body_outcome(body: bytes, rpc_id: JsonId) -> Outcome | None:
    """The outcome carried by a JSON response body (a message or, from older servers, a batch)."""
    return scanned_outcome(answer_messages(body), rpc_id)


@dataclass(frozen=True, slots=True)
class Answer:
    """What each top-level message of an answer says (None: not one JSON value), and how many messages it
    holds past those: a body too deep for the json module is read by the scanner, which keeps
    scan.MAX_MESSAGES summaries of a batch. A refunded call's answer may be among those `dropped`."""

    messages: list[Message] | None
    dropped: int = 0


def answer_messages(body: bytes) -> list[Message] | None:
    """What each top-level message of an answer says, or None if the body is not one JSON value (read_answer:
    for settling a call by its answer, an answer not kept is none)."""
    return read_answer(body).messages


def read_answer(body: bytes) -> Answer:
    """What each top-level message of an answer says, and how many the scanner did not keep.

    Parsed by the json module (C speed) when it can; a body too deep for it is read by the scanner,
    which is linear in the body's size however deeply it nests (but runs at Python speed).
    Lenient (what refunded answers are dropped by reads UTF-16, a byte order mark, `1.0` for `1`):
    a body that is not strict UTF-8 without a byte order mark, or that escapes a lone surrogate,
    is read all the same, but none of its messages is `version_ok`, so none is an outcome.
    """
    text: str | bytes
    try:
        text = body.decode("utf-8")
        strict = not text.startswith("\ufeff")
    except UnicodeDecodeError:
        text, strict = body, False  # json.loads reads UTF-16 and UTF-32 too: for dropping refunded answers
    try:
        parsed = json.loads(text)
        if strict and _SURROGATE_ESCAPE.search(body):  # rare: only then pay for the full check
            try:
                json.dumps(parsed, ensure_ascii=False).encode("utf-8")
            except UnicodeError:
                strict = False
    except RecursionError:
        scanner = MessageScanner()
        scanner.feed(body)
        messages = scanner.finish()
        if messages is not None and (not strict or _SURROGATE_ESCAPE.search(body)):
            for m in messages:  # the scanner does not read values: a lone surrogate's escape is not ruled out
                m.version_ok = False
        return Answer(messages, scanner.dropped if messages is not None else 0)
    except (ValueError, UnicodeDecodeError):
        return Answer(None)
    batched = isinstance(parsed, list)
    messages = [_summary(m, batched) for m in (parsed if batched else [parsed])]
    if not strict:
        for m in messages:
            m.version_ok = False
    return Answer(messages)


def sdk_reads(messages: list[Message] | None) -> bool:
    """Whether the MCP Python SDK client reads an event's data (these are its messages) as a JSON-RPC
    message, as its `jsonrpc_message_adapter` does: one object (a batch is none) with `"jsonrpc": "2.0"`
    that is a request or a notification (a string `method`; `params` an object, null or absent), a response
    (an id that is a string or an integer, a `result` object) or an error (such an id or null, an `error`
    object with an integer `code` and a string `message`). Other members are ignored. The client ends
    the request whose stream carries an event it cannot read (a parse error); values the scanner skips
    are not checked here (call.clients_read)."""
    if not messages or len(messages) != 1 or messages[0].batched:
        return False
    m = messages[0]
    return m.version_ok and ((m.has_method and m.params_ok) or (m.result_obj and m.id_ok)
                             or (m.error_ok and (m.id_ok or m.id_null)))


def _summary(message: Any, batched: bool = False) -> Message:
    if not isinstance(message, dict):
        return Message(batched=batched)
    mid = message.get("id")
    result, error, params = message.get("result"), message.get("error"), message.get("params")
    return Message(
        id_raw=json.dumps(mid).encode() if isinstance(mid, (str, int, float)) and not isinstance(mid, bool) else None,
        has_method=isinstance(message.get("method"), str), has_error="error" in message,
        has_result="result" in message, is_error=isinstance(result, dict) and result.get("isError") is True,
        version_ok=message.get("jsonrpc") == "2.0", result_obj=isinstance(result, dict),
        error_obj=isinstance(error, dict), batched=batched, params_ok=params is None or isinstance(params, dict),
        id_ok=isinstance(mid, str) or (isinstance(mid, int) and not isinstance(mid, bool)),
        id_null="id" in message and mid is None,
        error_ok=(isinstance(error, dict) and "code" in error and sdk_int(error["code"])
                  and isinstance(error.get("message"), str)),
    )


def _same_id(mid: Any, rpc_id: JsonId) -> bool:
    """The request's id, of the same JSON type: "\\u0061" is "a", but "1" is not 1, 1.0 is not 1 (the
    SDKs' strict integer rejects it), and true is not 1."""
    if isinstance(mid, bool) or isinstance(rpc_id, bool):
        return False
    if isinstance(mid, str) or isinstance(rpc_id, str):
        return isinstance(mid, str) and isinstance(rpc_id, str) and mid == rpc_id
    return isinstance(mid, int) and isinstance(rpc_id, int) and mid == rpc_id
