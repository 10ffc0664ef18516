"""The MySQL store against a database laid out by the reference, and against MySQL failing.

The reference's own layout (tests/fixtures/reference-schema.sql, unchanged, without schema.sql)
is filled the way its Laravel app writes rows; MysqlStore must upgrade it in place and serve
it. Then the failure modes: wrong settings stop the gateway at start with a message naming
the variable, an unreachable or hanging server costs a call at most about a second, and the
store finds MySQL again by itself when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from addon.auth import token_hash
from addon.config import Config, ConfigError, MysqlSettings
from addon.model import Verdict
from addon.store.base import StoreUnavailable
from addon.store.mysql import MysqlStore
from addon.store.sql import utc

from .dbutil import REFERENCE_SCHEMA, SCHEMA, Db, Relay, SilentServer, closed_port, connect, require_server
from .dbutil import schema_snapshot, scratch_database
from .test_store_contract import MysqlBackend, Who, _prepare, add_consumer, add_listing, call, cred, outcome, reconcile

FAST = 1.5  # seconds within which an unreachable database must turn into StoreUnavailable

KEY = "mcpm_live_ReferenceKey0123456789"
TEST_KEY = "mcpm_test_ReferenceKey0123456789"


def laravel_rows(db: Db) -> None:
    """A publisher with a priced listing and a consumer with a signup bonus, as the reference app writes them."""
    now = utc()
    db.execute("INSERT INTO users (id, name, email, handle, role, password, status, credit_micro_cents,"
               " created_at, updated_at) VALUES (1, 'Pat Publisher', 'pat@example.test', 'pat', 'publisher',"
               " '$2y$12$abcdefghijklmnopqrstuv', 'active', 0, %s, %s)", (now, now))
    db.execute("INSERT INTO users (id, name, email, password, email_verified_at, status, credit_micro_cents,"
               " created_at, updated_at) VALUES (2, 'Casey Consumer', 'casey@example.test',"
               " '$2y$12$abcdefghijklmnopqrstuv', %s, 'active', 5000000, %s, %s)", (now, now, now))
    db.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, balance_after_micro_cents,"
               " description, metadata, created_at, updated_at) VALUES (2, 5000000, 'signup_bonus', 5000000,"
               " 'Welcome credit', '{\"campaign\": \"launch\"}', %s, %s)", (now, now))
    db.execute("INSERT INTO projects (id, user_id, name, slug, spending_cap_cents_per_month, created_at, updated_at)"
               " VALUES (20, 2, 'Default', 'casey-default', 500, %s, %s)", (now, now))
    for key, env in ((KEY, "live"), (TEST_KEY, "test")):
        db.execute("INSERT INTO api_keys (user_id, project_id, name, key_prefix, key_hash, env, created_at,"
                   " updated_at) VALUES (2, 20, 'laptop', %s, %s, %s, %s, %s)",
                   (key[:14], token_hash(key), env, now, now))
    db.execute("INSERT INTO mcps (id, publisher_id, slug, name, category, description, sample_prompts, upstream_url,"
               " upstream_headers, transport, status, free_calls_per_consumer, rate_limit_per_minute, created_at,"
               " updated_at) VALUES (30, 1, 'weather', 'Weather', 'data', 'Forecasts', '[\"rain?\"]',"
               " 'https://weather.example.test/mcp/', '{\"Authorization\": \"Bearer pub\"}', 'streamable', 'live',"
               " 2, 30, %s, %s)", (now, now))
    db.execute("INSERT INTO mcp_tools (mcp_id, name, description, input_schema, kind, created_at, updated_at)"
               " VALUES (30, 'forecast', 'A forecast', '{}', 'read', %s, %s)", (now, now))
    for tool, price, model in ((None, 2000, "per_call"), ("forecast", 15000, "per_call"), ("ping", 0, "free")):
        db.execute("INSERT INTO pricing_rules (mcp_id, tool_name, model, price_micro_cents, currency, created_at,"
                   " updated_at) VALUES (30, %s, %s, %s, 'USD', %s, %s)", (tool, model, price, now, now))


async def test_a_reference_database_is_upgraded_in_place_and_served() -> None:
    with scratch_database(REFERENCE_SCHEMA) as settings, contextlib.closing(Db(settings)) as db:
        laravel_rows(db)
        assert "bill_tool_errors" not in db.columns("mcps")
        mcps_before = db.rows("SELECT * FROM mcps")
        backend = MysqlBackend(settings)  # opens MysqlStore: the upgrade happens here
        try:
            backend.opening = {1: 0, 2: 0}  # the signup bonus is in the ledger
            assert "bill_tool_errors" in backend.columns("mcps")
            assert "request_id" in backend.columns("credit_transactions")
            assert backend.rows("SELECT * FROM mcps") == [mcps_before[0] + (0,)]  # rows untouched, column added
            store = backend.store

            consumer = await store.find_consumer(cred(KEY))
            assert consumer is not None
            assert (consumer.user_id, consumer.project_id, consumer.status, consumer.env) == (2, 20, "active", "live")
            assert (await store.find_consumer(cred(TEST_KEY))).env == "test"  # type: ignore[union-attr]
            listing = await store.find_listing("weather")
            assert listing is not None
            assert (listing.id, listing.status) == (30, "live")
            assert listing.upstream_url == "https://weather.example.test/mcp/"
            assert listing.default_price == 2000 and dict(listing.tool_prices) == {"forecast": 15000, "ping": 0}
            assert dict(listing.upstream_headers) == {"Authorization": "Bearer pub"}
            assert (listing.free_calls_per_consumer, listing.rate_limit_per_minute) == (2, 30)

            who = Who(2, 20, KEY, consumer.key_id)  # type: ignore[arg-type]
            free = [call(who, 30, 15000, free=2, tool="forecast") for _ in range(2)]
            for req in free:
                assert (await store.charge(req)).verdict is Verdict.FREE
            paid, refunded = (call(who, 30, 15000, free=2, tool="forecast") for _ in range(2))
            assert (await store.charge(paid)).balance == 4_985_000
            assert (await store.charge(refunded)).balance == 4_970_000
            await store.settle(outcome(free[0], who))
            await store.settle(outcome(paid, who))
            assert await store.settle(outcome(refunded, who, refund=True, status=502)) == 4_985_000
            assert backend.rows("SELECT billed_micro_cents FROM usage_events ORDER BY id") == [(0,), (15000,), (0,)]
            recent = [r.request_id for r in await store.recent_calls(10)]
            assert recent == [refunded.request_id, paid.request_id, free[0].request_id]
            reconcile(backend)
        finally:
            backend.close()


async def test_the_upgrade_equals_schema_sql_and_is_idempotent() -> None:
    with scratch_database(SCHEMA) as fresh, scratch_database(REFERENCE_SCHEMA) as upgraded:
        MysqlStore(Config(store="mysql", mysql=upgraded)).close()
        MysqlStore(Config(store="mysql", mysql=fresh)).close()  # schema.sql leaves the procedure to the gateway
        with contextlib.closing(Db(upgraded)) as db, contextlib.closing(Db(fresh)) as want:
            after_first = schema_snapshot(db)
            assert after_first == schema_snapshot(want)
            MysqlStore(Config(store="mysql", mysql=upgraded)).close()  # a second start changes nothing
            MysqlStore(Config(store="mysql", mysql=fresh)).close()
            assert schema_snapshot(db) == after_first == schema_snapshot(want)


def test_settings_that_can_never_work_stop_the_gateway_at_start() -> None:
    server = require_server()
    with pytest.raises(ConfigError, match="DB_NAME='mcpmeter_no_such_db'"):
        MysqlStore(Config(store="mysql", mysql=replace(server, database="mcpmeter_no_such_db")))
    with pytest.raises(ConfigError, match="DB_USER='mcpmeter_no_such_user'"):
        MysqlStore(Config(store="mysql", mysql=replace(server, user="mcpmeter_no_such_user", database="mysql")))
    with scratch_database() as empty, pytest.raises(ConfigError, match=r"DB_NAME=.*no table.*schema\.sql"):
        MysqlStore(Config(store="mysql", mysql=empty))
    with pytest.raises(ConfigError, match="pool_size"):
        MysqlStore(Config(store="mysql", mysql=replace(server, pool_size=0)))


async def test_the_charge_procedure_needs_create_routine_once_then_execute() -> None:
    """The gateway creates its charge procedure at start: a user who may not is told what to grant;
    once an administrator's start created it, EXECUTE (and the tables' privileges) is enough."""
    server = require_server()
    user = f"mcpm_np_{secrets.token_hex(4)}"
    with scratch_database(SCHEMA) as settings:
        admin = connect(server)
        try:
            admin.cursor().execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
            admin.cursor().execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, ALTER, CREATE ON `{settings.database}`.*"
                                   f" TO '{user}'@'%'")
            limited = replace(settings, user=user, password="pw")
            with pytest.raises(ConfigError, match="CREATE ROUTINE"):
                MysqlStore(Config(store="mysql", mysql=limited))
            backend = MysqlBackend(settings)  # an administrator's start: the procedure is made
            try:
                _prepare(backend)
                who = add_consumer(backend, 1, credit=10_000)
                add_listing(backend, 30, "weather", price=1000)
                admin.cursor().execute(f"GRANT EXECUTE ON `{settings.database}`.* TO '{user}'@'%'")
                store = MysqlStore(Config(store="mysql", mysql=limited))
                try:
                    taken = await store.charge(call(who, 30, 1000))
                    assert (taken.verdict, taken.balance) == (Verdict.DEBITED, 9000)
                finally:
                    store.close()
                reconcile(backend)
            finally:
                backend.close()
        finally:
            admin.cursor().execute(f"DROP USER IF EXISTS '{user}'@'%'")
            admin.close()


async def test_the_charge_procedure_works_whatever_the_tables_collation() -> None:
    """A database whose tables use another utf8mb4 collation (a Laravel default, say) is charged
    alike: the procedure's period parameter compares in the column's collation."""
    with scratch_database(SCHEMA) as settings:
        with contextlib.closing(Db(settings)) as db:
            for table in ("mcp_consumer_usage", "projects", "mcpmeter_project_spend"):
                db.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        backend = MysqlBackend(settings)
        try:
            _prepare(backend)
            who = add_consumer(backend, 1, credit=10_000_000, cap_cents=1)
            add_listing(backend, 30, "weather", price=1000, free=1)
            verdicts = [(await backend.store.charge(call(who, 30, 1000, free=1, tool="s\u00e9\U0001F600"))).verdict
                        for _ in range(3)]
            assert verdicts == [Verdict.FREE, Verdict.DEBITED, Verdict.DEBITED]
            big = await backend.store.charge(call(who, 30, 999_000, free=1))  # over the 1 ¢ cap
            assert big.verdict is Verdict.PROJECT_CAP_EXCEEDED
            assert backend.rows("SELECT DISTINCT tool_name FROM mcpmeter_calls") == [("s\u00e9\U0001F600",)]
            reconcile(backend)
        finally:
            backend.close()


async def _all_unavailable(store: MysqlStore) -> None:
    """Every store method raises StoreUnavailable, each within FAST seconds, also when many ask at once."""
    who = Who(1, 10, KEY, 1)
    req = call(who, 30, 1000)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.find_consumer(cred(KEY)), lambda: store.find_listing("weather"), lambda: store.balance(1),
        lambda: store.charge(req), lambda: store.settle(outcome(req, who)), lambda: store.topup(1, 5, "x"),
        lambda: store.recent_calls(5),
    ]
    for method in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await method()
        assert time.monotonic() - started < FAST
    started = time.monotonic()
    results = await asyncio.gather(*(store.charge(call(who, 30, 1000)) for _ in range(40)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert time.monotonic() - started < FAST
    health = await asyncio.wait_for(store.health(), FAST)
    assert health["store"] == "mysql" and health["ok"] is False and "error" in health


def _unreachable_config(port: int) -> Config:
    settings = MysqlSettings(host="127.0.0.1", port=port, user="root", password="", database="mcpmeter", pool_size=4)
    return Config(store="mysql", mysql=settings, seed={"listings": [{"slug": "x"}], "consumers": []})


async def test_mysql_down_at_start_means_503s_not_a_hang(caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    store = MysqlStore(_unreachable_config(closed_port()))  # starts anyway: MySQL may come up later
    try:
        assert time.monotonic() - started < FAST
        assert "unreachable" in caplog.text and "seed" in caplog.text
        await _all_unavailable(store)
    finally:
        store.close()


async def test_a_server_that_never_answers_costs_about_a_second() -> None:
    silent = SilentServer()
    try:
        started = time.monotonic()
        store = MysqlStore(_unreachable_config(silent.port))
        assert time.monotonic() - started < FAST
        try:
            await asyncio.sleep(1.0)  # past the fail-fast window: calls try to connect again
            await _all_unavailable(store)
        finally:
            store.close()
    finally:
        silent.close()


async def test_dead_connections_are_replaced() -> None:
    with scratch_database(SCHEMA) as settings:
        store = MysqlStore(Config(store="mysql", mysql=replace(settings, pool_size=4)))
        admin = connect(settings)
        try:
            await asyncio.gather(*(store.balance(1) for _ in range(20)))  # every worker opens its connection
            cur = admin.cursor()
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()",
                        (settings.database,))
            ids = [r[0] for r in cur.fetchall()]
            assert ids
            for connection_id in ids:
                cur.execute(f"KILL CONNECTION {int(connection_id)}")
            results = await asyncio.gather(*(store.balance(1) for _ in range(20)))  # no StoreUnavailable
            assert results == [0] * 20
            assert (await store.health())["ok"] is True
        finally:
            admin.close()
            store.close()


async def test_the_store_finds_mysql_again_when_it_comes_back() -> None:
    relay = Relay(require_server())  # MySQL behind a switch
    with scratch_database(REFERENCE_SCHEMA) as settings:
        with contextlib.closing(Db(settings)) as db:
            laravel_rows(db)
        store = MysqlStore(Config(store="mysql", mysql=replace(settings, port=relay.port)))  # down at start
        try:
            await _fails_fast(store.find_listing("weather"))
            relay.start()  # MySQL comes up: the first connection also upgrades the reference schema
            listing = await _eventually(lambda: store.find_listing("weather"))
            assert listing is not None and listing.default_price == 2000
            relay.stop()  # MySQL goes away: open connections are cut, new ones refused
            await _fails_fast(store.balance(2))
            relay.start()  # ... and comes back
            assert await _eventually(lambda: store.balance(2)) == 5_000_000
            assert (await store.health())["ok"] is True
        finally:
            store.close()
            relay.stop()


async def _fails_fast(pending: Awaitable[Any]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await pending
    assert time.monotonic() - started < FAST


async def _eventually(method: Callable[[], Awaitable[Any]], within: float = 5.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            return await method()
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not reconnect"
            await asyncio.sleep(0.1)


async def test_a_transaction_that_waits_too_long_on_a_lock_runs_again() -> None:
    with scratch_database(SCHEMA) as settings:
        backend = MysqlBackend(settings)
        try:
            _prepare(backend)
            who = add_consumer(backend, 1, credit=10_000)
            add_listing(backend, 10, "w", price=1000)
            holder = connect(settings)
            holder.autocommit(False)
            holder.cursor().execute("SELECT credit_micro_cents FROM users WHERE id = 1 FOR UPDATE")
            release = threading.Timer(2.6, holder.commit)  # longer than the store's lock wait timeout
            release.start()
            try:
                result = await backend.store.charge(call(who, 10, 1000))
            finally:
                release.join()
                holder.close()
            assert result.verdict is Verdict.DEBITED and result.balance == 9000
            assert backend.store.retries >= 1  # type: ignore[attr-defined]
            reconcile(backend)
        finally:
            backend.close()
