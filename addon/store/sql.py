"""The ledger's transactions, written once for every SQL adapter.

Each method runs on a DB-API connection inside one transaction the adapter opened, on
the adapter's own thread, never on mitmproxy's event loop. Statements use `%s`
placeholders; a Dialect rewrites what differs between MySQL and SQLite.

Money rules kept here (SPEC I1-I4):
- a balance changes only together with its credit_transactions row, in one transaction;
- debits are conditional (`credit >= price`), free-tier claims and cap checks too, so no
  interleaving of gateways can overspend;
- every priced call has a row in `mcpmeter_calls` (keyed by request id) written with its
  debit; settlement flips it once, so a refund can never be paid twice.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..auth import Credential
from ..billing import period as this_month, split
from ..forwarding import header_problem
from ..model import (
    MAX_MICRO_CENTS,
    MICRO_CENTS_PER_CENT,
    CallRecord,
    ChargeRequest,
    ChargeResult,
    Consumer,
    ConsumerStatus,
    Listing,
    ListingStatus,
    Settlement,
    Transport,
    Verdict,
)
from .base import CreditLimit, StoreUnavailable, UnknownUser
from ..preview import Preview, decide as preview_decision
from .group_commit import GroupCommit

# The reason a call is settled with when its gateway stopped before settling it (see settle_stale).
SWEPT = "swept"
# Marks (the `reason` of an unsettled journal row) of calls held open until a later message settles
# them (addon/deferred.py): the plain sweep leaves them to their own limits.
HELD = ("task_pending", "input_pending")


@dataclass(frozen=True, slots=True)
class Dialect:
    placeholder: str  # '%s' for pymysql, '?' for sqlite3
    insert_ignore: str  # 'INSERT IGNORE' | 'INSERT OR IGNORE'

    on_duplicate: str  # how an upsert starts its UPDATE part; {key} names the unique key's columns
    new_value: str  # how that UPDATE part names the value the INSERT proposed; {col} is the column
    # The database's UTC time, where gateways share the database (MySQL): their own clocks may be
    # skewed, and a gateway ahead would sweep, i.e. refund, calls another is still running. None where
    # one process owns the database (SQLite): its own clock is the only one.
    clock: str | None = None

    def sql(self, statement: str) -> str:
        statement = statement.replace("INSERT IGNORE", self.insert_ignore)
        return statement if self.placeholder == "%s" else statement.replace("%s", self.placeholder)

    def upsert(self, insert: str, key: str, updates: list[tuple[str, str]]) -> str:
        """INSERT ... or, when `key` exists, UPDATE; `updates` expressions say NEW(col) for the proposed value.

        Assignments are applied in order (MySQL evaluates them left to right): assign a column only
        after the expressions that read its old value.
        """
        sets = ", ".join(f"{col} = {expr}" for col, expr in updates)
        return f"{insert} {self.on_duplicate.format(key=key)} " + re.sub(
            r"NEW\((\w+)\)", lambda m: self.new_value.format(col=m.group(1)), sets)

    def ago(self, seconds: float) -> tuple[str, Any]:
        """A placeholder (or an expression with one) and its value: the time `seconds` ago, by the
        database's clock where it has one for us, else by this process's."""
        if self.clock is None:
            return "%s", utc(time.time() - seconds)
        # Whole seconds, rounded up (the columns hold whole seconds): never earlier than asked.
        return f"{self.clock} - INTERVAL %s SECOND", math.ceil(seconds)


T = TypeVar("T")
log = logging.getLogger("mcpmeter")

# UTC_TIMESTAMP(), not NOW(): UTC whatever the session's time_zone (ours is '+00:00', mysql_conn.py,
# so the TIMESTAMP columns read and write UTC too).
MYSQL = Dialect("%s", "INSERT IGNORE", "ON DUPLICATE KEY UPDATE", "VALUES({col})", "UTC_TIMESTAMP()")
SQLITE = Dialect("?", "INSERT OR IGNORE", "ON CONFLICT ({key}) DO UPDATE SET", "excluded.{col}")


def utc(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() if ts is None else ts))


def _epoch(value: Any) -> float | None:
    """A TIMESTAMP column as unix seconds (pymysql gives datetime, sqlite3 gives str)."""
    if value is None:
        return None
    if isinstance(value, str):
        return float(calendar.timegm(time.strptime(value[:19], "%Y-%m-%d %H:%M:%S")))
    return float(calendar.timegm(value.timetuple()))


# The upsert's updates counting NEW(billable_calls) billed calls of NEW(period_year_month) in a consumer's
# usage row, which holds one month: a later month starts it again; an earlier month's call settled late
# (its answer came after midnight) leaves the row alone, so the new month's free calls are never reset.
COUNT_BILLABLE = [
    ("billable_calls", "CASE WHEN period_year_month = NEW(period_year_month) THEN billable_calls + NEW(billable_calls)"
                       " WHEN period_year_month > NEW(period_year_month) THEN billable_calls"
                       " ELSE NEW(billable_calls) END"),
    ("free_calls_used", "CASE WHEN period_year_month >= NEW(period_year_month) THEN free_calls_used ELSE 0 END"),
    ("period_year_month", "CASE WHEN period_year_month > NEW(period_year_month) THEN period_year_month"
                          " ELSE NEW(period_year_month) END"),
    ("last_called_at", "NEW(last_called_at)"), ("updated_at", "NEW(updated_at)"),
]


# One usage_events row per settled priced call, billed what was kept (SPEC step 8).
USAGE_EVENTS_INSERT = (
    "INSERT IGNORE INTO usage_events (project_id, mcp_id, api_key_id, tool_name, client, user_agent,"
    " called_at, duration_ms, status, billed_micro_cents, publisher_payout_micro_cents,"
    " platform_fee_micro_cents, request_id, created_at, updated_at)")
USAGE_EVENT_VALUES = "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


def storable(text: str) -> str:
    """`text` as UTF-8 can hold it. mitmproxy decodes header bytes that are not UTF-8 with
    surrogateescape: a User-Agent holding 0xff reaches a settlement as '\\udcff', which sqlite3 refuses
    to bind (UnicodeEncodeError). Such bytes become U+FFFD, so the settlement of a delivered
    call is written (billed) instead of failing and being left to the sweeper's refund."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make
        return text.encode("utf-8", "replace").decode("utf-8")


