"""The gateway's refusals as an MCP client reads them: JSON-RPC error objects answering the call's id.

An agent talks through an MCP SDK, which turns a non-2xx answer into an opaque "Server returned
an error response" unless the body is a JSON-RPC error. So a refusal of a request that carries a
JSON-RPC id answers that id, at the same HTTP status, with a sentence a person can act on in
`message` and the machine fields in `data`. A request without an id keeps the plain body
`{"error": code, "message", "request_id", ...}`. Pure: no mitmproxy, no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import RPC_CODES, GatewayError, error_body, rpc_code
from .jsonrpc import JsonId

PEEK_LIMIT = 1024 * 1024  # bodies beyond this are not parsed just to word a refusal
MAX_SAFE_INTEGER = 2**53 - 1
MAX_STRING_ID = 200
MICRO_CENTS_PER_DOLLAR = 100_000_000

__all__ = ["RPC_CODES", "PEEK_LIMIT", "peek_id", "refusal_body", "sentence"]


def peek_id(body: bytes | None) -> JsonId | None:
    """The id of a single JSON-RPC request in `body`, or None; never raises.

    Used for refusals decided before (or without) the strict parse: the id is returned only when
    the body is one JSON object with a `method` and a valid id (an integer within ±2^53-1 or a
    string of at most 200 characters). Batches, notifications, null ids and anything malformed
    get the plain error body.
    """
    if not body or len(body) > PEEK_LIMIT or body.lstrip()[:1] != b"{":
        return None
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return None
    rpc_id = message.get("id")
    if isinstance(rpc_id, bool):
        return None
    if isinstance(rpc_id, int) and abs(rpc_id) <= MAX_SAFE_INTEGER:
        return rpc_id
    if isinstance(rpc_id, str) and len(rpc_id) <= MAX_STRING_ID:
        return rpc_id
    return None


def refusal_body(error: GatewayError, request_id: str, rpc_id: JsonId | None,
                 top_up_url: str | None = None) -> bytes:
    """The body of a refusal: a JSON-RPC error answering `rpc_id`, or the plain gateway error."""
    if rpc_id is None:
        return error_body(error.spec.code, **{**error.details, "request_id": request_id})
    data: dict[str, Any] = {"error": error.spec.code, **error.details, "request_id": request_id}
    if top_up_url and error.status == 402:
        data["top_up_url"] = top_up_url
    message = {"jsonrpc": "2.0", "id": rpc_id,
               "error": {"code": rpc_code(error.spec.code), "message": sentence(error, top_up_url), "data": data}}
    return json.dumps(message).encode()


def sentence(error: GatewayError, top_up_url: str | None = None) -> str:
    """What happened and what to do about it, in words an agent can relay to its user."""
    d, code = error.details, error.spec.code
    balance, price = d.get("balance_micro_cents"), d.get("required_micro_cents")
    where = f" at {top_up_url}" if top_up_url else ""
    if code == "insufficient_credit" and isinstance(balance, int) and isinstance(price, int):
        return (f"Not enough credit: this call costs {_money(price)} and your balance is {_money(balance)}. "
                f"Top up your balance{where}, then retry the call.")
    if code == "project_cap_exceeded" and isinstance(price, int):
        return (f"This call ({_money(price)}) would exceed your project's monthly spending cap. "
                f"Raise the cap{where} or wait for next month.")
    if code == "rate_limited" and d.get("retry_after") is not None:
        scope = d.get("scope")
        window = {"minute": "per-minute", "day": "daily"}.get(str(scope), str(scope))
        return f"Rate limit reached (the {window} limit for this server); retry in {d['retry_after']} s."
    message = error.spec.message
    retry = error.headers.get("Retry-After")
    if retry and retry.isdigit() and "retry" not in message.lower():
        message += f" Retry in {retry} s."
    return message


def _money(micro_cents: int) -> str:
    """µ¢ as dollars and µ¢: '$0.00001 (1000 µ¢)'."""
    dollars = f"{micro_cents / MICRO_CENTS_PER_DOLLAR:.8f}".rstrip("0").rstrip(".")
    return f"${dollars} ({micro_cents} µ¢)"
