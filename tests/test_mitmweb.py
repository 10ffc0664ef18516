"""mitmweb as a billing debugger, and shadow mode, through mitmproxy's test tools (embedded store).

Streamed answers kept for display, comments that name the consumer, replays that are dry runs,
commands that answer in the command bar, and shadow mode's "record, refuse and charge nothing".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon import display
from addon.gateway import Mcpmeter
from tests.test_gateway_hooks import (  # noqa: F401  (gw and isolated are fixtures)
    ALICE, CAPPED, OPENING, POOR, PRICE, RESULT, Db, Gw, _logged, assert_no_secret, forwarded, gw, isolated,
    json_response, make_flow, meta, sse_chunks, sse_response, upstream_answers, write_config,
)

pytestmark = pytest.mark.timeout(30)

ANSWER = {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}


async def stream(gw: Gw, flow: Any, chunks: list[bytes]) -> None:
    """What mitmproxy does with a streamed answer: the callable sees each chunk, then b""."""
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    flow.response.data.content = None  # mitmproxy keeps no body of a streamed answer
    for chunk in chunks + [b""]:
        flow.response.stream(chunk)
    await gw.addon.response(flow)
    await gw.addon.drain()


# --- streamed answers are visible --------------------------------------------------------------


@pytest.mark.parametrize("show", [True, False])
async def test_streamed_answer_is_kept_for_display_only_when_asked(gw: Gw, show: bool) -> None:
    gw.tctx.options.mcpmeter_show_streams = "on" if show else "off"
    flow = make_flow()
    await gw.addon.request(flow)
    chunks = sse_chunks(RESULT)
    await stream(gw, flow, chunks)
    assert meta(flow)["decision"] == "billed"  # the watcher still settles: the copy wraps it
    assert gw.db.usage()[0]["billed_micro_cents"] == PRICE
    if show:
        # What the client got: the upstream's events, the answer's with its receipt.
        assert flow.response.content.startswith(b"".join(chunks[:-2]))
        assert b'"mcpmeter/receipt"' in flow.response.content
    else:
        assert flow.response.content is None  # mitmdump keeps nothing


def test_show_streams_defaults_to_mitmweb_only() -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        assert tctx.options.mcpmeter_show_streams == "auto"
        assert addon.show_streams() is False  # a test master is not mitmweb
        assert display.under_mitmweb(type("WebMaster", (), {})())


async def test_display_copy_is_bounded(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    gw.tctx.options.mcpmeter_show_streams = "on"
    monkeypatch.setattr(display, "MAX_COPY_BYTES", 64)
    monkeypatch.setattr(display.keep_copy, "__defaults__", (64,))
    flow = make_flow()
    await gw.addon.request(flow)
    chunks = sse_chunks(RESULT)
    await stream(gw, flow, chunks)
    assert flow.response.content.startswith(b"".join(chunks)[:64])
    assert flow.response.content.endswith(b"[mcpmeter: display copy truncated at 64 bytes]\n")
    assert meta(flow)["decision"] == "billed"


# --- comments ---------------------------------------------------------------------------------------


async def test_comment_names_consumer_tool_price_decision_and_refund_reason(gw: Gw, caplog: Any) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "x"}}))
    assert flow.comment.startswith("user 1 (mcpm_test_alic…) · echo-test · echo · price 1000 µ¢ · refunded")
    assert "rpc_error" in flow.comment or "error" in meta(flow)["reason"]
    assert meta(flow)["reason"] in flow.comment and meta(flow)["user_id"] == 1
    assert_no_secret(flow, caplog)


async def test_flows_the_gateway_answered_are_recognisable(gw: Gw) -> None:
    poor = make_flow(token=POOR)
    await gw.addon.request(poor)
    assert poor.response.status_code == 402
    assert poor.comment.startswith(f"{display.GATEWAY}: user 4 (mcpm_test_poor…) · echo-test · refused 402")
    assert poor.marked == ":no_entry:"
    health = make_flow("/health", method="GET", token=None)
    await gw.addon.request(health)
    assert health.comment.startswith(display.GATEWAY) and health.marked
    forwarded_flow = make_flow()
    await gw.addon.request(forwarded_flow)
    await upstream_answers(gw, forwarded_flow, json_response(ANSWER))
    assert not forwarded_flow.comment.startswith(display.GATEWAY)


async def test_health_405_carries_allow(gw: Gw) -> None:
    flow = make_flow("/health", method="POST", token=None)
    await gw.addon.request(flow)
    assert flow.response.status_code == 405 and flow.response.headers["Allow"] == "GET, HEAD"


# --- replay is a dry run ------------------------------------------------------------------------


def replay(flow: Any) -> None:
    """What mitmproxy 12.3's replay.client does: the same flow object, backed up and cleared."""
    flow.backup()
    flow.is_replay = "request"
    flow.response = None
    flow.error = None
    flow.live = True


