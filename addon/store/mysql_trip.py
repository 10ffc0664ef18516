"""A charge or a settlement in ONE network round trip to MySQL / MariaDB, COMMIT included.

The Ledger (sql.py) sends a statement, reads its answer and decides the next one in Python:
about nine statements and a COMMIT per paid call, each a round trip with pymysql's packet work
on a worker thread. Here the charge and the settlement are each one CALL of a stored procedure
(CHARGE_DDL, SETTLE_DDL below; the gateway creates them at start) whose decisions are made in SQL:
ROW_COUNT() says whether a conditional write matched, and the writes that depend on it wait behind
an IF. Every INSERT is a single-row INSERT ... VALUES, which under InnoDB's default
innodb_autoinc_lock_mode=1 takes no table AUTO-INC lock (an INSERT ... SELECT does, held to its
statement's end while the transaction holds row locks: concurrent settlements deadlocked on it).
Both end with a SELECT of the outcome and COMMIT, and both run on the event loop through aiomysql
(mysql_loop.py), as does mysql_batch.py.

Money semantics are the Ledger's, statement for statement and in the same lock order (usage
row, users, spend for a charge; journal, users, spend or usage row for a settlement), with one
change of form: a refusal is undone in SQL instead of rolled back, so COMMIT always ends the
work. Short of credit, the debit matched nothing and nothing is written. Over the project cap
(checked, as in the Ledger, after the debit and the spend upsert, under their exclusive locks),
the procedure puts the credit back and the spend row back as it was (deleted if this call made
it): the tables end exactly as before.

A server error stops the work at the failing statement: COMMIT is never reached and the adapter
rolls back (and runs a deadlock victim again, as for any transaction). Running a charge or a
settlement again after the connection broke is safe even if the first COMMIT did land (an
ambiguous COMMIT: the answer was lost): a settlement's flip matches nothing; a charge first reads
its request's unsettled journal row (one primary-key read, no lock) and, finding it, answers what
the first run decided, its verdict and amount with the balance now, writing nothing. So a consumer
the first run debited is served, not refused for the credit that run took (a 402) nor failed by
the journal's key (a 503). Were the first run still under way on the server (its client gave up
waiting), the read misses it and the second run waits on its locks, then fails on the journal's
key once the first commits (a 503; the sweeper refunds the first run's debit, which nobody
settles) or, its lock wait timed out, runs again and finds the row. Nothing is taken twice. All
values go through pymysql's escaping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model import MICRO_CENTS_PER_CENT, ChargeRequest, ChargeResult, Settlement, Verdict
from .mysql_loop import one_trip, selected
from .sql import COUNT_BILLABLE, MYSQL, USAGE_EVENTS_INSERT, LastUsed, usage_event, utc

# The charge is a stored procedure (the gateway creates it at start, see mysql.py `ensure_schema`):
# one CALL, whose statements MariaDB parsed once per connection, instead of nine statements parsed
# and answered one by one (measured: about half the server's CPU per charge, and half pymysql's
# work). Its statements are the Ledger's in the Ledger's lock order: the free-tier row, then users,
# then the spend row; the cap is checked after the debit and the spend upsert, under their exclusive
# locks (testing it inside the debit's WHERE reads the spend row under a shared lock the upsert must
# then upgrade: two users charging one project deadlock on it, measured), and over the cap the debit
# and the spend are put back as they were (the row deleted if this call made it). ROW_COUNT() counts
# rows matched (the connection has CLIENT.FOUND_ROWS); every write it tests changes its row anyway.
# A new version of the procedure gets a new name: gateways of both versions can share a database
# (`ensure_schema` creates the names missing and leaves the others). v2 reads the call journal first,
# so a charge run again after its COMMIT landed answers what it decided (v1 decided again), and compares
# the spend with the cap in DECIMAL: v1's cap (BIGINT UNSIGNED cents) past 1.8e13 cents, times 1,000,000
# in BIGINT arithmetic, failed every charge of its project ("BIGINT UNSIGNED value is out of range").
# v3 takes its time from the database's clock, not the gateway's (p_now is gone), and its month too
# when p_period is NULL, and answers the month it counted in: the journal's created_at is what the
# sweeper compares with the database's clock (sql.py `stale_calls`), so a gateway whose clock runs
# ahead no longer refunds calls other gateways are still running, nor does one behind date its calls
# in the past for the others to refund.
CHARGE_PROCEDURE = "mcpmeter_charge_v3"
# The same charge without its COMMIT, for charges that queue up under load: many CALLs of it and one
# COMMIT share a transaction and a round trip (charge_batch below).
CHARGE_BATCH_PROCEDURE = "mcpmeter_charge_batch_v3"
# Text parameters are only stored, never compared, except the period and the request id (the
# gateway's UUIDs), whose repertoire is ASCII: a column of any utf8mb4 collation compares with them
# in its own collation (a parameter declared with one collation breaks charges on tables made with
# another: "Illegal mix of collations").
_VARCHAR = "VARCHAR({n}) CHARACTER SET utf8mb4"
_CHARGE_TEMPLATE = f"""CREATE PROCEDURE `{{name}}`(
  IN p_request VARCHAR(64) CHARACTER SET ascii, IN p_user BIGINT UNSIGNED, IN p_project BIGINT UNSIGNED,
  IN p_listing BIGINT UNSIGNED, IN p_tool {_VARCHAR.format(n=191)}, IN p_price BIGINT, IN p_allowance BIGINT,
  IN p_period VARCHAR(7) CHARACTER SET ascii, IN p_description {_VARCHAR.format(n=255)})
  MODIFIES SQL DATA SQL SECURITY INVOKER
