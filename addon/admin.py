"""The operator's operations on the store: listings, keys, credit, usage, payouts, reconciliation.

Used by the `mcpmeter` command (cli.py). Each operation is one transaction on the SQL adapters'
own connections (sqlite.py, mysql.py), run synchronously on the caller's thread: the command runs
outside mitmproxy. SQL is written once with `%s` placeholders, as in store/sql.py.

Rows are written the way the reference's web app writes them (tests/backends.py), so gateways,
the web app and this command share one database. Running gateways see a change within their
cache TTLs: listings MCP_CACHE_TTL_SECONDS, keys KEY_CACHE_TTL_SECONDS; balances are never cached.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .auth import token_hash
from .config import Config, sweep_interval
from .store.base import CreditLimit, OutcomeUnknown, StoreUnavailable, UnknownUser
from .store.sql import HELD, MYSQL, Ledger, SqlStore, parse_upstream_headers, utc
from .store.wallet_sql import UNBILLED, settle_after

T = TypeVar("T")

DEFAULT_PUBLISHER = "publisher@localhost"  # owner of listings added without --publisher
KEY_ALPHABET = string.ascii_letters + string.digits
KEY_SECRET_LENGTH = 32
KEY_PREFIX_LENGTH = 14  # what api_keys.key_prefix holds, as the web app writes it ('mcpm_live_' + 4)
UNRECORDED = "unrecorded"  # `usage --by reason` for calls settled before settlements kept their reason
MAX_USAGE_ROWS = 2_000_000  # a usage report reads at most this many calls (percentiles are computed here)
BIGINT_MAX = 2**63 - 1  # no row id is larger (SQLite cannot even be asked about one)
HALF = 2**32  # reconcile sums each ledger row's amount in two parts, each sum far from overflowing
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\Z")


class AdminError(Exception):
    """A request the store cannot do as asked (unknown, ambiguous, already there): nothing was written."""


@dataclass(frozen=True, slots=True)
class ListingChange:
    """What `listing add` / `listing set` write; None leaves a field as it is (or its default on add)."""

    upstream_url: str | None = None
    transport: str | None = None
    price: int | None = None
    tool_prices: Mapping[str, int] = field(default_factory=dict)
    clear_tool_prices: bool = False
    free: int | None = None
    rpm: int | None = None  # 0: the gateway's default
    rpd: int | None = None
    timeout_seconds: int | None = None  # 0: the gateway's default
    headers: Mapping[str, str] = field(default_factory=dict)
    clear_headers: bool = False
    publisher: str | None = None
    status: str | None = None


def open_admin(config: Config) -> Admin:
    """The configured store, opened for admin work (the YAML seed is not applied: it is the gateway's)."""
    config = replace(config, seed={"listings": [], "consumers": []})
    if config.store == "mysql":
        from .store.mysql import MysqlStore

        return Admin(MysqlStore(config), config)
    from .store.sqlite import SqliteStore

    return Admin(SqliteStore(config), config)


class Admin:
    def __init__(self, store: SqlStore, config: Config) -> None:
        self.store = store
        self.config = config

    def close(self) -> None:
        self.store.close()

    def _tx(self, fn: Callable[[Ledger], T]) -> T:
        try:
            return self.store.transaction(fn)
        except OutcomeUnknown:
            raise
        except StoreUnavailable as e:
            if e.__cause__ is None or not self.store.duplicate_key(e.__cause__):
                raise
        # Another operator inserted the same row (a listing's slug, a new user's email) between this
        # transaction's read and its insert (MySQL; SQLite runs one writer at a time), and committed
        # first. This one was rolled back: run again, it sees that row (says "exists already", or uses it).
        return self.store.transaction(fn)

    # --- listings ----------------------------------------------------------------------------

    def add_listing(self, slug: str, change: ListingChange) -> dict[str, Any]:
        def run(ledger: Ledger) -> dict[str, Any]:
            if _listing_id(ledger, slug) is not None:
                raise AdminError(f"listing {slug!r} exists already: change it with `mcpmeter listing set {slug}`")
            now = utc()
            publisher = _user_id(ledger, change.publisher or DEFAULT_PUBLISHER, create_as="publisher")
            headers = _merge_headers({}, change.headers)
            ledger._q(
                "INSERT INTO mcps (publisher_id, slug, name, category, upstream_url, upstream_headers, transport,"
                " status, free_calls_per_consumer, rate_limit_per_minute, rate_limit_per_day,"
                " upstream_timeout_seconds, bill_tool_errors, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 0, %s, %s)",
                (publisher, slug, slug, "mcp", change.upstream_url, _headers_json(headers),
                 change.transport or "streamable", change.status or "live", change.free or 0,
                 change.rpm or None, change.rpd or None, change.timeout_seconds or None, now, now))
            mcp_id = _listing_id(ledger, slug)
            assert mcp_id is not None
            _write_prices(ledger, mcp_id, change, now)
            return _listing_row(ledger, mcp_id)

        return self._tx(run)

    def set_listing(self, slug: str, change: ListingChange) -> dict[str, Any]:
        def run(ledger: Ledger) -> dict[str, Any]:
            mcp_id = _require_listing(ledger, slug)
            now = utc()
            sets: list[tuple[str, Any]] = []
            if change.upstream_url is not None:
                sets.append(("upstream_url", change.upstream_url))
            if change.transport is not None:
                sets.append(("transport", change.transport))
            if change.status is not None:
                sets.append(("status", change.status))
            if change.free is not None:
                sets.append(("free_calls_per_consumer", change.free))
            for column, value in (("rate_limit_per_minute", change.rpm), ("rate_limit_per_day", change.rpd),
                                  ("upstream_timeout_seconds", change.timeout_seconds)):
                if value is not None:
                    sets.append((column, value or None))
            if change.publisher is not None:
                sets.append(("publisher_id", _user_id(ledger, change.publisher, create_as="publisher")))
            if change.headers or change.clear_headers:
                # A locking read on MySQL: a plain one reads the transaction's snapshot, so two
                # operators adding headers at once would each write back a set without the other's.
                # (SQLite's BEGIN IMMEDIATE already runs one writer at a time.)
                lock = " FOR UPDATE" if ledger.d is MYSQL else ""
                row = ledger._one("SELECT upstream_headers FROM mcps WHERE id = %s" + lock, (mcp_id,))
                headers = {} if change.clear_headers else parse_upstream_headers(row[0])
                sets.append(("upstream_headers", _headers_json(_merge_headers(headers, change.headers))))
            sets.append(("updated_at", now))
            ledger._q(f"UPDATE mcps SET {', '.join(f'{c} = %s' for c, _ in sets)} WHERE id = %s",
                      [v for _, v in sets] + [mcp_id])
            _write_prices(ledger, mcp_id, change, now)
            return _listing_row(ledger, mcp_id)

        return self._tx(run)

    def listings(self) -> list[dict[str, Any]]:
        def run(ledger: Ledger) -> list[dict[str, Any]]:
            ids = [int(r[0]) for r in ledger._q("SELECT id FROM mcps ORDER BY slug").fetchall()]
            return [_listing_row(ledger, i) for i in ids]

        return self._tx(run)

    # --- keys --------------------------------------------------------------------------------

    def create_key(self, email: str, env: str, credit: int) -> dict[str, Any]:
        """A new key for the user with this email (user and project made if needed), with opening credit."""
        key = f"mcpm_{env}_" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_SECRET_LENGTH))

        def run(ledger: Ledger) -> dict[str, Any]:
            now = utc()
            user_id = _user_id(ledger, email, create_as="consumer")
            row = ledger._one("SELECT id FROM projects WHERE user_id = %s ORDER BY id LIMIT 1", (user_id,))
            if row is None:
                local = re.sub(r"[^a-z0-9]+", "-", email.split("@")[0].lower()).strip("-") or "user"
                ledger._q("INSERT INTO projects (user_id, name, slug, created_at, updated_at)"
                          " VALUES (%s, %s, %s, %s, %s)",
                          (user_id, "Default project", f"{local[:40]}-{secrets.token_hex(4)}", now, now))
                row = ledger._one("SELECT id FROM projects WHERE user_id = %s ORDER BY id LIMIT 1", (user_id,))
            project_id = int(row[0])
            ledger._q("INSERT INTO api_keys (user_id, project_id, name, key_prefix, key_hash, env, created_at,"
                      " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                      (user_id, project_id, "mcpmeter key create", key[:KEY_PREFIX_LENGTH], token_hash(key), env,
                       now, now))
            balance = ledger.balance(user_id)
            if credit > 0:
                try:
                    balance = ledger.topup(user_id, credit, "opening credit (mcpmeter key create)")
                except CreditLimit as e:
                    raise AdminError(f"{e}: nothing written") from None
            return {"key": key, "prefix": key[:KEY_PREFIX_LENGTH], "user_id": user_id, "email": email,
                    "project_id": project_id, "env": env, "balance_micro_cents": balance}

        return self._tx(run)

    def keys(self, email: str | None = None) -> list[dict[str, Any]]:
        def run(ledger: Ledger) -> list[dict[str, Any]]:
            sql = ("SELECT k.id, k.key_prefix, k.user_id, u.email, k.env, k.created_at, k.last_used_at, k.revoked_at"
                   " FROM api_keys k JOIN users u ON u.id = k.user_id")
            args: tuple[Any, ...] = ()
            if email is not None:
                sql, args = sql + " WHERE u.email = %s", (email,)
            rows = ledger._q(sql + " ORDER BY k.id", args).fetchall()
            return [{"id": int(r[0]), "prefix": r[1], "user_id": int(r[2]), "email": r[3], "env": r[4],
                     "created_at": _stamp(r[5]), "last_used_at": _stamp(r[6]), "revoked_at": _stamp(r[7])}
                    for r in rows]

        return self._tx(run)

    def revoke_key(self, prefix: str) -> dict[str, Any]:
        """Revoke the one active key whose prefix starts with `prefix` (or whose id or whole key it is)."""
        def run(ledger: Ledger) -> dict[str, Any]:
            rows = ledger._q("SELECT k.id, k.key_prefix, u.email, k.key_hash FROM api_keys k"
                             " JOIN users u ON u.id = k.user_id WHERE k.revoked_at IS NULL ORDER BY k.id").fetchall()
            # Matched here, not by LIKE: exact and case-sensitive on both backends.
            if (key_id := _row_id(prefix)) is not None:
                rows = [r for r in rows if int(r[0]) == key_id]
            elif len(prefix) > KEY_PREFIX_LENGTH:  # a whole key: its hash names it exactly
                rows = [r for r in rows if r[3] == token_hash(prefix)]
            else:
                rows = [r for r in rows if str(r[1]).startswith(prefix)]
            # A whole key is a secret: a message (which may be logged) shows its prefix only.
            shown = prefix if len(prefix) <= KEY_PREFIX_LENGTH else prefix[:KEY_PREFIX_LENGTH] + "…"
            if not rows:
                raise AdminError(f"no active key matches {shown!r} (see `mcpmeter key list`)")
            if len(rows) > 1:
                names = ", ".join(f"#{r[0]} {r[1]} ({r[2]})" for r in rows[:10])
                raise AdminError(f"{len(rows)} active keys match {shown!r}: {names}; "
                                 "give a longer prefix or the key's id")
            key_id, key_prefix, owner, _ = rows[0]
            now = utc()
            ledger._q("UPDATE api_keys SET revoked_at = %s, updated_at = %s WHERE id = %s", (now, now, key_id))
            return {"id": int(key_id), "prefix": key_prefix, "email": owner, "revoked_at": now}

        return self._tx(run)

    # --- credit ------------------------------------------------------------------------------

    def add_credit(self, who: str, amount: int) -> dict[str, Any]:
        """A top-up: the balance and its `topup` ledger row in one transaction; unknown user: nothing written."""
        def run(ledger: Ledger) -> dict[str, Any]:
            user_id = _find_user(ledger, who)
            try:
                balance = ledger.topup(user_id, amount, "top-up (mcpmeter credit add)")
            except UnknownUser:
                raise AdminError(f"no user {who!r}: nothing written") from None
            except CreditLimit as e:
                raise AdminError(f"{e}: nothing written") from None
            return {"user_id": user_id, "added_micro_cents": amount, "balance_micro_cents": balance}

        return self._tx(run)

    # --- reports -----------------------------------------------------------------------------

    def usage(self, listing: str | None = None, consumer: str | None = None, since: str | None = None,
              by: str = "listing") -> list[dict[str, Any]]:
        """Calls per group: calls, free, billed, refunded, µ¢ billed, p50/p95 duration (ms).

        Percentiles are nearest-rank, computed here over the selected rows, so both backends agree."""
        def run(ledger: Ledger) -> list[tuple[Any, ...]]:
            sql = ("SELECT m.slug, e.tool_name, u.email, p.user_id, e.called_at, e.duration_ms,"
                   " e.billed_micro_cents, c.verdict, c.refunded, c.reason FROM usage_events e"
                   " JOIN mcps m ON m.id = e.mcp_id"
                   " LEFT JOIN projects p ON p.id = e.project_id LEFT JOIN users u ON u.id = p.user_id"
                   " LEFT JOIN mcpmeter_calls c ON c.request_id = e.request_id WHERE 1 = 1")
            args: list[Any] = []
            if listing is not None:
                if _listing_id(ledger, listing) is None:
                    raise AdminError(f"no listing {listing!r}")
                sql += " AND m.slug = %s"
                args.append(listing)
            if consumer is not None:
                sql += " AND p.user_id = %s"
                args.append(_find_user(ledger, consumer))
            if since is not None:
                sql += " AND e.called_at >= %s"
                args.append(f"{since} 00:00:00")
            rows = ledger._q(sql + " ORDER BY e.id LIMIT %s", [*args, MAX_USAGE_ROWS + 1]).fetchall()
            if len(rows) > MAX_USAGE_ROWS:
                raise AdminError(f"more than {MAX_USAGE_ROWS} calls match: narrow the report with --since, "
                                 "--listing or --consumer")
            return rows

        groups: dict[str, dict[str, Any]] = {}
        for slug, tool, email, user_id, called_at, duration, billed, verdict, refunded, reason in self._tx(run):
            name = {"listing": slug, "tool": f"{slug} · {tool}", "day": (_stamp(called_at) or "")[:10],
                    "consumer": email or f"user {user_id}", "reason": reason or UNRECORDED}[by]
            g = groups.setdefault(name, {by: name, "calls": 0, "free": 0, "billed": 0, "refunded": 0,
                                         "billed_micro_cents": 0, "_durations": []})
            g["calls"] += 1
            g["free"] += int(verdict == "free" and not refunded)
            g["billed"] += int(int(billed) > 0)
            g["refunded"] += int(bool(refunded))
            g["billed_micro_cents"] += int(billed)
            g["_durations"].append(int(duration))
        out = []
        for name in sorted(groups):
            g = groups[name]
            durations = sorted(g.pop("_durations"))
            out.append({**g, "p50_ms": percentile(durations, 50), "p95_ms": percentile(durations, 95)})
        return out

    def payouts(self, month: str) -> dict[str, Any]:
        """Per publisher and listing for a UTC month: gross, platform fee, payout (fee + payout == gross)."""
        year, mon = int(month[:4]), int(month[5:7])
        start = f"{month}-01 00:00:00"
        end = f"{year + mon // 12:04d}-{mon % 12 + 1:02d}-01 00:00:00"

        def run(ledger: Ledger) -> tuple[list[tuple[Any, ...]], Any]:
            rows = ledger._q(
                "SELECT m.publisher_id, pu.email, m.slug, COUNT(*), SUM(e.billed_micro_cents),"
                " SUM(e.platform_fee_micro_cents), SUM(e.publisher_payout_micro_cents) FROM usage_events e"
                " JOIN mcps m ON m.id = e.mcp_id LEFT JOIN users pu ON pu.id = m.publisher_id"
                " WHERE e.called_at >= %s AND e.called_at < %s AND e.billed_micro_cents > 0"
                " GROUP BY m.publisher_id, pu.email, m.slug ORDER BY pu.email, m.slug", (start, end)).fetchall()
            total = ledger._one("SELECT COALESCE(SUM(billed_micro_cents), 0) FROM usage_events"
                                " WHERE called_at >= %s AND called_at < %s", (start, end))[0]
            return rows, total

        rows, billed = self._tx(run)
        lines = [{"publisher": email or f"user {pid}", "listing": slug, "billed_calls": int(n),
                  "gross_micro_cents": int(gross), "fee_micro_cents": int(fee), "payout_micro_cents": int(payout)}
                 for pid, email, slug, n, gross, fee, payout in rows]
        totals = {k: sum(x[k] for x in lines) for k in
                  ("billed_calls", "gross_micro_cents", "fee_micro_cents", "payout_micro_cents")}
        return {"month": month, "fee_bps": self.config.platform_fee_bps, "lines": lines, "totals": totals,
                "billed_micro_cents": int(billed),
                "adds_up": totals["gross_micro_cents"] == int(billed)
                and totals["fee_micro_cents"] + totals["payout_micro_cents"] == int(billed)}

    def reconcile(self) -> list[Check]:
        """Every money invariant the README states, checked against the database; each lists its discrepancies.

        Ages are the sweeper's: by the database's clock on MySQL (this host's may be skewed)."""
        stale_limit = self.config.stale_call_seconds + sweep_interval(self.config)
        held_ages = [(mark, seconds + 60 + sweep_interval(self.config))
                     for mark, seconds in zip(HELD, (self.config.task_settle_seconds,
                                                     self.config.round_settle_seconds), strict=True)]

        def run(ledger: Ledger) -> list[Check]:
            q = ledger._q
            # A ledger is summed in two halves (high and low 32 bits of each row): SQLite's SUM fails past
            # 2**63 ('integer overflow'), which a broken ledger reaches, and that is a discrepancy to name.
            upper = f"(t.amount_micro_cents {'DIV' if ledger.d is MYSQL else '/'} {HALF})"
            before, cutoff = ledger.d.ago(stale_limit)
            # Wallet calls (MySQL, wallets.py) are debited by their hold, not one by one, and one recorded
            # after its hold settled is refunded by the hold's rest, not by a refund row of its own.
            wallets = ledger.d is MYSQL
            by_call = " AND c.hold_id IS NULL" if wallets else ""
            unbilled = ", ".join(f"'{r}'" for r in UNBILLED)
            not_settled_hold = f" AND NOT (c.hold_id IS NOT NULL AND c.reason IN ({unbilled}))" if wallets else ""
            settled_hold = f" OR (c.hold_id IS NOT NULL AND c.reason IN ({unbilled}))" if wallets else ""
            held = [(mark, *ledger.d.ago(age)) for mark, age in held_ages]
            checks = [
                Check("I1", "balance == opening (0) + the sum of the user's ledger rows", [
                    f"user {u} ({e}): balance {int(b)} µ¢, ledger sums to {s} µ¢"
                    for u, e, b, s in (
                        (u, e, b, int(high) * HALF + int(low)) for u, e, b, high, low in q(
                            f"SELECT u.id, u.email, u.credit_micro_cents, COALESCE(SUM({upper}), 0),"
                            f" COALESCE(SUM(t.amount_micro_cents - {upper} * {HALF}), 0)"
                            " FROM users u LEFT JOIN credit_transactions t ON t.user_id = u.id"
                            " GROUP BY u.id, u.email, u.credit_micro_cents").fetchall()) if int(b) != s]),
                Check("I3", "no balance below zero", [
                    f"user {u} ({e}): balance {int(b)} µ¢" for u, e, b in
                    q("SELECT id, email, credit_micro_cents FROM users WHERE credit_micro_cents < 0").fetchall()]),
                Check("I4", "every debit has its usage ledger row", [
                    f"call {r}: debited {int(a)} µ¢ but its ledger row is {'missing' if t is None else f'{int(t)} µ¢'}"
                    for r, a, t in q(
                        "SELECT c.request_id, c.amount_micro_cents, t.amount_micro_cents FROM mcpmeter_calls c"
                        " LEFT JOIN credit_transactions t ON t.request_id = c.request_id AND t.type = 'usage'"
                        f" WHERE c.verdict = 'debited'{by_call}"
                        " AND (t.id IS NULL OR t.amount_micro_cents <> -c.amount_micro_cents)").fetchall()]),
                Check("I4", "refunds exactly once: a refunded debit has one refund row, others none", [
                    f"call {r}: {'refunded' if int(f) else 'not refunded'}, refund row "
                    f"{'missing' if t is None else f'{int(t)} µ¢'} (debit {int(a)} µ¢)"
                    for r, a, f, t in q(
                        "SELECT c.request_id, c.amount_micro_cents, c.refunded, t.amount_micro_cents"
                        " FROM mcpmeter_calls c"
                        " LEFT JOIN credit_transactions t ON t.request_id = c.request_id AND t.type = 'refund'"
                        f" WHERE (c.refunded = 1 AND c.verdict = 'debited'{not_settled_hold}"
                        " AND (t.id IS NULL OR t.amount_micro_cents <> c.amount_micro_cents))"
                        f" OR ((c.refunded = 0 OR c.verdict <> 'debited'{settled_hold}) AND t.id IS NOT NULL)"
                        ).fetchall()]),
                Check("usage", "one usage row per settled call, billing what was kept", [
                    f"call {r}: settled, " + ("no usage row" if e is None else
                                             f"usage row bills {int(e)} µ¢ instead of {int(want)} µ¢")
                    for r, e, want in q(
                        "SELECT c.request_id, e.billed_micro_cents,"
                        " CASE WHEN c.refunded = 1 THEN 0 ELSE c.amount_micro_cents END FROM mcpmeter_calls c"
                        " LEFT JOIN usage_events e ON e.request_id = c.request_id WHERE c.settled_at IS NOT NULL"
                        " AND (e.id IS NULL OR e.billed_micro_cents <>"
                        " CASE WHEN c.refunded = 1 THEN 0 ELSE c.amount_micro_cents END)").fetchall()]),
                Check("split", "each usage row's payout + platform fee == billed", [
                    f"usage row {i} ({r}): billed {int(b)} µ¢ != payout {int(p)} + fee {int(f)}"
                    for i, r, b, p, f in q(
                        "SELECT id, request_id, billed_micro_cents, publisher_payout_micro_cents,"
                        " platform_fee_micro_cents FROM usage_events"
                        " WHERE billed_micro_cents <> publisher_payout_micro_cents + platform_fee_micro_cents"
                    ).fetchall()]),
                Check("sweeper", f"no call left unsettled longer than stale_call_seconds + one sweep "
                                 f"({stale_limit:g} s)", [
                    f"call {r}: {v} {int(a)} µ¢ at {_stamp(c)}, never settled (is any gateway running?)"
                    for r, v, a, c in q(
                        "SELECT request_id, verdict, amount_micro_cents, created_at FROM mcpmeter_calls"
                        f" WHERE settled_at IS NULL AND created_at < {before}"
                        " AND (reason IS NULL OR reason NOT IN (%s, %s)) ORDER BY created_at",
                        (cutoff, *HELD)).fetchall()]),
                Check("held", "no task or input_required round held past its own limit + one sweep "
                              "(task_settle_seconds, round_settle_seconds)", [
                    f"call {r}: {m} since {_stamp(c)}, never settled (is any gateway running?)"
                    for mark, held_before, limit in held for r, m, c in q(
                        "SELECT request_id, reason, created_at FROM mcpmeter_calls"
                        f" WHERE settled_at IS NULL AND reason = %s AND created_at < {held_before}"
                        " ORDER BY created_at", (mark, limit)).fetchall()]),
            ]
            if wallets:
                checks += self._holds(ledger)
            return checks

        return self._tx(run)

    def _holds(self, ledger: Ledger) -> list[Check]:
        """The wallets' holds (wallet_sql.py): each adds up, and none outlives its settlement."""
        q = ledger._q
        late, limit = ledger.d.ago(settle_after(self.config) + sweep_interval(self.config))
        return [
            Check("holds", "a hold's spent == what its billed calls cost; spent + returned <= granted; settled: "
                           "granted == spent + returned + rest", [
                f"hold {h} (user {u}): granted {int(g)}, spent {int(sp)}, returned {int(r)}, rest "
                f"{'-' if rest is None else int(rest)}, its billed calls {int(b)} µ¢"
                for h, u, g, sp, r, rest, b in q(
                    "SELECT h.id, h.user_id, h.granted_micro_cents, h.spent_micro_cents, h.returned_micro_cents,"
                    " h.rest_micro_cents, COALESCE(SUM(c.amount_micro_cents), 0) FROM mcpmeter_holds h"
                    " LEFT JOIN mcpmeter_calls c ON c.hold_id = h.id AND c.refunded = 0"
                    " GROUP BY h.id, h.user_id, h.granted_micro_cents, h.spent_micro_cents, h.returned_micro_cents,"
                    " h.rest_micro_cents").fetchall()
                if int(sp) != int(b) or int(sp) + int(r) > int(g)
                or (rest is not None and int(g) != int(sp) + int(r) + int(rest))]),
            Check("holds", "no hold left unsettled past the longest call + one sweep", [
                f"hold {h} (user {u}): {int(g)} µ¢ held since {_stamp(c)}, never settled (is any gateway running?)"
                for h, u, g, c in q("SELECT id, user_id, granted_micro_cents, created_at FROM mcpmeter_holds"
                                    f" WHERE settled_at IS NULL AND created_at < {late} ORDER BY id",
                                    (limit,)).fetchall()]),
        ]


