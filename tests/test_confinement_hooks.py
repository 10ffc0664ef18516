"""Issue 7 through the hooks: confinement of paths, legacy SSE sessions by identity, Origin and Host.

Same harness as test_gateway_hooks (taddons/tflow, the embedded SQLite store), with a legacy
(`sse`) listing and an `allowed_origins` setting added to its seed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import taddons

from addon import gateway as gateway_module
from addon.gateway import Mcpmeter
from tests.test_lifecycle import reloaded
from tests.refusals import refusal
from tests.test_gateway_hooks import (  # noqa: F401  (isolated: an autouse fixture)
    ALICE, BOB, OPENING, PRICE, SEED, UPSTREAM, Db, Gw, isolated, json_response, make_flow, meta,
    sse_response, tool_call, upstream_answers, write_config,
)

pytestmark = pytest.mark.timeout(30)

LEGACY = {"slug": "legacy-one", "upstream_url": f"{UPSTREAM}/legacy/sse", "transport": "sse",
          "price_micro_cents": PRICE, "upstream_timeout_seconds": 1,
          "upstream_headers": {"X-Publisher-Key": "pub-secret"}}
APP = "https://app.example"


async def _gw(tmp_path: Path, **extra: Any) -> AsyncIterator[Gw]:
    addon = Mcpmeter()
    seed = {**SEED, "listings": [*SEED["listings"], LEGACY]}
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, seed=seed, **extra)))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path, allowed_origins=[APP]):
        yield g


@pytest.fixture
async def gw_public(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path, public_url="https://meter.example/"):
        yield g


def error_of(flow: http.HTTPFlow) -> str:
    assert flow.response is not None
    return refusal(flow.response)["error"]


def untouched(flow: http.HTTPFlow) -> bool:
    """Still aimed at the reverse target: the gateway built no upstream URL for it."""
    return flow.request.host == "127.0.0.1" and flow.request.port == 3011


# --- confinement -----------------------------------------------------------------------------------

HOSTILE = [
    "/legacy-one/http://127.0.0.1:4113/x", "/legacy-one///host/x", "/legacy-one//host/x",
    "/legacy-one/http:%2f%2f127.0.0.1:4113/x", "/legacy-one/..%2f..%2fx", "/legacy-one/%2e%2e/x",
    "/echo-test/..", "/echo-test/../x", "/echo-test/%2e%2e", "/echo-test/%2E./x", "/echo-test/..%2f",
    "/echo-test/.%2e%2Fadmin", "/echo-test/a%5cb", "/echo-test/a\\b", "/echo-test/a//b", "/echo-test//x",
    "/echo-test/x%00", "/echo-test/x%zz", "/echo-test/x%4", "/echo-test/caf\u00e9", "/echo-test/a b",
    "/echo-test/..;/x", "/echo-test/x?a b", "/echo-test/x?a=\x01",
]


@pytest.mark.parametrize("path", HOSTILE)
async def test_hostile_paths_are_refused_before_anything_is_built(gw: Gw, path: str) -> None:
    flow = make_flow(path)
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert error_of(flow) == "invalid_path"
    assert untouched(flow) and "x-publisher-key" not in flow.request.headers
    assert gw.db.balance(1) == OPENING and gw.db.journal() == []


async def test_confined_paths_are_forwarded_as_sent(gw: Gw) -> None:
    flow = make_flow("/echo-test/a/x@evil.example:1/%41;b?u=http://evil/&q=%2e%2e")
    await gw.addon.request(flow)
    assert flow.response is None
    assert flow.request.url == f"{UPSTREAM}/mcp/a/x@evil.example:1/%41;b?u=http://evil/&q=%2e%2e"
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", 1)
    flow = make_flow("/legacy-one/messages/?session_id=s1", method="GET")
    await gw.addon.request(flow)
    assert flow.request.url == f"{UPSTREAM}/legacy/messages/?session_id=s1"


# --- legacy SSE sessions ------------------------------------------------------------------------------

ANSWER = b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}\n\n'
BLANKED = b"event: message\n\n"  # an answer to a refunded call: its data lines dropped


async def open_session(gw: Gw, session_id: str = "abc", token: str = ALICE) -> http.HTTPFlow:
    """ALICE's GET stream; the upstream announces its POST endpoint."""
    stream = make_flow("/legacy-one", token=token, method="GET")
    await gw.addon.request(stream)
    stream.response = sse_response()
    await gw.addon.responseheaders(stream)
    out = stream.response.stream(f"event: endpoint\ndata: /legacy/messages/?session_id={session_id}\n\n".encode())
    assert out == [f"event: endpoint\ndata: /legacy-one/messages/?session_id={session_id}\n\n".encode()]
    await asyncio.sleep(0)  # the session's binding to its key
    return stream


