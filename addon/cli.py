"""`mcpmeter`: the operator's command for listings, keys, credit, usage, payouts and reconciliation.

It reads the gateway's own configuration (`--config FILE`, then the same environment variables)
and works on either backend. Argument parsing and printing live here; the database work is
in admin.py. Exit codes: 0 done, 1 refused or discrepancies found, 2 bad arguments,
3 configuration or database unavailable. A user's mistake is a message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import admin, forwarding
from .display import escaped
from .config import LISTING_STATUSES, SLUG_RE, TRANSPORTS, ConfigError, load
from .model import MAX_MICRO_CENTS
from .store.base import OutcomeUnknown, StoreUnavailable

OK, REFUSED, USAGE, UNAVAILABLE = 0, 1, 2, 3

TTL_NOTE = """\
Running gateways see changes within their cache TTLs: listings after MCP_CACHE_TTL_SECONDS,
keys (revocations) after KEY_CACHE_TTL_SECONDS (60 s each by default), a slug or key that was
unknown after negative_cache_ttl_seconds (30 s). Credit is never cached: it counts at once."""


class Command(argparse.ArgumentParser):
    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


# --- argument types: each names what is wrong -------------------------------------------------


def _int(low: int, high: int = MAX_MICRO_CENTS) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


MICRO_CENTS = _int(0)
POSITIVE_MICRO_CENTS = _int(1)


def slug(text: str) -> str:
    if not SLUG_RE.match(text) or len(text) > 191:
        raise argparse.ArgumentTypeError(f"{text!r} is not a slug: lower-case letters, digits and '-', "
                                         "starting with a letter or digit")
    return text


def url(text: str) -> str:
    # The gateway's own rule (forwarding.upstream_url_problem); the message never repeats a URL
    # with userinfo, which may hold a password.
    if (problem := forwarding.upstream_url_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def email(text: str) -> str:
    """Lower-cased: MySQL compares emails without case and SQLite with it; both then find the same user.
    Nothing unprintable: a control character is printed to terminals, an invisible one hides in MySQL's collation."""
    if not admin.EMAIL_RE.match(text) or len(text) > 255 or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not an email address")
    return text.lower()


def tool_price(text: str) -> tuple[str, int]:
    name, sep, price = text.partition("=")
    if not sep or not name or len(name) > 191:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=MICRO_CENTS")
    return name, MICRO_CENTS(price)


