"""addon/guard.py: every flow that no working meter claimed is refused 503, never forwarded."""

from __future__ import annotations

import json
import uuid

from mitmproxy import http
from mitmproxy.addons import script, view
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import taddons, tflow

from addon import guard


def live_flow() -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.live = True
    return flow


def test_unclaimed_flow_is_refused_with_gateway_json() -> None:
    flow = live_flow()
    guard.FailClosedGuard().request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    body = json.loads(flow.response.content)
    assert body["error"] == "meter_unavailable" and uuid.UUID(body["request_id"]).version == 4
    assert flow.response.headers["X-Mcpmeter-Request-Id"] == body["request_id"]
    assert flow.response.headers["Content-Type"] == "application/json"


def test_claimed_flow_passes_once() -> None:
    flow = live_flow()
    guard.claim(flow)
    guard.FailClosedGuard().request(flow)
    assert flow.response is None
    assert flow not in guard._claimed


def test_answered_or_dead_flows_are_left_alone() -> None:
    answered = live_flow()
    answered.response = http.Response.make(401)
    dead = live_flow()
    dead.live = False
    for flow in (answered, dead):
        guard.FailClosedGuard().request(flow)
    assert answered.response.status_code == 401 and dead.response is None


def test_install_adds_one_guard_at_the_end_of_the_chain() -> None:
    with taddons.context() as tctx:
        guard.install(tctx.master)
        guard.install(tctx.master)  # a script reload runs it again
        chain = tctx.master.addons.chain
        assert [type(a) for a in chain].count(guard.FailClosedGuard) == 1
        assert isinstance(chain[-1], guard.FailClosedGuard)
    guard.install(None)  # imported outside mitmproxy: nothing to guard


def test_redactor_redacts_credentials_and_keeps_the_meters_redaction() -> None:
    flow = live_flow()
    flow.request.headers["Authorization"] = "Bearer mcpm_live_secret0123456789"
    flow.request.headers["Cookie"] = "s=secret"
    guard.CredentialRedactor().requestheaders(flow)
    assert "secret" not in repr(flow.request.headers)
    already = live_flow()
    already.request.headers["Authorization"] = "Bearer mcpm_live_se… (redacted)"  # what the meter shows
    guard.CredentialRedactor().requestheaders(already)
    assert already.request.headers["Authorization"] == "Bearer mcpm_live_se… (redacted)"


def test_a_flow_the_guard_refuses_keeps_no_wrapped_credential() -> None:
    """Without a meter the guard refuses the flow, which is saved (-w) as it is: the consumer's
    credential wrapped for the upstream is redacted like its own key."""
    flow = live_flow()
    flow.request.headers["X-Forward-Authorization"] = "Bearer upstream-secret-1"
    flow.request.headers.add("x-forward-cookie", "s=upstream-secret-2")
    guard.CredentialRedactor().requestheaders(flow)
    guard.FailClosedGuard().request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert "upstream-secret" not in repr(flow.get_state())


def test_a_flow_the_guard_refuses_keeps_no_key_from_its_query() -> None:
    flow = live_flow()
    flow.request.path = "/echo-test?x=1&key=mcpm_live_querysecret0123"
    guard.CredentialRedactor().requestheaders(flow)
    guard.FailClosedGuard().request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert flow.request.path == "/echo-test?(redacted)" and "querysecret" not in repr(flow.get_state())


async def test_without_a_meter_mitmweb_never_sees_a_key() -> None:
    """mitmweb's view takes a flow in `requestheaders` and sends it to the browser at once; it comes
    after the script loader (the meter's place) and before the guard, last in the chain. With no meter
    loaded, the credentials are redacted right after the script loader all the same."""
    shown: list[str | None] = []

    def on_add(flow: http.HTTPFlow) -> None:
        shown.append(flow.request.headers.get("authorization"))
        shown.append(flow.request.headers.get("x-forward-authorization"))

    v = view.View()
    v.sig_view_add.connect(on_add)
    with taddons.context(script.ScriptLoader(), v) as tctx:
        guard.install(tctx.master)
        guard.install(tctx.master)  # a script reload runs it again
        flow = live_flow()
        flow.request.headers["Authorization"] = "Bearer mcpm_live_secret0123456789"
        flow.request.headers["X-Forward-Authorization"] = "Bearer upstream-secret"
        await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(flow))
    assert shown == ["(redacted)", "(redacted)"]


def test_answers_to_head_lose_their_body_but_keep_their_length() -> None:
    flow = live_flow()
    flow.request.method = "HEAD"
    flow.response = http.Response.make(400, b'{"error": "invalid_request"}', {"Content-Type": "application/json"})
    guard.FailClosedGuard().response(flow)
    assert flow.response.raw_content == b"" and flow.response.headers["Content-Length"] == "28"
    get = live_flow()
    get.response = http.Response.make(400, b"{}")
    guard.FailClosedGuard().response(get)
    assert get.response.raw_content == b"{}"