BEGIN
  -- The database's clock, shared by every gateway (theirs may be skewed), in UTC whatever the
  -- session's time_zone; the month is the caller's when it names one (the gateway names none).
  DECLARE v_now DATETIME DEFAULT UTC_TIMESTAMP();
  DECLARE v_period VARCHAR(7) CHARACTER SET ascii DEFAULT COALESCE(p_period, DATE_FORMAT(v_now, '%Y-%m'));
  DECLARE v_verdict VARCHAR(20) DEFAULT '{Verdict.INSUFFICIENT_CREDIT.value}';
  DECLARE v_spend INT DEFAULT 0;
  DECLARE v_balance BIGINT DEFAULT NULL;
  DECLARE v_amount BIGINT DEFAULT 0;
  DECLARE v_replay VARCHAR(20) DEFAULT NULL;
  -- A charge run again after its COMMIT landed (the connection lost before the answer was read,
  -- mysql_loop.py) answers what that run decided and writes nothing: the request's unsettled journal
  -- row, read by primary key, and the balance now. Both reads are SELECT ... INTO, a consistent read
  -- taking no lock (a SET or IF with a subquery reads under a shared lock, with a gap lock where no
  -- row is: charges inserting other request ids would wait on it). That is enough at READ COMMITTED
  -- and REPEATABLE READ alike (charges, lone or batched, run at the server's default; a batch reads
  -- from its first CALL's snapshot): the first run is over, committed or rolled back (no row then).
  -- Were it still running on the server (its client gave up waiting), this read misses it: this
  -- run's writes wait on its locks and its ledger or journal INSERT fails as a duplicate once it
  -- commits (a 503; the sweeper refunds the first). A settled row (its call served or refunded
  -- already) or another user's is not answered: those INSERTs refuse the request id as a duplicate.
  -- MAX(): one row even when none matches (no "No data" warning). A replay answers the month the
  -- first run counted in, which its settlement must count in too.
  SELECT MAX(verdict), COALESCE(MAX(amount_micro_cents), 0), COALESCE(MAX(period_year_month), v_period)
    INTO v_replay, v_amount, v_period FROM mcpmeter_calls
    WHERE request_id = p_request AND user_id = p_user AND settled_at IS NULL;
  IF v_replay IS NOT NULL THEN
    SET v_verdict = v_replay;
    SELECT COALESCE(MAX(credit_micro_cents), 0) INTO v_balance FROM users WHERE id = p_user;
  ELSEIF p_price <= 0 THEN
    SET v_verdict = '{Verdict.UNPRICED.value}';
  ELSEIF p_allowance > 0 THEN
    INSERT IGNORE INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month, billable_calls,
      first_called_at, created_at, updated_at) VALUES (p_listing, p_user, 0, v_period, 0, v_now, v_now, v_now);
    UPDATE mcp_consumer_usage SET
      billable_calls = CASE WHEN period_year_month = v_period THEN billable_calls ELSE 0 END,
      free_calls_used = CASE WHEN period_year_month = v_period THEN free_calls_used ELSE 0 END + 1,
      period_year_month = v_period, last_called_at = v_now, updated_at = v_now
      WHERE mcp_id = p_listing AND user_id = p_user
      AND (period_year_month IS NULL OR period_year_month < v_period
           OR (period_year_month = v_period AND free_calls_used < p_allowance));
    IF ROW_COUNT() = 1 THEN
      SET v_verdict = '{Verdict.FREE.value}';
    END IF;
  END IF;
  IF v_verdict = '{Verdict.INSUFFICIENT_CREDIT.value}' THEN
    UPDATE users SET credit_micro_cents = credit_micro_cents - p_price
      WHERE id = p_user AND credit_micro_cents >= p_price;
    IF ROW_COUNT() = 1 THEN
      INSERT INTO mcpmeter_project_spend (project_id, period_year_month, spent_micro_cents)
        VALUES (p_project, v_period, p_price)
        ON DUPLICATE KEY UPDATE spent_micro_cents = spent_micro_cents + VALUES(spent_micro_cents);
      SET v_spend = ROW_COUNT();  -- 1: this call made the month's row, 2: it updated it
      IF EXISTS (SELECT 1 FROM projects p JOIN mcpmeter_project_spend s
                   ON s.project_id = p.id AND s.period_year_month = v_period
                 WHERE p.id = p_project AND p.spending_cap_cents_per_month IS NOT NULL
                   AND s.spent_micro_cents
                       > CAST(p.spending_cap_cents_per_month AS DECIMAL(20, 0)) * {MICRO_CENTS_PER_CENT}) THEN
        UPDATE users SET credit_micro_cents = credit_micro_cents + p_price WHERE id = p_user;
        IF v_spend = 1 THEN
          DELETE FROM mcpmeter_project_spend WHERE project_id = p_project AND period_year_month = v_period;
        ELSE
          UPDATE mcpmeter_project_spend SET spent_micro_cents = spent_micro_cents - p_price
            WHERE project_id = p_project AND period_year_month = v_period;
        END IF;
        SET v_verdict = '{Verdict.PROJECT_CAP_EXCEEDED.value}';
      ELSE
        SELECT credit_micro_cents INTO v_balance FROM users WHERE id = p_user;
        INSERT INTO credit_transactions (user_id, amount_micro_cents, type, reference_type,
          balance_after_micro_cents, description, request_id, created_at, updated_at)
          VALUES (p_user, -p_price, 'usage', 'mcpmeter_call', v_balance, p_description, p_request, v_now, v_now);
        SET v_verdict = '{Verdict.DEBITED.value}', v_amount = p_price;
      END IF;
    END IF;
  END IF;
  IF v_replay IS NULL
     AND v_verdict IN ('{Verdict.FREE.value}', '{Verdict.DEBITED.value}', '{Verdict.UNPRICED.value}') THEN
    INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,
      amount_micro_cents, period_year_month, created_at)
      VALUES (p_request, p_user, p_project, p_listing, p_tool, v_verdict, v_amount, v_period, v_now);
  END IF;
  IF v_balance IS NULL THEN
    -- A SET's subquery reads under a shared lock: the latest balance (the one a refusal was decided
    -- on), not the snapshot of the journal read above, which may predate a lock wait.
    SET v_balance = COALESCE((SELECT credit_micro_cents FROM users WHERE id = p_user), 0);
  END IF;
  SELECT v_verdict, v_balance, v_amount, v_period;
  {{commit}}