@dataclass(frozen=True, slots=True)
class Check:
    invariant: str
    rule: str
    discrepancies: list[str]

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def as_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "rule": self.rule, "ok": self.ok, "discrepancies": self.discrepancies}


def percentile(sorted_values: list[int], pct: float) -> int | None:
    """Nearest-rank percentile of sorted values; None for none."""
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(pct / 100 * len(sorted_values))) - 1]


# --- helpers (inside a transaction) ---------------------------------------------------------


def _listing_id(ledger: Ledger, slug: str) -> int | None:
    row = ledger._one("SELECT id FROM mcps WHERE slug = %s", (slug,))
    return None if row is None else int(row[0])


def _require_listing(ledger: Ledger, slug: str) -> int:
    mcp_id = _listing_id(ledger, slug)
    if mcp_id is None:
        raise AdminError(f"no listing {slug!r} (add it with `mcpmeter listing add {slug} --upstream URL`)")
    return mcp_id


def _find_user(ledger: Ledger, who: str) -> int:
    """A user by email, or by id when `who` is all digits; AdminError if there is none."""
    if (user_id := _row_id(who)) is not None:
        row = None if user_id > BIGINT_MAX else ledger._one("SELECT id FROM users WHERE id = %s", (user_id,))
    else:
        row = _by_email(ledger, who)
    if row is None:
        raise AdminError(f"no user {who!r}: nothing written")
    return int(row[0])


