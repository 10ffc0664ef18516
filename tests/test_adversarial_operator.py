"""Adversarial review of the operator's tools: the `mcpmeter` command, the configuration and its seed.

Each test names a defect found by review: a traceback where a message was promised, a value
accepted that the gateway cannot use (or would put on the wire), money that could overflow.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from addon.config import ConfigError, load
from tests.backends import Backend
from tests.test_cli import Run, js, run  # noqa: F401  (the `run` fixture)

BIGINT_MAX = 2**63 - 1


def _email() -> str:
    return f"adv-{uuid.uuid4().hex[:10]}@example.test"


def _balance(backend: Backend, email: str) -> int:
    return int(backend.query("SELECT credit_micro_cents FROM users WHERE email = %s", (email,))[0][0])



# --- money: a balance past BIGINT -----------------------------------------------------------


def test_credit_add_that_would_overflow_the_balance_is_refused(run: Run, backend: Backend) -> None:
    """Each amount is bounded (2**62) but their sum was not: the second top-up overflowed the balance
    column: on SQLite a traceback (OverflowError), on MySQL 'the database is unavailable' (exit 3)."""
    email = _email()
    run("key", "create", "--email", email, "--credit", str(2**62))
    rows = backend.query("SELECT COUNT(*) FROM credit_transactions t JOIN users u ON u.id = t.user_id"
                         " WHERE u.email = %s", (email,))[0][0]
    _, err = run("credit", "add", email, str(2**62), code=1)
    assert "balance" in err
    assert _balance(backend, email) == 2**62  # nothing written, and still a whole number
    assert backend.query("SELECT COUNT(*) FROM credit_transactions t JOIN users u ON u.id = t.user_id"
                         " WHERE u.email = %s", (email,))[0][0] == rows
    run("reconcile")


# --- user and key arguments: a message, never a traceback ----------------------------------


@pytest.mark.parametrize("argv", [
    ["credit", "add", "²", "5"],  # str.isdigit() is true for superscripts, int() refuses them
    ["credit", "add", "99999999999999999999999", "5"],  # an id past INTEGER: OverflowError in sqlite3
    ["key", "revoke", "²"],
    ["usage", "--consumer", "²"],
])
def test_odd_user_ids_are_a_message(run: Run, backend: Backend, argv: list[str]) -> None:
    from addon.cli import main

    rc = main(argv)  # the fixture's run() asserts on the code; here any refusal will do, not a traceback
    assert rc in (1, 2)


# --- listing URLs and headers: what the command and the seed accept, the gateway can use -------


@pytest.mark.parametrize("upstream", [
    "http://h/mcp\x00",  # control characters go into the request target as they are
    "http://h/mcp\x7f",
    "http://h/m\u00e9",  # the gateway refuses a non-ASCII path on every call (invalid_path)
])
def test_listing_upstream_with_control_or_non_ascii_characters_is_refused(run: Run, backend: Backend,
                                                                          upstream: str) -> None:
    run("listing", "add", "adv-" + uuid.uuid4().hex[:8], "--upstream", upstream, code=2)


def test_url_error_does_not_repeat_the_password(run: Run, backend: Backend) -> None:
    for upstream in ("ftp://user:s3cret-pw@h/mcp", "http://user:s3cret-pw@h:99999/mcp"):
        _, err = run("listing", "add", "adv-" + uuid.uuid4().hex[:8], "--upstream", upstream, code=2)
        assert "s3cret-pw" not in err


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Mcp-Session-Id"])
def test_header_the_gateway_would_drop_is_refused(run: Run, backend: Backend, name: str) -> None:
    """The gateway never sends these publisher headers (forwarding.NOT_UNWRAPPABLE): the command said
    nothing and listed the header as if it were sent."""
    run("listing", "add", "adv-" + uuid.uuid4().hex[:8], "--upstream", "http://h/mcp", "--header", f"{name}=x",
        code=2)


@pytest.mark.parametrize("given", [
    "Authorization: Bearer sk-s3cret",  # a colon instead of '='
    "Authorization: Bearer sk-s3cret==",  # ... and the value's own '='
    "Authorization:sk-s3cret",
    "Authorization Bearer sk-s3cret",
    "Authorization\tsk-s3cret=1",
])
def test_a_bad_header_is_named_never_its_value(run: Run, backend: Backend, given: str) -> None:
    """`--header 'Authorization: Bearer sk-...'` was reported as a bad header name, the whole of it: the
    secret went to stderr (a terminal, a CI log). The error names the header and says what is wrong."""
    s = "adv-" + uuid.uuid4().hex[:8]
    for argv in (("listing", "add", s, "--upstream", "http://h/mcp"), ("listing", "set", s)):
        _, err = run(*argv, "--header", given, code=2)
        assert "s3cret" not in err and "Bearer" not in err and "'Authorization'" in err
    _, err = run("listing", "add", s, "--upstream", "http://h/mcp", "--header", given, code=2)
    assert ("holds no ':'" in err) is (given[13] == ":")


def test_a_header_error_names_a_long_header_cut(run: Run, backend: Backend) -> None:
    for given in ("X" * 5000 + ": s3cret", "X" * 5000 + "=\x01s3cret", "Host" + "x" * 5000 + "\x1b[2Js3cret=1"):
        _, err = run("listing", "add", "adv-" + uuid.uuid4().hex[:8], "--upstream", "http://h/mcp", "--header",
                     given, code=2)
        assert "s3cret" not in err and "\x1b" not in err and len(err) < 1000


@pytest.mark.parametrize("headers", [
    {"Authorization: Bearer sk-s3cret": "x"},
    {"Authorization Bearer sk-s3cret": "x"},
    {"X-Api-Key": "sk-s3cret\r\nX-Injected: 1"},
    {"X" * 900 + " sk-s3cret": "x"},  # (YAML keys are at most 1,024 characters)
])
def test_a_bad_seed_header_is_named_never_its_value(tmp_path: Path, headers: dict[str, str]) -> None:
    import json

    text = ("seed: {listings: [{slug: a, upstream_url: 'http://h/mcp', upstream_headers: "
            + json.dumps(headers) + "}]}")
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, text)
    assert "s3cret" not in str(raised.value) and "Bearer" not in str(raised.value)
    assert len(str(raised.value)) < 1000


# --- configuration: a bad value is a ConfigError ----------------------------------------------


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load(str(path), env or {})


@pytest.mark.parametrize("text", [
    "max_body_bytes: .inf",  # OverflowError
    "fee_rate: .nan",  # ValueError from round()
    "fee_rate: .inf",
    "circuit_breaker: {failures: .inf}",
    "seed: {listings: [{slug: a, upstream_url: 'http://h/', free_calls_per_consumer: .inf}]}",
])
def test_infinite_or_nan_numbers_are_a_config_error_not_a_crash(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, text)


@pytest.mark.parametrize("text", [
    # The sweeper computes utc(now - nan): ValueError on every sweep, so stale debits are never refunded.
    "stale_call_seconds: .nan",
    # Meaningless: cachetools then expires every entry at once (no cache) without a word.
    "key_cache_ttl_seconds: .nan",
    "mcp_cache_ttl_seconds: .nan",
    "negative_cache_ttl_seconds: -1",
    "circuit_breaker: {cooldown_seconds: .inf}",
])
def test_nan_and_negative_durations_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, text)


@pytest.mark.parametrize("name", ["KEY_CACHE_TTL_SECONDS", "MCP_CACHE_TTL_SECONDS"])
def test_nan_ttl_from_the_environment_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, "{}", {name: "nan"})


def test_a_nan_stale_call_seconds_would_stop_every_sweep() -> None:
    """Why `stale_call_seconds: .nan` matters: the sweeper's cutoff cannot be computed, so every sweep
    fails and debits left by a stopped gateway are never refunded."""
    import time

    from addon.store.sql import utc

    with pytest.raises(ValueError):
        utc(time.time() - float("nan"))


@pytest.mark.parametrize("headers", [
    {"X-Api-Key": "v\r\nX-Injected: 1"},  # written to the upstream as two header lines
    {"X-Api-Key": "v\x00"},
    {"Bad Name": "v"},
    {"Host": "other.example"},  # dropped by the gateway without a word
])
def test_seed_upstream_headers_are_checked_like_the_command_checks_them(tmp_path: Path,
                                                                        headers: dict[str, str]) -> None:
    import json

    text = ("seed: {listings: [{slug: a, upstream_url: 'http://h/mcp', upstream_headers: "
            + json.dumps(headers) + "}]}")
    with pytest.raises(ConfigError):
        _load(tmp_path, text)


def test_a_header_value_with_crlf_from_the_database_is_not_sent() -> None:
    """A row the web app wrote: the gateway's HTTP/1 writer puts values on the wire byte for byte."""
    from addon.store.sql import parse_upstream_headers

    headers = parse_upstream_headers('{"X-Api-Key": "v\\r\\nX-Injected: 1", "X-Ok": "fine", "Bad Name": "v"}')
    assert headers == {"X-Ok": "fine"}


