"""A charge or a settlement in ONE network round trip to MySQL / MariaDB, COMMIT included.

The Ledger (sql.py) sends a statement, reads its answer and decides the next one in Python:
about nine statements and a COMMIT per paid call, each a round trip with pymysql's packet work
on a worker thread. Here the same statements go as one multi-statement text (the connection
has CLIENT.MULTI_STATEMENTS) and the decisions are made in SQL with session user variables:
ROW_COUNT() says whether a conditional write matched (the connection reports rows matched,
CLIENT.FOUND_ROWS), and every later write is an INSERT ... SELECT ... WHERE @flag or an UPDATE
whose key is IF(@flag, key, NULL) (no row read, so no lock taken, when the flag is off). The
text ends with a SELECT of the outcome and COMMIT.

Money semantics are the Ledger's, statement for statement and in the same lock order (usage
row, users, spend for a charge; journal, users, spend or usage row for a settlement), with one
change of form: a refusal is undone in SQL instead of rolled back, so COMMIT always ends the
text. Short of credit, the debit matched nothing and nothing is written. Over the project cap
(checked, as in the Ledger, after the debit and the spend upsert, under their exclusive locks),
the same text puts the credit back and the spend row back as it was (deleted if this call made
it): the tables end exactly as before. (Testing the cap inside the debit's WHERE instead reads
the spend row under a shared lock that the upsert must then upgrade: two users charging one
project deadlock on it, measured, where the Ledger's order never does.)

A server error stops a multi-statement text at the failing statement: COMMIT is never reached
and the adapter rolls back (and runs a deadlock victim again, as for any transaction). Running
a text again after the connection broke is safe even if the first COMMIT did land: a charge's
journal INSERT (keyed by request id) then fails and the run is rolled back, a settlement's flip
matches nothing. All values go through pymysql's escaping (execute with named arguments).
"""

from __future__ import annotations

from typing import Any

from ..billing import split
from ..model import MICRO_CENTS_PER_CENT, ChargeRequest, ChargeResult, Settlement, Verdict
from .sql import MYSQL, LastUsed, utc

_JOURNAL_INSERT = (
    "INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
    " amount_micro_cents, period_year_month, created_at)")
_LEDGER_INSERT = (
    "INSERT INTO credit_transactions (user_id, amount_micro_cents, type, reference_type,"
    " balance_after_micro_cents, description, request_id, created_at, updated_at)")
_SPEND = MYSQL.upsert(
    "INSERT INTO mcpmeter_project_spend (project_id, period_year_month, spent_micro_cents)"
    " SELECT %(project)s, %(period)s, {amount} FROM DUAL WHERE {flag}",
    "project_id, period_year_month", [("spent_micro_cents", "spent_micro_cents + NEW(spent_micro_cents)")])
_BALANCE = "(SELECT credit_micro_cents FROM users WHERE id = %(user)s)"

# The charge, price > 0, as few statements as the decisions allow (each costs the server a parse).
# @mcpm_free: a free-tier slot was claimed; @mcpm_debited: the debit matched; @mcpm_over: and then
# the project went over its cap, so the debit and the spend are put back. (Each SET assigns from
# values of earlier statements only: the order of assignments within one SET is not relied on.)
_CLAIM_FREE = (
    "INSERT IGNORE INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month,"
    " billable_calls, first_called_at, created_at, updated_at)"
    " VALUES (%(listing)s, %(user)s, 0, %(period)s, 0, %(now)s, %(now)s, %(now)s);"
    "UPDATE mcp_consumer_usage SET"
    " billable_calls = CASE WHEN period_year_month = %(period)s THEN billable_calls ELSE 0 END,"
    " free_calls_used = CASE WHEN period_year_month = %(period)s THEN free_calls_used ELSE 0 END + 1,"
    " period_year_month = %(period)s, last_called_at = %(now)s, updated_at = %(now)s"
    " WHERE mcp_id = %(listing)s AND user_id = %(user)s"
    " AND (period_year_month IS NULL OR period_year_month <> %(period)s OR free_calls_used < %(allowance)s);"
    "SET @mcpm_free := ROW_COUNT();")