def _by_email(ledger: Ledger, email: str) -> tuple[Any, ...] | None:
    """The user (id, email) with this email, compared without case; AdminError if the database only
    collates the two equal. MySQL's utf8mb4_unicode_ci ignores accents, width and ignorable characters:
    'bób@x' finds 'bob@x', whose credit a key made for 'bób@x' would spend."""
    row = ledger._one("SELECT id, email FROM users WHERE email = %s", (email,))
    if row is not None and str(row[1]).lower() != email.lower():
        raise AdminError(f"{email!r} is user {int(row[0])}'s {str(row[1])!r} to the database (MySQL's collation "
                         "cannot tell them apart): give that address, or another; nothing written")
    return row


def _row_id(text: str) -> int | None:
    """`text` as a row id when it is ASCII digits (str.isdigit also holds for '²', which int() refuses)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _user_id(ledger: Ledger, email: str, create_as: str) -> int:
    row = _by_email(ledger, email)
    if row is not None:
        return int(row[0])
    now = utc()
    ledger._q("INSERT INTO users (name, email, password, role, status, credit_micro_cents, created_at, updated_at)"
              " VALUES (%s, %s, '', %s, 'active', 0, %s, %s)", (email.split("@")[0], email, create_as, now, now))
    return int(ledger._one("SELECT id FROM users WHERE email = %s", (email,))[0])


def _write_prices(ledger: Ledger, mcp_id: int, change: ListingChange, now: str) -> None:
    if change.clear_tool_prices:
        ledger._q("DELETE FROM pricing_rules WHERE mcp_id = %s AND tool_name IS NOT NULL", (mcp_id,))
    rules: list[tuple[str | None, int]] = [] if change.price is None else [(None, change.price)]
    for tool, price in [*rules, *change.tool_prices.items()]:
        if tool is None:
            ledger._q("DELETE FROM pricing_rules WHERE mcp_id = %s AND tool_name IS NULL", (mcp_id,))
        else:
            _same_tool(ledger, mcp_id, tool)
            ledger._q("DELETE FROM pricing_rules WHERE mcp_id = %s AND tool_name = %s", (mcp_id, tool))
        ledger._q("INSERT INTO pricing_rules (mcp_id, tool_name, model, price_micro_cents, created_at, updated_at)"
                  " VALUES (%s, %s, 'per_call', %s, %s, %s)", (mcp_id, tool, price, now, now))


def _same_tool(ledger: Ledger, mcp_id: int, tool: str) -> None:
    """AdminError if the listing prices another tool that the database cannot tell from `tool`. The
    gateway prices params.name exactly, but MySQL's collation ignores case, accents and trailing spaces:
    its unique key would keep one of the two, and deleting `tool`'s price would delete the other's."""
    for (other,) in ledger._q("SELECT tool_name FROM pricing_rules WHERE mcp_id = %s AND tool_name = %s",
                              (mcp_id, tool)).fetchall():
        if str(other) != tool:
            raise AdminError(f"tool {tool!r} and the listing's {str(other)!r} are one name to the database "
                             "(MySQL's collation): it cannot price both; nothing written")


def _listing_row(ledger: Ledger, mcp_id: int) -> dict[str, Any]:
    """A listing as the command shows it: header names only, never their values (they are secrets)."""
    slug = ledger._one("SELECT slug FROM mcps WHERE id = %s", (mcp_id,))[0]
    listing = ledger.find_listing(str(slug))
    assert listing is not None
    publisher = ledger._one("SELECT u.email FROM mcps m LEFT JOIN users u ON u.id = m.publisher_id"
                            " WHERE m.id = %s", (mcp_id,))[0]
    return {
        "slug": listing.slug, "status": listing.status, "transport": listing.transport,
        "upstream_url": listing.upstream_url, "price_micro_cents": listing.default_price,
        "tool_prices": dict(sorted(listing.tool_prices.items())), "free_calls": listing.free_calls_per_consumer,
        "rpm": listing.rate_limit_per_minute, "rpd": listing.rate_limit_per_day,
        "timeout_ms": None if listing.upstream_timeout_seconds is None else listing.upstream_timeout_seconds * 1000,
        "header_names": sorted(listing.upstream_headers), "publisher": publisher,
    }


def _merge_headers(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
    """`old` with each header of `new` set, later ones first dropping any of the same name in another
    case: header names are case-insensitive, and the gateway would send the upstream both."""
    merged = dict(old)
    for name, value in new.items():
        merged = {k: v for k, v in merged.items() if k.lower() != name.lower()}
        merged[name] = value
    return merged


def _headers_json(headers: Mapping[str, str]) -> str | None:
    return json.dumps(dict(headers)) if headers else None


def _stamp(value: Any) -> str | None:
    """A TIMESTAMP column as 'YYYY-MM-DD HH:MM:SS' (pymysql gives datetime, sqlite3 gives str)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value[:19]
    return value.strftime("%Y-%m-%d %H:%M:%S")
