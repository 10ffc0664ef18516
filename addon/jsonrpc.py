"""What a JSON-RPC request body asks for, and what a response message answers. Pure."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import GatewayError

JsonId = str | int | float


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


def inspect_request(
    body: bytes,
    billable: Collection[str],
    mcp_method: str | None = None,
    mcp_name: str | None = None,
) -> Inspection:
    """Classify a POST body. Raises GatewayError for bodies the meter must refuse.

    A batch that holds a billable method is refused: pricing several calls under one
    request id would let one refund or one debit stand for many calls.
    """
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError("invalid_json") from None
    if isinstance(message, list):
        if not message or not all(isinstance(m, dict) for m in message):
            raise GatewayError("invalid_request", reason="empty or malformed batch")
        if any(isinstance(m.get("method"), str) and m["method"] in billable for m in message):
            raise GatewayError("batch_not_supported")
        if mcp_method is not None or mcp_name is not None:
            raise GatewayError("header_mismatch")
        return Inspection(method=None, call=None)
    if not isinstance(message, dict):
        raise GatewayError("invalid_request", reason="a JSON-RPC message is an object")
    method = message.get("method")
    if method is not None and not isinstance(method, str):
        raise GatewayError("invalid_request", reason="method must be a string")
    params = message.get("params")
    _check_headers(method, params, mcp_method, mcp_name)
    if method not in billable:
        return Inspection(method=method, call=None)
    rpc_id = message.get("id")
    if rpc_id is None or isinstance(rpc_id, bool) or not isinstance(rpc_id, (str, int, float)):
        # A priced method sent as a notification could run upstream with no answer to settle on.
        raise GatewayError("invalid_request", reason=f"{method} must carry a JSON-RPC id")
    if method == "tools/call":
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str) or not name:
            raise GatewayError("invalid_request", reason="tools/call needs params.name")
        return Inspection(method=method, call=PricedCall(method, rpc_id, name))
    return Inspection(method=method, call=PricedCall(method, rpc_id, method))


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


def answer_outcome(message: Any, rpc_id: JsonId) -> Outcome | None:
    """The outcome if `message` is the response to the request `rpc_id`, else None."""
    if not isinstance(message, Mapping) or "method" in message:
        return None
    mid = message.get("id")
    if mid != rpc_id or type(mid) is bool or isinstance(mid, str) != isinstance(rpc_id, str):
        return None
    if "error" in message:
        return Outcome.RPC_ERROR
    if "result" not in message:
        return None
    result = message["result"]
    if isinstance(result, Mapping) and result.get("isError") is True:
        return Outcome.TOOL_ERROR
    return Outcome.RESULT


def body_outcome(body: bytes, rpc_id: JsonId) -> Outcome | None:
    """The outcome carried by a JSON response body (a message or, from older servers, a batch)."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    messages = message if isinstance(message, list) else [message]
    for m in messages:
        if (outcome := answer_outcome(m, rpc_id)) is not None:
            return outcome
    return None
