"""addon.jsonrpc (what a request asks for, what a response answers) and the addon.errors table."""

from __future__ import annotations

import json
from typing import Any

import pytest

from addon.errors import ERRORS, GatewayError, error_body
from addon.jsonrpc import (
    MAX_DEPTH, MAX_TOOL_NAME, Inspection, Outcome, PricedCall, answer_outcome, body_outcome, inspect_request,
    parse_strict, read_answer,
)
from addon.scan import MAX_MESSAGES

BILLABLE = ("tools/call",)


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def call(name: Any = "search", rpc_id: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
            "params": {"name": name, "arguments": {}}, **extra}


def refused(raw: bytes, billable: Any = BILLABLE, **headers: Any) -> str:
    with pytest.raises(GatewayError) as e:
        inspect_request(raw, billable, **headers)
    return e.value.spec.code


# --- inspect_request: what is priced --------------------------------------------------------

@pytest.mark.parametrize("rpc_id", [1, 0, -7, "abc", "", 2**53 - 1, -(2**53 - 1), "x" * 200])
def test_tools_call_is_priced_under_its_tool_name(rpc_id: Any) -> None:
    got = inspect_request(body(call("get_weather", rpc_id)), BILLABLE)
    assert got == Inspection(method="tools/call", call=PricedCall("tools/call", rpc_id, "get_weather"))


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": 3, "method": "ping"},
    {"jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {"uri": "file:///a"}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
])
def test_other_methods_pass_unpriced(message: dict[str, Any]) -> None:
    assert inspect_request(body(message), BILLABLE) == Inspection(method=message["method"], call=None)


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "id": 9, "result": {}},  # the client answering a server request
    {"jsonrpc": "2.0", "id": 9, "error": {"code": -32601, "message": "nope"}},
])
def test_client_responses_pass_unpriced(message: dict[str, Any]) -> None:
    assert inspect_request(body(message), BILLABLE) == Inspection(method=None, call=None)


def test_configured_billable_method_is_priced_under_its_method_name() -> None:
    billable = ("tools/call", "resources/read")
    message = {"jsonrpc": "2.0", "id": "r1", "method": "resources/read", "params": {"uri": "file:///x"}}
    got = inspect_request(body(message), billable)
    assert got.call == PricedCall("resources/read", "r1", "resources/read")
    # tools/call keeps being priced by tool name alongside it
    assert inspect_request(body(call("t")), billable).call == PricedCall("tools/call", 1, "t")


def test_tools_call_is_free_when_not_billable() -> None:
    assert inspect_request(body(call()), ("resources/read",)).call is None
    assert inspect_request(body(call()), ()).call is None


# --- inspect_request: what is refused ---------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe\x00", b'{"id": 1,}', b"{'a': 1}"])
def test_invalid_json(raw: bytes) -> None:
    assert refused(raw) == "invalid_json"


# --- strict parsing: the gateway and the upstream must read the same call ------------------------

@pytest.mark.parametrize("raw, says", [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}', "'method'"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"free","name":"paid"}}', "'name'"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"k":1,"k":2}}}', "'k'"),
    (b'{"id":1,"\\u0069d":2,"method":"ping"}', "'id'"),  # the same key spelled with an escape
    (b'[{"jsonrpc":"2.0","method":"ping","method":"tools/call"}]', "'method'"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[{"a":1,"a":1}]}', "'a'"),
])
def test_duplicate_keys_at_any_depth_are_refused(raw: bytes, says: str) -> None:
    with pytest.raises(GatewayError) as e:
        inspect_request(raw, BILLABLE)
    assert e.value.spec.code == "invalid_json" and "duplicate key" in e.value.details["reason"]
    assert says in e.value.details["reason"]


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_numbers_are_refused_anywhere(constant: bytes) -> None:
    assert refused(b'{"jsonrpc":"2.0","id":' + constant + b',"method":"tools/call","params":{"name":"a"}}') == \
        "invalid_json"
    assert refused(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":[' + constant + b']}}') == "invalid_json"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 1_000_000])
def test_nesting_deeper_than_the_limit_is_refused_without_recursion(depth: int) -> None:
    inner = b"[" * (depth - 2) + b"]" * (depth - 2)
    raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":' + inner + b"}}"
    with pytest.raises(GatewayError) as e:
        inspect_request(raw, BILLABLE)
    assert e.value.spec.code == "invalid_json" and "deeper" in e.value.details["reason"]