def usage_event(s: Settlement, billed: int, now: str) -> tuple[Any, ...]:
    """The values of a settled call's usage_events row, in USAGE_EVENTS_INSERT's order."""
    req = s.charge
    payout, fee = split(billed, s.fee_bps)
    return (req.project_id, req.listing_id, s.key_id, storable(req.tool_name)[:191], s.client,
            (s.user_agent or None) and storable(s.user_agent)[:255], utc(s.called_at), max(s.duration_ms, 0),
            s.status, billed, payout, fee, req.request_id, now, now)


class LastUsed:
    """When a store last wrote a key's last_used_at: informational, so once a minute is enough."""

    PRECISION = 60.0  # seconds

    def __init__(self) -> None:
        self._stamped: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()  # the MySQL store's worker threads share one

    def due(self, table: str, row_id: int) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._stamped.get((table, row_id), float("-inf")) < self.PRECISION:
                return False
            if len(self._stamped) > 100_000:
                self._stamped.clear()
            self._stamped[(table, row_id)] = now
            return True


class Ledger:
    """SQL for one connection; the caller owns transactions (begin/commit/rollback)."""

    def __init__(self, conn: Any, dialect: Dialect, last_used: LastUsed | None = None) -> None:
        self.conn = conn
        self.d = dialect
        self.last_used = last_used or LastUsed()

    def _q(self, statement: str, args: Sequence[Any] = ()) -> Any:
        cur = self.conn.cursor()
        cur.execute(self.d.sql(statement), tuple(args))
        return cur

    def _one(self, statement: str, args: Sequence[Any] = ()) -> Any:
        return self._q(statement, args).fetchone()

    # --- reads -------------------------------------------------------------------------

    def find_consumer(self, cred: Credential) -> Consumer | None:
        if cred.kind == "oauth":
            row = self._one(
                "SELECT t.id, t.user_id, u.status, t.expires_at FROM oauth_access_tokens t"
                " JOIN users u ON u.id = t.user_id"
                " WHERE t.token_hash = %s AND t.revoked_at IS NULL AND t.expires_at > %s",
                (cred.hash, utc()),
            )
            if row is None:
                return None
            token_id, user_id, status, expires_at = row
            # OAuth tokens act for the user's oldest project, as in the reference v0.2.
            project = self._one("SELECT id FROM projects WHERE user_id = %s ORDER BY id LIMIT 1", (user_id,))
            if project is None:
                return None
            return Consumer(user_id=int(user_id), project_id=int(project[0]), status=ConsumerStatus(str(status)),
                            token_id=int(token_id), env="oauth", expires_at=_epoch(expires_at))
        row = self._one(
            "SELECT k.id, k.user_id, k.project_id, k.env, u.status FROM api_keys k"
            " JOIN users u ON u.id = k.user_id WHERE k.key_hash = %s AND k.revoked_at IS NULL",
            (cred.hash,),
        )
        if row is None:
            return None
        key_id, user_id, project_id, env, status = row
        return Consumer(user_id=int(user_id), project_id=int(project_id), status=ConsumerStatus(str(status)),
                        key_id=int(key_id), env=str(env))

    def find_listing(self, slug: str) -> Listing | None:
        row = self._one(
            "SELECT id, slug, status, upstream_url, transport, upstream_headers, free_calls_per_consumer,"
            " rate_limit_per_minute, rate_limit_per_day, upstream_timeout_seconds, bill_tool_errors"
            " FROM mcps WHERE slug = %s",
            (slug,),
        )
        if row is None:
            return None
        (mcp_id, slug, status, url, transport, headers, free, rpm, rpd, timeout, bill_errors) = row
        default_price: int | None = None
        tool_prices: dict[str, int] = {}
        for tool, price, model in self._q(
            "SELECT tool_name, price_micro_cents, model FROM pricing_rules WHERE mcp_id = %s", (mcp_id,)
        ).fetchall():
            value = 0 if model == "free" else int(price)
            if tool is None:
                default_price = value
            else:
                tool_prices[str(tool)] = value
        return Listing(
            id=int(mcp_id), slug=str(slug), status=ListingStatus(str(status)), upstream_url=url or None,
            transport=Transport(str(transport)), upstream_headers=parse_upstream_headers(headers),
            free_calls_per_consumer=int(free or 0),
            rate_limit_per_minute=int(rpm) if rpm else None,
            rate_limit_per_day=int(rpd) if rpd else None,
            upstream_timeout_seconds=int(timeout) if timeout else None,
            default_price=default_price, tool_prices=tool_prices, bill_tool_errors=bool(bill_errors),
        )

    def balance(self, user_id: int) -> int:
        row = self._one("SELECT credit_micro_cents FROM users WHERE id = %s", (user_id,))
        return int(row[0]) if row else 0

    def free_calls_used(self, listing_id: int, user_id: int, period: str) -> int:
        row = self._one("SELECT free_calls_used FROM mcp_consumer_usage"
                        " WHERE mcp_id = %s AND user_id = %s AND period_year_month = %s", (listing_id, user_id, period))
        return int(row[0]) if row else 0

    def user_exists(self, user_id: int) -> bool:
        return self._one("SELECT id FROM users WHERE id = %s", (user_id,)) is not None

    def with_period(self, req: ChargeRequest) -> ChargeRequest:
        """`req` with its month: the one it names, else this month by the database's clock where it
        has one for us (see Dialect.clock), else by this process's."""
        if req.period is not None:
            return req
        if self.d.clock is None:
            return req.in_period(this_month())
        return req.in_period(str(self._one(f"SELECT DATE_FORMAT({self.d.clock}, '%%Y-%%m')")[0]))

    def preview(self, req: ChargeRequest) -> Preview:
        """What `charge` would decide now, read without writing anything."""
        req = self.with_period(req)
        free_used = self.free_calls_used(req.listing_id, req.user_id, req.month)
        cap = self._one("SELECT spending_cap_cents_per_month FROM projects WHERE id = %s", (req.project_id,))
        spent = self._one("SELECT spent_micro_cents FROM mcpmeter_project_spend"
                          " WHERE project_id = %s AND period_year_month = %s", (req.project_id, req.month))
        return preview_decision(req, free_used, self.balance(req.user_id),
                                None if cap is None or cap[0] is None else int(cap[0]), int(spent[0]) if spent else 0)

    def recent_calls(self, limit: int) -> list[CallRecord]:
        rows = self._q(
            "SELECT e.request_id, m.slug, e.tool_name, e.status, e.billed_micro_cents, e.called_at"
            " FROM usage_events e JOIN mcps m ON m.id = e.mcp_id ORDER BY e.id DESC LIMIT %s",
            (limit,),
        ).fetchall()
        return [CallRecord(str(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), str(r[5])) for r in rows]

    # --- money ---------------------------------------------------------------------------

    def charge(self, req: ChargeRequest) -> ChargeResult:
        """Inside a transaction: pay for one call. Returns the verdict; refusals must be rolled back.

        Its times are this process's clock: the SQLite store's charge (one gateway). The MySQL store
        charges through mysql_trip.py, whose times and month are the database's."""
        req = self.with_period(req)
        now, price, month = utc(), req.price, req.month
        if price <= 0:
            self._journal(req, Verdict.UNPRICED, 0, now)
            return ChargeResult(Verdict.UNPRICED, 0, self.balance(req.user_id), month)
        if req.free_allowance > 0 and self._claim_free(req, now):
            self._journal(req, Verdict.FREE, 0, now)
            return ChargeResult(Verdict.FREE, 0, self.balance(req.user_id), month)
        debited = self._q(
            "UPDATE users SET credit_micro_cents = credit_micro_cents - %s"
            " WHERE id = %s AND credit_micro_cents >= %s",
            (price, req.user_id, price),
        ).rowcount
        if debited != 1:
            return ChargeResult(Verdict.INSUFFICIENT_CREDIT, 0, self.balance(req.user_id), month)
        self._add_spend(req.project_id, month, price)
        balance, cap, spent = self._one(
            "SELECT u.credit_micro_cents, p.spending_cap_cents_per_month, s.spent_micro_cents FROM users u"
            " JOIN projects p ON p.id = %s"
            " JOIN mcpmeter_project_spend s ON s.project_id = p.id AND s.period_year_month = %s WHERE u.id = %s",
            (req.project_id, month, req.user_id),
        ) or (self.balance(req.user_id), None, 0)
        if cap is not None and int(spent) > int(cap) * MICRO_CENTS_PER_CENT:
            return ChargeResult(Verdict.PROJECT_CAP_EXCEEDED, 0, int(balance) + price, month)  # caller rolls back
        balance = int(balance)
        self._ledger_row(req.user_id, -price, "usage", balance, req.request_id,
                         f"{req.tool_name} on mcp {req.listing_id}", now)
        self._journal(req, Verdict.DEBITED, price, now)
        return ChargeResult(Verdict.DEBITED, price, balance, month)

    def settle(self, s: Settlement) -> int | None:
        """Inside a transaction: record the call, refund if due. Idempotent by request id.

        Returns the balance after, or None when `need_balance` is off.
        """
        self.settle_once(s)
        return self.balance(s.charge.user_id) if s.need_balance else None

    def settle_once(self, s: Settlement) -> bool:
        """`settle`, saying whether this settlement settled the call (False: settled before, or unknown)."""
        req, now = s.charge, utc()
        flip = ("UPDATE mcpmeter_calls SET settled_at = %s, refunded = %s, status = %s, reason = %s"
                " WHERE request_id = %s AND settled_at IS NULL")
        reason = s.reason[:32] if s.reason else None
        args = (now, int(s.refund), s.status, reason, req.request_id)
        if s.taken is not None and self._q(flip + " AND verdict = %s AND amount_micro_cents = %s",
                                           args + (s.taken.verdict.value, s.taken.amount)).rowcount == 1:
            # The journal agrees with what the charge reported: nothing to read back.
            verdict, amount = s.taken.verdict, s.taken.amount
        elif self._q(flip, args).rowcount == 1:
            row = self._one("SELECT verdict, amount_micro_cents FROM mcpmeter_calls WHERE request_id = %s",
                            (req.request_id,))
            verdict, amount = Verdict(row[0]), int(row[1])  # what was really taken, not what the caller thinks
        else:
            return False  # settled before, or unknown
        billed = 0 if s.refund else amount
        if s.refund and verdict is Verdict.DEBITED and amount > 0:
            # A user deleted since the charge (the web app's ON DELETE CASCADE took their ledger too)
            # has no balance to credit: the refund row would break the ledger's foreign key, and the
            # call, unsettleable, would stop the sweeper at it. Their call is settled refunded, bare.
            if self._q("UPDATE users SET credit_micro_cents = credit_micro_cents + %s WHERE id = %s",
                       (amount, req.user_id)).rowcount == 1:
                self._ledger_row(req.user_id, amount, "refund", self.balance(req.user_id), req.request_id,
                                 f"refund: {req.tool_name} on mcp {req.listing_id}"
                                 + (f" ({reason})" if reason else ""), now)
            self._add_spend(req.project_id, req.month, -amount)
        elif s.refund and verdict is Verdict.FREE:
            self._q(
                "UPDATE mcp_consumer_usage SET free_calls_used = free_calls_used - 1, updated_at = %s"
                " WHERE mcp_id = %s AND user_id = %s AND period_year_month = %s AND free_calls_used > 0",
                (now, req.listing_id, req.user_id, req.month),
            )
        if billed > 0:
            self._count_billable(req, now)
        self._q(f"{USAGE_EVENTS_INSERT} VALUES {USAGE_EVENT_VALUES}", usage_event(s, billed, now))
        if s.key_id is not None and self.last_used.due("api_keys", s.key_id):
            self._q("UPDATE api_keys SET last_used_at = %s WHERE id = %s", (now, s.key_id))
        elif s.token_id is not None and self.last_used.due("oauth_access_tokens", s.token_id):
            self._q("UPDATE oauth_access_tokens SET last_used_at = %s WHERE id = %s", (now, s.token_id))
        return True

    def topup(self, user_id: int, amount: int, description: str) -> int:
        """Inside a transaction: credit and its `topup` row; UnknownUser (nothing written) for no such user."""
        # rowcount counts matched rows on both drivers (the MySQL store connects with FOUND_ROWS).
        # Conditional, so that a concurrent debit or top-up cannot slip between a check and the
        # update: past BIGINT MySQL refuses the statement and SQLite turns the sum into a REAL.
        if self._q("UPDATE users SET credit_micro_cents = credit_micro_cents + %s"
                   " WHERE id = %s AND credit_micro_cents <= %s",
                   (amount, user_id, MAX_MICRO_CENTS - amount)).rowcount != 1:
            if self.user_exists(user_id):
                raise CreditLimit(user_id, amount)
            raise UnknownUser(user_id)
        balance = self.balance(user_id)
        self._ledger_row(user_id, amount, "topup", balance, None, description, utc())
        return balance

    def _claim_free(self, req: ChargeRequest, now: str) -> bool:
        """Take one free call of this month's allowance, if any is left. The row resets each month."""
        self._q(
            "INSERT IGNORE INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month,"
            " billable_calls, first_called_at, created_at, updated_at) VALUES (%s, %s, 0, %s, 0, %s, %s, %s)",
            (req.listing_id, req.user_id, req.period, now, now, now),
        )
        return self._q(
            "UPDATE mcp_consumer_usage SET"
            " billable_calls = CASE WHEN period_year_month = %s THEN billable_calls ELSE 0 END,"
            " free_calls_used = CASE WHEN period_year_month = %s THEN free_calls_used ELSE 0 END + 1,"
            " period_year_month = %s, last_called_at = %s, updated_at = %s"
            " WHERE mcp_id = %s AND user_id = %s"
            # A row already in a later month (this call's period was read just before midnight) is
            # not moved back: the call is not free, so the allowance of neither month is exceeded.
            " AND (period_year_month IS NULL OR period_year_month < %s"
            " OR (period_year_month = %s AND free_calls_used < %s))",
            (req.period, req.period, req.period, now, now, req.listing_id, req.user_id, req.period, req.period,
             req.free_allowance),
        ).rowcount == 1

    def _count_billable(self, req: ChargeRequest, now: str) -> None:
        """One more billed call this month in the consumer's usage row (which resets each month)."""
        self._q(self.d.upsert(
            "INSERT INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month, billable_calls,"
            " first_called_at, last_called_at, created_at, updated_at) VALUES (%s, %s, 0, %s, 1, %s, %s, %s, %s)",
            "mcp_id, user_id", COUNT_BILLABLE), (req.listing_id, req.user_id, req.month, now, now, now, now))

    def _add_spend(self, project_id: int, period: str, amount: int) -> None:
        """Move the project's spend this month (the cap is checked by the caller, in the same transaction)."""
        self._q(self.d.upsert(
            "INSERT INTO mcpmeter_project_spend (project_id, period_year_month, spent_micro_cents) VALUES (%s, %s, %s)",
            "project_id, period_year_month",
            [("spent_micro_cents", "spent_micro_cents + NEW(spent_micro_cents)")],
        ), (project_id, period, amount))

    def _ledger_row(self, user_id: int, amount: int, kind: str, balance: int, request_id: str | None,
                    description: str, now: str) -> None:
        self._q(
            "INSERT INTO credit_transactions (user_id, amount_micro_cents, type, reference_type,"
            " balance_after_micro_cents, description, request_id, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (user_id, amount, kind, "mcpmeter_call" if request_id else None, balance, description[:255],
             request_id, now, now),
        )

    def stale_calls(self, older_than_seconds: float, limit: int, held: str | None = None) -> list[str]:
        """Calls paid for over `older_than_seconds` ago and never settled: their gateway stopped
        mid-call. Calls held open on purpose (`hold`: a task, an input_required round) are left to
        their own limit: `held` names the mark to sweep instead. The age is the database's where
        it has a clock for us (Dialect.clock), as the journal's created_at is."""
        before, cutoff = self.d.ago(older_than_seconds)
        mark = "reason = %s" if held else "(reason IS NULL OR reason NOT IN (%s, %s))"
        rows = self._q(f"SELECT request_id FROM mcpmeter_calls WHERE settled_at IS NULL AND created_at < {before}"
                       f" AND {mark} ORDER BY created_at LIMIT %s",
                       (cutoff, *((held,) if held else HELD), limit)).fetchall()
        return [str(r[0]) for r in rows]

    def hold(self, request_id: str, mark: str) -> bool:
        """Mark an unsettled call as held open (its outcome comes later): the sweeper's
        `stale_call_seconds` no longer applies to it, its own limit does."""
        return self._q("UPDATE mcpmeter_calls SET reason = %s WHERE request_id = %s AND settled_at IS NULL",
                       (mark, request_id)).rowcount == 1

    def settle_stale(self, request_id: str, fee_bps: int, refund: bool = True, reason: str = SWEPT) -> bool:
        """Refund a call whose gateway stopped before settling it: nobody can show it was delivered."""
        row = self._one("SELECT user_id, project_id, mcp_id, tool_name, amount_micro_cents, period_year_month,"
                        " created_at FROM mcpmeter_calls WHERE request_id = %s AND settled_at IS NULL", (request_id,))
        if row is None:
            return False
        user_id, project_id, mcp_id, tool, amount, period, created = row
        req = ChargeRequest(request_id=request_id, user_id=int(user_id), project_id=int(project_id),
                            listing_id=int(mcp_id), tool_name=str(tool), price=int(amount), free_allowance=0,
                            period=str(period))
        # Another gateway's sweeper may have settled it since the read above (it waited on that one's
        # locks): only a call this one settled is counted.
        return self.settle_once(Settlement(charge=req, refund=refund, status=0, duration_ms=0,
                                           called_at=_epoch(created) or time.time(), key_id=None, token_id=None,
                                           client=None, user_agent=None, fee_bps=fee_bps, reason=reason))

    def _journal(self, req: ChargeRequest, verdict: Verdict, amount: int, now: str) -> None:
        self._q(
            "INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
            " amount_micro_cents, period_year_month, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (req.request_id, req.user_id, req.project_id, req.listing_id, req.tool_name[:191], verdict.value,
             amount, req.period, now),
        )