async def post(gw: Gw, route: str, token: str = ALICE, rpc_id: Any = 1) -> http.HTTPFlow:
    flow = make_flow(route, token=token, body=tool_call(rpc_id=rpc_id))
    await gw.addon.request(flow)
    return flow


async def accepted(gw: Gw, flow: http.HTTPFlow) -> None:
    """The upstream acknowledges the POST with 202; the result will come on the stream."""
    flow.response = http.Response.make(202, b"Accepted", {"Content-Type": "text/plain"})
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)


async def settled(gw: Gw) -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)
        if all(s for *_, s in gw.db.journal()):
            return


@pytest.mark.parametrize("route", [
    "/legacy-one/messages/?session_id=abc",
    "/legacy-one/messages/?session_id=abc&x=1",  # an extra parameter
    "/legacy-one/messages/?x=1&session_id=abc&",
    "/legacy-one/messages/?session_id=ab%63",  # the same id, encoded
    "/legacy-one/messages?session_id=abc",  # another spelling of the route
])
async def test_a_post_to_a_variant_of_the_route_is_settled_from_the_session_stream(gw: Gw, route: str) -> None:
    stream = await open_session(gw)
    flow = await post(gw, route)
    assert flow.response is None and gw.db.balance(1) == OPENING - PRICE
    await accepted(gw, flow)
    assert stream.response.stream(ANSWER) == [ANSWER]
    await settled(gw)
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == PRICE
    assert row["status"] == 200  # answered on the stream, not the 202 that acknowledged the POST
    assert gw.db.balance(1) == OPENING - PRICE
    assert gw.addon.legacy.awaiting == {}
    gw.db.assert_reconciled()


async def test_an_answer_that_overtakes_the_202_is_recorded_200(gw: Gw) -> None:
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    stream.response.stream(ANSWER)
    await accepted(gw, flow)
    await gw.addon.drain()
    await settled(gw)
    [row] = gw.db.usage()
    assert row["status"] == 200 and row["billed_micro_cents"] == PRICE


@pytest.mark.parametrize("route", [
    "/legacy-one/messages/?session_id=abc",
    "/legacy-one/messages/?session_id=abc&x=1",
    "/legacy-one/messages/?session_id=abc&",
    "/legacy-one/messages?session_id=abc",
    "/legacy-one/other/?sessionId=abc",
])
async def test_another_key_cannot_post_into_the_session_through_a_variant(gw: Gw, route: str) -> None:
    await open_session(gw)
    flow = await post(gw, route, token=BOB)
    assert flow.response is not None and flow.response.status_code == 403
    assert error_of(flow) == "session_forbidden"
    assert gw.db.balance(2) == OPENING


async def test_a_session_id_given_twice_is_refused(gw: Gw) -> None:
    await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=xyz&session_id=abc", token=BOB)
    assert flow.response is not None and error_of(flow) == "invalid_request"
    assert gw.db.balance(2) == OPENING