def test_nesting_at_the_limit_passes() -> None:
    inner = b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2)
    raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":' + inner + b"}}"
    assert inspect_request(raw, BILLABLE).call == PricedCall("tools/call", 1, "a")


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '"' + "[{" * 1000 + '\\"]' + '"'
    raw = (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"q":'
           + text.encode() + b"}}}")
    assert inspect_request(raw, BILLABLE).call is not None


@pytest.mark.parametrize("raw", [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xed\xa0\x80"}}',  # an encoded surrogate
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\ud800"}}',  # an escaped lone one
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\\udc00b"}}',
    b'{"jsonrpc":"2.0","id":"\\udfff","method":"tools/call","params":{"name":"a"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xc3"}}',  # truncated UTF-8
    b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}',  # a BOM
    b'{\x00"\x00i\x00d\x00"\x00:\x001\x00}\x00',  # UTF-16, which json.loads(bytes) would guess
])
def test_invalid_utf8_and_lone_surrogates_are_refused(raw: bytes) -> None:
    assert refused(raw) == "invalid_json"


def test_a_surrogate_pair_is_fine() -> None:
    raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\ud83d\\ude00"}}'
    assert inspect_request(raw, BILLABLE).call == PricedCall("tools/call", 1, "\U0001F600")


@pytest.mark.parametrize("rpc_id", [b"1.0", b"1e3", b"2.5", b"-0.0", b"9007199254740992", b"-9007199254740992",
                                    b"1" + b"0" * 30, b"true", b"[1]", b'{"a":1}', b'"' + b"x" * 201 + b'"'])
@pytest.mark.parametrize("method", ["tools/call", "ping"])
def test_ids_other_peers_could_read_differently_are_refused(rpc_id: bytes, method: str) -> None:
    raw = b'{"jsonrpc":"2.0","id":' + rpc_id + b',"method":"' + method.encode() + b'","params":{"name":"a"}}'
    assert refused(raw) == "invalid_request"


def test_ids_in_a_batch_are_checked_too() -> None:
    assert refused(b'[{"jsonrpc":"2.0","id":1.5,"method":"ping"}]') == "invalid_request"


def test_parse_strict_reads_what_json_reads() -> None:
    raw = b'{"a":[1,2.5,"\\u0061",null,true,{"b":{}}]}'
    assert parse_strict(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"1", b'"tools/call"', b"null", b"true", b"3.5"])
def test_a_message_must_be_an_object(raw: bytes) -> None:
    assert refused(raw) == "invalid_request"


@pytest.mark.parametrize("method", [1, ["tools/call"], {"a": 1}, True])
def test_method_must_be_a_string(method: Any) -> None:
    assert refused(body({"jsonrpc": "2.0", "id": 1, "method": method})) == "invalid_request"


@pytest.mark.parametrize("rpc_id", ["missing", None, True, False, [1], {"a": 1}])
def test_priced_call_needs_an_id(rpc_id: Any) -> None:
    message = call()
    if rpc_id == "missing":
        del message["id"]  # a notification
    else:
        message["id"] = rpc_id
    assert refused(body(message)) == "invalid_request"


def test_configured_billable_notification_is_refused() -> None:
    message = {"jsonrpc": "2.0", "method": "resources/read", "params": {"uri": "x"}}
    assert refused(body(message), ("resources/read",)) == "invalid_request"


@pytest.mark.parametrize("params", ["missing", None, [], "search", {}, {"name": ""}, {"name": 5},
                                    {"name": None}, {"name": ["a"]}, {"arguments": {}}])
def test_tools_call_needs_params_name(params: Any) -> None:
    message = call()
    if params == "missing":
        del message["params"]
    else:
        message["params"] = params
    assert refused(body(message)) == "invalid_request"


def test_a_tool_name_is_bounded() -> None:
    """A held call keeps its tool name (up to 10,000 held calls): not as long as the body may be."""
    assert inspect_request(body(call("é" * MAX_TOOL_NAME)), BILLABLE).call == PricedCall(
        "tools/call", 1, "é" * MAX_TOOL_NAME)
    with pytest.raises(GatewayError) as e:
        inspect_request(body(call("x" * (MAX_TOOL_NAME + 1))), BILLABLE)
    assert e.value.spec.code == "invalid_request" and "1024" in str(e.value.details)


