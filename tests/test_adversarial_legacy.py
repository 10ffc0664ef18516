"""Adversarial review: the legacy HTTP+SSE transport (2024-11-05) and shadow mode, through the hooks.

Same harness as tests/test_confinement_hooks.py (taddons/tflow, the embedded SQLite store).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from addon import compat
from tests.test_blanking_hooks import proxied
from tests.test_confinement_hooks import (  # noqa: F401  (isolated: an autouse fixture)
    BLANKED, OPENING, PRICE, Gw, _gw, accepted, error_of, isolated, make_flow, open_session, post, settled,
    sse_response,
)
from tests.test_gateway_hooks import rpc, upstream_fails
from tests.test_pending_hooks import usage_reasons

pytestmark = pytest.mark.timeout(30)

ANSWER = b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}\n\n'


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path):
        yield g


# --- a POST answered with an event stream (a server that also serves streamable HTTP beside /sse) -----

@pytest.mark.parametrize("route", [
    "/legacy-one/mcp?sessionId=abc",  # the owner's own session id, on the streamable endpoint beside /sse
    "/legacy-one/messages/?session_id=abc",  # the session's own route
    "/legacy-one",  # the listing URL itself: no session to own
])
async def test_a_priced_post_answered_with_an_event_stream_is_refused_not_delivered_free(gw: Gw, route: str) -> None:
    """A server serving streamable HTTP beside its legacy endpoints (the TypeScript SDK's backwards-compatible
    server: /sse, /messages and /mcp on one app) answers a POST on its own event stream. It passed the endpoint
    rewriter as events before an endpoint, settling nothing: delivered, then refunded as unanswered. Now
    nothing of it is sent: 502, refunded, the upstream closed."""
    await open_session(gw)
    flow = await post(gw, route)
    assert flow.response is None and gw.db.balance(1) == OPENING - PRICE
    handler = proxied(gw, flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    assert handler.closed == [flow.server_conn] and flow.error is not None
    assert not callable(flow.response.stream)  # nothing of it goes out
    await upstream_fails(gw, flow, "Connection killed.")
    answer, _ = compat._pending[flow.client_conn.id].split(b"\r\n\r\n", 1)
    assert b" 502 " in answer.split(b"\r\n")[0]
    compat.forget(flow)
    await gw.addon.drain()
    await settled(gw)
    assert usage_reasons(gw) == [(502, 1, "upstream_failed")] and gw.db.balance(1) == OPENING
    assert gw.addon.legacy.awaiting == {}
    gw.db.assert_reconciled()


async def test_an_unpriced_post_answered_with_an_event_stream_still_passes(gw: Gw) -> None:
    """Only a priced call's stream is refused: an initialize or a tools/list there costs nothing."""
    await open_session(gw)
    listed = b'event: message\ndata: {"jsonrpc": "2.0", "id": 5, "result": {"tools": []}}\n\n'
    flow = make_flow("/legacy-one/mcp?sessionId=abc", body=rpc("tools/list", 5))
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    assert flow.error is None and flow.response.stream(listed) == [listed]


# --- a session id a server reads under another spelling of its parameter's name ------------------------

@pytest.mark.parametrize("other", [
    "SessionId=abc",  # ASP.NET Core (the C# SDK's SseHandler reads `sessionId`) looks names up ignoring case
    "sessionid=abc", "SESSION_ID=abc",
    "sessionId[]=abc",  # Express's qs, PHP, Rack: an array; transports[['abc']] is transports['abc'] in JS
    "sessionId%5B0%5D=abc",
    "session.id=abc", "session+id=abc",  # PHP reads both as `session_id`
])
async def test_a_second_session_id_under_another_name_is_refused(gw: Gw, other: str) -> None:
    """The owner of two sessions names one to the meter and the other to the upstream: its call would run
    in session abc, answered on abc's stream, where nothing awaits it (delivered), while the meter awaits
    it in xyz and refunds it at the timeout. Another key could post into a session it does not own."""
    await open_session(gw, "abc")
    await open_session(gw, "xyz")
    flow = await post(gw, f"/legacy-one/messages/?session_id=xyz&{other}")
    assert flow.response is not None and flow.response.status_code == 400, "forwarded"
    assert error_of(flow) == "invalid_request"
    assert gw.db.balance(1) == OPENING and gw.db.journal() == []


@pytest.mark.parametrize("other", ["x=1", "sessions=2", "session=3", "id=4", "session_idx=5"])
async def test_other_parameters_beside_the_session_id_still_pass(gw: Gw, other: str) -> None:
    await open_session(gw, "xyz")
    flow = await post(gw, f"/legacy-one/messages/?session_id=xyz&{other}")
    assert flow.response is None and gw.db.balance(1) == OPENING - PRICE


# --- shadow mode on a legacy listing ----------------------------------------------------------------------

@pytest.fixture
async def gw_shadow(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path, shadow_listings=["legacy-one"]):
        yield g


async def test_a_shadow_legacy_session_moves_no_money_and_records_what_it_would_have(gw_shadow: Gw) -> None:
    """Answered, refunded at its timeout, failed by the stream's end: recorded at 0, no ledger row, reconciled."""
    gw = gw_shadow
    ledger = gw.db.ledger(1)
    stream = await open_session(gw)
    calls = [await post(gw, "/legacy-one/messages/?session_id=abc", rpc_id=i) for i in (1, 2, 3)]
    for flow in calls:
        assert flow.response is None
        await accepted(gw, flow)
    assert stream.response.stream(ANSWER) == [ANSWER]  # call 1 answered
    await asyncio.sleep(1.3)  # call 2 and 3 past the listing's timeout
    await settled(gw)
    late = ANSWER.replace(b'"id": 1', b'"id": 2')
    assert stream.response.stream(late) == [BLANKED]  # a refunded call's answer is withheld in shadow mode too
    stream.response.stream(b"")
    await gw.addon.drain()
    await settled(gw)
    assert gw.db.balance(1) == OPENING and gw.db.ledger(1) == ledger
    assert [r["billed_micro_cents"] for r in gw.db.usage()] == [0, 0, 0]
    assert sorted(why for *_, why in usage_reasons(gw)) == ["shadow:debited", "shadow:refunded", "shadow:refunded"]
    gw.db.assert_reconciled()
