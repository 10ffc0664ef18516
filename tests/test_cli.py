"""The `mcpmeter` command's contract, on both backends: what it writes, prints and exits with.

Most tests call `main([...])` in-process with the gateway's environment variables pointing at
the module's backend; one runs the installed console script; one drives a real gateway with a
listing and a key the command made. After each test every ledger reconciles (conftest).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from addon import admin
from addon.auth import parse_authorization, token_hash
from addon.billing import period
from addon.cli import main
from addon.config import load
from addon.model import ChargeRequest, Settlement
from addon.store import UnknownUser, open_store
from tests.backends import Backend
from tests.gateway_proc import Gateway
from tests.test_e2e_gateway import MCP_HEADERS, call, slug

Run = Callable[..., tuple[str, str]]
KEY_RE = re.compile(r"^mcpm_(live|test)_[A-Za-z0-9]+\Z")


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    # Short cache TTLs so a change made by the command reaches the running gateway quickly.
    return {"mcp_cache_ttl_seconds": 1, "key_cache_ttl_seconds": 1, "negative_cache_ttl_seconds": 1}


def cli_env(backend: Backend) -> dict[str, str]:
    env = dict(backend.env())
    if backend.kind == "sqlite":
        env["MCPMETER_SQLITE_PATH"] = str(backend.path)  # type: ignore[attr-defined]
    return env


@pytest.fixture
def run(backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`run(*argv, code=0)` -> (stdout, stderr), asserting the exit code and that no traceback was printed."""
    for name in list(os.environ):
        if name.startswith(("DB_", "REDIS_", "MCPMETER_")):
            monkeypatch.delenv(name)
    for name, value in cli_env(backend).items():
        monkeypatch.setenv(name, value)

    def run(*argv: str, code: int = 0) -> tuple[str, str]:
        capsys.readouterr()
        rc = main(list(argv))
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc}, expected {code}\nstdout: {out}\nstderr: {err}"
        assert "Traceback" not in out + err
        if code:
            assert "error" in err or "discrepancy" in err, err
        return out, err

    return run


def js(run: Run, *argv: str) -> Any:
    return json.loads(run(*argv, "--json")[0])


def count(backend: Backend, table: str) -> int:
    return int(backend.query(f"SELECT COUNT(*) FROM {table}")[0][0])


# --- listings -----------------------------------------------------------------------------------


def test_listing_add_list_set_pause_resume(run: Run, backend: Backend) -> None:
    s = slug("cli")
    row = js(run, "listing", "add", s, "--upstream", "http://127.0.0.1:9/mcp", "--price", "1000",
             "--tool-price", "slow=5000", "--free", "3", "--rpm", "10", "--rpd", "100", "--timeout-ms", "5000",
             "--header", "X-Api-Key=s3cret", "--publisher", f"pub-{s}@example.test")[0]
    assert row == {"slug": s, "status": "live", "transport": "streamable", "upstream_url": "http://127.0.0.1:9/mcp",
                   "price_micro_cents": 1000, "tool_prices": {"slow": 5000}, "free_calls": 3, "rpm": 10,
                   "rpd": 100, "timeout_ms": 5000, "header_names": ["X-Api-Key"],
                   "publisher": f"pub-{s}@example.test"}
    # Stored as the gateway reads it: the listing's prices, headers and publisher.
    headers, publisher_role = backend.query(
        "SELECT m.upstream_headers, u.role FROM mcps m JOIN users u ON u.id = m.publisher_id WHERE m.slug = %s",
        (s,))[0]
    assert json.loads(headers) == {"X-Api-Key": "s3cret"} and publisher_role == "publisher"

    listed = {x["slug"]: x for x in js(run, "listing", "list")}
    assert listed[s] == row
    table, _ = run("listing", "list")
    assert s in table and "s3cret" not in table  # header values are secrets: never printed

    row = js(run, "listing", "set", s, "--price", "2000", "--tool-price", "fast=1", "--header", "X-Other=1",
             "--transport", "sse", "--rpm", "0")[0]
    assert row["price_micro_cents"] == 2000 and row["tool_prices"] == {"fast": 1, "slow": 5000}
    assert row["transport"] == "sse" and row["rpm"] is None and row["rpd"] == 100  # untouched options stay
    assert row["header_names"] == ["X-Api-Key", "X-Other"]
    assert count_rules(backend, s) == 3  # the default price replaced, not doubled
    row = js(run, "listing", "set", s, "--clear-tool-prices", "--clear-headers")[0]
    assert row["tool_prices"] == {} and row["header_names"] == [] and row["price_micro_cents"] == 2000

    assert js(run, "listing", "pause", s)[0]["status"] == "paused"
    assert js(run, "listing", "resume", s)[0]["status"] == "live"


