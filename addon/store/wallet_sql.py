"""The wallets' MySQL transactions: a hold granted, closed and settled, and a batch of calls recorded.

Each function runs inside one transaction the store opened (MysqlStore._run, a worker thread). Lock
order, the same in every one and compatible with the charge and settlement procedures
(mysql_trip.py): holds by ascending id, then consumer usage rows, then users by ascending id, then
project spend rows. So gateways granting, flushing and settling holds at once never deadlock on
each other (a deadlock victim is run again by the store anyway).

Money, per hold (see the README, "Wallets"): granted == spent + returned + rest once settled, where
spent is what its recorded billed calls cost, returned what came back while it was open (the wallet's
left-over when retired, refunds), rest what came back when it settled. Every movement of a balance has
its credit_transactions row, so I1 (balance == opening + ledger) holds as before.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..config import Config, sweep_interval
from ..model import MAX_MICRO_CENTS, MICRO_CENTS_PER_CENT, ChargeRequest, ChargeResult, Settlement, Verdict
from .sql import COUNT_BILLABLE, MYSQL, USAGE_EVENT_VALUES, USAGE_EVENTS_INSERT, Ledger, _epoch, usage_event, utc

HOLD = "mcpmeter_hold"  # credit_transactions.reference_type of a hold's rows (reference_id: the hold)
HOLD_SETTLED = "hold_settled"  # the reason of a call recorded after its hold settled: never billed
HOLD_OVERDRAWN = "hold_overdrawn"  # a call its hold had no room left for (a stale wallet): never billed
UNBILLED = (HOLD_SETTLED, HOLD_OVERDRAWN)  # reasons of wallet calls neither billed nor refunded by a row

HOLDS_DDL = """CREATE TABLE IF NOT EXISTS `mcpmeter_holds` (
  `id` bigint unsigned NOT NULL AUTO_INCREMENT,
  `user_id` bigint unsigned NOT NULL,
  `project_id` bigint unsigned NOT NULL,
  `period_year_month` varchar(7) COLLATE utf8mb4_unicode_ci NOT NULL,
  `granted_micro_cents` bigint NOT NULL,
  `spent_micro_cents` bigint NOT NULL DEFAULT '0',
  `returned_micro_cents` bigint NOT NULL DEFAULT '0',
  `rest_micro_cents` bigint DEFAULT NULL,
  `created_at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `closed_at` timestamp NULL DEFAULT NULL,
  `settled_at` timestamp NULL DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `mcpmeter_holds_user_id_index` (`user_id`),
  KEY `mcpmeter_holds_settled_at_created_at_index` (`settled_at`,`created_at`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"""


@dataclass(frozen=True, slots=True)
class Grant:
    hold: int | None  # None: refused (`verdict` says why)
    granted: int
    balance: int  # the consumer's balance in MySQL after the grant
    verdict: Verdict


def grant(ledger: Ledger, user_id: int, project_id: int, period: str, price: int, want: int,
          retired: tuple[int, int] | None) -> Grant:
    """Close the wallet just retired (its left-over back to the consumer), then reserve up to `want`
    (at least `price`) of the consumer's credit, within the project's cap, in a new hold."""
    now = utc()
    if retired is not None:
        close(ledger, *retired, now=now)
    row = ledger._one("SELECT credit_micro_cents FROM users WHERE id = %s FOR UPDATE", (user_id,))
    if row is None:
        return Grant(None, 0, 0, Verdict.INSUFFICIENT_CREDIT)
    credit = int(row[0])
    granted = min(want, credit)
    verdict = Verdict.DEBITED if credit >= price else Verdict.INSUFFICIENT_CREDIT
    cap = ledger._one("SELECT spending_cap_cents_per_month FROM projects WHERE id = %s", (project_id,))
    if cap is not None and cap[0] is not None:
        # The spend row locked (made if missing) before it is read: the room left under the cap counts
        # every hold of the month, open ones whole, so concurrent holds never pass it together.
        ledger._q("INSERT IGNORE INTO mcpmeter_project_spend (project_id, period_year_month, spent_micro_cents)"
                  " VALUES (%s, %s, 0)", (project_id, period))
        spent = ledger._one("SELECT spent_micro_cents FROM mcpmeter_project_spend"
                            " WHERE project_id = %s AND period_year_month = %s FOR UPDATE", (project_id, period))
        room = int(cap[0]) * MICRO_CENTS_PER_CENT - int(spent[0])
        if verdict is Verdict.DEBITED and room < price:
            verdict = Verdict.PROJECT_CAP_EXCEEDED
        granted = min(granted, room)
    if verdict is not Verdict.DEBITED:
        return Grant(None, 0, credit, verdict)
    ledger._q("INSERT INTO mcpmeter_holds (user_id, project_id, period_year_month, granted_micro_cents, created_at)"
              f" VALUES (%s, %s, %s, %s, {MYSQL.clock})", (user_id, project_id, period, granted))
    hold = int(ledger._one("SELECT LAST_INSERT_ID()")[0])
    ledger._q("UPDATE users SET credit_micro_cents = credit_micro_cents - %s WHERE id = %s", (granted, user_id))
    balance = credit - granted
    _ledger_row(ledger, user_id, -granted, balance, hold, f"credit held for calls (hold {hold})", now)
    ledger._add_spend(project_id, period, granted)
    return Grant(hold, granted, balance, Verdict.DEBITED)


def close(ledger: Ledger, hold: int, left: int, now: str | None = None) -> None:
    """A hold's wallet retired with `left` in it: that much back to the consumer now. Nothing for a
    hold settled already: its rest counted what the wallet held."""
    now = now or utc()
    row = ledger._one("SELECT user_id, project_id, period_year_month, granted_micro_cents, settled_at,"
                      " spent_micro_cents, returned_micro_cents FROM mcpmeter_holds WHERE id = %s FOR UPDATE", (hold,))
    if row is None or row[4] is not None:
        return
    user_id, project_id, period, granted = int(row[0]), int(row[1]), str(row[2]), int(row[3])
    # Never more than the hold still has (a wallet Redis brought back staler than it was holds more).
    left = max(0, min(left, granted - int(row[5]) - int(row[6])))
    ledger._q(f"UPDATE mcpmeter_holds SET returned_micro_cents = returned_micro_cents + %s,"
              f" closed_at = COALESCE(closed_at, {MYSQL.clock}) WHERE id = %s", (left, hold))
    if left > 0:
        _credit(ledger, user_id, left, hold, f"unspent credit of hold {hold} returned", now)
        ledger._add_spend(project_id, period, -left)


def settle(ledger: Ledger, hold: int) -> bool:
    """A closed hold past the longest call: whatever of it is neither recorded as spent nor returned
    comes back to the consumer (calls never recorded: their gateway died, or Redis lost the wallet)."""
    row = ledger._one("SELECT user_id, project_id, period_year_month, granted_micro_cents, spent_micro_cents,"
                      " returned_micro_cents FROM mcpmeter_holds"
                      " WHERE id = %s AND settled_at IS NULL AND closed_at IS NOT NULL FOR UPDATE", (hold,))
    if row is None:
        return False
    user_id, project_id, period = int(row[0]), int(row[1]), str(row[2])
    rest = max(0, int(row[3]) - int(row[4]) - int(row[5]))
    ledger._q(f"UPDATE mcpmeter_holds SET rest_micro_cents = %s, settled_at = {MYSQL.clock} WHERE id = %s",
              (rest, hold))
    if rest > 0:
        _credit(ledger, user_id, rest, hold, f"hold {hold} settled: credit of calls never recorded returned", utc())
        ledger._add_spend(project_id, period, -rest)
    return True


def due(ledger: Ledger, open_for: float, settle_after: float, limit: int) -> list[tuple[int, int, int, bool, bool]]:
    """Holds to close (open longer than a wallet lives) or settle: (id, user, project, closed, settle now)."""
    opened, cutoff = MYSQL.ago(open_for)
    settled_before, limit_cutoff = MYSQL.ago(settle_after)
    rows = ledger._q(
        f"SELECT id, user_id, project_id, closed_at IS NOT NULL, created_at < {settled_before} FROM mcpmeter_holds"
        f" WHERE settled_at IS NULL AND created_at < {opened}"
        # Closed holds too young to settle are not due: they would fill the page and keep stale wallets open.
        f" AND (closed_at IS NULL OR created_at < {settled_before}) ORDER BY id LIMIT %s",
        (limit_cutoff, cutoff, limit_cutoff, limit)).fetchall()
    return [(int(r[0]), int(r[1]), int(r[2]), bool(r[3]), bool(r[4])) for r in rows]


def open_holds(ledger: Ledger, user_id: int, but_project: int) -> list[tuple[int, int]]:
    """The consumer's holds not closed yet, of projects other than this one: (id, project)."""
    rows = ledger._q("SELECT id, project_id FROM mcpmeter_holds WHERE user_id = %s AND project_id <> %s"
                     " AND closed_at IS NULL ORDER BY id", (user_id, but_project))
    return [(int(r[0]), int(r[1])) for r in rows.fetchall()]


def abandoned(ledger: Ledger, older_than: float, limit: int = 200) -> list[int]:
    """Holds this old and not settled: no gateway with wallets settled them (wallets turned off)."""
    before, cutoff = MYSQL.ago(older_than)
    return [int(r[0]) for r in ledger._q(f"SELECT id FROM mcpmeter_holds WHERE settled_at IS NULL"
                                         f" AND created_at < {before} ORDER BY id LIMIT %s", (cutoff, limit))]


def abandon(ledger: Ledger, hold: int) -> bool:
    """Close (nothing returned: Redis is not asked, its wallet expired long ago) and settle a hold."""
    close(ledger, hold, 0)
    return settle(ledger, hold)


def recorded(ledger: Ledger, request_ids: Sequence[str]) -> tuple[set[str], set[str]]:
    """Which of these calls the journal holds settled already (a batch written again after its
    COMMIT's answer was lost), and which unsettled: held calls (`mark_held`), settled by a flip."""
    marks = ", ".join(["%s"] * len(request_ids))
    rows = ledger._q(f"SELECT request_id, settled_at FROM mcpmeter_calls WHERE request_id IN ({marks})",
                     request_ids).fetchall()
    return {str(r[0]) for r in rows if r[1] is not None}, {str(r[0]) for r in rows if r[1] is None}


def mark_held(ledger: Ledger, req: ChargeRequest, taken: ChargeResult, mark: str) -> bool:
    """A wallet call held open (a task, an input_required round: addon/deferred.py) gets its journal row
    now, unsettled and marked, as the journal store's charge would have written it: if its gateway stops
    before it settles, any gateway's held sweep settles it by its rule (`settle_stale`), instead of the
    hold giving its price back unrecorded."""
    ledger._q("INSERT IGNORE INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
              " amount_micro_cents, period_year_month, created_at, reason, hold_id)"
              f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, {MYSQL.clock}, %s, %s)",
              (req.request_id, req.user_id, req.project_id, req.listing_id, req.tool_name[:191],
               Verdict.DEBITED.value, taken.amount, taken.period or req.month, mark, taken.hold))
    return ledger._q("UPDATE mcpmeter_calls SET reason = %s WHERE request_id = %s AND settled_at IS NULL",
                     (mark, req.request_id)).rowcount == 1


def settle_stale(ledger: Ledger, request_id: str, fee_bps: int, refund: bool, reason: str) -> bool | None:
    """The sweeper's settlement of a wallet call's unsettled row (one `mark_held` wrote); None for a row
    of the journal store's own (the Ledger settles those)."""
    row = ledger._one("SELECT user_id, project_id, mcp_id, tool_name, amount_micro_cents, period_year_month,"
                      " created_at, hold_id FROM mcpmeter_calls WHERE request_id = %s AND settled_at IS NULL",
                      (request_id,))
    if row is None or row[7] is None:
        return None
    user_id, project_id, mcp_id, tool, amount, period, created, hold = row
    req = ChargeRequest(request_id=request_id, user_id=int(user_id), project_id=int(project_id),
                        listing_id=int(mcp_id), tool_name=str(tool), price=int(amount), free_allowance=0,
                        period=str(period))
    taken = ChargeResult(Verdict.DEBITED, int(amount), 0, str(period), hold=int(hold))
    return record(ledger, [Settlement(charge=req, refund=refund, status=0, duration_ms=0,
                                      called_at=_epoch(created) or time.time(), key_id=None, token_id=None,
                                      client=None, user_agent=None, fee_bps=fee_bps, taken=taken,
                                      reason=reason)]) == 1


def record(ledger: Ledger, batch: Sequence[Settlement]) -> int:
    """Record a batch of settled wallet calls in one transaction; returns how many were new.

    A billed call counts in its hold's spent; a refunded one's price comes back to the consumer (its
    refund row) and counts in the hold's returned; a call whose hold settled before it came is
    recorded unbilled (the hold's rest gave its price back already)."""
    now = utc()
    done, held = recorded(ledger, [s.charge.request_id for s in batch])
    first: dict[str, Settlement] = {}  # the first of a call's settlements counts (asked twice, one batch)
    for s in batch:
        if s.charge.request_id not in done:
            first.setdefault(s.charge.request_id, s)
    batch = list(first.values())
    if not batch:
        return 0
    holds = sorted({_hold(s) for s in batch})
    marks = ", ".join(["%s"] * len(holds))
    # What each live hold has left to pay with: a wallet Redis brought back staler than it was (a
    # snapshot, a lagging replica) pays calls beyond its hold, which are not the consumer's to pay.
    room = {int(r[0]): int(r[2]) - int(r[3]) - int(r[4]) for r in ledger._q(
        "SELECT id, settled_at, granted_micro_cents, spent_micro_cents, returned_micro_cents FROM mcpmeter_holds"
        f" WHERE id IN ({marks}) ORDER BY id FOR UPDATE", holds).fetchall() if r[1] is None}
    # A held call's row is taken by its flip: one another gateway's sweep settled meanwhile is not ours.
    flipped = {rid for rid in sorted(held & first.keys()) if ledger._q(
        "UPDATE mcpmeter_calls SET settled_at = %s WHERE request_id = %s AND settled_at IS NULL",
        (now, rid)).rowcount == 1}
    batch = [s for s in batch if s.charge.request_id not in held or s.charge.request_id in flipped]
    if not batch:
        return 0
    calls, events, flips = [], [], []
    billable: dict[tuple[int, int, str], int] = defaultdict(int)
    spent: dict[int, int] = defaultdict(int)
    returned: dict[int, int] = defaultdict(int)
    refunds: dict[int, list[Settlement]] = defaultdict(list)
    unspent: dict[tuple[int, str], int] = defaultdict(int)
    for s in batch:
        req, hold, amount = s.charge, _hold(s), _amount(s)
        reason = (s.reason or "")[:32] or None
        if hold not in room:
            billed, refunded, reason = 0, True, HOLD_SETTLED
        elif room[hold] < amount:
            billed, refunded, reason = 0, True, HOLD_OVERDRAWN
        elif s.refund:
            billed, refunded = 0, True
            returned[hold] += amount
            room[hold] -= amount
            refunds[req.user_id].append(s)
            unspent[(req.project_id, req.month)] += amount
        else:
            billed, refunded = amount, False
            spent[hold] += amount
            room[hold] -= amount
            billable[(req.listing_id, req.user_id, req.month)] += 1
        if req.request_id in flipped:
            flips.append((s.status, int(refunded), reason, req.request_id))
        else:
            calls.append((req.request_id, req.user_id, req.project_id, req.listing_id, req.tool_name[:191],
                          Verdict.DEBITED.value, amount, req.month, s.status, int(refunded), utc(s.called_at), now,
                          reason, hold))
        events.append(usage_event(s, billed, now))
    if calls:
        ledger._q("INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
                  " amount_micro_cents, period_year_month, status, refunded, created_at, settled_at, reason,"
                  " hold_id) VALUES "
                  + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(calls)),
                  [v for row in calls for v in row])
    for flip in flips:
        ledger._q("UPDATE mcpmeter_calls SET status = %s, refunded = %s, reason = %s WHERE request_id = %s", flip)
    for (listing, user, period), n in sorted(billable.items()):
        ledger._q(MYSQL.upsert(
            "INSERT INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month, billable_calls,"
            " first_called_at, last_called_at, created_at, updated_at) VALUES (%s, %s, 0, %s, %s, %s, %s, %s, %s)",
            "mcp_id, user_id", COUNT_BILLABLE), (listing, user, period, n, now, now, now, now))
    for user, settlements in sorted(refunds.items()):
        total = sum(_amount(s) for s in settlements)
        if ledger._q("UPDATE users SET credit_micro_cents = credit_micro_cents + %s WHERE id = %s",
                     (total, user)).rowcount != 1:
            continue  # a user deleted since (their ledger went with them): nothing to credit
        balance = ledger.balance(user) - total
        for s in settlements:
            balance += _amount(s)
            req = s.charge
            ledger._ledger_row(user, _amount(s), "refund", balance, req.request_id,
                               f"refund: {req.tool_name} on mcp {req.listing_id}"
                               + (f" ({s.reason[:32]})" if s.reason else ""), now)
    for hold in holds:
        if spent[hold] or returned[hold]:
            ledger._q("UPDATE mcpmeter_holds SET spent_micro_cents = spent_micro_cents + %s,"
                      " returned_micro_cents = returned_micro_cents + %s WHERE id = %s",
                      (spent[hold], returned[hold], hold))
    for (project, period), amount in sorted(unspent.items()):
        ledger._add_spend(project, period, -amount)
    ledger._q(f"{USAGE_EVENTS_INSERT} VALUES " + ", ".join([USAGE_EVENT_VALUES] * len(events)),
              [v for row in events for v in row])
    for s in batch:
        if s.key_id is not None and ledger.last_used.due("api_keys", s.key_id):
            ledger._q("UPDATE api_keys SET last_used_at = %s WHERE id = %s", (now, s.key_id))
        elif s.token_id is not None and ledger.last_used.due("oauth_access_tokens", s.token_id):
            ledger._q("UPDATE oauth_access_tokens SET last_used_at = %s WHERE id = %s", (now, s.token_id))
    return len(batch)


def _hold(s: Settlement) -> int:
    assert s.taken is not None and s.taken.hold is not None
    return s.taken.hold


def _amount(s: Settlement) -> int:
    assert s.taken is not None
    return s.taken.amount


def _credit(ledger: Ledger, user_id: int, amount: int, hold: int, description: str, now: str) -> None:
    if ledger._q("UPDATE users SET credit_micro_cents = credit_micro_cents + %s WHERE id = %s",
                 (amount, user_id)).rowcount == 1:
        _ledger_row(ledger, user_id, amount, ledger.balance(user_id), hold, description, now)


def _ledger_row(ledger: Ledger, user_id: int, amount: int, balance: int, hold: int, description: str,
                now: str) -> None:
    ledger._q("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, reference_type, reference_id,"
              " balance_after_micro_cents, description, created_at, updated_at)"
              " VALUES (%s, %s, 'adjustment', %s, %s, %s, %s, %s, %s)",
              (user_id, amount, HOLD, hold, balance, description, now, now))


def settle_after(config: Config) -> float:
    """How old a hold is when it settles: no call spent from it can still be recorded then (the
    wallet's life, the longest call, held tasks and rounds included, and sweeps that come late).

    Three sweeps: the one that retires the wallet may come a sweep late, the next one settles, and one
    more of slack for the last settlements' batch (it was a fixed 60 s: the same at the defaults, where
    a sweep is 60 s, but it kept holds of a short-lived configuration a minute longer than needed)."""
    return (config.wallet_seconds + 3 * sweep_interval(config)
            + max(config.max_upstream_timeout_ms / 1000, config.task_settle_seconds, config.round_settle_seconds,
                  config.stale_call_seconds))


def abandoned_after(config: Config) -> float:
    """How old a hold is when a gateway settles it without Redis (no gateway with wallets did): past
    any wallet's expiry (settle_after, whatever wallet_seconds its gateway had), and a day more."""
    return settle_after(replace(config, wallet_seconds=3600.0)) + 86400.0


def want(price: int, calls: int) -> int:
    """How much one grant asks for: `calls` calls at this price, within the column's range."""
    return min(price * max(calls, 1), MAX_MICRO_CENTS)

