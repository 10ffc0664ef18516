"""Secrets that are neither the bearer key nor a publisher header: what a consumer wraps for the
upstream (`X-Forward-Authorization`), and what /health would tell the public about the backends."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from addon import compat
from mitmproxy import http
from mitmproxy.io import FlowWriter
from tests.refusals import refusal
from addon.model import Listing
from tests.test_gateway_hooks import (  # noqa: F401  (gw and isolated are fixtures)
    ALICE, Gw, assert_no_secret, forwarded, gw, isolated, json_response, make_flow, tool_call, upstream_answers,
    upstream_fails,
)

UPSTREAM_TOKEN = "consumer-own-upstream-token-123"
COOKIE = "upstream-session=cookie-value-456"


def wrapped() -> dict[str, str]:
    return {"X-Forward-Authorization": f"Bearer {UPSTREAM_TOKEN}", "X-Forward-Cookie": COOKIE}


def assert_hidden(flow: Any) -> None:
    state = repr(flow.get_state())
    assert UPSTREAM_TOKEN not in state and "cookie-value-456" not in state


async def test_a_wrapped_credential_goes_upstream_only_on_the_wire(gw: Gw) -> None:
    flow = make_flow(headers=wrapped())
    await gw.addon.request(flow)
    assert forwarded(flow)
    assert_hidden(flow)
    # The bytes mitmproxy sends upstream carry the real values (compat reveals them on the wire).
    real = compat._revealed(flow.request)
    assert real.headers["authorization"] == f"Bearer {UPSTREAM_TOKEN}" and real.headers["cookie"] == COOKIE
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    assert_hidden(flow)
    gw.db.assert_reconciled()


@pytest.mark.parametrize("token,body", [(None, tool_call()), (ALICE, b"{not json")],
                         ids=["refused-unauthenticated", "refused-bad-json"])
async def test_a_refused_request_keeps_no_wrapped_credential(gw: Gw, token: str | None, body: Any) -> None:
    flow = make_flow(token=token, body=body, headers=wrapped())
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code in (400, 401)
    assert_hidden(flow)


async def test_a_flow_that_dies_before_request_keeps_no_wrapped_credential(gw: Gw) -> None:
    flow = make_flow(headers=wrapped())
    gw.addon.requestheaders(flow)
    await upstream_fails(gw, flow, "Client disconnected.")
    assert_hidden(flow)


async def test_health_names_no_backend_address_or_driver_message(gw: Gw) -> None:
    async def failing() -> dict[str, object]:
        raise ConnectionError("cannot reach db.internal.example:3306 as mcpmeter@10.1.2.3")

    gw.addon.store.health = failing  # type: ignore[method-assign]
    flow = make_flow(path="/health", method="GET", token=None)
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    body = json.loads(flow.response.content)
    assert body["store"] == {"ok": False}
    assert "db.internal" not in flow.response.text and "10.1.2.3" not in flow.response.text


def test_a_listing_repr_shows_no_publisher_secret() -> None:
    listing = Listing(id=1, slug="s", status="live", upstream_url="http://h/", upstream_headers={"X-Key": "pub-secret"})
    assert "pub-secret" not in repr(listing)


async def test_a_wrapped_credential_is_hidden_from_the_first_hook_on(gw: Gw) -> None:
    """mitmweb's view takes the flow in `requestheaders` (after the meter's) and sends it to the browser
    at once; admission then waits for the store before forwarding. The wrapped value is not on the flow
    in between, and still reaches the upstream on the wire, every copy of it in order."""
    flow = make_flow(headers=wrapped())
    flow.request.headers.add("x-forward-authorization", "Bearer second-upstream-token-789")
    gw.addon.requestheaders(flow)
    assert_hidden(flow)
    assert "second-upstream-token-789" not in repr(flow.get_state())
    await gw.addon.request(flow)
    assert forwarded(flow)
    assert_hidden(flow)
    real = compat._revealed(flow.request)
    assert real.headers.get_all("authorization") == [f"Bearer {UPSTREAM_TOKEN}", "Bearer second-upstream-token-789"]
    assert real.headers["cookie"] == COOKIE
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    gw.db.assert_reconciled()


LOCATIONS = [
    ("http://127.0.0.1:1/mcp/next?x=1", "/echo-test/next?x=1"),  # the listing's own upstream: its route
    ("/mcp/next", "/echo-test/next"),  # relative to the upstream request, as a client would resolve it
    ("http://127.0.0.1:1/mcp", "/echo-test"),
    ("next", None),  # against the upstream's /mcp: /next, outside (and /next on the gateway is another listing)
    ("/freebies", None),  # on the gateway, another listing: an SDK follows it with the key and pays there
    ("http://gw.example:3010/strict", None),
    ("http://127.0.0.1:1/admin", None),  # the upstream's address outside the listing
    ("http://user:pw@127.0.0.1:1/mcp/next", None),  # with credentials
    ("https://elsewhere.example/", None),
]


@pytest.mark.parametrize("location,shown", LOCATIONS)
async def test_a_redirect_stays_within_its_listing(gw: Gw, location: str, shown: str | None) -> None:
    """A Location the upstream sends names the upstream (its address, maybe credentials), or a route
    of the gateway: the MCP SDKs follow a 307 within the origin they called, with the same key and
    body, so `/freebies` would run and be billed on another listing. Only a Location the gateway
    forwards back to the same listing reaches the client, as that route."""
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, http.Response.make(307, b"", {"Location": location}))
    assert flow.response is not None and flow.response.status_code == 307
    assert flow.response.headers.get_all("location") == ([shown] if shown else [])
    assert "127.0.0.1:1" not in repr(flow.response.headers) and "pw@" not in repr(flow.response.headers)
    gw.db.assert_reconciled()


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_an_upstream_echoing_a_publisher_header_value_does_not_hand_it_over(gw: Gw, sse: bool) -> None:
    """The listing's upstream_headers carry the publisher's secret (`pub-secret`); an upstream (a debugging
    proxy, a framework's error page) that repeats it in an answer header would give it to the consumer
    and to saved flows. Those fields are dropped; the others pass."""
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    echoes = {"X-Echo-Publisher-Key": "pub-secret", "X-Request-Headers": "x-publisher-key=pub-secret; accept=*/*",
              "X-Kept": "fine"}
    if sse:
        answer = http.Response.make(200, b"", {"Content-Type": "text/event-stream", **echoes})
        flow.response = answer
        await gw.addon.responseheaders(flow)
    else:
        answer = json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, headers=echoes)
        await upstream_answers(gw, flow, answer)
    assert flow.response is not None and flow.response.headers["X-Kept"] == "fine"
    assert "x-echo-publisher-key" not in flow.response.headers and "x-request-headers" not in flow.response.headers
    assert "pub-secret" not in repr(flow.get_state())


URL_KEY = "mcpm_live_urlKey0123456789"


@pytest.mark.parametrize("path,token", [
    (f"/echo-test?key={URL_KEY}", ALICE),
    (f"/echo-test/sub?cursor=1&api_key={URL_KEY.replace('_', '%5F')}", ALICE),  # percent-encoded
    (f"/echo-test?access_token=%6D{URL_KEY[1:]}", None),  # no Authorization: 400, not 401
    (f"/no-such-listing?token=x+{URL_KEY}", ALICE),  # nothing looked up: 400, not 404
], ids=["raw", "encoded", "unauthenticated", "unknown-listing"])
async def test_a_gateway_key_in_the_query_is_refused_and_kept_nowhere(
        gw: Gw, caplog: pytest.LogCaptureFixture, path: str, token: str | None) -> None:
    """A consumer that puts its key in the URL would have it forwarded to the upstream and kept in the
    flow's path (saved flows, mitmweb, logs): refused before anything is looked up, the query redacted."""
    flow = make_flow(path, token=token)
    gw.addon.requestheaders(flow)
    assert URL_KEY not in flow.request.path and "mcpm%5Flive" not in flow.request.path  # from the first hook on
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400 and not forwarded(flow)
    assert refusal(flow.response)["error"] == "invalid_request"
    assert "gateway key" in refusal(flow.response)["reason"]
    assert flow.request.path.endswith("?(redacted)")
    assert_no_secret(flow, caplog, URL_KEY, URL_KEY[10:])  # the secret part, however spelt
    assert gw.db.balance() == 1_000_000


@pytest.mark.parametrize("path,headers", [
    (f"/echo-test/{URL_KEY}", {}),  # in the path after the slug: forwarded upstream as it is
    (f"/echo-test/sub/{URL_KEY.replace('_', '%5F')}?cursor=1", {}),  # percent-encoded
    ("/echo-test", {"X-Api-Key": URL_KEY}),  # a header the gateway does not read: forwarded as it is
    ("/echo-test", {"X-Trace": f"k={URL_KEY.replace('_', '%5f')}"}),
    ("/echo-test", {URL_KEY: "1"}),  # a header named with it (a client's headers built the wrong way round)
], ids=["path", "path-encoded", "header", "header-encoded", "header-name"])
async def test_a_gateway_key_in_the_path_or_another_header_is_refused_and_kept_nowhere(
        gw: Gw, caplog: pytest.LogCaptureFixture, path: str, headers: dict[str, str]) -> None:
    """Everything but the credential headers goes upstream: a key anywhere else in the request would
    reach the publisher, who could spend with it, and stay in the flow. Refused, and redacted from the
    first hook on, as a key in the query is."""
    flow = make_flow(path, headers=headers)
    gw.addon.requestheaders(flow)
    assert URL_KEY[10:] not in repr(flow.request.get_state())
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400 and not forwarded(flow)
    assert refusal(flow.response)["error"] == "invalid_request"
    assert "gateway key" in refusal(flow.response)["reason"]
    assert_no_secret(flow, caplog, URL_KEY, URL_KEY[10:])
    assert gw.db.balance() == 1_000_000


async def test_a_wrapped_credential_that_is_a_gateway_key_still_goes_upstream(gw: Gw) -> None:
    """X-Forward-Authorization carries the consumer's own credential for the upstream, which may be
    another gateway (a listing in front of a metered server): its key goes there on purpose."""
    flow = make_flow(headers={"X-Forward-Authorization": f"Bearer {URL_KEY}"})
    gw.addon.requestheaders(flow)
    assert URL_KEY not in repr(flow.request.get_state())
    await gw.addon.request(flow)
    assert forwarded(flow)


def test_the_guards_redactor_takes_a_key_from_the_path_and_headers() -> None:
    """While no meter is loaded the guard refuses everything; its redactor still keeps keys off flows."""
    from addon.guard import CredentialRedactor
    flow = make_flow(f"/echo-test/{URL_KEY}", headers={"X-Api-Key": URL_KEY})
    CredentialRedactor().requestheaders(flow)
    assert URL_KEY[10:] not in repr(flow.request.get_state())


async def test_a_query_that_only_mentions_the_key_prefix_passes(gw: Gw) -> None:
    flow = make_flow("/echo-test?q=mcpm_live_&r=mcpm%2Dlive%2Dx")
    await gw.addon.request(flow)
    assert forwarded(flow) and flow.request.path.endswith("?q=mcpm_live_&r=mcpm%2Dlive%2Dx")


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_an_upstreams_trailers_say_no_gateway_header_and_no_publisher_secret(gw: Gw, sse: bool) -> None:
    """Trailers (HTTP/2, chunked HTTP/1.1) reach the client after the response hook, streamed or not:
    an upstream's X-Mcpmeter-* trailer would contradict the gateway's own headers (a forged
    X-Mcpmeter-Billed: 0), and one repeating the publisher's secret would hand it over."""
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    result = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    answer = (http.Response.make(200, f"data: {result}\n\n".encode(), {"Content-Type": "text/event-stream"})
              if sse else json_response(json.loads(result)))
    answer.trailers = http.Headers([(b"X-Mcpmeter-Billed", b"0"), (b"x-mcpmeter-balance", b"999999999"),
                                    (b"X-Debug-Echo", b"X-Publisher-Key: pub-secret"), (b"Grpc-Status", b"0")])
    await upstream_answers(gw, flow, answer)
    assert flow.response is not None and not flow.response.trailers  # none crosses the gateway
    assert "pub-secret" not in repr(flow.get_state())
    gw.db.assert_reconciled()


@pytest.mark.parametrize("location,shown", LOCATIONS)
async def test_content_location_and_refresh_follow_the_location_rule(gw: Gw, location: str, shown: str | None) -> None:
    """Content-Location and a Refresh's URL name a URL as Location does: kept only as the route back into
    the same listing, else dropped (the upstream's address, its credentials, another listing)."""
    flow = make_flow()
    await gw.addon.request(flow)
    assert forwarded(flow)
    await upstream_answers(gw, flow, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, headers={
        "Content-Location": location, "Refresh": f"0; URL='{location}'"}))
    assert flow.response is not None
    assert flow.response.headers.get_all("content-location") == ([shown] if shown else [])
    assert flow.response.headers.get_all("refresh") == ([f"0; url={shown}"] if shown else [])
    assert "127.0.0.1:1" not in repr(flow.response.headers) and "pw@" not in repr(flow.response.headers)
    gw.db.assert_reconciled()