_DEBIT = (
    "UPDATE users SET credit_micro_cents = credit_micro_cents - %(price)s"
    " WHERE id = {debit_user} AND credit_micro_cents >= %(price)s;"
    # ROW_COUNT() is the previous statement's: the debit's here, then the spend upsert's (0: no
    # debit, 1: it made the month's spend row, 2: it updated the row).
    + _SPEND.format(amount="%(price)s", flag="ROW_COUNT() = 1") + ";"
    "SET @mcpm_debited := ROW_COUNT() > 0, @mcpm_new_spend := ROW_COUNT() = 1,"
    " @mcpm_over := ROW_COUNT() > 0 AND EXISTS (SELECT 1 FROM projects p"
    " JOIN mcpmeter_project_spend s ON s.project_id = p.id AND s.period_year_month = %(period)s"
    " WHERE p.id = %(project)s AND p.spending_cap_cents_per_month IS NOT NULL"
    f" AND s.spent_micro_cents > p.spending_cap_cents_per_month * {MICRO_CENTS_PER_CENT});"
    # Over the cap: put both rows back as they were, under the locks just taken (no-ops otherwise:
    # a NULL key reads no row).
    "UPDATE users u JOIN mcpmeter_project_spend s ON s.project_id = %(project)s AND s.period_year_month = %(period)s"
    " SET u.credit_micro_cents = u.credit_micro_cents + %(price)s,"
    " s.spent_micro_cents = s.spent_micro_cents - %(price)s"
    " WHERE u.id = IF(@mcpm_over, %(user)s, NULL);"
    "DELETE FROM mcpmeter_project_spend"
    " WHERE project_id = IF(@mcpm_over AND @mcpm_new_spend, %(project)s, NULL) AND period_year_month = %(period)s;"
    + _LEDGER_INSERT
    + " SELECT id, -%(price)s, 'usage', 'mcpmeter_call', credit_micro_cents, %(description)s, %(request)s,"
    " %(now)s, %(now)s FROM users WHERE id = IF({kept}, %(user)s, NULL);"
    + _JOURNAL_INSERT
    + " SELECT %(request)s, %(user)s, %(project)s, %(listing)s, %(tool)s, IF({kept}, %(debited)s, %(free)s),"
    " IF({kept}, %(price)s, 0), %(period)s, %(now)s FROM DUAL WHERE {free} OR {kept};"
    # A failed debit was short of credit, unless the cap undid it (credit is tested first, as in the Ledger).
    "SELECT CASE WHEN {free} THEN %(free)s WHEN {kept} THEN %(debited)s"
    " WHEN @mcpm_over THEN %(capped)s ELSE %(short)s END, COALESCE(" + _BALANCE + ", 0);"
    "COMMIT")
_KEPT = "(@mcpm_debited AND NOT @mcpm_over)"  # the debit stands
_PAID = _DEBIT.format(debit_user="%(user)s", free="FALSE", kept=_KEPT)
_FREE_OR_PAID = _CLAIM_FREE + _DEBIT.format(debit_user="IF(@mcpm_free = 0, %(user)s, NULL)", free="@mcpm_free = 1",
                                             kept=_KEPT)
_UNPRICED = (
    _JOURNAL_INSERT + " VALUES (%(request)s, %(user)s, %(project)s, %(listing)s, %(tool)s, %(unpriced)s, 0,"
    " %(period)s, %(now)s);"
    f"SELECT {_BALANCE};"
    "COMMIT")


def charge(conn: Any, req: ChargeRequest) -> ChargeResult:
    """Ledger.charge in one round trip; the transaction is committed (a refusal wrote nothing)."""
    now = utc()
    args: dict[str, Any] = {
        "request": req.request_id, "user": req.user_id, "project": req.project_id, "listing": req.listing_id,
        "tool": req.tool_name[:191], "price": req.price, "period": req.period, "now": now,
        "allowance": req.free_allowance, "free": Verdict.FREE.value, "debited": Verdict.DEBITED.value,
        "capped": Verdict.PROJECT_CAP_EXCEEDED.value, "short": Verdict.INSUFFICIENT_CREDIT.value,
        "unpriced": Verdict.UNPRICED.value,
        "description": f"{req.tool_name} on mcp {req.listing_id}"[:255],
    }
    if req.price <= 0:
        _, row = _run(conn, _UNPRICED, args)
        return ChargeResult(Verdict.UNPRICED, 0, int(row[0] or 0) if row else 0)
    _, row = _run(conn, _FREE_OR_PAID if req.free_allowance > 0 else _PAID, args)
    if row is None:
        raise RuntimeError("mysql: the charge's text returned no outcome")
    verdict = Verdict(row[0] if isinstance(row[0], str) else bytes(row[0]).decode())
    balance = row[1]
    return ChargeResult(verdict, req.price if verdict is Verdict.DEBITED else 0, int(balance))