async def test_replay_is_a_dry_run_as_the_original_consumer(gw: Gw, caplog: Any) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response(ANSWER))
    original_comment, original_meta = flow.comment, dict(meta(flow))
    ledger, usage, journal = gw.db.ledger(1), gw.db.usage(), gw.db.journal()
    assert forwarded(flow)

    replay(flow)
    flow.request.url = "http://127.0.0.1:1/mcp/"  # the replayed request is the forwarded one
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 200  # answered locally
    assert flow.response.headers["X-Mcpmeter-Dry-Run"] == "1"
    body = json.loads(flow.response.content)
    assert body["dry_run"] is True and body["charged"] == 0 and body["forwarded"] is False
    assert body["consumer"] == {"user_id": 1, "key_prefix": "mcpm_test_alic…", "status": "active"}
    assert body["tool"] == "echo" and body["price"] == PRICE and body["would"] == "debit"
    assert body["balance"] == OPENING - PRICE and body["free_left"] == 0
    assert body["rate_limit"]["per_minute"] == 60
    assert body["original"]["request_id"] == original_meta["request_id"]
    # Nothing charged, counted or recorded; the original record kept.
    assert gw.db.ledger(1) == ledger and gw.db.usage() == usage and gw.db.journal() == journal
    assert flow.metadata["mcpmeter_original"]["billing"] == original_meta
    assert flow.comment.startswith(f"{display.GATEWAY}: dry run · user 1")
    assert flow.comment.endswith(f"| original: {original_comment}") and flow.marked == ":mag:"
    assert meta(flow)["decision"] == "dry_run"
    assert ALICE not in repr(flow.get_state()) and ALICE not in repr(gw.addon.replays.by_ref)
    flow.revert()  # mitmweb's Revert: the original flow comes back whole
    assert flow.comment == original_comment and meta(flow) == original_meta

    # A second replay still compares against the first call, not against the dry run.
    replay(flow)
    await gw.addon.request(flow)
    assert json.loads(flow.response.content)["original"]["decision"] == "billed"


async def test_replay_shows_a_refusal_it_would_make(gw: Gw) -> None:
    flow = make_flow(token=CAPPED)
    await gw.addon.request(flow)
    assert flow.response.status_code == 402  # the project cap (0 cents)
    replay(flow)
    await gw.addon.request(flow)
    body = json.loads(flow.response.content)
    assert body["would"] == "refuse" and body["verdict"] == "project_cap_exceeded"
    assert "would refuse (project_cap_exceeded)" in flow.comment


async def test_replay_of_a_flow_this_gateway_never_saw_is_answered_not_forwarded(gw: Gw) -> None:
    flow = make_flow()
    replay(flow)
    await gw.addon.request(flow)
    body = json.loads(flow.response.content)
    assert flow.response.status_code == 200 and body["would"] == "refuse" and body["error"] == "invalid_token"
    assert not forwarded(flow) and gw.db.usage() == []


async def test_a_pricing_change_shows_in_the_dry_run(gw: Gw, tmp_path: Path) -> None:
    flow = make_flow("/freebies")
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response(ANSWER))
    assert meta(flow)["decision"] == "free"
    replay(flow)
    await gw.addon.request(flow)
    body = json.loads(flow.response.content)
    assert body["free_allowance"] == 1 and body["free_left"] == 0 and body["would"] == "debit"


# --- commands -----------------------------------------------------------------------------------


async def test_topup_of_a_missing_user_writes_nothing(gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcpmeter")
    before = gw.db.rows("SELECT COUNT(*) FROM credit_transactions")
    gw.tctx.command(gw.addon.commands.topup_command, "99", "1000")
    await _logged(caplog, "user 99: no such user, nothing written")
    await gw.addon.drain()
    assert gw.db.rows("SELECT COUNT(*) FROM credit_transactions") == before
    assert gw.db.rows("SELECT COUNT(*) FROM users WHERE id = 99") == [(0,)]
    with pytest.raises(exceptions.CommandError, match="does not exist"):
        gw.tctx.command(gw.addon.commands.topup_command, "99", "1000")  # known missing: refused at once


@pytest.mark.parametrize("command, args", [
    ("balance_command", ["0"]), ("balance_command", ["-3"]), ("topup_command", ["1", "0"]),
    ("topup_command", ["0", "10"]), ("topup_command", ["1", str(10**16)]), ("calls_command", ["0"]),
    ("calls_command", ["1000"]), ("balance_command", ["abc"]),
])
async def test_commands_validate_their_arguments(gw: Gw, command: str, args: list[str]) -> None:
    with pytest.raises(exceptions.CommandError):
        gw.tctx.command(getattr(gw.addon.commands, command), *args)
    assert gw.db.ledger(1) == [("topup", OPENING)]


async def test_commands_answer_in_the_command_bar_through_the_command_manager(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response(ANSWER))
    # What mitmweb's command endpoint calls: the returned value is what the command bar shows.
    answer = gw.tctx.master.commands.call_strings("mcpmeter.calls", ["3"])
    assert isinstance(answer, str) and meta(flow)["request_id"] in answer


# --- shadow mode ----------------------------------------------------------------------------------


@pytest.fixture
async def shadow_gw(tmp_path: Path) -> Any:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, shadow_listings=["echo-test", "strict"])))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