@pytest.mark.parametrize("refresh,shown", [
    ("5", "5"),  # no URL: reloads the same resource
    ("5;", "5;"),
    ("1, http://127.0.0.1:1/mcp/next", "1; url=/echo-test/next"),
    ("1 url=http://127.0.0.1:1/admin", None),  # the separator may be a space
    ('0;url="http://127.0.0.1:1/mcp/a"', "0; url=/echo-test/a"),
    ("url=http://127.0.0.1:1/mcp", None),  # no delay: not a Refresh a browser reads; dropped all the same
])
async def test_refresh_forms(gw: Gw, refresh: str, shown: str | None) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    answer = json_response({"jsonrpc": "2.0", "id": 1, "result": {}}, headers={"Refresh": refresh})
    await upstream_answers(gw, flow, answer)
    assert flow.response is not None and flow.response.headers.get_all("refresh") == ([shown] if shown else [])


async def test_a_link_naming_the_upstream_or_credentials_is_dropped(gw: Gw) -> None:
    """Link fields that name the upstream's host (any port, any scheme, in a target or a parameter) or a
    URL's credentials go; relative ones and other hosts' pass."""
    links = [
        '<http://127.0.0.1:1/mcp/docs>; rel="help"',
        '<https://127.0.0.1:8443/x>; rel="alternate"',
        '</docs>; rel="help", <//127.0.0.1:1/x>; rel="next"',  # scheme-relative, in a list
        '<https://docs.example/a>; rel="help"; anchor="http://127.0.0.1:1/mcp"',
        '<https://u:pw@docs.example/a>; rel="help"',
        '</docs/tools>; rel="help"',
        '<https://docs.example/mcp>; rel="describedby"',
    ]
    flow = make_flow()
    await gw.addon.request(flow)
    answer = json_response({"jsonrpc": "2.0", "id": 1, "result": {}})
    for link in links:
        answer.headers.add("Link", link)
    await upstream_answers(gw, flow, answer)
    assert flow.response is not None and flow.response.headers.get_all("link") == links[-2:]


