"""Every error the gateway itself answers: one table of status, code and message.

Clients branch on the `error` code, people read the `message`; both are stable API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    code: str
    message: str


_TABLE = [
    ErrorSpec(400, "invalid_slug", "The path must be /<slug> with a slug of lowercase letters, digits and dashes."),
    ErrorSpec(400, "invalid_path", "The path or query may not be forwarded (dot segment, encoded slash, empty segment, control character or malformed escape)."),
    ErrorSpec(400, "invalid_json", "The request body is not valid JSON-RPC JSON."),
    ErrorSpec(400, "invalid_request", "The request is not a JSON-RPC message this gateway can meter."),
    ErrorSpec(400, "batch_not_supported", "JSON-RPC batches that contain priced calls are not accepted; send one call per request."),
    ErrorSpec(400, "header_mismatch", "The Mcp-Method / Mcp-Name headers do not match the JSON-RPC body."),
    ErrorSpec(401, "invalid_token", "A valid bearer key is required: Authorization: Bearer mcpm_live_..."),
    ErrorSpec(402, "insufficient_credit", "Not enough credit for this call; top up your balance."),
    ErrorSpec(402, "project_cap_exceeded", "This call would exceed the project's monthly spending cap."),
    ErrorSpec(403, "account_suspended", "The account that owns this key is suspended."),
    ErrorSpec(403, "origin_forbidden", "Requests from this browser origin are not accepted; see allowed_origins."),
    ErrorSpec(403, "session_forbidden", "This MCP session belongs to another key."),
    ErrorSpec(403, "task_forbidden", "This task was created, and is paid for, by another user."),
    ErrorSpec(404, "no_such_mcp", "No MCP server is listed under this slug."),
    ErrorSpec(404, "not_found", "Nothing is served here; call /<slug>."),
    ErrorSpec(405, "method_not_allowed", "This HTTP method is not allowed here; the Allow header lists those that are."),
    ErrorSpec(410, "mcp_archived", "This listing has been archived by its publisher."),
    ErrorSpec(410, "task_expired", "This task was refunded (its end was not seen within task_settle_seconds, or its tasks/result was answered with an error); its result is not served through the gateway."),
    ErrorSpec(413, "payload_too_large", "The request body is over the gateway's limit."),
    ErrorSpec(429, "rate_limited", "Too many calls; retry after the number of seconds in Retry-After."),
    ErrorSpec(400, "proxy_error", "The gateway's HTTP layer could not read or complete this request (the status says which)."),
    ErrorSpec(500, "internal_error", "The gateway failed to meter this call; it was not forwarded and not billed."),
    ErrorSpec(502, "upstream_failed", "The MCP server could not be reached or failed before answering; the call was refunded."),
    ErrorSpec(502, "upstream_unreadable", "The MCP server sent, before its answer, a message MCP clients cannot read; the call was refunded and its stream ended."),
    ErrorSpec(503, "mcp_paused", "The publisher has paused this listing."),
    ErrorSpec(503, "mcp_not_yet_live", "This listing is not live yet."),
    ErrorSpec(503, "store_unavailable", "The billing database is unavailable; the call was not forwarded."),
    ErrorSpec(503, "gateway_busy", "The gateway is reading too many request bodies at once; retry after "
              "Retry-After seconds. Nothing was forwarded or charged."),
    ErrorSpec(503, "gateway_stopping", "This gateway is stopping; the call was not forwarded. Retry shortly."),
    ErrorSpec(503, "meter_unavailable", "The meter is not loaded (a failed reload?); nothing is forwarded until it is back."),
    ErrorSpec(504, "upstream_timeout", "The MCP server did not answer in time; the call was refunded."),
]

_TABLE += [  # the circuit breaker (addon/circuits.py)
    ErrorSpec(503, "upstream_unavailable", "This MCP server is failing, so calls to it are paused for a short "
              "cool-down; this call was not forwarded and not charged."),
]
_TABLE += [  # GET /metrics (addon/metrics.py)
    ErrorSpec(401, "metrics_unauthorized", "GET /metrics needs Authorization: Bearer <metrics_token>."),
    ErrorSpec(403, "metrics_forbidden", "This bearer token is not the configured metrics_token."),
]

_TABLE += [  # Idempotency-Key (addon/idempotency.py)
    ErrorSpec(400, "invalid_idempotency_key", "The Idempotency-Key header must be 1-255 printable ASCII characters, sent once."),
    ErrorSpec(409, "idempotency_in_flight", "A call with this Idempotency-Key is still running; retry after "
              "Retry-After seconds to get its answer. This request was not forwarded and not charged."),
    ErrorSpec(422, "idempotency_key_reused", "This Idempotency-Key was used for a different request body; "
              "use a new key for a new call. This request was not forwarded and not charged."),
    ErrorSpec(410, "idempotency_answer_lost", "The call with this Idempotency-Key ran and was billed, but its "
              "client closed the connection before the answer, which was not kept. This request was not "
              "forwarded and not charged; use a new key to call again."),
]

ERRORS: dict[str, ErrorSpec] = {e.code: e for e in _TABLE}


class GatewayError(Exception):
    """A refusal decided by the gateway: becomes a JSON error response."""

    def __init__(self, code: str, headers: dict[str, str] | None = None, **details: Any) -> None:
        super().__init__(code)
        self.spec = ERRORS[code]
        self.headers = headers or {}
        self.details = details

    @property
    def status(self) -> int:
        return self.spec.status

    def body(self) -> bytes:
        return error_body(self.spec.code, **self.details)


def error_body(code: str, **details: Any) -> bytes:
    spec = ERRORS[code]
    return json.dumps({"error": spec.code, "message": spec.message, **details}).encode()


# --- JSON-RPC error codes: how a refusal reads to an MCP client (see addon/rpc_errors.py) -----
#
# A refusal of a request that carries a JSON-RPC id is a JSON-RPC error with one of these codes,
# chosen by the HTTP status so a code added to the table above gets one without an edit here.
# The MCP spec reserves -32020..-32099 for its own codes and retired -32002 and -32042; the SDKs
# use -32000 (connection closed) and -32001 (request timeout). The gateway's codes are therefore
# in the remaining implementation-defined band -32003..-32019, plus the standard JSON-RPC codes
# (and the spec's -32020 header mismatch) where those say exactly what happened.
RPC_CODES: dict[int, int] = {
    400: -32600,  # Invalid Request (standard)
    401: -32003,  # authentication required
    402: -32004,  # payment required: credit or spending cap
    403: -32005,  # forbidden
    404: -32006,  # no such MCP server
    405: -32007,  # HTTP method not allowed
    410: -32008,  # listing archived
    409: -32014,  # conflict: the same Idempotency-Key is still in flight
    413: -32009,  # request too large
    422: -32015,  # unprocessable: an Idempotency-Key reused for another body
    429: -32010,  # rate limited
    500: -32603,  # Internal error (standard)
    502: -32011,  # the upstream MCP server failed
    503: -32012,  # temporarily unavailable: retry later
    504: -32013,  # the upstream MCP server timed out
}
RPC_CODE_OVERRIDES: dict[str, int] = {
    "invalid_json": -32700,  # Parse error (standard)
    "header_mismatch": -32020,  # the MCP spec's HEADER_MISMATCH
    "task_expired": -32016,  # a task refunded at its limit: its result is not delivered afterwards
    "idempotency_answer_lost": -32017,  # the keyed call ran and was billed, its answer lost with its client
}


def rpc_code(code: str) -> int:
    """The JSON-RPC error code for a gateway error code."""
    if code in RPC_CODE_OVERRIDES:
        return RPC_CODE_OVERRIDES[code]
    status = ERRORS[code].status
    return RPC_CODES.get(status, -32600 if status < 500 else -32603)