@pytest.mark.parametrize("url", [
    "http://h/a b",  # a space in the request line
    "http://h/a\x00",
    "http://h:99999/mcp",  # every call would be refused invalid_path
    "http://h/m\u00e9",
])
def test_seed_upstream_url_is_checked_like_the_command_checks_it(tmp_path: Path, url: str) -> None:
    import json

    with pytest.raises(ConfigError):
        _load(tmp_path, "seed: {listings: [{slug: a, upstream_url: " + json.dumps(url) + "}]}")


@pytest.mark.parametrize("entry", [
    "{key: mcpm_test_abc, credit_micro_cents: 100000000000000000000}",
    "{key: mcpm_test_abc, user_id: 100000000000000000000}",
])
def test_seed_numbers_past_bigint_are_a_config_error_not_a_crash_at_start(tmp_path: Path, entry: str) -> None:
    """They passed load() and the SQLite store then crashed at start with OverflowError."""
    with pytest.raises(ConfigError):
        _load(tmp_path, f"sqlite_path: {tmp_path / 'x.db'}\nseed: {{consumers: [{entry}]}}")


def test_seed_price_past_bigint_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, "seed: {listings: [{slug: a, upstream_url: 'http://h/', price_micro_cents: "
                        f"{BIGINT_MAX + 1}}}]}}")