def header(text: str) -> tuple[str, str | None]:
    """NAME=VALUE, or NAME alone: its value is then read from standard input (see _header_values)."""
    name, sep, value = text.partition("=")
    if (problem := forwarding.header_problem(name, value)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return name, value if sep else None


def _header_values(headers: list[tuple[str, str | None]]) -> dict[str, str] | str:
    """Each NAME-only header's value, one line of standard input each, in order: a secret given so
    is in neither the shell's history nor the process's command line. A str is what went wrong."""
    out: dict[str, str] = {}
    for name, value in headers:
        if value is None:
            line = sys.stdin.readline()
            if not line:
                return (f"--header {forwarding.shown_name(name)}: no value on standard input (one line per header "
                        "given as NAME alone)")
            value = line.removesuffix("\n").removesuffix("\r")
            if (problem := forwarding.header_problem(name, value)) is not None:
                return problem  # names the header, never the value
        out[name] = value
    return out


def day(text: str) -> str:
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None
    return text


def month(text: str) -> str:
    if not re.match(r"^\d{4}-\d{2}\Z", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a month YYYY-MM")
    try:
        time.strptime(text, "%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month YYYY-MM") from None
    return text


def user(text: str) -> str:
    if text.isascii() and text.isdigit():  # a user id ('²'.isdigit() is true too)
        return text
    return email(text)


# --- the parser ---------------------------------------------------------------------------------


def parser() -> Command:
    def options(parser: Any, top_level: bool) -> Any:
        # Accepted before or after the subcommand. Only the top level has defaults: a subcommand
        # that has none keeps what the top level read.
        unset = argparse.SUPPRESS
        parser.add_argument("--config", metavar="FILE", default=None if top_level else unset,
                            help="the gateway's YAML configuration (environment variables override it, "
                                 "as in the gateway)")
        parser.add_argument("--json", action="store_true", default=False if top_level else unset,
                            help="print JSON instead of a table")
        return parser

    common = options(argparse.ArgumentParser(add_help=False), top_level=False)
    top: Command = options(Command(prog="mcpmeter", formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description="Manage mcpmeter's listings, keys and credit; report usage and "
                                               "payouts; reconcile the ledger.\n\n" + TTL_NOTE), top_level=True)
    groups = top.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Command)

    def sub(group: Any, name: str, help: str, **kw: Any) -> Command:
        return group.add_parser(name, help=help, description=help + ("\n\n" + TTL_NOTE if kw.pop("ttl", False)
                                                                      else ""),
                                parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    listing = sub(groups, "listing", "add, change, pause and list listings (the MCP servers sold)", ttl=True)
    lg = listing.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Command)
    for name, help in (("add", "add a listing (live at once unless --status says otherwise)"),
                       ("set", "change a listing: only the options given")):
        p = sub(lg, name, help, ttl=True)
        p.add_argument("slug", type=slug, metavar="SLUG")
        p.add_argument("--upstream", type=url, required=name == "add", metavar="URL",
                       help="the publisher's MCP endpoint, http:// or https://")
        p.add_argument("--price", type=MICRO_CENTS, metavar="MICRO_CENTS",
                       help="default price of a tools/call (1 cent = 1000000 µ¢); 0 = free")
        p.add_argument("--tool-price", type=tool_price, action="append", default=[], metavar="NAME=MICRO_CENTS",
                       help="a tool's own price (repeatable)")
        p.add_argument("--transport", choices=TRANSPORTS, help="streamable (default), sse (2024-11-05) or http")
        p.add_argument("--free", type=_int(0, 65535), metavar="N", help="free calls per consumer per UTC month")
        p.add_argument("--rpm", type=_int(0, 2**32 - 1), metavar="N", help="calls per minute per consumer (0: default)")
        p.add_argument("--rpd", type=_int(0, 2**32 - 1), metavar="N", help="calls per day per consumer (0: default)")
        p.add_argument("--timeout-ms", type=_int(0, 65535 * 1000), metavar="N",
                       help="upstream timeout in ms, a multiple of 1000 (0: the gateway's default)")
        p.add_argument("--header", type=header, action="append", default=[], metavar="NAME=VALUE|NAME",
                       help="a header sent to the upstream (repeatable; replaces one of the same name in any case; "
                            "values are never printed). NAME alone "
                            "reads its value from standard input, one line per header: keeps a secret out of "
                            "the shell's history and the process list")
        p.add_argument("--publisher", type=email, metavar="EMAIL",
                       help=f"the publisher paid for the listing (made if new; default {admin.DEFAULT_PUBLISHER})")
        p.add_argument("--status", choices=LISTING_STATUSES)
        if name == "set":
            p.add_argument("--clear-tool-prices", action="store_true", help="drop every tool's own price first")
            p.add_argument("--clear-headers", action="store_true", help="drop every upstream header first")
    sub(lg, "list", "list the listings")
    for name in ("pause", "resume"):
        sub(lg, name, f"{name} a listing (paused listings answer 503 mcp_paused)", ttl=True).add_argument(
            "slug", type=slug, metavar="SLUG")

    key = sub(groups, "key", "create, list and revoke consumers' API keys", ttl=True)
    kg = key.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Command)
    p = sub(kg, "create", "a new key for a consumer (user and project made if needed); printed once, never again")
    p.add_argument("--email", type=email, required=True)
    p.add_argument("--credit", type=MICRO_CENTS, default=0, metavar="MICRO_CENTS", help="credit to add with it")
    p.add_argument("--env", choices=("live", "test"), default="live")
    p = sub(kg, "list", "list keys (prefix only, never the key)")
    p.add_argument("--email", type=email)
    p = sub(kg, "revoke", "revoke one key", ttl=True)
    p.add_argument("prefix", metavar="PREFIX", help="the key's prefix as `key list` shows it, its id, or the key")

    credit = sub(groups, "credit", "add credit to a consumer")
    cg = credit.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Command)
    p = sub(cg, "add", "add credit: the balance and its topup ledger row, in one transaction")
    p.add_argument("user", type=user, metavar="EMAIL|USER_ID")
    p.add_argument("amount", type=POSITIVE_MICRO_CENTS, metavar="MICRO_CENTS")

    p = sub(groups, "usage", "calls, free, billed, refunded, µ¢ billed, p50/p95 duration")
    p.add_argument("--listing", type=slug, metavar="SLUG")
    p.add_argument("--consumer", type=user, metavar="EMAIL")
    p.add_argument("--since", type=day, metavar="YYYY-MM-DD", help="from this UTC day on")
    p.add_argument("--by", choices=("tool", "consumer", "listing", "day", "reason"), default="listing",
                   help="reason: why calls were billed or refunded (result, upstream_timeout, swept, ...)")

    p = sub(groups, "payouts", "per publisher and listing: gross, platform fee, payout for a UTC month")
    p.add_argument("--month", type=month, metavar="YYYY-MM", help="default: this month")

    sub(groups, "reconcile", "check every money invariant; exit 1 naming each discrepancy")
    return top