async def test_shadow_listing_records_what_it_would_bill_and_charges_nothing(shadow_gw: Gw) -> None:
    gw = shadow_gw
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response(ANSWER))
    assert gw.db.balance(1) == OPENING and gw.db.ledger(1) == [("topup", OPENING)]
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == 0 and row["status"] == 200  # the call is recorded, unbilled
    assert meta(flow)["shadow"]["verdict"] == "debited" and meta(flow)["shadow"]["amount"] == PRICE
    assert meta(flow)["decision"] == "shadow" and meta(flow)["billed"] == 0 and meta(flow)["price"] == PRICE
    assert flow.marked == ":ghost:" and f"shadow (would debit {PRICE} µ¢, charged nothing" in flow.comment
    assert flow.response.headers["X-Mcpmeter-Billed"] == "0"
    gw.db.assert_reconciled()


async def test_shadow_listing_refuses_nothing(shadow_gw: Gw) -> None:
    gw = shadow_gw
    poor = make_flow(token=POOR)
    await gw.addon.request(poor)
    assert poor.response is None and forwarded(poor)  # 402 in enforcing mode
    await upstream_answers(gw, poor, json_response(ANSWER))
    assert meta(poor)["shadow"]["verdict"] == "insufficient_credit"
    assert "would be refused insufficient_credit" in poor.comment
    assert gw.db.balance(4) == 100 and gw.db.ledger(4) == [("topup", 100)]
    for _ in range(2):  # strict allows 1 call a minute
        flow = make_flow("/strict")
        await gw.addon.request(flow)
        assert flow.response is None and forwarded(flow)
        await upstream_answers(gw, flow, json_response(ANSWER))
    assert meta(flow)["shadow"]["refused"] == "rate_limited"
    other = make_flow("/lenient", token=POOR)  # not in shadow: enforced
    await gw.addon.request(other)
    assert other.response.status_code == 402
    gw.db.assert_reconciled()


async def test_global_shadow_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPMETER_SHADOW", "1")
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path)))
        db = Db(tmp_path / "mcpmeter.db")
        flow = make_flow("/freebies", token=POOR)
        await addon.request(flow)
        assert forwarded(flow)
        await upstream_answers(Gw(addon, tctx, db), flow, json_response(ANSWER))
        assert meta(flow)["shadow"]["verdict"] == "free" and db.free_used("freebies", 4) == 0
        assert db.ledger(4) == [("topup", 100)]
        addon.done()


# --- OAuth metadata ----------------------------------------------------------------------------------


async def test_authorization_servers_are_the_configured_ones(tmp_path: Path) -> None:
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(
            tmp_path, authorization_servers=["https://auth.example/"])))
        flow = make_flow("/.well-known/oauth-protected-resource", method="GET", token=None)
        await addon.request(flow)
        assert json.loads(flow.response.content)["authorization_servers"] == ["https://auth.example"]
        addon.done()


async def test_a_tool_name_is_shown_bounded_and_on_one_line(shadow_gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    """A tool name is the client's, up to 1,024 characters and with any character in it: the
    shadow log line, the flow's comment and `mcpmeter.calls` show at most 191 characters of it, with
    line breaks and other control characters escaped, so it cannot forge a line of its own."""
    gw = shadow_gw
    caplog.set_level(logging.INFO, logger="mcpmeter")
    name = "echo\nmcpmeter: shadow forged would pass\r\u2028" + "x" * 900
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {}}}
    flow = make_flow(body=body)
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response(ANSWER))
    shadow_lines = [r.getMessage() for r in caplog.records if "mcpmeter: shadow" in r.getMessage()]
    calls = gw.addon.commands.calls_command(10)
    for text in (*shadow_lines, flow.comment, calls):
        assert "\n" not in text and "\r" not in text and "\u2028" not in text
        assert "xxxx" in text and len(text) < 600
    assert shadow_lines and "\\nmcpmeter: shadow forged" in shadow_lines[0]