# --- two operators at once ------------------------------------------------------------------


def test_two_operators_adding_headers_to_one_listing_keep_both(run: Run, backend: Backend,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`listing set --header` reads the listing's headers, merges, writes them back. On MySQL the read
    was a plain (snapshot) read: two operators adding different headers at once both read the old
    set, and the second write dropped the first operator's header (say, the upstream's API key)."""
    import threading

    from addon import admin
    from addon.config import load as load_config

    s = "adv-" + uuid.uuid4().hex[:8]
    run("listing", "add", s, "--upstream", "http://h/mcp", "--header", "X-Old=1")
    barrier = threading.Barrier(2)
    parse = admin.parse_upstream_headers

    def slow_parse(raw: Any) -> dict[str, str]:  # both read before either writes, if the read allows it
        try:
            barrier.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return parse(raw)

    monkeypatch.setattr(admin, "parse_upstream_headers", slow_parse)
    errors: list[BaseException] = []

    def operator(name: str) -> None:
        a = admin.open_admin(load_config(None))
        try:
            a.set_listing(s, admin.ListingChange(headers={name: "v"}))
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
        finally:
            a.close()

    threads = [threading.Thread(target=operator, args=(n,)) for n in ("X-First", "X-Second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    row = backend.query("SELECT upstream_headers FROM mcps WHERE slug = %s", (s,))[0][0]
    assert sorted(parse(row)) == ["X-First", "X-Old", "X-Second"]


def _at_once(monkeypatch: pytest.MonkeyPatch, reader: str, work: Any) -> list[Any]:
    """`work(admin)` from two operators whose transactions both make `reader`'s first read (does the
    row exist?) before either writes, where the database allows it (SQLite runs one writer at a
    time: there the second waits, then reads). Returns what each returned or raised."""
    import threading

    from addon import admin
    from addon.config import load as load_config

    barrier = threading.Barrier(2)
    read = getattr(admin, reader)

    def read_together(*args: Any, **kwargs: Any) -> Any:
        found = read(*args, **kwargs)
        try:
            barrier.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return found

    monkeypatch.setattr(admin, reader, read_together)
    outcomes: list[Any] = []

    def operator() -> None:
        a = admin.open_admin(load_config(None))
        try:
            outcomes.append(work(a))
        except BaseException as e:  # noqa: BLE001  (returned)
            outcomes.append(e)
        finally:
            a.close()

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_two_operators_adding_one_listing_get_it_added_and_exists_already(run: Run, backend: Backend,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On MySQL both read "no such slug", both inserted, and the second's duplicate key was reported as
    "the database is unavailable" (exit 3), inviting a retry of something that had been done."""
    from addon import admin

    s = "adv-" + uuid.uuid4().hex[:8]
    outcomes = _at_once(monkeypatch, "_listing_id",
                        lambda a: a.add_listing(s, admin.ListingChange(upstream_url="http://h/mcp")))
    added = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, admin.AdminError)]
    assert len(added) == 1 and len(refused) == 1, outcomes
    assert "exists already" in str(refused[0])
    assert backend.query("SELECT COUNT(*) FROM mcps WHERE slug = %s", (s,))[0][0] == 1


