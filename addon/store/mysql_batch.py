"""Billed settlements of many calls in one MySQL transaction: two round trips for the whole batch.

A billed answer's settlement (mysql_trip.settle) flips the call's journal row, counts the call in
the consumer's usage row and writes its usage_events row: one CALL, but about four statements and
a COMMIT per call for the server to run. Under
load these settlements queue up behind each other anyway, so here a batch of them shares one
transaction and one set of statements: the journal rows are locked in one SELECT ... FOR UPDATE
(request-id order, the primary key's), then one text flips them all (one UPDATE), upserts each
(listing, consumer, month) usage row once with its count, inserts every usage_events row in one
multi-row INSERT, stamps last_used_at and COMMITs.

Only billed settlements come here: they never touch `users`, `credit_transactions` or the
project's spend, so a batch takes no lock a charge takes first and waits for (charges lock a usage
row, then users, then spend, then insert their own journal row). Locks are taken in one order by
every batch of every gateway: the batch's own journal rows by primary key (request id), then usage
rows by (user, listing, month), under READ COMMITTED (no gap locks): two batches never wait on each
other in a cycle, and new calls' journal rows never wait on a batch. A settlement
whose journal row is not the unsettled row its charge reported (settled before, or disagreeing)
is left out: the caller settles it alone, through the Ledger, which reads what was really taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model import Settlement
from .sql import COUNT_BILLABLE, MYSQL, USAGE_EVENT_VALUES, USAGE_EVENTS_INSERT, LastUsed, usage_event, utc

_COUNT = MYSQL.upsert(
    "INSERT INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month, billable_calls,"
    " first_called_at, last_called_at, created_at, updated_at) VALUES {rows}",
    "mcp_id, user_id", COUNT_BILLABLE)


def batchable(s: Settlement) -> bool:
    """A billed settlement whose charge reported what it took and whose caller needs no balance."""
    return not s.refund and s.taken is not None and not s.need_balance


def lock_text(n: int) -> str:
    """The batch's first round trip: lock `n` journal rows by request id, and read them."""
    # The primary key, forced: with few unsettled rows the optimizer prefers the settled_at index,
    # or a scan, which locks every unsettled row of other calls and the gaps between them, so new
    # calls' journal INSERTs waited on the batch and deadlocked with it (measured). READ COMMITTED:
    # row locks only; under REPEATABLE READ a list of keys read as a range may also lock the gap
    # past its last row (an INSERT of a higher request id waited on it, measured).
    return ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED;"
            "SELECT request_id, verdict, amount_micro_cents, settled_at FROM mcpmeter_calls FORCE INDEX (PRIMARY)"
            f" WHERE request_id IN ({', '.join(['%s'] * n)}) FOR UPDATE")


async def settle_billed(conn: Any, batch: Sequence[Settlement], last_used: LastUsed) -> list[bool]:
    """Settle `batch` (each `batchable`) in one transaction, committed here; returns, per settlement,
    whether it was settled (False: nothing was written for it, settle it alone)."""
    first: dict[str, int] = {}  # request id -> its first settlement in the batch (a repeat goes alone)
    for i, s in enumerate(batch):
        first.setdefault(s.charge.request_id, i)
    cur = await conn.cursor()
    rids = sorted(first)
    await cur.execute(lock_text(len(rids)), rids)
    await cur.nextset()  # past the SET's empty result, to the SELECT's rows
    unsettled = {str(rid): (str(verdict), int(amount)) for rid, verdict, amount, settled in await cur.fetchall()
                 if settled is None}
    settled = [False] * len(batch)
    chosen: list[Settlement] = []
    for rid in rids:
        i = first[rid]
        s = batch[i]
        assert s.taken is not None
        if unsettled.get(rid) == (s.taken.verdict.value, s.taken.amount):
            settled[i] = True
            chosen.append(s)
    if not chosen:
        await conn.rollback()
        return settled
    now = utc()
    text, args = _text(chosen, now, last_used)
    await cur.execute(text, args)
    while await cur.nextset():  # read every result: a failing statement raises here, before COMMIT
        pass
    return settled


def _text(chosen: list[Settlement], now: str, last_used: LastUsed) -> tuple[str, list[Any]]:
    """The flips, counters, usage rows and stamps of `chosen` (in request-id order), ending with COMMIT."""
    parts: list[str] = []
    args: list[Any] = []
    rids = [s.charge.request_id for s in chosen]
    whens = " ".join(["WHEN %s THEN %s"] * len(chosen))
    parts.append(f"UPDATE mcpmeter_calls SET settled_at = %s, refunded = 0, status = CASE request_id {whens} END,"
                 f" reason = CASE request_id {whens} END WHERE request_id IN ({', '.join(['%s'] * len(rids))})")
    args.append(now)
    for s in chosen:
        args += [s.charge.request_id, s.status]
    for s in chosen:
        args += [s.charge.request_id, s.reason[:32] if s.reason else None]
    args += rids
    counts: dict[tuple[int, int, str], int] = {}
    for s in chosen:
        assert s.taken is not None
        if s.taken.amount > 0:
            key = (s.charge.user_id, s.charge.listing_id, s.charge.month)
            counts[key] = counts.get(key, 0) + 1
    if counts:
        # One row per (listing, consumer, month), in (user, listing, month) order: the lock order.
        parts.append(_COUNT.format(rows=", ".join(["(%s, %s, 0, %s, %s, %s, %s, %s, %s)"] * len(counts))))
        for (user, listing, period), n in sorted(counts.items()):
            args += [listing, user, period, n, now, now, now, now]
    parts.append(f"{USAGE_EVENTS_INSERT} VALUES " + ", ".join([USAGE_EVENT_VALUES] * len(chosen)))
    for s in chosen:
        assert s.taken is not None
        args += usage_event(s, s.taken.amount, now)
    keys = sorted({s.key_id for s in chosen if s.key_id is not None and last_used.due("api_keys", s.key_id)})
    tokens = sorted({s.token_id for s in chosen if s.key_id is None and s.token_id is not None
                     and last_used.due("oauth_access_tokens", s.token_id)})
    for table, ids in (("api_keys", keys), ("oauth_access_tokens", tokens)):
        if ids:
            parts.append(f"UPDATE {table} SET last_used_at = %s WHERE id IN ({', '.join(['%s'] * len(ids))})")
            args += [now, *ids]
    parts.append("COMMIT")
    return ";".join(parts), args