@pytest.mark.parametrize("billable", [BILLABLE, frozenset(BILLABLE), ["tools/call"]])
@pytest.mark.parametrize("batch", [
    [call()],
    [{"jsonrpc": "2.0", "method": "notifications/initialized"}, call("x", 2)],
    [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, call("x", 2)],
    [call("x", 1), call("y", 2)],
    [{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x"}}],  # even as a notification
])
def test_batch_with_a_billable_element_is_refused(batch: list[Any], billable: Any) -> None:
    assert refused(body(batch), billable) == "batch_not_supported"


@pytest.mark.parametrize("method", ["tasks/result", "tasks/get", "tasks/cancel", "tasks/list"])
def test_a_tasks_request_without_an_id_is_refused(method: str) -> None:
    """A held task settles from the answer to it, matched by id: a null id (or none) would let a
    lenient upstream's answer pass unread."""
    for message in ({"jsonrpc": "2.0", "id": None, "method": method, "params": {"taskId": "T"}},
                    {"jsonrpc": "2.0", "method": method, "params": {"taskId": "T"}}):
        assert refused(body(message)) == "invalid_request"
    assert inspect_request(body({"jsonrpc": "2.0", "id": 7, "method": method, "params": {"taskId": "T"}}),
                           BILLABLE).method == method


def test_a_refusal_names_the_method_it_refuses_in_a_few_characters() -> None:
    """The method is the client's: a 'tasks/' one the size of the body is not echoed back whole."""
    method = "tasks/" + "x" * 100_000
    with pytest.raises(GatewayError) as e:
        inspect_request(body({"jsonrpc": "2.0", "method": method}), BILLABLE)
    reason = e.value.details["reason"]
    assert len(reason) < 120 and reason.startswith("'tasks/xxx") and reason.endswith("must carry a JSON-RPC id")
    assert len(e.value.body()) < 400


@pytest.mark.parametrize("method", ["tasks/result", "tasks/get", "tasks/cancel", "tasks/list"])
def test_batch_with_a_tasks_request_is_refused(method: str) -> None:
    """A held task settles from the answers to these, read one message at a time: a batched
    tasks/result would deliver a result past the meter."""
    batch = [{"jsonrpc": "2.0", "id": 2, "method": method, "params": {"taskId": "T"}}]
    assert refused(body(batch)) == "batch_not_supported"
    assert refused(b'[{"jsonrpc":"2.0","id":2,"method":"\\u0074asks/result"}]') == "batch_not_supported"


@pytest.mark.parametrize("billable", [BILLABLE, frozenset(BILLABLE)])
@pytest.mark.parametrize("batch", [
    [{"jsonrpc": "2.0", "method": "notifications/initialized"}],
    [{"jsonrpc": "2.0", "method": "notifications/initialized"},
     {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}],
    [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, {"jsonrpc": "2.0", "id": 2, "result": {}}],
    [{"jsonrpc": "2.0", "id": 1, "method": ["tools/call"]}],  # an unhashable method is simply not billable
])
def test_batch_without_billable_elements_passes_unpriced(batch: list[Any], billable: Any) -> None:
    assert inspect_request(body(batch), billable) == Inspection(method=None, call=None)


@pytest.mark.parametrize("batch", [[], [1], [call(), "x"], [None], [[call()]]])
def test_empty_or_malformed_batch(batch: list[Any]) -> None:
    assert refused(body(batch)) == "invalid_request"


def test_empty_batch_is_refused_even_with_no_billable_methods() -> None:
    assert refused(b"[]", ()) == "invalid_request"


# --- inspect_request: Mcp-Method / Mcp-Name headers (revision 2026-07-28) --------------------

@pytest.mark.parametrize("message, mcp_method, mcp_name", [
    (call("search"), "tools/call", "search"),
    (call("search"), "tools/call", None),
    (call("search"), None, "search"),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, "tools/list", None),
    ({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///a"}},
     "resources/read", "file:///a"),
    ({"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "p"}}, "prompts/get", "p"),
])
def test_matching_headers_pass(message: dict[str, Any], mcp_method: str | None, mcp_name: str | None) -> None:
    got = inspect_request(body(message), BILLABLE, mcp_method=mcp_method, mcp_name=mcp_name)
    assert got.method == message["method"]


def test_matching_headers_keep_the_price() -> None:
    got = inspect_request(body(call("search")), BILLABLE, mcp_method="tools/call", mcp_name="search")
    assert got.call == PricedCall("tools/call", 1, "search")


@pytest.mark.parametrize("message, mcp_method, mcp_name", [
    (call("search"), "tools/list", None),  # claims a free method for a priced call
    (call("search"), "Tools/Call", None),
    (call("search"), "", None),
    (call("cheap"), "tools/call", "expensive"),  # routes to another tool than the one priced
    (call("search"), None, ""),
    (call("search"), None, "SEARCH"),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, "tools/call", None),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, None, "search"),  # no params to name
    ({"jsonrpc": "2.0", "id": 1, "result": {}}, "tools/call", None),  # a response has no method
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": ["x"]}}, None, "x"),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": {"a": 1}}}, None, "x"),
    ({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"uri": [1], "name": {}}}, None, "x"),
    ({"jsonrpc": "2.0", "id": 1, "method": "x", "params": ["x"]}, None, "x"),
])
def test_mismatching_headers_are_refused(message: dict[str, Any], mcp_method: str | None,
                                         mcp_name: str | None) -> None:
    assert refused(body(message), mcp_method=mcp_method, mcp_name=mcp_name) == "header_mismatch"