class SqlStore:
    """The Store protocol over a Ledger, with group commit.

    Adapters provide `_run(fn, commit)`, which runs one transaction off the event loop,
    `db_errors` (their driver's error classes) and `parallel` (how many transactions may
    run at once); every call goes through `_submit`, which batches concurrent ones.
    """

    db_errors: tuple[type[BaseException], ...] = ()
    parallel = 1
    max_batch = 64
    _group: GroupCommit[Ledger] | None = None

    async def _run(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _transaction(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        raise NotImplementedError

    def duplicate_key(self, error: BaseException) -> bool:
        """Whether a driver error is a unique key refusing a row (another writer inserted it first)."""
        raise NotImplementedError

    def transaction(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        """Run one transaction on the caller's thread: for the admin command, which runs outside mitmproxy.

        Raises StoreUnavailable when the database fails."""
        try:
            return self._transaction(fn, commit)
        except self.db_errors as e:
            raise StoreUnavailable(f"{type(self).__name__}: {e}") from e

    async def _submit(self, fn: Callable[[Ledger], T], commit: Callable[[T], bool] = lambda _: True) -> T:
        if self._group is None:
            self._group = GroupCommit(self._run, lambda ledger, sql: ledger._q(sql), self.db_errors, self.parallel,
                                      self.max_batch)
        return await self._group.submit(fn, commit)

    async def find_consumer(self, credential: Credential) -> Consumer | None:
        return await self._submit(lambda ledger: ledger.find_consumer(credential))

    async def find_listing(self, slug: str) -> Listing | None:
        return await self._submit(lambda ledger: ledger.find_listing(slug))

    async def balance(self, user_id: int) -> int:
        return await self._submit(lambda ledger: ledger.balance(user_id))

    async def user_exists(self, user_id: int) -> bool:
        return await self._submit(lambda ledger: ledger.user_exists(user_id))

    async def free_calls_used(self, listing_id: int, user_id: int, period: str) -> int:
        return await self._submit(lambda ledger: ledger.free_calls_used(listing_id, user_id, period))

    async def preview(self, request: ChargeRequest) -> Preview:
        # A transaction that only selects: it commits nothing.
        return await self._submit(lambda ledger: ledger.preview(request))

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        # A refusal rolls back whatever the attempt touched (the debit before a cap check, say).
        return await self._submit(lambda ledger: ledger.charge(request), commit=lambda r: r.accepted)

    async def settle(self, settlement: Settlement) -> int | None:
        return await self._submit(lambda ledger: ledger.settle(settlement))

    async def topup(self, user_id: int, amount: int, description: str) -> int:
        return await self._submit(lambda ledger: ledger.topup(user_id, amount, description))

    async def recent_calls(self, limit: int) -> list[CallRecord]:
        return await self._submit(lambda ledger: ledger.recent_calls(limit))

    async def sweep(self, older_than_seconds: float, fee_bps: int, limit: int = 100, held: str | None = None,
                    refund: bool = True, reason: str = SWEPT) -> int:
        """Refund calls left unsettled for longer than any call may run; one transaction each.
        With `held`, settle the calls held open under that mark instead (refunded or billed, `reason`)."""
        stale = await self._submit(lambda ledger: ledger.stale_calls(older_than_seconds, limit, held))
        done, failed, first, stopped = 0, 0, "", False
        for request_id in stale:
            def settle(ledger: Ledger, rid: str = request_id) -> bool:
                return self._settle_stale(ledger, rid, fee_bps, refund, reason)

            try:
                done += await self._submit(settle)
            except Exception as e:
                # One call that cannot be written (its listing deleted, say) is skipped, not the
                # calls after it: they are listed oldest first, so it would stop every later sweep.
                # Both adapters report any database error as StoreUnavailable, that call's own too:
                # the sweep stops only if the database does not answer a trivial transaction either
                # (every later call would fail alike); what is left waits for the next sweep.
                failed, first = failed + 1, first or f"{request_id}: {e}"
                if isinstance(e, StoreUnavailable) and not await self._answers():
                    stopped = True
                    break
        if stopped:
            log.error("mcpmeter: sweep (%s) stopped, the database unavailable: %d of %d stale call(s) settled,"
                      " the rest left for the next sweep (first error, %s)", reason, done, len(stale), first)
        elif failed:
            log.error("mcpmeter: sweep (%s): %d of %d stale call(s) cannot be settled, left for the next sweep"
                      " (first error, %s)", reason, failed, len(stale), first)
        return done

    def _settle_stale(self, ledger: Ledger, request_id: str, fee_bps: int, refund: bool, reason: str) -> bool:
        """One stale (or held past its limit) call's settlement, inside a transaction."""
        return ledger.settle_stale(request_id, fee_bps, refund, reason)

    async def _answers(self) -> bool:
        """Whether the database runs a trivial transaction: down, or one call's own error?"""
        try:
            await self._submit(lambda ledger: ledger.balance(0))
        except StoreUnavailable:
            return False
        return True

    async def hold(self, request_id: str, mark: str) -> bool:
        return await self._submit(lambda ledger: ledger.hold(request_id, mark))


def parse_upstream_headers(raw: Any) -> dict[str, str]:
    """The publisher's `upstream_headers` JSON text; anything unusable counts as none."""
    if not raw:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    headers = {k: str(v) for k, v in value.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
    # A value is written to the upstream byte for byte: a CR or LF would start a header of its own.
    return {k: v for k, v in headers.items() if header_problem(k, v) is None}