def count_rules(backend: Backend, s: str) -> int:
    return int(backend.query("SELECT COUNT(*) FROM pricing_rules r JOIN mcps m ON m.id = r.mcp_id WHERE m.slug = %s",
                             (s,))[0][0])


@pytest.mark.parametrize("argv", [
    ["listing", "add", "Bad_Slug", "--upstream", "http://h/mcp"],
    ["listing", "add", "ok-slug", "--upstream", "ftp://h/mcp"],
    ["listing", "add", "ok-slug", "--upstream", "http:///mcp"],
    ["listing", "add", "ok-slug", "--upstream", "http://h:99999/mcp"],
    ["listing", "add", "ok-slug", "--upstream", "http://h:0/mcp"],
    ["listing", "add", "ok-slug"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--price", "-1"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--price", "1.5"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--tool-price", "echo"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--free", "x"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--timeout-ms", "1500"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--timeout-ms", "600000"],
    ["listing", "add", "ok-slug", "--upstream", "http://user:pw@h/mcp"],
    ["listing", "add", "ok-slug", "--upstream", "http://[::1/mcp"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--header", "Bad Name=1"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--header", "X-A=1\x01"],
    ["listing", "add", "ok-slug", "--upstream", "http://h/mcp", "--transport", "ws"],
    ["listing", "frobnicate"],
    ["key", "create", "--email", "not-an-email"],
    ["key", "create", "--email", "a@b.test", "--env", "oauth"],
    ["credit", "add", "a@b.test", "0"],
    ["credit", "add", "a@b.test", "-5"],
    ["usage", "--since", "2026-13-01"],
    ["usage", "--by", "hour"],
    ["payouts", "--month", "2026-1"],
])
def test_bad_arguments_exit_2_and_write_nothing(run: Run, backend: Backend, argv: list[str]) -> None:
    before = (count(backend, "mcps"), count(backend, "users"), count(backend, "credit_transactions"))
    run(*argv, code=2)
    assert (count(backend, "mcps"), count(backend, "users"), count(backend, "credit_transactions")) == before


def test_refusals_exit_1_and_write_nothing(run: Run, backend: Backend) -> None:
    s = slug("cli")
    run("listing", "add", s, "--upstream", "http://127.0.0.1:9/mcp", "--price", "7")
    _, err = run("listing", "add", s, "--upstream", "http://other/mcp", "--price", "8", code=1)
    assert "exists" in err
    assert {x["slug"]: x for x in js(run, "listing", "list")}[s]["price_micro_cents"] == 7  # unchanged
    _, err = run("listing", "set", "no-such-listing-" + s, "--price", "1", code=1)
    assert "no listing" in err
    run("listing", "pause", "no-such-listing-" + s, code=1)
    run("usage", "--listing", "no-such-listing-" + s, code=1)


