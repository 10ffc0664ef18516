"""The test side of a gateway's database: add consumers and listings by plain SQL, read the ledger.

Rows go in the way the reference's web app writes them, so the gateway is tested against
data it did not create itself. One class per store kind; the behaviour suite runs on both.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addon.auth import token_hash

SQLITE_SCHEMA = Path(__file__).resolve().parent.parent / "addon" / "store" / "sqlite_schema.sql"
_ids = itertools.count(1000)


@dataclass(frozen=True)
class TestConsumer:
    __test__ = False  # a data class, not a test case

    key: str
    user_id: int
    project_id: int
    key_id: int

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class Backend:
    """Direct SQL access to the store a gateway under test uses."""

    kind: str
    placeholder = "%s"

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        """Run one statement, committed; returns lastrowid."""
        raise NotImplementedError

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def add_consumer(self, credit: int = 0, cap_cents: int | None = None, status: str = "active",
                     env: str = "test") -> TestConsumer:
        n = next(_ids)
        user_id = self.execute(
            "INSERT INTO users (name, email, password, status, credit_micro_cents) VALUES (%s, %s, %s, %s, 0)",
            (f"consumer {n}", f"c{n}@example.test", "x", status))
        project_id = self.execute(
            "INSERT INTO projects (user_id, name, slug, spending_cap_cents_per_month) VALUES (%s, %s, %s, %s)",
            (user_id, f"project {n}", f"project-{n}", cap_cents))
        key = f"mcpm_{env}_t{n}x{user_id}abcdef"
        key_id = self.execute(
            "INSERT INTO api_keys (user_id, project_id, key_prefix, key_hash, env) VALUES (%s, %s, %s, %s, %s)",
            (user_id, project_id, key[:14], token_hash(key), env))
        if credit:
            self.topup(user_id, credit)
        return TestConsumer(key, user_id, project_id, key_id)

    def add_oauth_token(self, user_id: int, expires_in: float = 3600, revoked: bool = False) -> str:
        """An OAuth access token for the user, as the web app's authorization server issues them."""
        import time

        n = next(_ids)
        client = self.execute("INSERT INTO oauth_clients (client_id, name, redirect_uris) VALUES (%s, %s, %s)",
                              (f"client-{n}", f"client {n}", "[]"))
        token = f"mcpm_oauth_t{n}x{user_id}secret"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + expires_in))
        self.execute("INSERT INTO oauth_access_tokens (token_hash, token_prefix, user_id, client_id, scopes,"
                     " expires_at, revoked_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                     (token_hash(token), token[:16], user_id, client, '["mcp"]', stamp,
                      stamp if revoked else None))
        return token

    def topup(self, user_id: int, amount: int) -> None:
        # As the web app does: the balance and its ledger row together.
        self.execute("UPDATE users SET credit_micro_cents = credit_micro_cents + %s WHERE id = %s", (amount, user_id))
        balance = self.balance(user_id)
        self.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, balance_after_micro_cents,"
                     " description) VALUES (%s, %s, 'topup', %s, 'test top-up')", (user_id, amount, balance))

    def add_listing(self, slug: str, upstream_url: str | None, price: int | None = None,
                    tool_prices: dict[str, int] | None = None, free: int = 0, rpm: int | None = None,
                    rpd: int | None = None, timeout: int | None = None, status: str = "live",
                    headers: dict[str, str] | None = None, bill_tool_errors: bool = False,
                    transport: str = "streamable") -> int:
        publisher = self.execute(
            "INSERT INTO users (name, email, password, role) VALUES (%s, %s, 'x', 'publisher')",
            (f"publisher of {slug}", f"p-{slug}-{next(_ids)}@example.test"))
        mcp_id = self.execute(
            "INSERT INTO mcps (publisher_id, slug, name, category, upstream_url, upstream_headers, transport, status,"
            " free_calls_per_consumer, rate_limit_per_minute, rate_limit_per_day, upstream_timeout_seconds,"
            " bill_tool_errors) VALUES (%s, %s, %s, 'test', %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (publisher, slug, slug, upstream_url, json.dumps(headers) if headers else None, transport, status,
             free, rpm, rpd, timeout, int(bill_tool_errors)))
        if price is not None:
            self.execute("INSERT INTO pricing_rules (mcp_id, tool_name, price_micro_cents) VALUES (%s, NULL, %s)",
                         (mcp_id, price))
        for tool, tool_price in (tool_prices or {}).items():
            self.execute("INSERT INTO pricing_rules (mcp_id, tool_name, price_micro_cents) VALUES (%s, %s, %s)",
                         (mcp_id, tool, tool_price))
        return mcp_id

    def balance(self, user_id: int) -> int:
        return int(self.query("SELECT credit_micro_cents FROM users WHERE id = %s", (user_id,))[0][0])

    def ledger(self, user_id: int) -> list[tuple[int, str, str | None]]:
        return [(int(a), str(t), r) for a, t, r in self.query(
            "SELECT amount_micro_cents, type, request_id FROM credit_transactions WHERE user_id = %s ORDER BY id",
            (user_id,))]

    def call_debits(self, user_id: int) -> list[tuple[int, str, str | None]]:
        """The money of each paid call, (amount, kind, request id): a 'usage' debit, then its 'refund'
        if it was refunded. The journal store writes both as ledger rows (the debit when it charges)."""
        return [row for row in self.ledger(user_id) if row[1] in ("usage", "refund")]

    def usage(self, consumer: TestConsumer) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT tool_name, status, billed_micro_cents, publisher_payout_micro_cents, platform_fee_micro_cents,"
            " request_id, client, project_id FROM usage_events WHERE api_key_id = %s ORDER BY id", (consumer.key_id,))
        keys = ("tool_name", "status", "billed", "payout", "fee", "request_id", "client", "project_id")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def free_used(self, mcp_id: int, user_id: int) -> int:
        rows = self.query("SELECT free_calls_used FROM mcp_consumer_usage WHERE mcp_id = %s AND user_id = %s",
                          (mcp_id, user_id))
        return int(rows[0][0]) if rows else 0

    def unreconciled(self) -> list[tuple[int, int, int]]:
        """Users whose balance differs from the sum of their ledger (I1): (user, balance, ledger sum)."""
        rows = self.query(
            "SELECT u.id, u.credit_micro_cents, COALESCE(SUM(t.amount_micro_cents), 0) FROM users u"
            " LEFT JOIN credit_transactions t ON t.user_id = u.id GROUP BY u.id, u.credit_micro_cents")
        return [(int(u), int(b), int(s)) for u, b, s in rows if int(b) != int(s)]

    def close(self) -> None:
        pass


