"""One behaviour suite for the Store protocol, run against every backend.

Each test gets a fresh database (SQLite in tmp_path; MySQL: a new database built from
schema.sql, dropped afterwards), writes the catalogue and consumers as plain SQL the way the
reference's app would, drives the store only through its async interface, and ends with
`reconcile`: the money invariants (SPEC I1-I4) checked against the tables themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from addon.auth import Credential, parse_authorization, token_hash
from addon.config import Config
from addon.model import ChargeRequest, ChargeResult, Consumer, Settlement, Verdict
from addon.store.base import Store, StoreUnavailable
from addon.store.sql import SQLITE, utc
from addon.store.sqlite import SqliteStore

from .dbutil import SCHEMA, Db, scratch_database

PERIOD = "2030-01"
NEXT_PERIOD = "2030-02"
FEE_BPS = 2000
PUBLISHER = 900  # the user who publishes the listings
OAUTH_CLIENT = 1


# --- backends ------------------------------------------------------------------------------------

# Columns the reference's MySQL layout requires (NOT NULL, no default) that the gateway never reads;
# the Laravel app fills them. Backends drop what their schema does not have.
_REQUIRED: dict[str, Any] = {
    "users": lambda c: {"name": f"user {c['id']}", "email": f"user{c['id']}@example.test", "password": "x"},
    "projects": lambda c: {"name": f"project {c['id']}", "slug": f"project-{c['id']}"},
    "mcps": lambda c: {"name": c["slug"], "category": "tools", "publisher_id": PUBLISHER},
    "oauth_clients": lambda c: {"name": "a client", "redirect_uris": "[]"},
    "oauth_access_tokens": lambda c: {"scopes": "[]", "token_prefix": "mcpm_oauth_"},
}


class Backend:
    """A store under test plus plain SQL (`%s` placeholders) on the same database."""

    name: str
    store: Store
    opening: dict[int, int]  # each user's balance before the store touched it

    def execute(self, statement: str, args: Sequence[Any] = ()) -> int: ...

    def rows(self, statement: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def columns(self, table: str) -> set[str]: ...

    def open_store(self) -> Store:
        """Another store on the same database: a second gateway instance."""
        raise NotImplementedError

    def close(self) -> None: ...

    def value(self, statement: str, args: Sequence[Any] = ()) -> Any:
        rows = self.rows(statement, args)
        assert len(rows) == 1, rows
        return rows[0][0]

    def insert(self, table: str, **values: Any) -> int:
        row = {**_REQUIRED.get(table, lambda c: {})(values), **values}
        row = {k: v for k, v in row.items() if k in self.columns(table)}
        return self.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})",
                            list(row.values()))


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.config = Config(store="sqlite", sqlite_path=str(tmp_path / "ledger.db"))
        self.store = SqliteStore(self.config)
        self.opening = {}
        self.conn = sqlite3.connect(self.config.sqlite_path, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout=5000")

    def execute(self, statement: str, args: Sequence[Any] = ()) -> int:
        cur = self.conn.execute(SQLITE.sql(statement), tuple(args))
        return cur.lastrowid if statement.lstrip().upper().startswith("INSERT") else cur.rowcount

    def rows(self, statement: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(SQLITE.sql(statement), tuple(args)).fetchall()

    def columns(self, table: str) -> set[str]:
        return {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        self.store.close()
        self.conn.close()


class MysqlBackend(Backend):
    name = "mysql"

    def __init__(self, settings: Any) -> None:
        from addon.store.mysql import MysqlStore

        self.config = Config(store="mysql", mysql=settings)
        self._cls = MysqlStore
        self.db = Db(settings)
        self.stores: list[Store] = []
        self.store = self.open_store()
        self.opening = {}
        self._columns: dict[str, set[str]] = {}

    def open_store(self) -> Store:
        store = self._cls(self.config)
        self.stores.append(store)
        return store

    def execute(self, statement: str, args: Sequence[Any] = ()) -> int:
        return self.db.execute(statement, args)

    def rows(self, statement: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.rows(statement, args)

    def columns(self, table: str) -> set[str]:
        if table not in self._columns:
            self._columns[table] = self.db.columns(table)
        return self._columns[table]

    def close(self) -> None:
        for store in self.stores:
            store.close()
        self.db.close()


def _prepare(backend: Backend) -> Backend:
    backend.insert("users", id=PUBLISHER, status="active", credit_micro_cents=0)
    backend.insert("oauth_clients", id=OAUTH_CLIENT, client_id="test-client")
    return backend


@contextlib.contextmanager
def open_backend(kind: str, tmp_path: Path) -> Iterator[Backend]:
    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            backend: Backend = SqliteBackend(tmp_path)
        else:
            backend = MysqlBackend(stack.enter_context(scratch_database(SCHEMA)))
        stack.callback(backend.close)  # before the database is dropped
        yield _prepare(backend)


@pytest.fixture(params=["sqlite", "mysql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with open_backend(request.param, tmp_path) as backend:
        yield backend


@pytest.fixture
def mysql_db(tmp_path: Path) -> Iterator[Backend]:
    with open_backend("mysql", tmp_path) as backend:
        yield backend


# --- the world: consumers, listings, calls ---------------------------------------------------------

@dataclass(frozen=True)
class Who:
    user_id: int
    project_id: int
    key: str
    key_id: int


def add_consumer(db: Backend, user_id: int, *, credit: int = 0, status: str = "active", env: str = "live",
                 cap_cents: int | None = None, revoked: bool = False) -> Who:
    """A user with one project and one key; the opening balance is remembered for `reconcile`."""
    if user_id not in db.opening:
        db.insert("users", id=user_id, status=status, credit_micro_cents=credit, created_at=utc(), updated_at=utc())
        db.opening[user_id] = credit
    project_id = user_id * 10 + len(db.rows("SELECT id FROM projects WHERE user_id = %s", (user_id,)))
    db.insert("projects", id=project_id, user_id=user_id, spending_cap_cents_per_month=cap_cents)
    key = f"mcpm_{env}_{uuid.uuid4().hex}"
    key_id = db.insert("api_keys", user_id=user_id, project_id=project_id, key_prefix=key[:14],
                       key_hash=token_hash(key), env=env, revoked_at=utc() if revoked else None)
    return Who(user_id, project_id, key, key_id)


def add_listing(db: Backend, mcp_id: int, slug: str, *, price: int | None = None,
                tools: dict[str, int] | None = None, free_model: Sequence[str] = (), free: int = 0,
                status: str = "live", transport: str = "streamable", headers: str | None = None,
                rpm: int | None = None, rpd: int | None = None, timeout: int | None = None,
                bill_tool_errors: bool = False) -> int:
    db.insert("mcps", id=mcp_id, slug=slug, upstream_url=f"http://127.0.0.1:9/{slug}", upstream_headers=headers,
              transport=transport, status=status, free_calls_per_consumer=free, rate_limit_per_minute=rpm,
              rate_limit_per_day=rpd, upstream_timeout_seconds=timeout, bill_tool_errors=int(bill_tool_errors))
    rules: list[tuple[str | None, int, str]] = [(None, price, "per_call")] if price is not None else []
    rules += [(tool, p, "per_call") for tool, p in (tools or {}).items()]
    rules += [(tool, 999, "free") for tool in free_model]  # model 'free' wins over a stray price
    for tool, p, model in rules:
        db.insert("pricing_rules", mcp_id=mcp_id, tool_name=tool, model=model, price_micro_cents=p)
    return mcp_id


def cred(token: str) -> Credential:
    credential = parse_authorization(f"Bearer {token}")
    assert credential is not None
    return credential


def call(who: Who, listing_id: int, price: int, *, free: int = 0, period: str = PERIOD,
         tool: str = "search") -> ChargeRequest:
    return ChargeRequest(request_id=str(uuid.uuid4()), user_id=who.user_id, project_id=who.project_id,
                         listing_id=listing_id, tool_name=tool, price=price, free_allowance=free, period=period)


def outcome(req: ChargeRequest, who: Who, *, refund: bool = False, status: int = 200) -> Settlement:
    return Settlement(charge=req, refund=refund, status=status, duration_ms=42, called_at=time.time(),
                      key_id=who.key_id, token_id=None, client="claude-code", user_agent="claude-code/1.0",
                      fee_bps=FEE_BPS)


# --- the invariants ---------------------------------------------------------------------------------

def reconcile(db: Backend) -> None:
    """SPEC I1-I4 read back from the tables; call it after every scenario.

    - per user, balance == opening + SUM(ledger), every balance_after_micro_cents is the running
      balance, and no balance is negative (I1, I3);
    - every debited call has exactly one usage row and, if refunded, exactly one refund row of the
      same amount; free and unpriced calls move no money; no ledger row names an unknown call (I2, I4);
    - each project's monthly spend equals its debits net of refunds;
    - each settled call has exactly one usage_events row, billed what was kept, payout + fee = billed.
    """
    for user_id, balance in db.rows("SELECT id, credit_micro_cents FROM users ORDER BY id"):
        running = db.opening.get(int(user_id), 0)
        for amount, after in db.rows("SELECT amount_micro_cents, balance_after_micro_cents FROM credit_transactions"
                                     " WHERE user_id = %s ORDER BY id", (user_id,)):
            running += int(amount)
            assert int(after) == running, f"user {user_id}: balance_after {after} != running balance {running}"
        assert int(balance) == running, f"user {user_id}: balance {balance} != opening + ledger = {running}"
        assert int(balance) >= 0, f"user {user_id} overspent: {balance}"

    spend: Counter[tuple[int, str]] = Counter()
    calls = db.rows("SELECT request_id, project_id, verdict, amount_micro_cents, period_year_month, refunded,"
                    " settled_at FROM mcpmeter_calls")
    for request_id, project_id, verdict, amount, period, refunded, settled_at in calls:
        amount = int(amount)
        ledger = db.rows("SELECT type, amount_micro_cents FROM credit_transactions WHERE request_id = %s ORDER BY id",
                         (request_id,))
        ledger = [(str(kind), int(a)) for kind, a in ledger]
        if verdict == Verdict.DEBITED:
            assert amount > 0
            assert ledger == [("usage", -amount)] + ([("refund", amount)] if refunded else []), (request_id, ledger)
            spend[(int(project_id), str(period))] += 0 if refunded else amount
        else:
            assert verdict in (Verdict.FREE, Verdict.UNPRICED), verdict
            assert amount == 0 and ledger == [], (request_id, ledger)
        events = db.rows("SELECT billed_micro_cents, publisher_payout_micro_cents, platform_fee_micro_cents"
                         " FROM usage_events WHERE request_id = %s", (request_id,))
        if settled_at is None:
            assert events == []
        else:
            assert len(events) == 1, (request_id, events)
            billed, payout, fee = (int(x) for x in events[0])
            assert billed == (0 if refunded else amount)
            assert payout + fee == billed and fee == billed * FEE_BPS // 10_000
    orphans = db.value("SELECT COUNT(*) FROM credit_transactions t LEFT JOIN mcpmeter_calls c"
                       " ON c.request_id = t.request_id WHERE t.request_id IS NOT NULL AND c.request_id IS NULL")
    assert int(orphans) == 0, "a ledger row names a call the journal does not know"
    recorded = {(int(p), str(m)): int(s) for p, m, s in db.rows(
        "SELECT project_id, period_year_month, spent_micro_cents FROM mcpmeter_project_spend")}
    assert {k: v for k, v in recorded.items() if v} == {k: v for k, v in spend.items() if v}


def snapshot(db: Backend) -> dict[str, Any]:
    """Everything a refused charge must leave untouched."""
    return {
        "balances": db.rows("SELECT id, credit_micro_cents FROM users ORDER BY id"),
        "ledger": db.rows("SELECT id, user_id, amount_micro_cents FROM credit_transactions ORDER BY id"),
        "calls": db.rows("SELECT request_id FROM mcpmeter_calls ORDER BY request_id"),
        "spend": db.rows("SELECT project_id, period_year_month, spent_micro_cents FROM mcpmeter_project_spend"
                         " ORDER BY project_id, period_year_month"),
        "free": db.rows("SELECT mcp_id, user_id, free_calls_used, period_year_month FROM mcp_consumer_usage"
                        " ORDER BY mcp_id, user_id"),
    }


# --- consumers -------------------------------------------------------------------------------------

async def test_consumer_by_key_hash(db: Backend) -> None:
    live = add_consumer(db, 1, credit=5)
    test = add_consumer(db, 2, env="test")
    revoked = add_consumer(db, 3, revoked=True)
    suspended = add_consumer(db, 4, status="suspended")

    assert await db.store.find_consumer(cred(live.key)) == Consumer(
        user_id=1, project_id=live.project_id, status="active", key_id=live.key_id, env="live")
    assert await db.store.find_consumer(cred(test.key)) == Consumer(
        user_id=2, project_id=test.project_id, status="active", key_id=test.key_id, env="test")
    assert await db.store.find_consumer(cred(revoked.key)) is None
    found = await db.store.find_consumer(cred(suspended.key))
    assert found is not None and found.status == "suspended" and found.user_id == 4
    assert await db.store.find_consumer(cred("mcpm_live_" + "x" * 32)) is None


async def test_oauth_token_acts_for_the_oldest_project(db: Backend) -> None:
    db.insert("users", id=5, status="active", credit_micro_cents=0)
    db.insert("projects", id=52, user_id=5)  # created first, but not the oldest id
    db.insert("projects", id=51, user_id=5)
    db.insert("users", id=6, status="active", credit_micro_cents=0)  # a user without a project
    expires = int(time.time()) + 3600

    def token(user_id: int, expires_at: int, revoked: bool = False) -> tuple[str, int]:
        value = f"mcpm_oauth_{uuid.uuid4().hex}"
        token_id = db.insert("oauth_access_tokens", token_hash=token_hash(value), user_id=user_id,
                             client_id=OAUTH_CLIENT, expires_at=utc(expires_at),
                             revoked_at=utc() if revoked else None)
        return value, token_id

    valid, valid_id = token(5, expires)
    found = await db.store.find_consumer(cred(valid))
    assert found is not None
    assert (found.user_id, found.project_id, found.status, found.env) == (5, 51, "active", "oauth")
    assert (found.token_id, found.key_id) == (valid_id, None)
    assert found.expires_at == expires
    assert await db.store.find_consumer(cred(token(5, int(time.time()) - 60)[0])) is None
    assert await db.store.find_consumer(cred(token(5, expires, revoked=True)[0])) is None
    assert await db.store.find_consumer(cred(token(6, expires)[0])) is None


# --- listings --------------------------------------------------------------------------------------

async def test_listing_with_default_and_tool_prices(db: Backend) -> None:
    add_listing(db, 10, "weather", price=1000, tools={"forecast": 2500, "ping": 0}, free_model=["gratis"],
                free=3, transport="sse", headers='{"X-Api-Key": "secret"}', rpm=5, rpd=100, timeout=12,
                bill_tool_errors=True)
    add_listing(db, 11, "no-default", tools={"only": 7}, status="paused")

    weather = await db.store.find_listing("weather")
    assert weather is not None
    assert (weather.id, weather.slug, weather.status, weather.transport) == (10, "weather", "live", "sse")
    assert weather.upstream_url == "http://127.0.0.1:9/weather"
    assert weather.default_price == 1000
    assert dict(weather.tool_prices) == {"forecast": 2500, "ping": 0, "gratis": 0}
    assert dict(weather.upstream_headers) == {"X-Api-Key": "secret"}
    assert (weather.free_calls_per_consumer, weather.rate_limit_per_minute, weather.rate_limit_per_day,
            weather.upstream_timeout_seconds, weather.bill_tool_errors) == (3, 5, 100, 12, True)

    other = await db.store.find_listing("no-default")
    assert other is not None and other.status == "paused"
    assert other.default_price is None and dict(other.tool_prices) == {"only": 7}
    assert other.bill_tool_errors is False and other.rate_limit_per_minute is None
    assert await db.store.find_listing("nope") is None


# --- charge ----------------------------------------------------------------------------------------

async def test_debit_with_its_ledger_row(db: Backend) -> None:
    who = add_consumer(db, 1, credit=10_000)
    add_listing(db, 10, "w", price=3000)
    req = call(who, 10, 3000)

    assert await db.store.charge(req) == ChargeResult(Verdict.DEBITED, 3000, 7000)
    assert await db.store.balance(1) == 7000
    assert db.rows("SELECT amount_micro_cents, type, balance_after_micro_cents, request_id FROM credit_transactions"
                   " WHERE user_id = 1") == [(-3000, "usage", 7000, req.request_id)]
    exact = await db.store.charge(call(who, 10, 7000))  # the whole balance may be spent
    assert exact == ChargeResult(Verdict.DEBITED, 7000, 0)
    reconcile(db)


async def test_insufficient_credit_changes_nothing(db: Backend) -> None:
    who = add_consumer(db, 1, credit=2999)
    add_listing(db, 10, "w", price=3000)
    before = snapshot(db)

    assert await db.store.charge(call(who, 10, 3000)) == ChargeResult(Verdict.INSUFFICIENT_CREDIT, 0, 2999)
    assert snapshot(db) == before
    reconcile(db)


async def test_project_cap_refuses_and_changes_nothing(db: Backend) -> None:
    who = add_consumer(db, 1, credit=10_000_000, cap_cents=1)  # 1 cent = 1,000,000 µ¢ a month
    add_listing(db, 10, "w", price=400_000)

    for expected_balance in (9_600_000, 9_200_000):
        assert (await db.store.charge(call(who, 10, 400_000))).balance == expected_balance
    before = snapshot(db)
    refused = await db.store.charge(call(who, 10, 400_000))  # 1,200,000 > 1,000,000
    assert refused == ChargeResult(Verdict.PROJECT_CAP_EXCEEDED, 0, 9_200_000)
    assert snapshot(db) == before
    assert (await db.store.charge(call(who, 10, 200_000))).verdict is Verdict.DEBITED  # exactly the cap
    assert (await db.store.charge(call(who, 10, 1))).verdict is Verdict.PROJECT_CAP_EXCEEDED
    assert (await db.store.charge(call(who, 10, 400_000, period=NEXT_PERIOD))).verdict is Verdict.DEBITED
    assert await db.store.balance(1) == 8_600_000
    reconcile(db)


async def test_free_tier_up_to_the_allowance_then_debits(db: Backend) -> None:
    who = add_consumer(db, 1, credit=10_000)
    add_listing(db, 10, "w", price=1000, free=3)

    for _ in range(3):
        assert await db.store.charge(call(who, 10, 1000, free=3)) == ChargeResult(Verdict.FREE, 0, 10_000)
    assert await db.store.charge(call(who, 10, 1000, free=3)) == ChargeResult(Verdict.DEBITED, 1000, 9000)
    assert db.rows("SELECT free_calls_used, period_year_month FROM mcp_consumer_usage"
                   " WHERE mcp_id = 10 AND user_id = 1") == [(3, PERIOD)]
    reconcile(db)


async def test_free_tier_resets_in_a_new_month(db: Backend) -> None:
    who = add_consumer(db, 1, credit=0)
    add_listing(db, 10, "w", price=1000, free=2)

    verdicts = [(await db.store.charge(call(who, 10, 1000, free=2))).verdict for _ in range(3)]
    assert verdicts == [Verdict.FREE, Verdict.FREE, Verdict.INSUFFICIENT_CREDIT]
    assert (await db.store.charge(call(who, 10, 1000, free=2, period=NEXT_PERIOD))).verdict is Verdict.FREE
    assert db.rows("SELECT free_calls_used, period_year_month FROM mcp_consumer_usage"
                   " WHERE mcp_id = 10 AND user_id = 1") == [(1, NEXT_PERIOD)]
    reconcile(db)


async def test_a_month_boundary_never_hands_out_the_free_tier_twice(db: Backend) -> None:
    """Calls of the old month settled or charged after the new month's first call leave the usage
    row in the new month: its free calls are not reset, and an old-month call is not free."""
    who = add_consumer(db, 1, credit=100_000)
    add_listing(db, 10, "w", price=1000, free=1)
    assert (await db.store.charge(call(who, 10, 1000, free=1))).verdict is Verdict.FREE
    late = call(who, 10, 1000, free=1)  # answered after midnight
    late_taken = await db.store.charge(late)
    assert late_taken.verdict is Verdict.DEBITED
    assert (await db.store.charge(call(who, 10, 1000, free=1, period=NEXT_PERIOD))).verdict is Verdict.FREE
    await db.store.settle(dataclasses.replace(outcome(late, who), taken=late_taken))
    assert db.rows("SELECT free_calls_used, period_year_month FROM mcp_consumer_usage"
                   " WHERE mcp_id = 10 AND user_id = 1") == [(1, NEXT_PERIOD)]
    # The new month's one free call is used; so is, from the row's view, any old-month claim.
    assert (await db.store.charge(call(who, 10, 1000, free=1, period=NEXT_PERIOD))).verdict is Verdict.DEBITED
    assert (await db.store.charge(call(who, 10, 1000, free=1))).verdict is Verdict.DEBITED
    assert db.rows("SELECT free_calls_used, period_year_month FROM mcp_consumer_usage"
                   " WHERE mcp_id = 10 AND user_id = 1") == [(1, NEXT_PERIOD)]
    reconcile(db)


async def test_a_request_id_is_charged_once(db: Backend) -> None:
    who = add_consumer(db, 1, credit=10_000)
    add_listing(db, 10, "w", price=1000)
    req = call(who, 10, 1000)

    await db.store.charge(req)
    with contextlib.suppress(StoreUnavailable):  # a replayed request id is refused, never debited again
        await db.store.charge(req)
    assert await db.store.balance(1) == 9000
    reconcile(db)


# --- settle ----------------------------------------------------------------------------------------

async def test_billed_call_is_recorded_with_payout_and_fee(db: Backend) -> None:
    who = add_consumer(db, 1, credit=5_000_000)
    add_listing(db, 10, "w", price=1_000_003)
    req = call(who, 10, 1_000_003, tool="forecast")
    await db.store.charge(req)

    assert await db.store.settle(outcome(req, who, status=200)) == 3_999_997
    events = db.rows("SELECT project_id, mcp_id, api_key_id, tool_name, client, user_agent, duration_ms, status,"
                     " billed_micro_cents, publisher_payout_micro_cents, platform_fee_micro_cents, request_id"
                     " FROM usage_events")
    assert events == [(who.project_id, 10, who.key_id, "forecast", "claude-code", "claude-code/1.0", 42, 200,
                       1_000_003, 800_003, 200_000, req.request_id)]  # fee 20 % rounded down
    assert db.value("SELECT last_used_at FROM api_keys WHERE id = %s", (who.key_id,)) is not None
    assert db.rows("SELECT billable_calls FROM mcp_consumer_usage WHERE mcp_id = 10 AND user_id = 1") == [(1,)]
    # Settled is final: a later refund for the same call pays nothing.
    assert await db.store.settle(outcome(req, who, refund=True, status=502)) == 3_999_997
    assert int(db.value("SELECT COUNT(*) FROM usage_events")) == 1
    reconcile(db)


async def test_refund_restores_the_balance_exactly_once(db: Backend) -> None:
    who = add_consumer(db, 1, credit=5000)
    add_listing(db, 10, "w", price=5000)
    req = call(who, 10, 5000)
    assert (await db.store.charge(req)).balance == 0

    assert await db.store.settle(outcome(req, who, refund=True, status=502)) == 5000
    assert await db.store.settle(outcome(req, who, refund=True, status=502)) == 5000
    assert await db.store.balance(1) == 5000
    assert db.rows("SELECT type, amount_micro_cents, balance_after_micro_cents FROM credit_transactions"
                   " WHERE user_id = 1 ORDER BY id") == [("usage", -5000, 0), ("refund", 5000, 5000)]
    assert db.rows("SELECT status, billed_micro_cents, publisher_payout_micro_cents, platform_fee_micro_cents"
                   " FROM usage_events") == [(502, 0, 0, 0)]
    reconcile(db)


async def test_concurrent_refunds_of_one_call_pay_once(db: Backend) -> None:
    who = add_consumer(db, 1, credit=5000)
    add_listing(db, 10, "w", price=5000)
    req = call(who, 10, 5000)
    await db.store.charge(req)

    await asyncio.gather(*(db.store.settle(outcome(req, who, refund=True, status=502)) for _ in range(10)))
    assert await db.store.balance(1) == 5000
    assert int(db.value("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'")) == 1
    reconcile(db)


async def test_refunded_free_call_gives_its_slot_back(db: Backend) -> None:
    who = add_consumer(db, 1, credit=0)
    add_listing(db, 10, "w", price=1000, free=1)
    first = call(who, 10, 1000, free=1)

    assert (await db.store.charge(first)).verdict is Verdict.FREE
    assert (await db.store.charge(call(who, 10, 1000, free=1))).verdict is Verdict.INSUFFICIENT_CREDIT
    await db.store.settle(outcome(first, who, refund=True, status=502))
    await db.store.settle(outcome(first, who, refund=True, status=502))  # once only: not two slots back
    assert (await db.store.charge(call(who, 10, 1000, free=1))).verdict is Verdict.FREE
    assert (await db.store.charge(call(who, 10, 1000, free=1))).verdict is Verdict.INSUFFICIENT_CREDIT
    reconcile(db)


async def test_unpriced_call_is_recorded_never_charged(db: Backend) -> None:
    who = add_consumer(db, 1, credit=100)
    add_listing(db, 10, "w", price=0, free=5)
    req = call(who, 10, 0, free=5)

    assert await db.store.charge(req) == ChargeResult(Verdict.UNPRICED, 0, 100)
    assert await db.store.settle(outcome(req, who)) == 100
    assert db.rows("SELECT verdict, amount_micro_cents FROM mcpmeter_calls") == [("unpriced", 0)]
    assert db.rows("SELECT status, billed_micro_cents FROM usage_events") == [(200, 0)]
    assert db.rows("SELECT amount_micro_cents FROM credit_transactions") == []
    assert db.rows("SELECT free_calls_used FROM mcp_consumer_usage WHERE free_calls_used > 0") == []  # no slot used
    reconcile(db)


# --- concurrency -----------------------------------------------------------------------------------

async def test_concurrent_charges_never_overspend(db: Backend) -> None:
    price = 7_000
    who = add_consumer(db, 1, credit=20 * price)
    add_listing(db, 10, "w", price=price)

    results = await asyncio.gather(*(db.store.charge(call(who, 10, price)) for _ in range(50)))
    assert Counter(r.verdict for r in results) == {Verdict.DEBITED: 20, Verdict.INSUFFICIENT_CREDIT: 30}
    assert await db.store.balance(1) == 0
    reconcile(db)


async def test_concurrent_free_claims_never_exceed_the_allowance(db: Backend) -> None:
    who = add_consumer(db, 1, credit=0)
    add_listing(db, 10, "w", price=1000, free=10)

    results = await asyncio.gather(*(db.store.charge(call(who, 10, 1000, free=10)) for _ in range(50)))
    assert Counter(r.verdict for r in results) == {Verdict.FREE: 10, Verdict.INSUFFICIENT_CREDIT: 40}
    reconcile(db)


async def test_concurrent_charges_and_settlements_reconcile(db: Backend) -> None:
    price = 1000
    users = [add_consumer(db, u, credit=30 * price) for u in (1, 2, 3)]
    add_listing(db, 10, "w", price=price, free=5)

    async def one(who: Who, i: int) -> tuple[Verdict, bool]:
        req = call(who, 10, price, free=5)
        result = await db.store.charge(req)
        refund = i % 3 == 0
        if result.accepted:
            await db.store.settle(outcome(req, who, refund=refund, status=502 if refund else 200))
        return result.verdict, refund

    results = await asyncio.gather(*(one(who, i) for i in range(40) for who in users))
    assert {v for v, _ in results} <= {Verdict.FREE, Verdict.DEBITED, Verdict.INSUFFICIENT_CREDIT}
    for who in users:
        kept = int(db.value("SELECT COUNT(*) FROM mcpmeter_calls WHERE user_id = %s AND verdict = 'debited'"
                            " AND refunded = 0", (who.user_id,)))
        assert await db.store.balance(who.user_id) == 30 * price - kept * price
    reconcile(db)


# --- two gateways on one database (MySQL) ------------------------------------------------------------

async def test_two_gateways_never_overspend(mysql_db: Backend) -> None:
    price = 12_345
    who = add_consumer(mysql_db, 1, credit=80 * price)
    add_listing(mysql_db, 10, "w", price=price)
    stores = [mysql_db.store, mysql_db.open_store()]

    results = await asyncio.gather(*(stores[i % 2].charge(call(who, 10, price)) for i in range(200)))
    assert Counter(r.verdict for r in results) == {Verdict.DEBITED: 80, Verdict.INSUFFICIENT_CREDIT: 120}
    assert await stores[1].balance(1) == 0
    reconcile(mysql_db)


async def test_two_gateways_never_exceed_the_free_allowance(mysql_db: Backend) -> None:
    who = add_consumer(mysql_db, 1, credit=30 * 1000)
    add_listing(mysql_db, 10, "w", price=1000, free=10)
    stores = [mysql_db.store, mysql_db.open_store()]

    results = await asyncio.gather(*(stores[i % 2].charge(call(who, 10, 1000, free=10)) for i in range(100)))
    assert Counter(r.verdict for r in results) == {
        Verdict.FREE: 10, Verdict.DEBITED: 30, Verdict.INSUFFICIENT_CREDIT: 60}
    assert mysql_db.rows("SELECT free_calls_used FROM mcp_consumer_usage WHERE mcp_id = 10 AND user_id = 1") == [(10,)]
    reconcile(mysql_db)


async def test_two_gateways_refund_a_call_once(mysql_db: Backend) -> None:
    who = add_consumer(mysql_db, 1, credit=5000)
    add_listing(mysql_db, 10, "w", price=5000)
    stores = [mysql_db.store, mysql_db.open_store()]
    req = call(who, 10, 5000)
    await stores[0].charge(req)

    await asyncio.gather(*(stores[i % 2].settle(outcome(req, who, refund=True, status=502)) for i in range(20)))
    assert await stores[1].balance(1) == 5000
    assert mysql_db.rows("SELECT type FROM credit_transactions WHERE request_id = %s ORDER BY id",
                         (req.request_id,)) == [("usage",), ("refund",)]
    reconcile(mysql_db)


async def test_sweep_refunds_calls_their_gateway_never_settled(db: Backend) -> None:
    who = add_consumer(db, 1, credit=10_000)
    add_listing(db, 10, "w", price=1000, free=1)
    free, orphan, settled, fresh = (call(who, 10, 1000, free=1) for _ in range(4))
    for req in (free, orphan, settled, fresh):
        assert (await db.store.charge(req)).accepted
    await db.store.settle(outcome(settled, who))
    # The gateway that took `free` and `orphan` died an hour ago; `fresh` may still be running.
    an_hour_ago = utc(time.time() - 3600)
    db.execute("UPDATE mcpmeter_calls SET created_at = %s WHERE request_id IN (%s, %s, %s)",
               (an_hour_ago, free.request_id, orphan.request_id, settled.request_id))

    assert await db.store.sweep(600, FEE_BPS) == 2
    assert await db.store.sweep(600, FEE_BPS) == 0  # exactly once
    assert await db.store.balance(1) == 10_000 - 1000 - 1000  # `settled` and `fresh` stay paid
    rows = db.rows("SELECT request_id, status, billed_micro_cents FROM usage_events ORDER BY id")
    assert rows[0] == (settled.request_id, 200, 1000)
    assert sorted(rows[1:]) == sorted([(free.request_id, 0, 0), (orphan.request_id, 0, 0)])  # swept in any order
    assert (await db.store.charge(call(who, 10, 1000, free=1))).verdict is Verdict.FREE  # the slot came back
    reconcile(db)


async def test_held_calls_are_swept_only_by_their_own_limit_and_rule(db: Backend) -> None:
    """Tasks and input_required rounds (addon/deferred.py): marked held, the plain sweep leaves them;
    the held sweep refunds an expired task and bills an abandoned round, once."""
    who = add_consumer(db, 1, credit=10_000)
    add_listing(db, 10, "w", price=1000)
    task, rounds, done = (call(who, 10, 1000) for _ in range(3))
    for req in (task, rounds, done):
        assert (await db.store.charge(req)).accepted
    assert await db.store.hold(task.request_id, "task_pending")
    assert await db.store.hold(rounds.request_id, "input_pending")
    await db.store.settle(outcome(done, who))
    assert not await db.store.hold(done.request_id, "task_pending")  # settled: nothing to hold
    db.execute("UPDATE mcpmeter_calls SET created_at = %s", (utc(time.time() - 3600),))

    assert await db.store.sweep(600, FEE_BPS) == 0  # past stale_call_seconds, but held
    assert await db.store.sweep(7200, FEE_BPS, held="task_pending", reason="task_expired") == 0  # within its limit
    assert await db.store.sweep(1800, FEE_BPS, held="task_pending", reason="task_expired") == 1
    assert await db.store.sweep(1800, FEE_BPS, held="input_pending", refund=False, reason="input_abandoned") == 1
    assert await db.store.sweep(0, FEE_BPS, held="task_pending", reason="task_expired") == 0  # exactly once
    rows = dict((r, (int(f), why)) for r, f, why in db.rows("SELECT request_id, refunded, reason FROM mcpmeter_calls"))
    assert rows == {task.request_id: (1, "task_expired"), rounds.request_id: (0, "input_abandoned"),
                    done.request_id: (0, None)}
    assert await db.store.balance(1) == 10_000 - 2000
    assert sorted(db.rows("SELECT request_id, billed_micro_cents FROM usage_events")) == sorted(
        [(task.request_id, 0), (rounds.request_id, 1000), (done.request_id, 1000)])
    reconcile(db)


async def test_settle_trusts_the_journal_over_what_the_caller_says_was_taken(db: Backend) -> None:
    who = add_consumer(db, 1, credit=5000)
    add_listing(db, 10, "w", price=1000)
    req = call(who, 10, 1000)
    taken = await db.store.charge(req)
    assert taken.verdict is Verdict.DEBITED
    # A caller that believes the call was free (a bug) must not refund less or more than was debited.
    wrong = ChargeResult(Verdict.FREE, 0, taken.balance)
    settlement = dataclasses.replace(outcome(req, who, refund=True, status=502), taken=wrong)
    assert await db.store.settle(settlement) == 5000
    assert await db.store.settle(settlement) == 5000  # and only once
    quiet = dataclasses.replace(outcome(req, who), taken=taken, need_balance=False)
    assert await db.store.settle(quiet) is None  # settled already: nothing happens, nothing read
    assert db.rows("SELECT type, amount_micro_cents FROM credit_transactions WHERE user_id = 1 ORDER BY id") == [
        ("usage", -1000), ("refund", 1000)]
    reconcile(db)


async def test_settle_with_what_was_taken_records_without_reading_back(db: Backend) -> None:
    who = add_consumer(db, 1, credit=5000)
    add_listing(db, 10, "w", price=1000)
    req = call(who, 10, 1000)
    taken = await db.store.charge(req)
    assert await db.store.settle(dataclasses.replace(outcome(req, who), taken=taken, need_balance=False)) is None
    assert db.rows("SELECT status, billed_micro_cents FROM usage_events") == [(200, 1000)]
    assert await db.store.balance(1) == 4000
    reconcile(db)


async def test_each_settlement_keeps_its_reason(db: Backend) -> None:
    who = add_consumer(db, 1, credit=10_000)
    add_listing(db, 10, "w", price=1000, free=1)
    free, billed, timed_out, orphan = (call(who, 10, 1000, free=1) for _ in range(4))
    for req in (free, billed, timed_out, orphan):
        assert (await db.store.charge(req)).accepted
    await db.store.settle(dataclasses.replace(outcome(free, who, refund=True, status=502), reason="upstream_failed"))
    await db.store.settle(dataclasses.replace(outcome(billed, who), reason="result"))
    await db.store.settle(dataclasses.replace(outcome(timed_out, who, refund=True, status=504),
                                              reason="upstream_timeout"))
    # A second settlement of a settled call changes nothing, its reason included.
    await db.store.settle(dataclasses.replace(outcome(timed_out, who), reason="result"))
    db.execute("UPDATE mcpmeter_calls SET created_at = %s WHERE request_id = %s",
               (utc(time.time() - 3600), orphan.request_id))
    assert await db.store.sweep(600, FEE_BPS) == 1

    reasons = dict(db.rows("SELECT request_id, reason FROM mcpmeter_calls"))
    assert reasons == {free.request_id: "upstream_failed", billed.request_id: "result",
                       timed_out.request_id: "upstream_timeout", orphan.request_id: "swept"}
    refunds = db.rows("SELECT request_id, description FROM credit_transactions WHERE type = 'refund'")
    assert sorted(refunds) == sorted([(timed_out.request_id, "refund: search on mcp 10 (upstream_timeout)"),
                                      (orphan.request_id, "refund: search on mcp 10 (swept)")])
    reconcile(db)


async def test_a_journal_made_before_reasons_gets_the_column(db: Backend) -> None:
    who = add_consumer(db, 1, credit=5000)
    add_listing(db, 10, "w", price=1000)
    old = call(who, 10, 1000)
    await db.store.charge(old)
    await db.store.settle(outcome(old, who))
    db.store.close()
    db.execute("ALTER TABLE mcpmeter_calls DROP COLUMN reason")  # as an older mcpmeter made it
    assert "reason" not in {str(r[0]).lower() for r in db.rows(
        "SELECT name FROM pragma_table_info('mcpmeter_calls')" if db.name == "sqlite" else
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
        " AND TABLE_NAME = 'mcpmeter_calls'")}

    db.store = SqliteStore(db.config) if db.name == "sqlite" else db.open_store()  # the next start upgrades it
    new = call(who, 10, 1000)
    await db.store.charge(new)
    await db.store.settle(dataclasses.replace(outcome(new, who, refund=True, status=502), reason="upstream_5xx"))
    assert dict(db.rows("SELECT request_id, reason FROM mcpmeter_calls")) == {
        old.request_id: None, new.request_id: "upstream_5xx"}
    reconcile(db)