def saved_bytes(flow: http.HTTPFlow) -> bytes:
    """The flow as `mitmdump -w` writes it."""
    out = io.BytesIO()
    FlowWriter(out).add(flow)
    return out.getvalue()


def credential_trailers() -> http.Headers:
    return http.Headers([(b"authorization", f"Bearer {URL_KEY}".encode()),
                         (b"x-forward-authorization", f"Bearer {UPSTREAM_TOKEN}".encode()),
                         (b"x-api-key", URL_KEY.encode()), (b"x-checksum", b"abc")])


@pytest.mark.parametrize("token", [None, ALICE], ids=["refused", "forwarded"])
async def test_a_key_in_a_request_trailer_is_kept_nowhere(gw: Gw, caplog: pytest.LogCaptureFixture,
                                                          token: str | None) -> None:
    """An HTTP/2 (or chunked) request's trailer fields reach the flow after `requestheaders`, before
    `request`; they are never forwarded, but a refused flow kept them as sent: a key or a wrapped credential
    there was saved with it. They are redacted as header fields are."""
    flow = make_flow(token=token)
    gw.addon.requestheaders(flow)
    flow.request.trailers = credential_trailers()  # as mitmproxy sets them, once the body has ended
    await gw.addon.request(flow)
    assert forwarded(flow) == (token is not None)
    saved = saved_bytes(flow)
    assert URL_KEY[10:].encode() not in saved and UPSTREAM_TOKEN.encode() not in saved
    assert_no_secret(flow, caplog, URL_KEY, URL_KEY[10:], UPSTREAM_TOKEN)
    if token is None:
        assert flow.request.trailers is not None and flow.request.trailers["x-checksum"] == "abc"