class SqliteBackend(Backend):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(SQLITE_SCHEMA.read_text())

    def env(self) -> dict[str, str]:
        return {"MCPMETER_STORE": "sqlite", "MCPMETER_CACHE": "memory"}

    def config(self) -> dict[str, Any]:
        return {"sqlite_path": str(self.path)}

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        return self.conn.execute(sql.replace("%s", "?"), args).lastrowid or 0

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql.replace("%s", "?"), args).fetchall()

    def close(self) -> None:
        self.conn.close()


class ProductionBackend(Backend):
    """MySQL (a throwaway database built from schema.sql) and Redis (a throwaway key prefix)."""

    kind = "mysql"

    def __init__(self, wallets: bool = False) -> None:
        from contextlib import ExitStack

        self.wallets = wallets  # credit held in Redis wallets (addon/store/wallets.py)
        from tests import dbutil, redisutil

        self._stack = ExitStack()
        try:
            self.mysql = self._stack.enter_context(dbutil.scratch_database(dbutil.SCHEMA))
            self.redis = self._stack.enter_context(redisutil.scratch_prefix())
            self.db = dbutil.Db(self.mysql)
            self._stack.callback(self.db.close)
        except BaseException:
            self._stack.close()
            raise

    def env(self) -> dict[str, str]:
        m, r = self.mysql, self.redis
        return {"MCPMETER_STORE": "mysql", "MCPMETER_CACHE": "redis",
                "DB_HOST": m.host, "DB_PORT": str(m.port), "DB_USER": m.user, "DB_PASSWORD": m.password,
                "DB_NAME": m.database, "REDIS_HOST": r.host, "REDIS_PORT": str(r.port), "REDIS_DB": str(r.db),
                "MCPMETER_REDIS_PREFIX": r.prefix, **({"MCPMETER_WALLETS": "1"} if self.wallets else {})}

    def config(self) -> dict[str, Any]:
        return {}

    def balance(self, user_id: int) -> int:
        """With wallets, what the consumer can spend: the balance in MySQL and what their wallets hold."""
        balance = super().balance(user_id)
        if self.wallets:
            from tests import redisutil

            with redisutil.client(self.redis) as r:
                for key in r.scan_iter(match=f"{self.redis.prefix}w:{{u{user_id}}}:p*", count=1000):
                    balance += int(r.hget(key, "left") or 0)
        return balance

    def call_debits(self, user_id: int) -> list[tuple[int, str, str | None]]:
        """With wallets, a wallet call has no 'usage' row (its hold's one 'adjustment' row paid for it): its
        debit is its recorded call, written when it settles; a refund is a 'refund' row as before. The
        journal's calls (free tiers, unpriced) first, then the wallet calls in the order they were made."""
        rows = super().call_debits(user_id)
        if not self.wallets:
            return rows
        calls = [(str(r), int(a)) for r, a in self.query(
            "SELECT request_id, amount_micro_cents FROM mcpmeter_calls WHERE user_id = %s AND hold_id IS NOT NULL"
            " AND verdict = 'debited' ORDER BY created_at, request_id", (user_id,))]
        wallet = {r for r, _ in calls}
        refunds = {r: a for a, t, r in rows if t == "refund" and r in wallet}
        debits = [row for row in rows if row[2] not in wallet]
        for request_id, amount in calls:
            debits.append((-amount, "usage", request_id))
            if request_id in refunds:
                debits.append((refunds[request_id], "refund", request_id))
        return debits

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        return self.db.execute(sql, args)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.db.rows(sql, args)

    def close(self) -> None:
        self._stack.close()
