"""A flow is freed once its call is over: nothing the meter keeps per flow holds it.

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