async def test_a_doubled_slash_variant_is_refused_not_charged(gw: Gw) -> None:
    await open_session(gw)
    flow = await post(gw, "/legacy-one/messages//?session_id=abc")
    assert error_of(flow) == "invalid_path" and gw.db.balance(1) == OPENING


async def test_a_call_without_answer_is_refunded_at_the_listing_timeout_while_the_stream_stays_open(gw: Gw) -> None:
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc&x=1")
    await accepted(gw, flow)
    assert gw.db.balance(1) == OPENING - PRICE
    await asyncio.sleep(1.3)  # the listing's upstream_timeout_seconds is 1
    await settled(gw)
    assert gw.db.balance(1) == OPENING
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == 0 and row["status"] == 504
    assert gw.addon.legacy.awaiting == {}
    # The stream is still open and still works: a late answer settles nothing twice, and is not
    # delivered (blanked: clients dispatch no event without data), whichever way it is split.
    assert b"".join(stream.response.stream(ANSWER[:30]) + stream.response.stream(ANSWER[30:])) == BLANKED
    note = b'event: message\ndata: {"jsonrpc": "2.0", "method": "notifications/message", "params": {}}\n\n'
    assert stream.response.stream(note) == [note]
    await asyncio.sleep(0.05)
    assert len(gw.db.usage()) == 1
    gw.db.assert_reconciled()


async def test_a_new_call_under_a_refunded_id_takes_it_over(gw: Gw) -> None:
    """As on streamable HTTP (pending.track): the answer to the id is the new call's, delivered and billed."""
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    await accepted(gw, flow)
    await asyncio.sleep(1.3)  # refunded at the timeout
    await settled(gw)
    again = await post(gw, "/legacy-one/messages/?session_id=abc")
    await accepted(gw, again)
    assert stream.response.stream(ANSWER) == [ANSWER]
    await settled(gw)
    assert sorted(r["billed_micro_cents"] for r in gw.db.usage()) == [0, PRICE]
    assert gw.db.balance(1) == OPENING - PRICE
    # That call answered, the id's answers are nobody's: they pass (nothing refunded under it now).
    assert stream.response.stream(ANSWER) == [ANSWER]
    gw.db.assert_reconciled()


@pytest.mark.parametrize("spelled", ["1", '"1"', '"01"', '"1.0"', '"0x1"', "1.0"])
async def test_a_post_the_upstream_failed_gets_no_answer_on_the_stream_however_its_id_is_spelled(
        gw: Gw, spelled: str) -> None:
    """Refunded (a 500), its answer on the session stream is withheld, also under "1" for call 1's,
    which the SDK clients take for it (int(), Number())."""
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    flow.response = http.Response.make(500, b"boom", {"Content-Type": "text/plain"})
    await gw.addon.responseheaders(flow)
    await gw.addon.response(flow)
    await settled(gw)
    misspelled = ANSWER.replace(b'"id": 1', b'"id": ' + spelled.encode())
    assert stream.response.stream(misspelled) == [BLANKED]
    other = ANSWER.replace(b'"id": 1', b'"id": "2"')  # another id's: passes
    assert stream.response.stream(other) == [other]
    await asyncio.sleep(0.05)
    assert gw.db.balance(1) == OPENING and [r["billed_micro_cents"] for r in gw.db.usage()] == [0]
    gw.db.assert_reconciled()


async def test_a_session_without_refunded_calls_holds_nothing_back(gw: Gw) -> None:
    """The stream passes as it comes while no call of the session was refunded: an event in progress too."""
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    await accepted(gw, flow)
    assert stream.response.stream(ANSWER[:30]) == [ANSWER[:30]]
    assert stream.response.stream(ANSWER[30:]) == [ANSWER[30:]]
    await settled(gw)
    assert gw.db.usage()[0]["billed_micro_cents"] == PRICE
    # Another session's refunded call does not make this one hold its events.
    other = await open_session(gw, "xyz")
    late = await post(gw, "/legacy-one/messages/?session_id=xyz", rpc_id=7)
    await accepted(gw, late)
    await asyncio.sleep(1.3)
    await settled(gw)
    assert stream.response.stream(ANSWER[:30]) == [ANSWER[:30]]
    assert other.response.stream(ANSWER.replace(b'"id": 1', b'"id": 7')) == [BLANKED]


