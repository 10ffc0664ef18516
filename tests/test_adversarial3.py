"""Adversarial review 3: Idempotency-Key, legacy HTTP+SSE sessions, the gateway's own endpoints, headers.

Same harness as tests/test_confinement_hooks.py (taddons/tflow, the embedded SQLite store).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import http

from tests.test_confinement_hooks import (  # noqa: F401  (isolated: an autouse fixture)
    ALICE, BOB, OPENING, PRICE, Gw, _gw, accepted, error_of, isolated, make_flow, meta, post, settled,
    sse_response, tool_call,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in _gw(tmp_path):
        yield g


# --- legacy SSE: a session routed on its path (no session id parameter) -------------------------------

ANSWER = b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}\n\n'


async def open_path_session(gw: Gw, token: str = ALICE) -> http.HTTPFlow:
    """An upstream whose POST endpoint names the session in its path: /legacy/messages/abc."""
    stream = make_flow("/legacy-one", token=token, method="GET")
    await gw.addon.request(stream)
    stream.response = sse_response()
    await gw.addon.responseheaders(stream)
    out = stream.response.stream(b"event: endpoint\ndata: /legacy/messages/abc\n\n")
    assert out == [b"event: endpoint\ndata: /legacy-one/messages/abc\n\n"]
    await asyncio.sleep(0)  # the session's binding to its key
    return stream


@pytest.mark.parametrize("route", [
    "/legacy-one/messages/abc",
    "/legacy-one/messages/ab%63",  # the same path, one letter percent-encoded: the upstream decodes it
    "/legacy-one/messages/abc?x=1",  # an extra parameter an upstream routing on the path ignores
])
async def test_another_key_cannot_post_into_a_path_routed_session(gw: Gw, route: str) -> None:
    await open_path_session(gw)
    flow = await post(gw, route, token=BOB)
    assert flow.response is not None and flow.response.status_code == 403, flow.request.url
    assert error_of(flow) == "session_forbidden"
    assert gw.db.balance(2) == OPENING


@pytest.mark.parametrize("route", [
    "/legacy-one/messages/ab%63",
    "/legacy-one/messages/abc?x=1",
])
async def test_a_variant_of_a_path_routed_session_is_not_a_free_call(gw: Gw, route: str) -> None:
    """The owner POSTs to another spelling of its own route: the upstream runs the call and answers on
    the session's stream, which the client reads. Either it is refused, or it is billed: never run
    and delivered, then refunded at the timeout."""
    stream = await open_path_session(gw)
    flow = await post(gw, route)
    if flow.response is not None:  # refused before anything ran
        assert gw.db.balance(1) == OPENING
        return
    await accepted(gw, flow)
    assert stream.response.stream(ANSWER) == [ANSWER]  # the client has its result
    await asyncio.sleep(1.3)  # the listing's upstream_timeout_seconds is 1
    await settled(gw)
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == PRICE, "a delivered answer was refunded"


# --- legacy SSE: the official Python SDK server reads its session_id with uuid.UUID(hex=...) --------------

SID = "0123456789abcdef0123456789abcdef"  # as mcp.server.sse announces it: session_id.hex
UUID_SPELLINGS = [
    SID.upper(),  # uppercase hex
    "01234567-89ab-cdef-0123-456789abcdef",  # hyphenated
    "{" + SID + "}",  # braces
    "urn:uuid:" + SID,  # a URN
]


async def open_sdk_session(gw: Gw, token: str = ALICE) -> http.HTTPFlow:
    stream = make_flow("/legacy-one", token=token, method="GET")
    await gw.addon.request(stream)
    stream.response = sse_response()
    await gw.addon.responseheaders(stream)
    out = stream.response.stream(f"event: endpoint\ndata: /legacy/messages/?session_id={SID}\n\n".encode())
    assert out == [f"event: endpoint\ndata: /legacy-one/messages/?session_id={SID}\n\n".encode()]
    await asyncio.sleep(0)
    return stream


def test_the_python_sdk_reads_every_spelling_as_the_same_session() -> None:
    """What makes the spellings below one session for the upstream (mcp.server.sse.handle_post_message)."""
    import uuid
    assert {uuid.UUID(hex=s) for s in [SID, *UUID_SPELLINGS]} == {uuid.UUID(hex=SID)}


@pytest.mark.parametrize("spelling", UUID_SPELLINGS)
async def test_another_key_cannot_post_into_a_python_sdk_session_by_respelling_its_id(gw: Gw, spelling: str) -> None:
    await open_sdk_session(gw)
    flow = await post(gw, f"/legacy-one/messages/?session_id={spelling}", token=BOB)
    assert flow.response is not None and flow.response.status_code == 403, "forwarded into ALICE's session"
    assert error_of(flow) == "session_forbidden"
    assert gw.db.balance(2) == OPENING


@pytest.mark.parametrize("spelling", UUID_SPELLINGS)
async def test_respelling_the_session_id_does_not_make_a_call_free(gw: Gw, spelling: str) -> None:
    """The owner respells its own session id: the Python SDK runs the call in the session and answers on
    its stream; the gateway must either refuse the POST or bill that answer, not refund it at the timeout."""
    stream = await open_sdk_session(gw)
    flow = await post(gw, f"/legacy-one/messages/?session_id={spelling}")
    if flow.response is not None:
        assert gw.db.balance(1) == OPENING
        return
    await accepted(gw, flow)
    assert stream.response.stream(ANSWER) == [ANSWER]  # the client reads its result on the stream
    await asyncio.sleep(1.3)
    await settled(gw)
    [row] = gw.db.usage()
    assert row["billed_micro_cents"] == PRICE, "the result was delivered on the session's stream, then refunded"


async def test_a_post_to_a_session_with_no_stream_open_here_is_refused(gw: Gw) -> None:
    """Its answer would come on a stream this gateway does not watch (another gateway's, without
    affinity): delivered there, refunded here at the timeout. Refused before it is charged."""
    flow = await post(gw, f"/legacy-one/messages/?session_id={SID}")
    assert flow.response is not None and error_of(flow) == "session_forbidden"
    assert gw.db.balance(1) == OPENING and gw.db.journal() == []


async def test_once_the_stream_is_over_its_route_takes_no_more_posts(gw: Gw) -> None:
    stream = await open_sdk_session(gw)
    assert stream.response.stream(b"") == []  # the upstream ends the session's stream
    await gw.addon.response(stream)
    flow = await post(gw, f"/legacy-one/messages/?session_id={SID}")
    assert flow.response is not None and error_of(flow) == "session_forbidden"
    assert gw.addon.legacy.streams == {} and gw.db.balance(1) == OPENING


# --- the request's charset: what the meter prices must be what the upstream runs (I5) --------------------

# A body that is `ping` (unpriced) read as UTF-8, and a `tools/call` of `echo` read as UTF-7, the way
# Express's express.json() (body-parser 2, iconv-lite) reads it under `charset=utf-7`; the TypeScript
# SDK's createMcpExpressApp installs express.json(), and its legacy SSEServerTransport decodes POSTs
# with the charset too (raw-body). Checked with the SDK's pinned node_modules: express answers "echo".
UTF7_SMUGGLED = ("+ACIAfQ-,+ACI-method+ACI-:+ACI-tools/call+ACI-,+ACI-params+ACI-:+AHsAIg-name+ACI-:+ACI-echo"
                 "+ACI-,+ACI-arguments+ACI-:+AHsAfQ-,+ACI-x+ACI-:+ACI-")
UTF7_BODY = ('{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + UTF7_SMUGGLED + '"}}').encode()


def test_the_utf7_body_is_a_ping_to_the_meter_and_a_tool_call_under_utf7() -> None:
    assert json.loads(UTF7_BODY)["method"] == "ping"
    # Python's own UTF-7 codec reads it as iconv-lite does.
    as_utf7 = json.loads(UTF7_BODY.decode("utf-7"), object_pairs_hook=lambda pairs: dict(pairs))  # last key wins, as JS
    assert as_utf7["method"] == "tools/call" and as_utf7["params"]["name"] == "echo"


@pytest.mark.parametrize("content_type", [
    "application/json; charset=utf-7", "application/json;charset=UTF-7", "application/json; Charset=\"utf-7\"",
    "application/json; charset = utf-7", "application/json; charset=utf-16le",
])
async def test_a_body_in_another_charset_is_refused_not_forwarded_unpriced(gw: Gw, content_type: str) -> None:
    flow = make_flow("/echo-test", body=UTF7_BODY, headers={"Content-Type": content_type})
    del flow.request.headers["content-type"]
    flow.request.headers["Content-Type"] = content_type
    await gw.addon.request(flow)
    assert flow.response is not None, f"forwarded as {meta(flow).get('method')!r}, unpriced"
    assert flow.response.status_code == 400
    assert gw.db.balance(1) == OPENING


async def test_two_content_types_are_refused(gw: Gw) -> None:
    flow = make_flow("/echo-test", body=UTF7_BODY)
    flow.request.headers.add("Content-Type", "application/json; charset=utf-7")
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/json; charset=\"UTF-8\"", "application/json;charset=utf8"])
async def test_utf8_bodies_pass(gw: Gw, content_type: str) -> None:
    flow = make_flow("/echo-test", body=tool_call())
    flow.request.headers["Content-Type"] = content_type
    await gw.addon.request(flow)
    assert flow.response is None and gw.db.balance(1) == OPENING - PRICE


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "identity, gzip", "x-custom"])
async def test_a_compressed_request_body_is_refused_not_forwarded(gw: Gw, encoding: str) -> None:
    # The meter prices the bytes it reads; a server that inflates them (body-parser) would run others.
    flow = make_flow("/echo-test", body=tool_call(), headers={"Content-Encoding": encoding})
    await gw.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert error_of(flow) == "invalid_request" and gw.db.balance(1) == OPENING


@pytest.mark.parametrize("encoding", ["identity", "Identity", ""])
async def test_an_identity_request_body_passes(gw: Gw, encoding: str) -> None:
    flow = make_flow("/echo-test", body=tool_call(), headers={"Content-Encoding": encoding})
    await gw.addon.request(flow)
    assert flow.response is None and gw.db.balance(1) == OPENING - PRICE