def test_two_keys_made_at_once_for_a_new_email_are_both_made(run: Run, backend: Backend,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Both made the user; the second failed on the email's unique key (exit 3 on MySQL)."""
    email = _email()
    outcomes = _at_once(monkeypatch, "_user_id", lambda a: a.create_key(email, "live", 0))
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert backend.query("SELECT COUNT(*) FROM users WHERE email = %s", (email,))[0][0] == 1
    assert backend.query("SELECT COUNT(*) FROM api_keys k JOIN users u ON u.id = k.user_id"
                         " WHERE u.email = %s", (email,))[0][0] == 2


def test_a_top_up_whose_commit_was_lost_is_not_reported_as_not_done(run: Run, backend: Backend,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops while COMMIT is on the wire, after the server committed. The command said
    "the database is unavailable", which reads as "nothing happened": the operator runs it again and
    the consumer is credited twice. It must say the top-up may have been written."""
    if backend.kind != "mysql":
        pytest.skip("the embedded store commits in-process")
    import pymysql

    email = _email()
    run("key", "create", "--email", email)
    real_commit = pymysql.connections.Connection.commit

    def commit_then_lose(self: Any) -> None:
        real_commit(self)
        raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")

    monkeypatch.setattr(pymysql.connections.Connection, "commit", commit_then_lose)
    _, err = run("credit", "add", email, "500", code=3)
    monkeypatch.setattr(pymysql.connections.Connection, "commit", real_commit)
    assert _balance(backend, email) == 500  # it was written
    assert "may have been written" in err and "unavailable" not in err


# --- secrets: a publisher's header value need not be on the command line -----------------------


def test_a_header_value_can_be_given_on_standard_input(run: Run, backend: Backend,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`--header NAME=VALUE` was the only way: the publisher's secret went into the shell's history
    and into /proc/<pid>/cmdline, which every local user can read while the command runs."""
    import io
    import json

    s = "adv-" + uuid.uuid4().hex[:8]
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-from-stdin\nsecond-value\n"))
    out, err = run("listing", "add", s, "--upstream", "http://h/mcp", "--header", "X-Api-Key", "--header",
                   "X-Other")
    assert "s3cret-from-stdin" not in out + err
    row = backend.query("SELECT upstream_headers FROM mcps WHERE slug = %s", (s,))[0][0]
    assert json.loads(row) == {"X-Api-Key": "s3cret-from-stdin", "X-Other": "second-value"}
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    _, err = run("listing", "set", s, "--header", "X-Api-Key", code=2)
    assert "standard input" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("bad\x01value\n"))
    run("listing", "set", s, "--header", "X-Api-Key", code=2)
    assert json.loads(backend.query("SELECT upstream_headers FROM mcps WHERE slug = %s", (s,))[0][0])[
        "X-Api-Key"] == "s3cret-from-stdin"


# --- what the command prints: bytes others chose reach the operator's terminal escaped ----------


async def test_usage_by_tool_escapes_a_consumer_chosen_tool_name(run: Run, backend: Backend) -> None:
    """A tool name is whatever a consumer sent as params.name, kept in usage_events.tool_name. The
    table printed it raw: `usage --by tool` wrote the consumer's escape sequences (clear the screen,
    set the title, OSC 52 writes the clipboard) to the operator's terminal."""
    from tests.test_cli import record_calls

    s = "adv-" + uuid.uuid4().hex[:8]
    run("listing", "add", s, "--upstream", "http://127.0.0.1:9/mcp", "--price", "1000")
    user = js(run, "key", "create", "--email", _email(), "--credit", "10000")
    hostile = "t\x1b]52;c;ZXZpbA==\x07\x1b[2J\u009b31m\u202eok"
    await record_calls(backend, s, user, [(hostile, 0, False, 5)])
    out, _ = run("usage", "--listing", s, "--by", "tool")
    assert not any(not c.isprintable() for c in out.replace("\n", "")), repr(out)
    assert "\\x1b]52;c;ZXZpbA==\\x07" in out  # shown, escaped
    assert js(run, "usage", "--listing", s, "--by", "tool")[0]["tool"] == f"{s} · {hostile}"  # JSON: as stored


# --- emails: MySQL's collation calls different addresses one ----------------------------------


@pytest.mark.parametrize("twin", ["b\u00f3b", "\uff42\uff4f\uff42"])  # accented, full-width
def test_an_email_the_database_only_collates_equal_is_not_another_users(run: Run, backend: Backend,
                                                                       twin: str) -> None:
    """MySQL's utf8mb4_unicode_ci compares without accents, width or ignorable characters: on MySQL
    `key create --email bób@…` found bob@…'s account and gave a stranger a key that spends bob's
    credit (printing the email as typed); `credit add bób@…` credited bob; `--publisher bób@…` paid
    him. Each is refused there now, naming the address the database holds (SQLite tells them apart)."""
    domain = f"{uuid.uuid4().hex[:8]}.example.test"
    bob = js(run, "key", "create", "--email", f"bob@{domain}", "--credit", "100")
    code = 1 if backend.kind == "mysql" else 0
    for argv in (["key", "create", "--email", f"{twin}@{domain}"], ["credit", "add", f"{twin}@{domain}", "5"],
                 ["listing", "add", "adv-" + uuid.uuid4().hex[:8], "--upstream", "http://h/mcp",
                  "--publisher", f"{twin}@{domain}"]):
        _, err = run(*argv, code=code)
        if code:
            assert f"bob@{domain}" in err
    assert _balance(backend, f"bob@{domain}") == 100
    assert backend.query("SELECT COUNT(*) FROM api_keys WHERE user_id = %s", (bob["user_id"],))[0][0] == 1
    assert backend.query("SELECT COUNT(*) FROM mcps WHERE publisher_id = %s", (bob["user_id"],))[0][0] == 0


# --- header names are case-insensitive ---------------------------------------------------------


def test_a_header_set_again_in_another_case_replaces_the_old_one(run: Run, backend: Backend) -> None:
    """`listing set --header authorization=NEW` on a listing with `Authorization=OLD` kept both, and
    the gateway sent the upstream both: the old secret (rotated, perhaps because it leaked) first."""
    import json

    s = "adv-" + uuid.uuid4().hex[:8]
    run("listing", "add", s, "--upstream", "http://h/mcp", "--header", "Authorization=Bearer old",
        "--header", "X-A=1", "--header", "x-a=2")
    row = js(run, "listing", "set", s, "--header", "authorization=Bearer new")[0]
    assert row["header_names"] == ["authorization", "x-a"]  # as the later one spells it
    stored = json.loads(backend.query("SELECT upstream_headers FROM mcps WHERE slug = %s", (s,))[0][0])
    assert stored == {"x-a": "2", "authorization": "Bearer new"}


def test_seed_upstream_headers_named_twice_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, "seed: {listings: [{slug: a, upstream_url: 'http://h/mcp', upstream_headers: "
                        "{Authorization: a, authorization: b}}]}")