def test_the_guards_redactor_takes_a_key_from_request_trailers() -> None:
    from addon.guard import CredentialRedactor
    flow = make_flow()
    redactor = CredentialRedactor()
    redactor.requestheaders(flow)
    flow.request.trailers = credential_trailers()
    redactor.request(flow)
    assert URL_KEY[10:].encode() not in saved_bytes(flow) and UPSTREAM_TOKEN.encode() not in saved_bytes(flow)


def test_the_guards_redactor_redacts_fields_whose_name_is_not_a_token() -> None:
    """`Cookie : x` while no meter is loaded: a server trimming the name reads a credential there."""
    from addon.guard import CredentialRedactor
    flow = make_flow(headers={"Cookie ": "cookie-secret-0123", "X-Forward-Authorization\t": "wrapped-secret-0123"})
    CredentialRedactor().requestheaders(flow)
    assert b"cookie-secret" not in saved_bytes(flow) and b"wrapped-secret" not in saved_bytes(flow)
    assert flow.request.headers["Cookie "] == "(redacted)"


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_an_upstream_echoing_a_wrapped_credential_does_not_save_it(gw: Gw, sse: bool) -> None:
    """A credential the consumer wraps for the upstream is on the wire only, like a publisher header; an
    upstream (a debugging echo, an error page) that repeats it in an answer header put it in the flow
    mitmweb shows and `-w` saves. Those fields are dropped, as for a publisher's secret."""
    flow = make_flow(headers=wrapped())
    gw.addon.requestheaders(flow)
    await gw.addon.request(flow)
    assert forwarded(flow)
    echoes = {"X-Echo-Authorization": f"Bearer {UPSTREAM_TOKEN}", "X-Echo-Cookie": COOKIE, "X-Kept": "fine"}
    if sse:
        flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream", **echoes})
        await gw.addon.responseheaders(flow)
    else:
        answer = json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, headers=echoes)
        await upstream_answers(gw, flow, answer)
    assert flow.response is not None and flow.response.headers["X-Kept"] == "fine"
    assert "x-echo-authorization" not in flow.response.headers and "x-echo-cookie" not in flow.response.headers
    assert UPSTREAM_TOKEN.encode() not in saved_bytes(flow) and b"cookie-value-456" not in saved_bytes(flow)