END"""
CHARGE_DDL = _CHARGE_TEMPLATE.format(name=CHARGE_PROCEDURE, commit="COMMIT;")
CHARGE_BATCH_DDL = _CHARGE_TEMPLATE.format(name=CHARGE_BATCH_PROCEDURE, commit="")

# A settlement is a stored procedure too: the Ledger's settle (sql.py), in its lock order (the journal
# row, then users, the ledger and spend for a refund, or the usage row, then usage_events, the key's
# stamp), trusting what the charge reported it took (the flip tests it: a journal that disagrees, or
# a call settled before, matches nothing and nothing is written; the caller then runs the Ledger's).
# Every write waits behind IF v_flip, and every INSERT is a single-row INSERT ... VALUES. The settlement
# was a multi-statement text before, its conditional inserts INSERT ... SELECT ... WHERE @flag: each a
# "bulk insert" to InnoDB, which under the default innodb_autoinc_lock_mode=1 takes the table's AUTO-INC
# lock to the statement's end while the transaction holds row locks; concurrent settlements deadlocked
# on it often enough to exhaust their attempts, leaving delivered calls to the sweeper's refund (measured).
# The flip always changes settled_at, so ROW_COUNT() reads the same whether it counts rows matched
# (CLIENT.FOUND_ROWS) or changed; so does the refund's credit (amount > 0).
SETTLE_PROCEDURE = "mcpmeter_settle_v1"
# The usage_events row as usage_event() builds it, one parameter per column of USAGE_EVENTS_INSERT.
_EVENT_TYPES = {
    "project_id": "BIGINT UNSIGNED", "mcp_id": "BIGINT UNSIGNED", "api_key_id": "BIGINT UNSIGNED",
    "tool_name": _VARCHAR.format(n=191), "client": _VARCHAR.format(n=40), "user_agent": _VARCHAR.format(n=255),
    "called_at": "DATETIME", "duration_ms": "INT UNSIGNED", "status": "SMALLINT UNSIGNED",
    "billed_micro_cents": "BIGINT UNSIGNED", "publisher_payout_micro_cents": "BIGINT UNSIGNED",
    "platform_fee_micro_cents": "BIGINT UNSIGNED", "request_id": "VARCHAR(64) CHARACTER SET ascii",
    "created_at": "DATETIME", "updated_at": "DATETIME",
}
_EVENT_COLUMNS = USAGE_EVENTS_INSERT.split("(", 1)[1].rstrip(")").split(", ")
SETTLE_DDL = f"""CREATE PROCEDURE `{SETTLE_PROCEDURE}`(
  IN p_request VARCHAR(64) CHARACTER SET ascii, IN p_user BIGINT UNSIGNED, IN p_project BIGINT UNSIGNED,
  IN p_listing BIGINT UNSIGNED, IN p_period VARCHAR(7) CHARACTER SET ascii, IN p_now DATETIME,
  IN p_refunded TINYINT, IN p_status SMALLINT UNSIGNED, IN p_reason {_VARCHAR.format(n=32)},
  IN p_verdict VARCHAR(20) CHARACTER SET ascii, IN p_amount BIGINT, IN p_description {_VARCHAR.format(n=255)},
  IN p_stamp_key BIGINT UNSIGNED, IN p_stamp_token BIGINT UNSIGNED, IN p_need_balance TINYINT,
  {", ".join(f"IN e_{column} {_EVENT_TYPES[column]}" for column in _EVENT_COLUMNS)})
  MODIFIES SQL DATA SQL SECURITY INVOKER