# --- tool names: MySQL's collation calls different names one ------------------------------------


@pytest.mark.parametrize("first, second", [("Echo", "echo"), ("echo", "echo "), ("cafe", "caf\u00e9")])
def test_a_tool_price_mysql_cannot_tell_from_another_is_refused(run: Run, backend: Backend, first: str,
                                                                second: str) -> None:
    """Tool names are case- and byte-exact (the gateway prices params.name by exact match), but the
    unique key (mcp_id, tool_name) and `DELETE ... WHERE tool_name = %s` use MySQL's collation, which
    ignores case, accents and trailing spaces: `--tool-price Echo=1 --tool-price echo=5` kept only
    echo's, and `listing set --tool-price 'echo =0'` (a stray space) deleted echo's own price, each
    reported as done. On MySQL it is refused now, nothing written; SQLite keeps both names."""
    s = "adv-" + uuid.uuid4().hex[:8]
    code = 1 if backend.kind == "mysql" else 0
    _, err = run("listing", "add", s, "--upstream", "http://h/mcp", "--tool-price", f"{first}=1",
                 "--tool-price", f"{second}=5", code=code)
    if code:
        assert repr(first) in err and repr(second) in err
        assert backend.query("SELECT COUNT(*) FROM mcps WHERE slug = %s", (s,))[0][0] == 0
        run("listing", "add", s, "--upstream", "http://h/mcp", "--tool-price", f"{first}=1")
        run("listing", "set", s, "--tool-price", f"{second}=5", code=1)
        assert _prices(run, s) == {first: 1}
    else:
        assert _prices(run, s) == {first: 1, second: 5}
    run("listing", "set", s, "--tool-price", f"{first}=7")  # the same name, exactly: replaced


