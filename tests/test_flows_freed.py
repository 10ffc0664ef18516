"""A flow is freed once its call is over: nothing the meter keeps per flow holds it; and what it
keeps per call or per session is bounded in size, not only in count.

The meter keeps per-flow state in weak maps keyed by the flow (compat's body limits, the
credentials between requestheaders and request, the task facts). A value that refers back to its
flow keeps the entry, and so the flow with its bodies, alive for ever: measured before the fix,
every call's flow stayed (about 7 KB a call through the bench, 200 MB over 30,000 calls; a large
upstream answer would have stayed whole). Each case runs the hooks mitmproxy runs, then checks with
a weak reference that the flow is gone.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any
from unittest import mock

from addon import commands, compat, pending
from addon.cache.base import MISS
from tests.refusals import refusal
from tests.test_gateway_hooks import (  # noqa: F401  (gw and isolated are fixtures)
    Gw,
    gw,
    isolated,
    json_response,
    make_flow,
    upstream_answers,
    upstream_fails,
)


def gone(ref: weakref.ref[object]) -> bool:
    gc.collect()
    return ref() is None


async def test_a_billed_call_frees_its_flow(gw: Gw) -> None:
    flow = make_flow()
    gw.addon.requestheaders(flow)  # registers the body limit (compat) and the credential
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)
    gw.db.assert_reconciled()


async def test_a_refunded_call_frees_its_flow(gw: Gw) -> None:
    flow = make_flow()
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "connection refused")
    await gw.addon.drain()
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)
    gw.db.assert_reconciled()


async def test_a_refused_request_frees_its_flow(gw: Gw) -> None:
    flow = make_flow(token="mcpm_live_not-a-key")
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 401
    ref = weakref.ref(flow)
    del flow
    assert gone(ref)


async def test_an_internal_error_after_admission_leaves_nothing_tracked(gw: Gw, monkeypatch: Any) -> None:
    """A call in a session is tracked for its answers; an internal error after admission (500,
    refunded) used to leave it tracked, its flow with it, for ever. (Whether the flow itself is
    freed is not checked here: pytest keeps the logged traceback, whose frames refer to it.)"""
    def broken(*_: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(compat, "close_idle_upstream", broken)
    flow = make_flow(headers={"Mcp-Session-Id": "session-1"})
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    await gw.addon.drain()
    assert flow.response is not None and flow.response.status_code == 500
    assert not any(gw.addon.pending.tracked.values()) and flow.id not in gw.addon.calls
    gw.db.assert_reconciled()


async def test_a_session_id_or_slug_too_long_to_keep_is_refused_unkept(gw: Gw) -> None:
    """What the meter keeps per call or per session is bounded by size, not only by count: an
    Mcp-Session-Id over 512 characters is refused (400) before anything is charged, and a slug over
    255 characters (no listing has one) is not looked up, nor remembered as unknown."""
    flow = make_flow(headers={"Mcp-Session-Id": "s" * 513})
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert refusal(flow.response.content)["error"] == "invalid_request"
    flow = make_flow(headers={"Mcp-Session-Id": "s" * 512})
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    assert flow.response.status_code == 200
    slug = "x" * 256
    flow = make_flow(path=f"/{slug}")
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 404
    assert refusal(flow.response.content)["error"] == "no_such_mcp"
    assert gw.addon.cache is not None and await gw.addon.cache.get_listing(slug) is MISS
    gw.db.assert_reconciled()


async def test_the_call_history_keeps_a_tool_name_bounded(gw: Gw) -> None:
    flow = make_flow(body={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": "t" * 2_000, "arguments": {}}})
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "connection refused")  # refunded: in the history, as billed calls are
    await gw.addon.drain()
    recent = list(gw.addon.results.recent.values())
    assert [len(r.tool) for r in recent] == [commands.TOOL_CHARS]


def test_refund_markers_expire_as_new_ones_come() -> None:
    """Markers of refunded answers (not delivered if they come later) live marker_seconds; an
    expired one used to stay until max_markers newer ones pushed it out."""
    markers = pending.Pending(max_markers=1000, marker_seconds=60)
    clock = [1000.0]
    with mock.patch.object(pending.time, "monotonic", lambda: clock[0]):
        for i in range(500):
            markers.mark_refunded(("l", "s"), i)
        clock[0] += 61
        markers.mark_refunded(("l", "s"), "new")
        assert list(markers.refunded) == [(("l", "s"), pending.id_key("new"))]
        assert markers.is_refunded(("l", "s"), "new") and not markers.is_refunded(("l", "s"), 3)