BEGIN
  DECLARE v_flip TINYINT DEFAULT 0;
  DECLARE v_balance BIGINT DEFAULT NULL;
  UPDATE mcpmeter_calls SET settled_at = p_now, refunded = p_refunded, status = p_status, reason = p_reason
    WHERE request_id = p_request AND settled_at IS NULL AND verdict = p_verdict AND amount_micro_cents = p_amount;
  SET v_flip = ROW_COUNT() = 1;
  IF v_flip THEN
    IF p_refunded AND p_verdict = '{Verdict.DEBITED.value}' AND p_amount > 0 THEN
      UPDATE users SET credit_micro_cents = credit_micro_cents + p_amount WHERE id = p_user;
      -- A user deleted since the charge (ON DELETE CASCADE took their ledger too) has no balance to
      -- credit: their call is settled refunded, bare, as the Ledger does (a ledger row would break
      -- the ledger's foreign key and fail the settlement, leaving the call to the sweeper).
      IF ROW_COUNT() = 1 THEN
        SELECT credit_micro_cents INTO v_balance FROM users WHERE id = p_user;
        INSERT INTO credit_transactions (user_id, amount_micro_cents, type, reference_type,
          balance_after_micro_cents, description, request_id, created_at, updated_at)
          VALUES (p_user, p_amount, 'refund', 'mcpmeter_call', v_balance, p_description, p_request, p_now, p_now);
      END IF;
      INSERT INTO mcpmeter_project_spend (project_id, period_year_month, spent_micro_cents)
        VALUES (p_project, p_period, -p_amount)
        ON DUPLICATE KEY UPDATE spent_micro_cents = spent_micro_cents + VALUES(spent_micro_cents);
    ELSEIF p_refunded AND p_verdict = '{Verdict.FREE.value}' THEN
      UPDATE mcp_consumer_usage SET free_calls_used = free_calls_used - 1, updated_at = p_now
        WHERE mcp_id = p_listing AND user_id = p_user AND period_year_month = p_period AND free_calls_used > 0;
    END IF;
    IF e_billed_micro_cents > 0 THEN
      {MYSQL.upsert(
          "INSERT INTO mcp_consumer_usage (mcp_id, user_id, free_calls_used, period_year_month, billable_calls,"
          " first_called_at, last_called_at, created_at, updated_at)"
          " VALUES (p_listing, p_user, 0, p_period, 1, p_now, p_now, p_now, p_now)",
          "mcp_id, user_id", COUNT_BILLABLE)};
    END IF;
    {USAGE_EVENTS_INSERT} VALUES ({", ".join(f"e_{column}" for column in _EVENT_COLUMNS)});
    IF p_stamp_key IS NOT NULL THEN
      UPDATE api_keys SET last_used_at = p_now WHERE id = p_stamp_key;
    ELSEIF p_stamp_token IS NOT NULL THEN
      UPDATE oauth_access_tokens SET last_used_at = p_now WHERE id = p_stamp_token;
    END IF;
    IF p_need_balance THEN
      -- A consistent read (SELECT ... INTO takes no lock, see the charge): the balance now, this
      -- settlement's refund included.
      SELECT COALESCE(MAX(credit_micro_cents), 0) INTO v_balance FROM users WHERE id = p_user;
    END IF;
  END IF;
  SELECT v_flip, v_balance;
  COMMIT;
END"""
PROCEDURES = {CHARGE_PROCEDURE: CHARGE_DDL, CHARGE_BATCH_PROCEDURE: CHARGE_BATCH_DDL, SETTLE_PROCEDURE: SETTLE_DDL}
_CALL_ARGS = "(%s, %s, %s, %s, %s, %s, %s, %s, %s)"


def _charge_args(req: ChargeRequest) -> tuple[Any, ...]:
    return (req.request_id, req.user_id, req.project_id, req.listing_id, req.tool_name[:191], max(req.price, 0),
            req.free_allowance, req.period, f"{req.tool_name} on mcp {req.listing_id}"[:255])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else bytes(value).decode()


def _outcome(row: Any) -> ChargeResult:
    """The procedure's answer: the verdict, the balance, the amount debited (the journal's) and the
    month the charge counted in."""
    return ChargeResult(Verdict(_text(row[0])), int(row[2]), int(row[1]), _text(row[3]))


async def charge(conn: Any, req: ChargeRequest) -> ChargeResult:
    """Ledger.charge in one round trip (a CALL); the transaction is committed (a refusal wrote nothing)."""
    _, row = await one_trip(conn, f"CALL `{CHARGE_PROCEDURE}`{_CALL_ARGS}", _charge_args(req))
    if row is None:
        raise RuntimeError("mysql: the charge procedure returned no outcome")
    return _outcome(row)


def batch_order(reqs: Sequence[ChargeRequest]) -> list[int]:
    """The order a batch's charges run in: by user, each user's on one listing (`fits`), so that a
    batch takes each user's rows in a lone charge's order (the free-tier row of (listing, user), then
    users, then the project's spend row), users ascending, as billed batches take usage rows: two
    batches, or a batch and a lone charge, never wait on each other in a cycle. Raises ValueError
    for a batch that does not fit."""
    listings: dict[int, int] = {}
    if not all(fits(listings, req) for req in reqs):
        raise ValueError("a batch charges one listing per user (mysql_trip.fits)")
    return sorted(range(len(reqs)), key=lambda i: (reqs[i].user_id, i))


def fits(listings: dict[int, int], req: ChargeRequest) -> bool:
    """Whether `req` may join a batch whose users charge these listings ({user: listing}), noting it.

    One listing per user in a batch: a second listing's free-tier row would be locked after the
    user's `users` row, which a lone charge of that listing, holding its free-tier row, waits for
    (a deadlock, measured). Its charge goes in the next batch."""
    return listings.setdefault(req.user_id, req.listing_id) == req.listing_id


async def charge_batch(conn: Any, reqs: Sequence[ChargeRequest], order: Sequence[int]) -> list[ChargeResult]:
    """Many charges in one transaction and one round trip: a CALL of the COMMIT-less procedure per
    charge, in `order` (batch_order's), then COMMIT. Each CALL decides as a lone charge would, seeing the
    batch's earlier debits; a refusal undoes its own writes in SQL, so one COMMIT ends them all. A
    failing statement (a duplicate request id, a deadlock) stops the text before the COMMIT: the
    caller rolls the whole batch back. Returns the outcomes in `reqs`' order."""
    args: list[Any] = []
    for i in order:
        args += _charge_args(reqs[i])
    cur = await conn.cursor()
    await cur.execute(";".join([f"CALL `{CHARGE_BATCH_PROCEDURE}`{_CALL_ARGS}"] * len(order) + ["COMMIT"]), args)
    rows = await selected(cur)
    if len(rows) != len(order) or any(row is None for row in rows):
        raise RuntimeError(f"mysql: {len(order)} charges in a batch returned {len(rows)} outcomes")
    row_of = dict(zip(order, rows, strict=True))
    return [_outcome(row_of[i]) for i in range(len(reqs))]


async def settle(conn: Any, s: Settlement, last_used: LastUsed) -> tuple[bool, int | None]:
    """Ledger.settle in one round trip (a CALL), trusting `s.taken` (what the charge reported).

    Returns (settled, balance). settled is False when the journal row was not the unsettled one
    `s.taken` describes (settled before, unknown, or taken disagrees): then nothing was written and
    the caller runs Ledger.settle, which reads what was really taken. Needs `s.taken`."""
    req, taken, now = s.charge, s.taken, utc()
    assert taken is not None
    reason = s.reason[:32] if s.reason else None
    # last_used_at is informational (once a minute): counted as stamped even if the flip matches
    # nothing and the procedure writes no stamp.
    stamp_key = s.key_id if s.key_id is not None and last_used.due("api_keys", s.key_id) else None
    stamp_token = (s.token_id if stamp_key is None and s.token_id is not None
                   and last_used.due("oauth_access_tokens", s.token_id) else None)
    args = (req.request_id, req.user_id, req.project_id, req.listing_id, req.month, now, int(s.refund), s.status,
            reason, taken.verdict.value, taken.amount,
            (f"refund: {req.tool_name} on mcp {req.listing_id}" + (f" ({reason})" if reason else ""))[:255],
            stamp_key, stamp_token, int(s.need_balance),
            *usage_event(s, 0 if s.refund else taken.amount, now))  # the usage_events row, as the Ledger writes it
    _, row = await one_trip(conn, f"CALL `{SETTLE_PROCEDURE}`({', '.join(['%s'] * len(args))})", args)
    if row is None:
        raise RuntimeError("mysql: the settle procedure returned no outcome")
    if row[0] != 1:
        return False, None  # every write was conditional on the flip: nothing was written
    return True, (int(row[1]) if s.need_balance else None)