@pytest.mark.parametrize("headers", [{"mcp_method": "tools/list"}, {"mcp_name": "x"}])
def test_headers_on_a_batch_are_refused(headers: dict[str, str]) -> None:
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]
    assert refused(body(batch), **headers) == "header_mismatch"


# --- answer_outcome -----------------------------------------------------------------------------

@pytest.mark.parametrize("message, rpc_id, expected", [
    ({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, 1, Outcome.RESULT),
    ({"jsonrpc": "2.0", "id": "a", "result": {"content": []}}, "a", Outcome.RESULT),
    ({"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": False}}, 1, Outcome.RESULT),
    ({"jsonrpc": "2.0", "id": 1, "result": {"isError": "true"}}, 1, Outcome.RESULT),  # only true is true
    ({"jsonrpc": "2.0", "id": 1, "result": {"isError": 1}}, 1, Outcome.RESULT),
    ({"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": True}}, 1, Outcome.TOOL_ERROR),
    ({"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "bad"}}, 1, Outcome.RPC_ERROR),
    ({"jsonrpc": "2.0", "id": "x", "error": {"code": -32000, "message": "boom"}}, "x", Outcome.RPC_ERROR),
])
def test_answer_outcome(message: dict[str, Any], rpc_id: Any, expected: Outcome) -> None:
    assert answer_outcome(message, rpc_id) is expected


@pytest.mark.parametrize("message, rpc_id", [
    ({"jsonrpc": "2.0", "id": 2, "result": {}}, 1),  # another call's answer
    ({"jsonrpc": "2.0", "id": "1", "result": {}}, 1),  # a string id is not a number id
    ({"jsonrpc": "2.0", "id": 1.0, "result": {}}, 1),  # nor 1.0 1: the SDKs' strict integer rejects it
    ({"jsonrpc": "2.0", "id": 1, "result": None}, 1),  # a result is an object (tests/test_answer_outcome.py)
    ({"jsonrpc": "2.0", "id": 1, "result": []}, 1),
    ({"id": 1, "result": {}}, 1),  # not JSON-RPC 2.0
    ({"jsonrpc": "2.0", "id": 1, "result": {}}, "1"),
    ({"jsonrpc": "2.0", "id": True, "result": {}}, 1),  # true == 1 in Python, not in JSON-RPC
    ({"jsonrpc": "2.0", "id": False, "result": {}}, 0),
    ({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse"}}, 1),
    ({"jsonrpc": "2.0", "result": {}}, 1),  # no id at all
    ({"jsonrpc": "2.0", "id": 1}, 1),  # neither result nor error
    ({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}}, 1),  # a server request
    ({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1}}, 1),
    ({"jsonrpc": "2.0", "id": 1, "method": "x", "result": {}}, 1),
    ([{"jsonrpc": "2.0", "id": 1, "result": {}}], 1),  # a batch is not a message
    ("result", 1),
    (None, 1),
    (1, 1),
])
def test_answer_outcome_ignores_what_does_not_answer_the_call(message: Any, rpc_id: Any) -> None:
    assert answer_outcome(message, rpc_id) is None


# --- body_outcome ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, rpc_id, expected", [
    (body({"jsonrpc": "2.0", "id": 7, "result": {"content": []}}), 7, Outcome.RESULT),
    (body({"jsonrpc": "2.0", "id": 7, "result": {"isError": True}}), 7, Outcome.TOOL_ERROR),
    (body({"jsonrpc": "2.0", "id": 7, "error": {"code": 1, "message": "m"}}), 7, Outcome.RPC_ERROR),
    (body({"jsonrpc": "2.0", "id": 8, "result": {}}), 7, None),
    (body({"jsonrpc": "2.0", "id": "7", "result": {}}), 7, None),
    # batch responses from 2025-03-26 servers: the element answering the call decides
    (body([{"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 7, "error": {}}]), 7,
     Outcome.RPC_ERROR),
    (body([{"jsonrpc": "2.0", "id": 7, "result": {"isError": True}}, {"jsonrpc": "2.0", "id": 1, "error": {}}]), 7,
     Outcome.TOOL_ERROR),
    (body([{"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 2, "result": {}}]), 7, None),
    (body([]), 7, None),
    (body([1, "x", None]), 7, None),
    (b"", 7, None),
    (b"<html>502 Bad Gateway</html>", 7, None),
    (b"\xff\xfe", 7, None),
    (b'event: message\ndata: {"jsonrpc":"2.0","id":7,"result":{}}\n\n', 7, None),  # SSE is not JSON
])
def test_body_outcome(raw: bytes, rpc_id: Any, expected: Outcome | None) -> None:
    assert body_outcome(raw, rpc_id) is expected


# --- the error table -----------------------------------------------------------------------------

@pytest.mark.parametrize("code, status", [
    ("invalid_slug", 400), ("invalid_json", 400), ("invalid_request", 400), ("batch_not_supported", 400),
    ("header_mismatch", 400), ("invalid_token", 401), ("insufficient_credit", 402),
    ("project_cap_exceeded", 402), ("account_suspended", 403), ("no_such_mcp", 404), ("mcp_archived", 410),
    ("payload_too_large", 413), ("rate_limited", 429), ("upstream_failed", 502), ("mcp_paused", 503),
    ("mcp_not_yet_live", 503), ("upstream_timeout", 504),
])
def test_spec_error_codes_and_statuses(code: str, status: int) -> None:
    assert ERRORS[code].status == status
    assert GatewayError(code).status == status


def test_gateway_error_body_carries_code_message_and_details() -> None:
    e = GatewayError("insufficient_credit", headers={"X-A": "1"}, balance_micro_cents=5, required_micro_cents=9)
    assert json.loads(e.body()) == {"error": "insufficient_credit", "message": ERRORS["insufficient_credit"].message,
                                    "balance_micro_cents": 5, "required_micro_cents": 9}
    assert e.headers == {"X-A": "1"}
    assert json.loads(error_body("no_such_mcp"))["error"] == "no_such_mcp"


def test_unknown_error_code_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        GatewayError("no_such_code")


# --- body_outcome: any size, any shape ------------------------------------------------------------

def test_a_deeply_nested_result_is_read_without_recursion() -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    assert body_outcome(b'{"jsonrpc":"2.0","id":7,"result":{"content":' + nested + b"}}", 7) is Outcome.RESULT
    raw = b'{"jsonrpc":"2.0","id":7,"result":{"c":' + nested + b',"isError":true}}'
    assert body_outcome(raw, 7) is Outcome.TOOL_ERROR


def test_a_huge_result_is_read() -> None:
    text = b"z\\n" * 5_000_000
    raw = b'{"jsonrpc":"2.0","id":"q","result":{"content":[{"type":"text","text":"' + text + b'"}],"isError":true}}'
    assert body_outcome(raw, "q") is Outcome.TOOL_ERROR


@pytest.mark.parametrize("raw, rpc_id, expected", [
    (b'{"jsonrpc":"2.0","id":7.0,"result":{}}', 7, None),  # the same number, not an integer: the SDKs reject it
    (b'{"jsonrpc":"2.0","id":7e0,"result":{}}', 7, None),
    (b'{"jsonrpc":"2.0","id":"\\u0061","result":{}}', "a", Outcome.RESULT),  # the same string
    (b'{"jsonrpc":"2.0","id":true,"result":{}}', 1, None),
    (b'{"jsonrpc":"2.0","id":"7","result":{}}', 7, None),
    (b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"isError":true}]}}', 7, Outcome.RESULT),  # not top-level
    (b'{"jsonrpc":"2.0","id":7,"result":{"isError":"true"}}', 7, Outcome.RESULT),
    (b'{"jsonrpc":"2.0","id":7,"result":{"isError":true}} trailing', 7, None),  # not one JSON value
    (b'{"jsonrpc":"2.0","id":7,"result":{"isError":true}', 7, None),
    (b'{"jsonrpc":"2.0","id":7,"result":{"isError":true]}', 7, None),
    (b'{"jsonrpc":"2.0","id":7,"method":"x","result":{}}', 7, None),
])
def test_body_outcome_reads_like_json(raw: bytes, rpc_id: Any, expected: Outcome | None) -> None:
    assert body_outcome(raw, rpc_id) is expected


def test_the_longest_id_matches_however_the_upstream_escapes_it() -> None:
    rpc_id = "\U0001F600" * 200  # accepted: 200 characters
    assert inspect_request(body(call("a", rpc_id)), BILLABLE).call is not None
    escaped = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {}}).encode()  # \ud83d\ude00 x 200
    assert len(escaped) > 2400
    assert body_outcome(escaped, rpc_id) is Outcome.RESULT
    raw = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {}}, ensure_ascii=False).encode()
    assert body_outcome(raw, rpc_id) is Outcome.RESULT


