"""Prices, the publisher/platform split, and who pays when a call fails. Pure."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from .jsonrpc import Outcome
from .model import Listing


def price_of(listing: Listing, tool_name: str) -> int:
    """µ¢ for one call: the tool's own rule, else the listing default; null or 0 is free."""
    price = listing.tool_prices.get(tool_name, listing.default_price)
    return max(price or 0, 0)


def split(amount: int, fee_rate_bps: int) -> tuple[int, int]:
    """(publisher payout, platform fee); the fee rounds down so the two always add up."""
    fee = amount * fee_rate_bps // 10_000
    return amount - fee, fee


def period(now: float | None = None) -> str:
    """The UTC calendar month a free tier and a spending cap count in: 'YYYY-MM'."""
    return time.strftime("%Y-%m", time.gmtime(time.time() if now is None else now))


class Failure(StrEnum):
    UPSTREAM = "upstream_failed"  # unreachable, or died before the final answer
    TIMEOUT = "upstream_timeout"
    CLIENT_GONE = "client_disconnected"
    INTERNAL = "internal_error"  # the gateway itself failed after the call was paid for
    CANCELLED = "cancelled"  # notifications/cancelled, or (2026-07-28) the POST stream closed before the answer
    NO_ANSWER_BY_TIMEOUT = "no_answer_by_timeout"  # a server-closed stream whose answer no resumption delivered
    UNEXPECTED_CONTENT_TYPE = "unexpected_content_type"  # a 2xx answer neither JSON nor SSE: clients reject it
    # on the call's event stream, before its answer, a message event the MCP Python SDK client cannot read:
    # it ends the call there (a parse error); the meter ends the stream there, an error in its place (stream_watch.py)
    UNREADABLE_EVENT = "unreadable_event"


@dataclass(frozen=True, slots=True)
class Decision:
    refund: bool
    reason: str


def decide(
    status: int | None,
    outcome: Outcome | None,
    failure: Failure | None,
    bill_tool_errors: bool,
    unread: bool = False,
) -> Decision:
    """Whether a forwarded priced call is paid for, per the SPEC refund table.

    The answer to the call decides when it was seen, whatever happened to the
    connections afterwards; without an answer, only a client that walked away pays.
    `unread`: the whole answer reached the client but the meter could not read it, only
    because it inflates past its decode limit; a 2xx is billed then (SPEC I5: a delivered
    answer is never refunded for its size), under a reason of its own for audits.
    """
    if outcome is Outcome.RPC_ERROR:
        return Decision(True, "rpc_error")
    answered_ok = status is None or status < 400  # a 4xx/5xx is refunded whatever its body says
    if outcome is Outcome.TOOL_ERROR and answered_ok:
        return Decision(not bill_tool_errors, "tool_error")
    if outcome is Outcome.RESULT and answered_ok:
        return Decision(False, "result")
    if failure is not None and failure is not Failure.CLIENT_GONE:
        return Decision(True, failure.value)
    if unread and status is not None and 200 <= status < 300:
        return Decision(False, "unread_delivered")
    if status is not None and status >= 500:
        return Decision(True, "upstream_5xx")
    if status is not None and status >= 400:
        return Decision(True, "upstream_4xx")
    if failure is Failure.CLIENT_GONE:
        return Decision(False, "client_disconnected")
    return Decision(True, "no_answer")