# --- running ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except _Exit as e:
        return e.code
    try:
        config = load(args.config)
    except ConfigError as e:
        return _fail(f"configuration: {e}", UNAVAILABLE)
    if config.store == "sqlite" and not os.path.exists(config.sqlite_path):
        print(f"mcpmeter: note: no embedded store at {config.sqlite_path!r} yet: making a new, empty one "
              "(set MCPMETER_SQLITE_PATH or --config to use the gateway's)", file=sys.stderr)
    try:
        store = admin.open_admin(config)
    except ConfigError as e:
        return _fail(str(e), UNAVAILABLE)
    try:
        return _dispatch(store, args)
    except BrokenPipeError:  # `mcpmeter ... | head`: the reader has what it wanted
        # Python's documented remedy: stdout to devnull, so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except admin.AdminError as e:
        return _fail(str(e), REFUSED)
    except OutcomeUnknown as e:  # before StoreUnavailable, which it is
        return _fail(f"the database stopped answering during the commit ({e}): the change may have been written. "
                     "Look before running the command again (`mcpmeter key list`, `mcpmeter listing list`, "
                     "`mcpmeter reconcile`, the user's balance), or it may be done twice", UNAVAILABLE)
    except (StoreUnavailable, ConfigError) as e:
        return _fail(f"the database is unavailable: {e}", UNAVAILABLE)
    finally:
        store.close()


def _fail(message: str, code: int) -> int:
    print(f"mcpmeter: error: {escaped(message)}", file=sys.stderr)
    return code


