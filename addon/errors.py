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
    ErrorSpec(400, "invalid_json", "The request body is not valid JSON-RPC JSON."),
    ErrorSpec(400, "invalid_request", "The request is not a JSON-RPC message this gateway can meter."),
    ErrorSpec(400, "batch_not_supported", "JSON-RPC batches that contain priced calls are not accepted; send one call per request."),
    ErrorSpec(400, "header_mismatch", "The Mcp-Method / Mcp-Name headers do not match the JSON-RPC body."),
    ErrorSpec(401, "invalid_token", "A valid bearer key is required: Authorization: Bearer mcpm_live_..."),
    ErrorSpec(402, "insufficient_credit", "Not enough credit for this call; top up your balance."),
    ErrorSpec(402, "project_cap_exceeded", "This call would exceed the project's monthly spending cap."),
    ErrorSpec(403, "account_suspended", "The account that owns this key is suspended."),
    ErrorSpec(403, "session_forbidden", "This MCP session belongs to another key."),
    ErrorSpec(404, "no_such_mcp", "No MCP server is listed under this slug."),
    ErrorSpec(404, "not_found", "Nothing is served here; call /<slug>."),
    ErrorSpec(405, "method_not_allowed", "This HTTP method is not allowed here; the Allow header lists those that are."),
    ErrorSpec(410, "mcp_archived", "This listing has been archived by its publisher."),
    ErrorSpec(413, "payload_too_large", "The request body is over the gateway's limit."),
    ErrorSpec(429, "rate_limited", "Too many calls; retry after the number of seconds in Retry-After."),
    ErrorSpec(500, "internal_error", "The gateway failed to meter this call; it was not forwarded and not billed."),
    ErrorSpec(502, "upstream_failed", "The MCP server could not be reached or failed before answering; the call was refunded."),
    ErrorSpec(503, "mcp_paused", "The publisher has paused this listing."),
    ErrorSpec(503, "mcp_not_yet_live", "This listing is not live yet."),
    ErrorSpec(503, "store_unavailable", "The billing database is unavailable; the call was not forwarded."),
    ErrorSpec(504, "upstream_timeout", "The MCP server did not answer in time; the call was refunded."),
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