def test_a_bad_configuration_is_a_message(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stoer: sqlite\n")
    _, err = run("--config", str(bad), "listing", "list", code=3)
    assert "stoer" in err
    _, err = run("listing", "list", "--config", str(tmp_path / "missing.yaml"), code=3)
    assert "missing.yaml" in err


def test_an_unreachable_database_is_a_message(run: Run, backend: Backend, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    if backend.kind == "sqlite":
        monkeypatch.setenv("MCPMETER_SQLITE_PATH", str(tmp_path / "no-such-dir" / "x.db"))
    else:
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("DB_PORT", str(port))
    _, err = run("credit", "add", "someone@example.test", "100", code=3)
    assert "x.db" in err or "unavailable" in err


# --- keys and credit ------------------------------------------------------------------------


def test_key_create_makes_user_project_key_and_opening_credit(run: Run, backend: Backend) -> None:
    email = f"k-{uuid.uuid4().hex[:8]}@example.test"
    out, _ = run("key", "create", "--email", email, "--credit", "5000", "--env", "test")
    key = re.search(r"key: (\S+)", out).group(1)  # type: ignore[union-attr]
    assert KEY_RE.match(key) and key.startswith("mcpm_test_")
    cred = parse_authorization(f"Bearer {key}")
    assert cred is not None and cred.token == key  # the gateway's own parser accepts it
    user_id, project_id, prefix, env = backend.query(
        "SELECT user_id, project_id, key_prefix, env FROM api_keys WHERE key_hash = %s", (token_hash(key),))[0]
    assert prefix == key[:14] and env == "test"
    assert backend.query("SELECT user_id FROM projects WHERE id = %s", (project_id,))[0][0] == user_id
    assert backend.balance(user_id) == 5000
    assert backend.ledger(user_id) == [(5000, "topup", None)]

    # A second key for the same email: the same user and project, no credit unless asked.
    second = js(run, "key", "create", "--email", email)
    assert KEY_RE.match(second["key"]) and second["key"].startswith("mcpm_live_") and second["key"] != key
    assert (second["user_id"], second["project_id"]) == (user_id, project_id)
    assert second["balance_micro_cents"] == 5000

    # Emails are matched without case on both backends (MySQL's collation ignores it; SQLite's does not).
    third = js(run, "key", "create", "--email", email.upper())
    assert (third["user_id"], third["email"]) == (user_id, email)
    run("key", "revoke", third["key"])

    listed = js(run, "key", "list", "--email", email)[:2]
    assert [k["prefix"] for k in listed] == [key[:14], second["key"][:14]]
    assert all(k["revoked_at"] is None and k["email"] == email for k in listed)
    out, _ = run("key", "list")
    assert key not in out and second["key"] not in out  # never the key itself


def test_key_revoke_by_prefix_refuses_an_ambiguous_one(run: Run, backend: Backend) -> None:
    email = f"r-{uuid.uuid4().hex[:8]}@example.test"
    a = js(run, "key", "create", "--email", email)
    b = js(run, "key", "create", "--email", email)
    _, err = run("key", "revoke", "mcpm_live_", code=1)  # every live key matches
    assert "match" in err
    assert revoked(backend, a["key"]) is None and revoked(backend, b["key"]) is None
    run("key", "revoke", "mcpm_nope_", code=1)
    done = js(run, "key", "revoke", a["key"])[0]  # the whole key names it exactly
    assert done["prefix"] == a["prefix"] and revoked(backend, a["key"]) is not None
    assert revoked(backend, b["key"]) is None
    run("key", "revoke", a["key"], code=1)  # already revoked
    key_id = js(run, "key", "list", "--email", email)[1]["id"]
    js(run, "key", "revoke", str(key_id))
    assert revoked(backend, b["key"]) is not None


def revoked(backend: Backend, key: str) -> Any:
    return backend.query("SELECT revoked_at FROM api_keys WHERE key_hash = %s", (token_hash(key),))[0][0]


def test_credit_add_by_email_and_id_unknown_user_writes_nothing(run: Run, backend: Backend) -> None:
    email = f"c-{uuid.uuid4().hex[:8]}@example.test"
    user_id = js(run, "key", "create", "--email", email, "--credit", "100")["user_id"]
    assert js(run, "credit", "add", email, "250")[0] == {"user_id": user_id, "added_micro_cents": 250,
                                                         "balance_micro_cents": 350}
    assert js(run, "credit", "add", str(user_id), "50")[0]["balance_micro_cents"] == 400
    assert backend.ledger(user_id) == [(100, "topup", None), (250, "topup", None), (50, "topup", None)]
    rows = count(backend, "credit_transactions")
    _, err = run("credit", "add", "nobody-" + email, "100", code=1)
    assert "no user" in err
    run("credit", "add", "987654321", "100", code=1)
    assert count(backend, "credit_transactions") == rows


async def test_store_topup_refuses_an_unknown_user(backend: Backend) -> None:
    """The store under the gateway's `mcpmeter.topup` command: no orphan ledger row (issue 9)."""
    env = {**cli_env(backend)}
    store = open_store(load(None, env))
    try:
        rows = count(backend, "credit_transactions")
        with pytest.raises(UnknownUser) as raised:
            await store.topup(987654321, 100, "test")
        assert raised.value.user_id == 987654321
        assert count(backend, "credit_transactions") == rows
    finally:
        store.close()


# --- reports ------------------------------------------------------------------------------------


def listing_id(backend: Backend, s: str) -> int:
    return int(backend.query("SELECT id FROM mcps WHERE slug = %s", (s,))[0][0])


async def record_calls(backend: Backend, s: str, user: dict[str, Any],
                       calls: list[tuple[str, int, bool, int]]) -> None:
    """Calls paid and settled through the store, as the gateway does: (tool, free allowance, refund, ms)."""
    store = open_store(load(None, cli_env(backend)))
    try:
        for tool, free, refund, ms in calls:
            req = ChargeRequest(request_id=str(uuid.uuid4()), user_id=user["user_id"], project_id=user["project_id"],
                                listing_id=listing_id(backend, s), tool_name=tool, price=1000, free_allowance=free,
                                period=period())
            taken = await store.charge(req)
            assert taken.accepted
            await store.settle(Settlement(charge=req, refund=refund, status=200, duration_ms=ms,
                                          called_at=time.time(), key_id=None, token_id=None, client=None,
                                          user_agent=None, fee_bps=2000, taken=taken))
    finally:
        store.close()


async def test_usage_payouts_and_reconcile(run: Run, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    s = slug("rep")
    publisher = f"pub-{s}@example.test"
    run("listing", "add", s, "--upstream", "http://127.0.0.1:9/mcp", "--price", "1000", "--publisher", publisher)
    email = f"u-{uuid.uuid4().hex[:8]}@example.test"
    user = js(run, "key", "create", "--email", email, "--credit", "10000")
    await record_calls(backend, s, user, [("a", 1, False, 20),  # free
                                          ("a", 0, False, 10),  # billed 1000
                                          ("b", 0, True, 30),  # refunded
                                          ("b", 0, False, 40)])  # billed 1000

    assert js(run, "usage", "--listing", s) == [
        {"listing": s, "calls": 4, "free": 1, "billed": 2, "refunded": 1, "billed_micro_cents": 2000,
         "p50_ms": 20, "p95_ms": 40}]
    by_tool = js(run, "usage", "--listing", s, "--by", "tool")
    assert [(r["tool"], r["calls"], r["billed_micro_cents"], r["p50_ms"]) for r in by_tool] == [
        (f"{s} · a", 2, 1000, 10), (f"{s} · b", 2, 1000, 30)]
    assert js(run, "usage", "--consumer", email, "--by", "consumer")[0]["calls"] == 4
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert js(run, "usage", "--consumer", email, "--by", "day", "--since", today)[0]["day"] == today
    assert js(run, "usage", "--consumer", email, "--since", "2999-01-01") == []
    table, _ = run("usage", "--listing", s)
    assert table.splitlines()[0].split() == ["listing", "calls", "free", "billed", "refunded",
                                             "billed_micro_cents", "p50_ms", "p95_ms"]

    report = js(run, "payouts")
    mine = [x for x in report["lines"] if x["listing"] == s]
    assert mine == [{"publisher": publisher, "listing": s, "billed_calls": 2, "gross_micro_cents": 2000,
                     "fee_micro_cents": 400, "payout_micro_cents": 1600}]
    totals = report["totals"]
    assert totals["gross_micro_cents"] == report["billed_micro_cents"]
    assert totals["fee_micro_cents"] + totals["payout_micro_cents"] == report["billed_micro_cents"]
    assert js(run, "payouts", "--month", "2001-12")["lines"] == []

    assert js(run, "reconcile")["ok"] is True

    monkeypatch.setattr(admin, "MAX_USAGE_ROWS", 3)  # a report reads a bounded number of calls
    _, err = run("usage", "--listing", s, code=1)
    assert "more than 3 calls" in err


def test_reconcile_names_each_discrepancy(run: Run, backend: Backend) -> None:
    email = f"d-{uuid.uuid4().hex[:8]}@example.test"
    user = js(run, "key", "create", "--email", email, "--credit", "100")
    out, _ = run("reconcile")
    assert "discrepanc" not in out

    backend.execute("UPDATE users SET credit_micro_cents = credit_micro_cents + 1 WHERE id = %s", (user["user_id"],))
    old = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 7200))
    lost, orphan = f"lost-{uuid.uuid4().hex}", f"orphan-{uuid.uuid4().hex}"
    for request_id, settled in ((lost, None), (orphan, old)):
        backend.execute("INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
                        " amount_micro_cents, period_year_month, created_at, settled_at)"
                        " VALUES (%s, %s, %s, 1, 't', 'unpriced', 0, '2026-01', %s, %s)",
                        (request_id, user["user_id"], user["project_id"], old, settled))
    try:
        _, err = run("reconcile", code=1)
        assert f"user {user['user_id']} ({email}): balance 101 µ¢, ledger sums to 100 µ¢" in err
        assert f"call {lost}" in err and "never settled" in err
        assert f"call {orphan}: settled, no usage row" in err
    finally:
        backend.execute("UPDATE users SET credit_micro_cents = credit_micro_cents - 1 WHERE id = %s",
                        (user["user_id"],))
        backend.execute("DELETE FROM mcpmeter_calls WHERE request_id IN (%s, %s)", (lost, orphan))
    assert js(run, "reconcile")["ok"] is True


def test_reconcile_leaves_held_tasks_to_their_own_limit(run: Run, backend: Backend) -> None:
    user = js(run, "key", "create", "--email", f"h-{uuid.uuid4().hex[:8]}@example.test", "--credit", "100")
    young, old = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - age)) for age in (1800, 7200))
    held, overdue = f"held-{uuid.uuid4().hex}", f"overdue-{uuid.uuid4().hex}"
    for request_id, created in ((held, young), (overdue, old)):
        backend.execute("INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
                        " amount_micro_cents, period_year_month, created_at, reason)"
                        " VALUES (%s, %s, %s, 1, 't', 'unpriced', 0, '2026-01', %s, 'task_pending')",
                        (request_id, user["user_id"], user["project_id"], created))
    try:
        _, err = run("reconcile", code=1)
        assert f"call {held}" not in err  # past stale_call_seconds, within task_settle_seconds: held, not lost
        assert f"call {overdue}: task_pending since" in err
    finally:
        backend.execute("DELETE FROM mcpmeter_calls WHERE request_id IN (%s, %s)", (held, overdue))
    assert js(run, "reconcile")["ok"] is True