async def test_one_id_posted_twice_is_settled_once_per_answer(gw: Gw) -> None:
    stream = await open_session(gw)
    first = await post(gw, "/legacy-one/messages/?session_id=abc")
    second = await post(gw, "/legacy-one/messages/?session_id=abc&again=1")
    await accepted(gw, first)
    await accepted(gw, second)
    stream.response.stream(ANSWER)
    stream.response.stream(ANSWER)
    await settled(gw)
    assert sorted(r["billed_micro_cents"] for r in gw.db.usage()) == [PRICE, PRICE]
    assert gw.db.balance(1) == OPENING - 2 * PRICE


async def test_the_end_of_the_stream_refunds_the_calls_still_waiting(gw: Gw) -> None:
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc&x=2")
    await accepted(gw, flow)
    stream.response.stream(b"")
    await settled(gw)
    assert gw.db.balance(1) == OPENING and gw.db.usage()[0]["billed_micro_cents"] == 0


async def test_a_client_that_walks_away_from_the_session_pays_like_on_streamable_http(gw: Gw) -> None:
    """2024-11-05 has no cancellation: the upstream ran the call, as when a streamable client leaves (499)."""
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    await accepted(gw, flow)
    stream.error = Error("Client disconnected.")
    await gw.addon.error(stream)
    await settled(gw)
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == PRICE and row["status"] == 499
    assert gw.db.balance(1) == OPENING - PRICE
    gw.db.assert_reconciled()


# --- Origin ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://app.example.evil", "http://app.example",
                                    "https://app.example:8443", "https://app.example/", "garbage"])
@pytest.mark.parametrize("token", [ALICE, None])
async def test_a_foreign_origin_is_refused_before_authentication(gw: Gw, origin: str, token: str | None) -> None:
    flow = make_flow("/echo-test", token=token, headers={"Origin": origin})
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert error_of(flow) == "origin_forbidden" and "WWW-Authenticate" not in flow.response.headers
    assert untouched(flow) and gw.db.balance(1) == OPENING


@pytest.mark.parametrize("headers", [{}, {"Origin": APP}, {"Origin": "HTTPS://App.Example:443"}])
async def test_no_origin_or_an_allowed_one_passes(gw: Gw, headers: dict[str, str]) -> None:
    flow = make_flow("/echo-test", headers=headers)
    await gw.addon.request(flow)
    assert flow.response is None and flow.request.host == "127.0.0.1" and flow.request.port == 1
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    assert gw.db.balance(1) == OPENING - PRICE


async def test_two_origin_headers_are_refused(gw: Gw) -> None:
    flow = make_flow("/echo-test", headers={"Origin": APP})
    flow.request.headers.add("Origin", "https://evil.example")
    await gw.addon.request(flow)
    assert error_of(flow) == "origin_forbidden"


async def test_the_public_url_origin_is_always_allowed(gw_public: Gw) -> None:
    flow = make_flow("/echo-test", headers={"Origin": "https://meter.example"})
    await gw_public.addon.request(flow)
    assert flow.response is None
    flow = make_flow("/echo-test", headers={"Origin": APP})  # not listed in this configuration
    await gw_public.addon.request(flow)
    assert error_of(flow) == "origin_forbidden"


# --- Host: never reflected unless it is a plain host[:port] -------------------------------------------

EVIL_HOSTS = ['gw.example", error="x', "gw.example/evil?", "evil.example@gw", "gw.example, realm=evil",
              "gw.example\\x", "a b", "gw:99999", 'gw"}, "resource": "https://evil', ""]