def _prices(run: Run, s: str) -> dict[str, int]:
    return {x["slug"]: x for x in js(run, "listing", "list")}[s]["tool_prices"]


@pytest.mark.parametrize("address", ["a\x00b@example.test", "\x1b[31mred@example.test", "bo\u200bb@example.test",
                                     "evil\u202e@example.test"])
def test_an_email_with_control_or_invisible_characters_is_refused(run: Run, backend: Backend, address: str) -> None:
    """They were written as a new user's email (a NUL on both backends), to be printed to terminals."""
    users = backend.query("SELECT COUNT(*) FROM users")[0][0]
    run("key", "create", "--email", address, code=2)
    run("credit", "add", address, "5", code=2)
    assert backend.query("SELECT COUNT(*) FROM users")[0][0] == users


def test_key_revoke_never_repeats_a_whole_key(run: Run, backend: Backend) -> None:
    """`key revoke KEY` on a key already revoked (or mistyped) repeated the whole key in its error,
    into whatever logs the command's stderr (a script, CI): keys are shown once, at creation."""
    key = js(run, "key", "create", "--email", _email())["key"]
    run("key", "revoke", key)
    _, err = run("key", "revoke", key, code=1)
    assert key not in err and key[:14] in err
    _, err = run("key", "revoke", key[:-1] + "Z", code=1)
    assert key[:-1] not in err


@pytest.mark.parametrize("value", [
    "gw.example",  # no scheme: the metadata's resource and the challenge named a relative URL, and the
    #                public origin was never allowed (origins.of_url found none), without a word
    "ftp://gw.example",
    "https://user:pw@gw.example",  # credentials, reflected to every client
    'https://gw.example/"x',  # ends the challenge's quoted resource_metadata
    "https://gw.example/a b",
    "https://gw.example/\r\nSet-Cookie: x=1",  # a header line of its own in every 401
    "https://gw.example/?q=1",  # the metadata path would be appended to the query
    "https://gw.example:99999",
])
def test_a_public_url_the_gateway_cannot_reflect_is_a_config_error(tmp_path: Path, value: str) -> None:
    import json

    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, f"public_url: {json.dumps(value)}")
    assert "pw" not in str(raised.value)
    with pytest.raises(ConfigError):
        _load(tmp_path, "{}", {"MCPMETER_PUBLIC_URL": value})


@pytest.mark.parametrize("value", ["https://gw.example/", "http://127.0.0.1:3010", "https://[::1]:8443/meter"])
def test_a_public_url_with_a_path_or_a_port_is_kept(tmp_path: Path, value: str) -> None:
    assert _load(tmp_path, "{}", {"MCPMETER_PUBLIC_URL": value}).public_url == value.rstrip("/")


# --- reconcile on a broken ledger names what is wrong -------------------------------------------


def test_reconcile_names_a_ledger_whose_sum_passes_bigint(run: Run, backend: Backend) -> None:
    """Rows no command writes (a bad import, a hand-made adjustment) summing past 2**63: SQLite's SUM
    raised 'integer overflow', and reconcile said "the database is unavailable" (exit 3) instead of
    naming the user whose balance is not its ledger."""
    user = js(run, "key", "create", "--email", _email(), "--credit", "100")
    for _ in range(2):
        backend.execute("INSERT INTO credit_transactions (user_id, amount_micro_cents, type, balance_after_micro_cents)"
                        " VALUES (%s, %s, 'adjustment', 0)", (user["user_id"], BIGINT_MAX))
    try:
        _, err = run("reconcile", code=1)
        assert (f"user {user['user_id']} ({user['email']}): balance 100 µ¢, ledger sums to {100 + 2 * BIGINT_MAX} µ¢"
                in err)
    finally:
        backend.execute("DELETE FROM credit_transactions WHERE user_id = %s AND type = 'adjustment'",
                        (user["user_id"],))