def test_reconcile_ages_calls_by_the_database_clock(run: Run, backend: Backend,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On MySQL a call's age is the database's, as the sweeper's is: a host whose clock runs an hour
    ahead does not report a call charged a moment ago as never settled."""
    if backend.kind != "mysql":
        pytest.skip("the embedded store has one clock, its process's")
    user = js(run, "key", "create", "--email", f"c-{uuid.uuid4().hex[:8]}@example.test", "--credit", "100")
    fresh = f"fresh-{uuid.uuid4().hex}"
    backend.execute("INSERT INTO mcpmeter_calls (request_id, user_id, project_id, mcp_id, tool_name, verdict,"
                    " amount_micro_cents, period_year_month, created_at)"
                    " VALUES (%s, %s, %s, 1, 't', 'unpriced', 0, '2026-01', UTC_TIMESTAMP())",
                    (fresh, user["user_id"], user["project_id"]))
    real, ahead = time.time, [3600.0]
    monkeypatch.setattr(time, "time", lambda: real() + ahead[0])
    try:
        assert js(run, "reconcile")["ok"] is True
    finally:
        ahead[0] = 0.0
        backend.execute("DELETE FROM mcpmeter_calls WHERE request_id = %s", (fresh,))


# --- the installed console script ------------------------------------------------------------


def test_installed_console_script(backend: Backend, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("mcpmeter")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "MCPMETER_"))}
    env.update(backend.env())
    argv = [str(script)]
    if backend.kind == "sqlite":  # the gateway's own YAML names the store
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(backend.config()))
        argv += ["--config", str(config)]
    s = slug("script")
    done = subprocess.run(argv + ["listing", "add", s, "--upstream", "https://example.test/mcp", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["slug"] == s
    bad = subprocess.run(argv + ["credit", "add", "nobody@example.test", "lots"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not a whole number" in bad.stderr


# --- end to end: a real gateway serving what the command made -------------------------------


async def paid_call(gw: Gateway, path: str, key: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=20) as client:
        return await client.post(gw.url + path, content=json.dumps(call("ok")).encode(),
                                 headers={**MCP_HEADERS, "Authorization": f"Bearer {key}"})


async def test_e2e_listing_and_key_from_the_command(run: Run, backend: Backend, gateway: Gateway,
                                                     fault_url: str) -> None:
    s = slug("e2e")
    run("listing", "add", s, "--upstream", fault_url + "/mcp", "--price", "1000")
    user = js(run, "key", "create", "--email", f"e2e-{s}@example.test", "--credit", "10000", "--env", "test")

    r = await paid_call(gateway, f"/{s}", user["key"])
    assert r.status_code == 200, r.text
    assert r.headers["X-Mcpmeter-Billed"] == "1000" and r.headers["X-Mcpmeter-Balance"] == "9000"
    # A billed answer goes out before its usage row is written (a flush interval later, longer under load).
    deadline = time.monotonic() + 10
    while not (usage := js(run, "usage", "--listing", s)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert [(u["calls"], u["billed"], u["billed_micro_cents"]) for u in usage] == [(1, 1, 1000)]
    assert js(run, "reconcile")["ok"] is True

    # A price change reaches the running gateway once its listing cache (1 s here) expires.
    run("listing", "set", s, "--price", "2500")
    await asyncio.sleep(1.5)
    r = await paid_call(gateway, f"/{s}", user["key"])
    assert r.headers["X-Mcpmeter-Billed"] == "2500" and r.headers["X-Mcpmeter-Balance"] == "6500"
    # So does a revoked key.
    run("key", "revoke", user["key"])
    await asyncio.sleep(1.5)
    assert (await paid_call(gateway, f"/{s}", user["key"])).status_code == 401
    assert js(run, "usage", "--listing", s)[0]["billed_micro_cents"] == 3500
    assert js(run, "reconcile")["ok"] is True


def test_help_states_the_cache_ttls(run: Run) -> None:
    out, _ = run("listing", "set", "--help")
    assert "MCP_CACHE_TTL_SECONDS" in out
    out, _ = run("key", "revoke", "--help")
    assert "KEY_CACHE_TTL_SECONDS" in out


async def test_usage_by_reason_says_why_calls_were_billed_or_refunded(run: Run, backend: Backend) -> None:
    s = slug("why")
    run("listing", "add", s, "--upstream", "http://127.0.0.1:9/mcp", "--price", "1000")
    user = js(run, "key", "create", "--email", f"why-{s}@example.test", "--credit", "10000")
    store = open_store(load(None, cli_env(backend)))
    try:
        for refund, status, reason in ((False, 200, "result"), (True, 504, "upstream_timeout"),
                                       (True, 504, "upstream_timeout"), (True, 502, "upstream_failed")):
            req = ChargeRequest(request_id=str(uuid.uuid4()), user_id=user["user_id"], project_id=user["project_id"],
                                listing_id=listing_id(backend, s), tool_name="t", price=1000, free_allowance=0,
                                period=period())
            taken = await store.charge(req)
            await store.settle(Settlement(charge=req, refund=refund, status=status, duration_ms=5,
                                          called_at=time.time(), key_id=None, token_id=None, client=None,
                                          user_agent=None, fee_bps=2000, taken=taken, reason=reason))
    finally:
        store.close()

    rows = js(run, "usage", "--listing", s, "--by", "reason")
    assert [(r["reason"], r["calls"], r["billed"], r["refunded"], r["billed_micro_cents"]) for r in rows] == [
        ("result", 1, 1, 0, 1000), ("upstream_failed", 1, 0, 1, 0), ("upstream_timeout", 2, 0, 2, 0)]
    table, _ = run("usage", "--listing", s, "--by", "reason")
    assert table.splitlines()[0].split()[0] == "reason"
    assert any(line.split()[:2] == ["upstream_timeout", "2"] for line in table.splitlines())
    assert js(run, "reconcile")["ok"] is True