def settle(conn: Any, s: Settlement, last_used: LastUsed) -> tuple[bool, int | None]:
    """Ledger.settle in one round trip, trusting `s.taken` (what the charge reported).

    Returns (settled, balance). settled is False when the journal row was not the unsettled one
    `s.taken` describes (settled before, unknown, or taken disagrees): then nothing was written and
    the caller runs Ledger.settle, which reads what was really taken. Needs `s.taken`."""
    req, taken, now = s.charge, s.taken, utc()
    assert taken is not None
    reason = s.reason[:32] if s.reason else None
    billed = 0 if s.refund else taken.amount
    payout, fee = split(billed, s.fee_bps)
    args: dict[str, Any] = {
        "request": req.request_id, "user": req.user_id, "project": req.project_id, "listing": req.listing_id,
        "period": req.period, "now": now, "refunded": int(s.refund), "status": s.status, "reason": reason,
        "verdict": taken.verdict.value, "amount": taken.amount, "billed": billed, "payout": payout, "fee": fee,
        "key": s.key_id, "token": s.token_id, "client": s.client,
        "agent": (s.user_agent or None) and s.user_agent[:255], "tool": req.tool_name[:191],
        "called_at": utc(s.called_at), "duration": max(s.duration_ms, 0),
        "description": (f"refund: {req.tool_name} on mcp {req.listing_id}"
                        + (f" ({reason})" if reason else ""))[:255],
    }
    # A billed call's statements test the flip through a chain of ROW_COUNT()s (each the previous
    # statement's: the flip matched 1, the counter upsert wrote 1 or 2); other paths keep it in @mcpm_flip.
    stamp = ((s.key_id is not None and last_used.due("api_keys", s.key_id) and "api_keys")
             or (s.token_id is not None and last_used.due("oauth_access_tokens", s.token_id) and "oauth_access_tokens"))
    chain = not s.refund and not stamp
    parts = [
        "UPDATE mcpmeter_calls SET settled_at = %(now)s, refunded = %(refunded)s, status = %(status)s,"
        " reason = %(reason)s WHERE request_id = %(request)s AND settled_at IS NULL"
        " AND verdict = %(verdict)s AND amount_micro_cents = %(amount)s",
    ]
    if not chain:
        parts.append("SET @mcpm_flip := ROW_COUNT()")
    flip = "ROW_COUNT() = 1" if chain else "@mcpm_flip = 1"
    if s.refund and taken.verdict is Verdict.DEBITED and taken.amount > 0:
        parts += [
            "UPDATE users SET credit_micro_cents = credit_micro_cents + %(amount)s"
            " WHERE id = IF(@mcpm_flip = 1, %(user)s, NULL)",
            _LEDGER_INSERT + f" SELECT %(user)s, %(amount)s, 'refund', 'mcpmeter_call', COALESCE({_BALANCE}, 0),"
            " %(description)s, %(request)s, %(now)s, %(now)s FROM DUAL WHERE @mcpm_flip = 1",
            _SPEND.format(amount="-%(amount)s", flag="@mcpm_flip = 1"),
        ]
    elif s.refund and taken.verdict is Verdict.FREE:
        parts.append(
            "UPDATE mcp_consumer_usage SET free_calls_used = free_calls_used - 1, updated_at = %(now)s"
            " WHERE mcp_id = IF(@mcpm_flip = 1, %(listing)s, NULL) AND user_id = %(user)s"
            " AND period_year_month = %(period)s AND free_calls_used > 0")
    if billed > 0:
        this_month = "period_year_month = NEW(period_year_month)"
        parts.append(MYSQL.upsert(
            "INSERT INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month, billable_calls,"
            " first_called_at, last_called_at, created_at, updated_at)"
            " SELECT %(listing)s, %(user)s, 0, %(period)s, 1, %(now)s, %(now)s, %(now)s, %(now)s"
            " FROM DUAL WHERE " + flip,
            "mcp_id, user_id",
            [("billable_calls", f"CASE WHEN {this_month} THEN billable_calls ELSE 0 END + 1"),
             ("free_calls_used", f"CASE WHEN {this_month} THEN free_calls_used ELSE 0 END"),
             ("period_year_month", "NEW(period_year_month)"),
             ("last_called_at", "NEW(last_called_at)"), ("updated_at", "NEW(updated_at)")]))
        flip = "ROW_COUNT() > 0" if chain else flip
    parts.append(
        "INSERT IGNORE INTO usage_events (project_id, mcp_id, api_key_id, tool_name, client, user_agent,"
        " called_at, duration_ms, status, billed_micro_cents, publisher_payout_micro_cents,"
        " platform_fee_micro_cents, request_id, created_at, updated_at)"
        " SELECT %(project)s, %(listing)s, %(key)s, %(tool)s, %(client)s, %(agent)s, %(called_at)s, %(duration)s,"
        " %(status)s, %(billed)s, %(payout)s, %(fee)s, %(request)s, %(now)s, %(now)s FROM DUAL WHERE " + flip)
    # last_used_at is informational (once a minute): stamped here even if this text ends up not settling.
    if stamp:
        parts.append(f"UPDATE {stamp} SET last_used_at = %(now)s"
                     f" WHERE id = IF(@mcpm_flip = 1, {'%(key)s' if stamp == 'api_keys' else '%(token)s'}, NULL)")
    if s.need_balance:
        parts.append(f"SELECT {_BALANCE}")
    flipped, row = _run(conn, ";".join(parts + ["COMMIT"]), args)
    if flipped != 1:
        return False, None  # every write above was conditional on the flip: nothing was written
    return True, (int(row[0] or 0) if row else None)


def _run(conn: Any, text: str, args: dict[str, Any]) -> tuple[int, tuple[Any, ...] | None]:
    """Send the text and read every result (errors surface here): the first statement's row count
    (rows matched) and the row the text SELECTs, if any."""
    cur = conn.cursor()
    cur.execute(text, args)
    first, row = cur.rowcount, None
    while True:
        if cur.description is not None:
            row = cur.fetchone()
        if not cur.nextset():
            break
    return first, (tuple(row) if row is not None else None)