# --- request header checks (charset, coding): any header value gives a verdict, never a crash -----

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from addon.errors import GatewayError  # noqa: E402
from addon.jsonrpc import check_request_charset, check_request_encoding  # noqa: E402

_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=60)


@given(st.lists(_HEADER_TEXT, max_size=3))
def test_any_content_type_is_accepted_only_as_utf8(values: list[str]) -> None:
    try:
        check_request_charset(values)
    except GatewayError as e:
        assert e.spec.code == "invalid_request"
        return
    assert len(values) <= 1  # accepted: one field at most, with no charset or a UTF-8 one
    for param in (values[0].split(";")[1:] if values else []):
        name, sep, value = param.partition("=")
        if sep and name.strip().lower() == "charset":
            assert value.strip().strip('"').strip().lower() in ("utf-8", "utf8")


@given(st.lists(_HEADER_TEXT, max_size=3))
def test_any_content_encoding_is_accepted_only_as_identity(values: list[str]) -> None:
    try:
        check_request_encoding(values)
    except GatewayError as e:
        assert e.spec.code == "invalid_request"
        return
    assert all(c.strip().lower() in ("", "identity") for v in values for c in v.split(","))


def test_a_batch_too_deep_for_json_says_how_many_answers_its_scanner_did_not_keep() -> None:
    """json.loads gives up on a batch nested too deep; the scanner reads it, MAX_MESSAGES summaries at most:
    the answer says how many more it holds (a refunded call's answer may be among them)."""
    deep = b"[" * 100_000 + b"]" * 100_000  # an element json.loads cannot read: the whole batch is scanned
    answers = [b'{"jsonrpc":"2.0","id":%d,"result":{}}' % i for i in range(100, 100 + MAX_MESSAGES + 1)]
    answer = read_answer(b"[" + deep + b"," + b",".join(answers) + b"]")
    assert answer.dropped == 1 and answer.messages is not None and len(answer.messages) == MAX_MESSAGES
    kept = read_answer(b"[" + deep + b"," + b",".join(answers[:MAX_MESSAGES]) + b"]")
    assert kept.dropped == 0 and kept.messages is not None and len(kept.messages) == MAX_MESSAGES
    assert read_answer(b"[" + b",".join(answers) + b"]").dropped == 0  # parsed whole: nothing dropped
    assert read_answer(b"[" + deep).dropped == 0  # not one JSON value: no answer at all
