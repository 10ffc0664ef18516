"""addon.billing: prices, the payout/fee split, the free-tier month, and the SPEC refund table."""

from __future__ import annotations

import calendar

import pytest

from addon.billing import Decision, Failure, decide, period, price_of, split
from addon.jsonrpc import Outcome
from addon.model import ChargeResult, Consumer, Listing, Verdict


def listing(default_price: int | None = None, **tool_prices: int) -> Listing:
    return Listing(id=1, slug="x", status="live", upstream_url="http://u", default_price=default_price,
                   tool_prices=tool_prices)


# --- price_of ------------------------------------------------------------------------------------

@pytest.mark.parametrize("default, rules, tool, price", [
    (1000, {}, "search", 1000),  # listing default
    (1000, {"search": 5000}, "search", 5000),  # the tool's own rule wins
    (1000, {"search": 5000}, "other", 1000),
    (None, {"search": 5000}, "search", 5000),  # a rule without a default
    (None, {"search": 5000}, "other", 0),  # null default: free
    (0, {}, "search", 0),
    (None, {}, "search", 0),
    (1000, {"freebie": 0}, "freebie", 0),  # a rule of 0 makes the tool free despite the default
    (1000, {"freebie": 0}, "search", 1000),
    (1000, {"Search": 7}, "search", 1000),  # tool names are case-sensitive
    (-5, {}, "search", 0),  # a negative price never credits the consumer
    (1000, {"neg": -5}, "neg", 0),
])
def test_price_of(default: int | None, rules: dict[str, int], tool: str, price: int) -> None:
    assert price_of(listing(default, **rules), tool) == price


# --- split ----------------------------------------------------------------------------------------

AMOUNTS = [0, 1, 2, 3, 4, 5, 7, 9, 10, 11, 99, 101, 999, 1000, 1001, 4999, 5000, 12_345, 99_999,
           1_000_000, 1_234_567, 10**12 + 1]


@pytest.mark.parametrize("bps", [0, 1, 2000, 3333, 5000, 9999, 10_000])
@pytest.mark.parametrize("amount", AMOUNTS)
def test_split_always_adds_up(amount: int, bps: int) -> None:
    payout, fee = split(amount, bps)
    assert payout + fee == amount
    assert 0 <= fee <= amount and 0 <= payout <= amount
    assert fee == amount * bps // 10_000  # the fee rounds down, in the publisher's favour


@pytest.mark.parametrize("amount, bps, payout, fee", [
    (1000, 2000, 800, 200),
    (1001, 2000, 801, 200),
    (1004, 2000, 804, 200),
    (1005, 2000, 804, 201),
    (1, 2000, 1, 0),
    (4, 2000, 4, 0),
    (5, 2000, 4, 1),
    (999, 0, 999, 0),
    (999, 10_000, 0, 999),
    (3, 5000, 2, 1),
])
def test_split_examples(amount: int, bps: int, payout: int, fee: int) -> None:
    assert split(amount, bps) == (payout, fee)


# --- period ---------------------------------------------------------------------------------------

def ts(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: float = 0) -> float:
    return calendar.timegm((y, mo, d, h, mi, 0, 0, 0, 0)) + s


@pytest.mark.parametrize("now, month", [
    (ts(2025, 1, 31, 23, 59, 59.999), "2025-01"),
    (ts(2025, 2, 1), "2025-02"),  # the month starts at 00:00:00 UTC
    (ts(2025, 2, 28, 23, 59, 59), "2025-02"),
    (ts(2025, 3, 1), "2025-03"),
    (ts(2024, 2, 29, 12), "2024-02"),  # leap day
    (ts(2024, 12, 31, 23, 59, 59), "2024-12"),
    (ts(2025, 1, 1), "2025-01"),  # new year
    (0, "1970-01"),
    (ts(2099, 11, 30, 23, 59, 59), "2099-11"),
])
def test_period_is_the_utc_calendar_month(now: float, month: str) -> None:
    assert period(now) == month


def test_period_ignores_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: already March locally
    time.tzset()
    try:
        assert period(ts(2025, 2, 28, 12)) == "2025-02"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_period_defaults_to_now() -> None:
    import time

    before = time.strftime("%Y-%m", time.gmtime())
    assert period() in (before, time.strftime("%Y-%m", time.gmtime()))


# --- decide: the SPEC refund table ----------------------------------------------------------------

R, TE, RE = Outcome.RESULT, Outcome.TOOL_ERROR, Outcome.RPC_ERROR
UP, TO, GONE = Failure.UPSTREAM, Failure.TIMEOUT, Failure.CLIENT_GONE

