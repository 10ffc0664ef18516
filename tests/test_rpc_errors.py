"""Refusals as JSON-RPC errors: the id peek, the bodies, the code table. Pure, no sockets."""

from __future__ import annotations

import json

import mcp_types.jsonrpc as sdk_codes
import pytest

from addon.errors import ERRORS, RPC_CODE_OVERRIDES, GatewayError, rpc_code
from addon.rpc_errors import PEEK_LIMIT, peek_id, refusal_body, sentence


@pytest.mark.parametrize("body, expected", [
    (b'{"jsonrpc":"2.0","id":7,"method":"tools/call"}', 7),
    (b'  {"jsonrpc":"2.0","id":"abc","method":"ping"}', "abc"),
    (b'{"jsonrpc":"2.0","id":-9007199254740991,"method":"x"}', -(2**53 - 1)),
    (b'{"jsonrpc":"2.0","id":9007199254740992,"method":"x"}', None),  # beyond 2^53-1
    (b'{"jsonrpc":"2.0","id":1.0,"method":"x"}', None),
    (b'{"jsonrpc":"2.0","id":true,"method":"x"}', None),
    (b'{"jsonrpc":"2.0","id":null,"method":"x"}', None),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"x"}', None),
    (b'{"jsonrpc":"2.0","id":"' + b"x" * 201 + b'","method":"x"}', None),
    (b'{"jsonrpc":"2.0","method":"notifications/initialized"}', None),  # a notification
    (b'{"jsonrpc":"2.0","id":3,"result":{}}', None),  # a response, not a request
    (b'[{"jsonrpc":"2.0","id":1,"method":"x"}]', None),  # a batch
    (b'{not json', None),
    (b'{"id":1,"method":"x"' + b"[" * 100_000, None),
    (b'{"id":1,"method":"x","p":' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),  # too deep to parse
    (b'\xff\xfe{"id":1}', None),
    (b"", None),
    (None, None),
])
def test_peek_id_returns_only_a_valid_request_id(body: bytes | None, expected: object) -> None:
    assert peek_id(body) == expected


def test_peek_id_is_bounded() -> None:
    padding = b" " * PEEK_LIMIT
    assert peek_id(b'{"jsonrpc":"2.0","id":1,"method":"x"}' + padding) is None


def test_plain_body_without_an_id_is_unchanged() -> None:
    error = GatewayError("rate_limited", scope="minute", retry_after=12)
    body = json.loads(refusal_body(error, "rid", None, "https://pay.example/top-up"))
    assert body == {"error": "rate_limited", "message": ERRORS["rate_limited"].message,
                    "scope": "minute", "retry_after": 12, "request_id": "rid"}


def test_402_is_a_json_rpc_error_with_words_and_data() -> None:
    error = GatewayError("insufficient_credit", balance_micro_cents=100, required_micro_cents=1000)
    body = json.loads(refusal_body(error, "rid", "call-1", "https://pay.example/top-up"))
    assert body["jsonrpc"] == "2.0" and body["id"] == "call-1" and set(body) == {"jsonrpc", "id", "error"}
    err = body["error"]
    assert err["code"] == -32004
    assert "1000 µ¢" in err["message"] and "100 µ¢" in err["message"]
    assert "https://pay.example/top-up" in err["message"]
    assert err["data"] == {"error": "insufficient_credit", "request_id": "rid", "balance_micro_cents": 100,
                           "required_micro_cents": 1000, "top_up_url": "https://pay.example/top-up"}


def test_429_sentence_says_when_to_retry() -> None:
    error = GatewayError("rate_limited", scope="day", retry_after=3600)
    body = json.loads(refusal_body(error, "rid", 5))
    assert body["id"] == 5 and body["error"]["code"] == -32010
    assert body["error"]["message"] == "Rate limit reached (the daily limit for this server); retry in 3600 s."
    assert body["error"]["data"] == {"error": "rate_limited", "scope": "day", "retry_after": 3600, "request_id": "rid"}


def test_retry_after_header_is_worded_for_other_refusals() -> None:
    error = GatewayError("store_unavailable", headers={"Retry-After": "1"})
    assert sentence(error).endswith("Retry in 1 s.")


def test_every_gateway_code_has_a_json_rpc_code_outside_the_sdks_and_specs() -> None:
    reserved = {sdk_codes.CONNECTION_CLOSED, sdk_codes.REQUEST_TIMEOUT, -32002, sdk_codes.URL_ELICITATION_REQUIRED}
    standard = {sdk_codes.PARSE_ERROR, sdk_codes.INVALID_REQUEST, sdk_codes.INTERNAL_ERROR, sdk_codes.HEADER_MISMATCH}
    for code in ERRORS:
        rpc = rpc_code(code)
        assert rpc not in reserved, code
        assert rpc in standard or -32019 <= rpc <= -32003, (code, rpc)
    assert rpc_code("invalid_json") == sdk_codes.PARSE_ERROR
    assert rpc_code("header_mismatch") == sdk_codes.HEADER_MISMATCH
    assert set(RPC_CODE_OVERRIDES) <= set(ERRORS)
    # One meaning per code: two HTTP statuses never share a gateway-band code.
    by_status = {ERRORS[c].status: rpc_code(c) for c in ERRORS if c not in RPC_CODE_OVERRIDES}
    band = [v for v in by_status.values() if -32019 <= v <= -32003]
    assert len(band) == len(set(band))