async def test_an_upstream_challenge_naming_the_upstream_is_dropped(gw: Gw) -> None:
    """An upstream that wants OAuth of its own (the publisher's header expired, say) answers 401 with a
    WWW-Authenticate whose resource_metadata names its own address: MCP clients fetch that URL, straight
    from the upstream. A challenge naming the upstream's host (any port) or a URL's credentials is dropped,
    as a Link is; others pass. The 401 itself passes, unbilled."""
    challenges = [
        'Bearer resource_metadata="http://127.0.0.1:1/.well-known/oauth-protected-resource"',
        'Bearer error="invalid_token", error_uri="https://127.0.0.1:8443/errors"',
        'Basic realm="x", Bearer resource_metadata="https://u:pw@auth.example/m"',
        'Bearer realm="upstream", error="invalid_token"',
        'Bearer resource_metadata="https://auth.example/.well-known/oauth-protected-resource"',
    ]
    flow = make_flow()
    await gw.addon.request(flow)
    answer = json_response({"error": "unauthorized"}, status=401)
    for challenge in challenges:
        answer.headers.add("WWW-Authenticate", challenge)
    await upstream_answers(gw, flow, answer)
    assert flow.response is not None and flow.response.status_code == 401
    assert flow.response.headers.get_all("www-authenticate") == challenges[-2:]
    gw.db.assert_reconciled()