@pytest.mark.parametrize("host", EVIL_HOSTS)
async def test_a_hostile_host_is_not_reflected_in_the_challenge(gw: Gw, host: str) -> None:
    flow = make_flow("/echo-test", token=None)
    flow.request.headers["Host"] = host
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert error_of(flow) == "invalid_request"
    assert "WWW-Authenticate" not in flow.response.headers
    if host:
        assert host.encode() not in flow.response.content


@pytest.mark.parametrize("host", EVIL_HOSTS)
async def test_a_hostile_host_is_not_reflected_in_the_metadata(gw: Gw, host: str) -> None:
    flow = make_flow("/.well-known/oauth-protected-resource", token=None, method="GET")
    flow.request.headers["Host"] = host
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    if host:
        assert host.encode() not in flow.response.content


async def test_with_public_url_the_host_is_never_reflected(gw_public: Gw) -> None:
    for path, token in (("/.well-known/oauth-protected-resource", None), ("/echo-test", None)):
        flow = make_flow(path, token=token, method="GET" if token is None and "well-known" in path else "POST")
        flow.request.headers["Host"] = EVIL_HOSTS[0]
        await gw_public.addon.request(flow)
        assert b"evil" not in flow.response.content and b'error="x' not in flow.response.content
        assert "x\"" not in flow.response.headers.get("WWW-Authenticate", "")
        text = flow.response.text + flow.response.headers.get("WWW-Authenticate", "")
        assert "https://meter.example/.well-known/oauth-protected-resource" in text or \
            json.loads(flow.response.content)["resource"] == "https://meter.example"


async def test_a_plain_host_is_reflected(gw: Gw) -> None:
    flow = make_flow("/echo-test", token=None)
    await gw.addon.request(flow)
    assert flow.response.status_code == 401
    assert 'resource_metadata="http://gw.example:3010/.well-known/oauth-protected-resource"' in \
        flow.response.headers["WWW-Authenticate"]


# --- a script reload: a legacy session's stream stays with the meter that opened it ------------------

async def test_after_a_script_reload_a_legacy_call_refunded_at_the_grace_end_gets_no_answer(
        gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old meter refunds the calls its session streams still await at the end of its grace; the
    stream stayed open (a reload is no exit), and the answer that came on it after was delivered."""
    stop = Mcpmeter.stop
    monkeypatch.setattr(Mcpmeter, "stop", lambda self, grace=0.2: stop(self, grace))
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    await accepted(gw, flow)
    new = Gw(reloaded(gw), gw.tctx, gw.db)
    try:
        # The session is not the new meter's: a POST into it would be settled by nothing there.
        late = await post(new, "/legacy-one/messages/?session_id=abc", rpc_id=2)
        assert late.response is not None and error_of(late) == "session_forbidden"
        await asyncio.wait_for(asyncio.gather(*list(gateway_module._closing)), 5)  # the old meter's stop
        [row] = gw.db.usage()
        assert row["billed_micro_cents"] == 0 and gw.db.balance(1) == OPENING  # refunded
        assert stream.response.stream(ANSWER) == []  # never delivered after its refund
        gw.db.assert_reconciled()
    finally:
        new.addon.done()


async def test_after_a_script_reload_a_legacy_answer_within_the_grace_is_billed(gw: Gw) -> None:
    stream = await open_session(gw)
    flow = await post(gw, "/legacy-one/messages/?session_id=abc")
    await accepted(gw, flow)
    new = Gw(reloaded(gw), gw.tctx, gw.db)
    try:
        assert stream.response.stream(ANSWER) == [ANSWER]  # read by the old meter's watcher
        await asyncio.wait_for(asyncio.gather(*list(gateway_module._closing)), 5)
        [row] = gw.db.usage()
        assert row["billed_micro_cents"] == PRICE and row["status"] == 200
        gw.db.assert_reconciled()
    finally:
        new.addon.done()