def _dispatch(a: admin.Admin, args: argparse.Namespace) -> int:
    command = args.command if args.command in ("usage", "payouts", "reconcile") else f"{args.command} {args.action}"
    if command in ("listing add", "listing set"):
        timeout = args.timeout_ms
        if timeout is not None and timeout % 1000:
            return _fail(f"--timeout-ms {timeout}: listings store whole seconds; give a multiple of 1000", USAGE)
        if timeout is not None and timeout > a.config.max_upstream_timeout_ms:
            return _fail(f"--timeout-ms {timeout} is above the gateway's max_upstream_timeout_ms "
                         f"({a.config.max_upstream_timeout_ms})", USAGE)
        headers = _header_values(args.header)
        if isinstance(headers, str):
            return _fail(headers, USAGE)
        change = admin.ListingChange(
            upstream_url=args.upstream, transport=args.transport, price=args.price,
            tool_prices=dict(args.tool_price), clear_tool_prices=getattr(args, "clear_tool_prices", False),
            free=args.free, rpm=args.rpm, rpd=args.rpd, timeout_seconds=None if timeout is None else timeout // 1000,
            headers=headers, clear_headers=getattr(args, "clear_headers", False),
            publisher=args.publisher, status=args.status)
        row = (a.add_listing if args.action == "add" else a.set_listing)(args.slug, change)
        return _show(args, [row], LISTING_COLUMNS)
    if command in ("listing pause", "listing resume"):
        row = a.set_listing(args.slug, admin.ListingChange(status="paused" if args.action == "pause" else "live"))
        return _show(args, [row], LISTING_COLUMNS)
    if command == "listing list":
        return _show(args, a.listings(), LISTING_COLUMNS)
    if command == "key create":
        row = a.create_key(args.email, args.env, args.credit)
        if args.json:
            _print_json(row)
        else:
            print(f"key: {row['key']}\n(shown this once: store it now; only its hash is kept)\n")
            print(_table([row], ["prefix", "user_id", "email", "project_id", "env", "balance_micro_cents"]))
        return OK
    if command == "key list":
        return _show(args, a.keys(args.email), ["id", "prefix", "user_id", "email", "env", "created_at",
                                                 "last_used_at", "revoked_at"])
    if command == "key revoke":
        return _show(args, [a.revoke_key(args.prefix)], ["id", "prefix", "email", "revoked_at"])
    if command == "credit add":
        return _show(args, [a.add_credit(args.user, args.amount)], ["user_id", "added_micro_cents",
                                                                     "balance_micro_cents"])
    if command == "usage":
        rows = a.usage(args.listing, args.consumer, args.since, args.by)
        return _show(args, rows, [args.by, "calls", "free", "billed", "refunded", "billed_micro_cents",
                                  "p50_ms", "p95_ms"])
    if command == "payouts":
        report = a.payouts(args.month or time.strftime("%Y-%m", time.gmtime()))
        if args.json:
            _print_json(report)
        else:
            totals = {"publisher": "total", "listing": "", **report["totals"]}
            print(f"payouts for {report['month']} (platform fee {report['fee_bps'] / 100:g} %)")
            print(_table(report["lines"] + [totals], ["publisher", "listing", "billed_calls", "gross_micro_cents",
                                                       "fee_micro_cents", "payout_micro_cents"]))
        if not report["adds_up"]:
            return _fail(f"the lines do not add up to the {report['billed_micro_cents']} µ¢ billed this month: "
                         "run `mcpmeter reconcile`", REFUSED)
        return OK
    if command == "reconcile":
        checks = a.reconcile()
        bad = [c for c in checks if not c.ok]
        if args.json:
            _print_json({"ok": not bad, "checks": [c.as_dict() for c in checks]})
        else:
            print(_table([{"invariant": c.invariant, "rule": c.rule, "result": "ok" if c.ok else
                           f"{len(c.discrepancies)} discrepancies"} for c in checks], ["invariant", "rule", "result"]))
        for c in bad:
            for d in c.discrepancies:
                print(f"mcpmeter: discrepancy: {c.invariant}: {escaped(d)}", file=sys.stderr)
        return REFUSED if bad else OK
    raise AssertionError(command)  # every parser branch is handled above


LISTING_COLUMNS = ["slug", "status", "transport", "upstream_url", "price_micro_cents", "tool_prices", "free_calls",
                   "rpm", "rpd", "timeout_ms", "header_names", "publisher"]


def _show(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]) -> int:
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, columns) if rows else "(none)")
    return OK


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _cell(value: Any) -> str:
    """A value as a table shows it. Text is escaped: much of it was chosen by others (a tool name is
    whatever a consumer sent; emails and names come from the web app) and goes to a terminal."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return escaped(", ".join(f"{k}={v}" for k, v in value.items())) or "-"
    if isinstance(value, list):
        return escaped(", ".join(map(str, value))) or "-"
    return escaped(str(value))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Aligned columns: numbers to the right, text to the left."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), int) or r.get(c) is None for r in rows) for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(columns)] + [line(row) for row in cells])


if __name__ == "__main__":
    sys.exit(main())