REFUND_TABLE = [
    # (case, status, outcome, failure, bill_tool_errors, refunded, reason)
    ("success", 200, R, None, False, False, "result"),
    ("success, billed even when tool errors are billed", 200, R, None, True, False, "result"),
    ("upstream unreachable", None, None, UP, False, True, "upstream_failed"),
    ("upstream died after its headers", 200, None, UP, False, True, "upstream_failed"),
    ("upstream slower than the timeout", None, None, TO, False, True, "upstream_timeout"),
    ("timeout mid-stream", 200, None, TO, False, True, "upstream_timeout"),
    ("upstream 500", 500, None, None, False, True, "upstream_5xx"),
    ("upstream 502", 502, None, None, False, True, "upstream_5xx"),
    ("upstream 503 with a result body", 503, R, None, False, True, "upstream_5xx"),
    ("upstream 400", 400, None, None, False, True, "upstream_4xx"),
    ("upstream 404 (server/discover probe)", 404, None, None, False, True, "upstream_4xx"),
    ("upstream 429", 429, None, None, False, True, "upstream_4xx"),
    ("4xx with a result body", 400, R, None, False, True, "upstream_4xx"),
    ("JSON-RPC error", 200, RE, None, False, True, "rpc_error"),
    ("JSON-RPC error, tool errors billed", 200, RE, None, True, True, "rpc_error"),
    ("JSON-RPC error with 4xx", 400, RE, None, False, True, "rpc_error"),
    ("JSON-RPC error with 5xx", 500, RE, None, False, True, "rpc_error"),
    ("isError, default", 200, TE, None, False, True, "tool_error"),
    ("isError, listing bills tool errors", 200, TE, None, True, False, "tool_error"),
    ("isError in a 5xx, listing bills tool errors", 500, TE, None, True, True, "upstream_5xx"),
    ("isError in a 4xx, listing bills tool errors", 400, TE, None, True, True, "upstream_4xx"),
    ("client disconnected after forwarding", None, None, GONE, False, False, "client_disconnected"),
    ("client disconnected mid-stream", 200, None, GONE, False, False, "client_disconnected"),
    ("client disconnected after an error answer", 200, RE, GONE, False, True, "rpc_error"),
    ("client disconnected after an isError answer", 200, TE, GONE, False, True, "tool_error"),
    ("client disconnected after the result", 200, R, GONE, False, False, "result"),
    ("result, then the upstream died", 200, R, UP, False, False, "result"),
    ("result, then the deadline fired", 200, R, TO, False, False, "result"),
    ("result seen on a stream before any status", None, R, None, False, False, "result"),
    ("2xx with no matching answer", 200, None, None, False, True, "no_answer"),
    ("202 with no answer", 202, None, None, False, True, "no_answer"),
    ("nothing at all", None, None, None, False, True, "no_answer"),
]


@pytest.mark.parametrize("case, status, outcome, failure, bill_tool_errors, refunded, reason", REFUND_TABLE,
                         ids=[row[0] for row in REFUND_TABLE])
def test_refund_table(case: str, status: int | None, outcome: Outcome | None, failure: Failure | None,
                      bill_tool_errors: bool, refunded: bool, reason: str) -> None:
    assert decide(status, outcome, failure, bill_tool_errors) == Decision(refunded, reason)


UNREAD_TABLE = [
    # (case, status, outcome, failure, refunded, reason): the answer inflates past the meter's decode limit
    ("2xx too large to read", 200, None, None, False, "unread_delivered"),
    ("202 too large to read", 202, None, None, False, "unread_delivered"),
    ("the answer was seen before the limit", 200, R, None, False, "result"),
    ("a JSON-RPC error seen before the limit", 200, RE, None, True, "rpc_error"),
    ("5xx too large to read", 500, None, None, True, "upstream_5xx"),
    ("4xx too large to read", 404, None, None, True, "upstream_4xx"),
    ("3xx too large to read", 302, None, None, True, "no_answer"),
    ("the upstream died mid-answer", 200, None, UP, True, "upstream_failed"),
    ("the deadline cut the answer", 200, None, TO, True, "upstream_timeout"),
    ("the client left after the answer", 200, None, GONE, False, "unread_delivered"),
]


@pytest.mark.parametrize("case, status, outcome, failure, refunded, reason", UNREAD_TABLE,
                         ids=[row[0] for row in UNREAD_TABLE])
def test_an_answer_too_large_to_read_is_delivered(case: str, status: int | None, outcome: Outcome | None,
                                                  failure: Failure | None, refunded: bool, reason: str) -> None:
    """SPEC I5: a call whose answer reached the client is never refunded for the answer's size."""
    assert decide(status, outcome, failure, False, unread=True) == Decision(refunded, reason)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299, 301, 304, 399])
def test_a_result_below_400_is_billed(status: int) -> None:
    assert decide(status, R, None, False).refund is False


@pytest.mark.parametrize("status", range(400, 600, 7))
def test_no_error_status_is_billed_without_a_tool_error_opt_in(status: int) -> None:
    for outcome in (None, R, TE, RE):
        assert decide(status, outcome, None, False).refund is True


# --- model value objects --------------------------------------------------------------------------

@pytest.mark.parametrize("verdict, accepted", [
    (Verdict.FREE, True), (Verdict.DEBITED, True), (Verdict.UNPRICED, True),
    (Verdict.INSUFFICIENT_CREDIT, False), (Verdict.PROJECT_CAP_EXCEEDED, False),
])
def test_charge_result_accepted(verdict: Verdict, accepted: bool) -> None:
    assert ChargeResult(verdict, 0, 0).accepted is accepted


def test_consumer_principal_distinguishes_keys_from_tokens() -> None:
    assert Consumer(user_id=1, project_id=1, status="active", key_id=7).principal == "k7"
    assert Consumer(user_id=1, project_id=1, status="active", token_id=7, env="oauth").principal == "t7"
