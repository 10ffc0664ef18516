"""Issue 7, attacked: hostile clients and a hostile upstream against a real mitmdump, on both backends.

One group per class of the issue (1 confinement ... 8 fail closed), each with concrete inputs sent
byte for byte (`RawClient`) to a gateway in front of `tests.hostile_upstream`. Every test checks,
besides its own assertions, the two invariants of the suite: nothing reached a host or a path
outside its listing (the canary saw nothing; every path the upstream got stays under the listing's
base path without dot segments), and every tool the upstream ran has its debit (a billed usage
row for that tool). The conftest reconciles the ledger after each test.

Cases this suite found that are not fixed yet are strict xfails (`found_by_fuzz`): a fix makes them
pass, and strict turns that into a failure until the marker is removed.
"""

from __future__ import annotations

import itertools
import re
import json
import os
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.backends import Backend, TestConsumer
from tests.gateway_proc import MITMDUMP, ROOT, Gateway, closed_port, free_port, write_config
from tests.hostile_upstream import (Canary, HostileUpstream, RawClient, RawResponse, cpu_seconds, has_dot_segment,
                                   rss_bytes)

# --- cases found by this suite and not yet fixed: strict xfails, so a fix shows up ----------------


def found_by_fuzz(what: str) -> pytest.MarkDecorator:
    """A bug outside the agreed rules, found by this suite."""
    return pytest.mark.xfail(strict=True, reason=f"issue 7: found by fuzz: {what}")


# --- fixtures --------------------------------------------------------------------------------

_n = itertools.count(1)
MAX_BODY = 1_000_000  # the module's gateway runs with a 1 MB body limit: bombs are 20-200x that
ALLOWED_ORIGIN = "https://app.example"
CREDIT = 10_000_000
PRICES = {"cheap": 1, "pricey": 100_000}


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    server = Canary().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"max_body_bytes": MAX_BODY}


@pytest.fixture(scope="module")
def gateway(backend: Backend, gateway_settings: dict[str, object],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The conftest's gateway plus MCPMETER_ALLOWED_ORIGINS (an env var: unknown ones are ignored today)."""
    gw = launch({**backend.config(), **gateway_settings}, tmp_path_factory.mktemp("gateway"),
                {**backend.env(), "MCPMETER_ALLOWED_ORIGINS": ALLOWED_ORIGIN})
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[RawClient]:
    c = RawClient(gateway.url)
    yield c
    c.close()


def launch(config: dict[str, Any], workdir: Path, env: dict[str, str], extra: list[str] = (),
           script: Path | None = None, reverse: str | None = None) -> Gateway:
    """tests.gateway_proc.start_gateway with extra mitmdump arguments, a script and a reverse target."""
    config_path = write_config(workdir / "gateway.yaml", config)
    port = free_port()
    log_path = workdir / "gateway.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "MCPMETER_"))}
    full_env.update(env)
    proc = subprocess.Popen(
        [str(MITMDUMP), "-s", str(script or ROOT / "mcpmeter_addon.py"),
         "--mode", f"reverse:{reverse or f'http://127.0.0.1:{closed_port()}'}",
         "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", f"mcpmeter_config={config_path}", "--set", "termlog_verbosity=info", *extra],
        cwd=workdir, env=full_env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, text=True)
    gw = Gateway(f"http://127.0.0.1:{port}", proc, log_path, config_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
        try:
            c = RawClient(gw.url, timeout=2)
            if c.request("GET", "/health").status in (200, 503):
                c.close()
                return gw
        except OSError:
            pass
        time.sleep(0.1)
    gw.stop()
    raise RuntimeError(f"gateway did not start:\n{gw.log()}")


# --- listings on the hostile upstream, and the two invariants -----------------------------------


@dataclass
class Listing:
    slug: str
    mcp_id: int
    url: str  # the upstream URL the publisher registered
    base: str  # every path the upstream gets must start with this
    secret: str  # a publisher header value that must never leak
    consumer: TestConsumer

    @property
    def path(self) -> str:
        return f"/{self.slug}"

    def auth(self, **extra: str) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.consumer.key}"), ("Content-Type", "application/json"),
                ("Accept", "application/json, text/event-stream"), *extra.items()]


def make_listing(backend: Backend, hostile: HostileUpstream, transport: str = "streamable",
                 credit: int = CREDIT, **kwargs: Any) -> Listing:
    slug = f"adv-{next(_n)}-{uuid.uuid4().hex[:6]}"
    secret = f"pubsecret-{uuid.uuid4().hex}"
    if transport == "sse":
        url, base = f"{hostile.url}/L-{slug}/sse", f"/L-{slug}/"
    else:
        url = base = f"{hostile.url}/L-{slug}/mcp"
        base = f"/L-{slug}/mcp"
    kwargs.setdefault("price", 1000)
    kwargs.setdefault("tool_prices", PRICES)
    mcp_id = backend.add_listing(slug, url, transport=transport,
                                 headers={"X-Listing": slug, "X-Publisher-Secret": secret}, **kwargs)
    return Listing(slug, mcp_id, url, base, secret, backend.add_consumer(credit=credit))


def confined(listing: Listing, hostile: HostileUpstream, canary: Canary) -> list[str]:
    """What reached a place outside the listing (empty when confined)."""
    bad = [f"canary got {s.method} {s.target!r}" for s in canary.records()]
    for s in hostile.records(listing.slug):
        lower = s.path.lower()
        if (not s.path.startswith(listing.base) or has_dot_segment(s.path) or not s.route.startswith(listing.base)
                or "%2f" in lower or "%5c" in lower or "\\" in s.path):
            bad.append(f"upstream got {s.method} {s.target!r} (served route {s.route!r})")
    return bad


def unpaid(backend: Backend, listing: Listing, hostile: HostileUpstream) -> Counter[str]:
    """Tools the upstream ran beyond the billed usage rows of that tool (empty when every run is paid)."""
    ran = Counter(s.ran for s in hostile.ran(listing.slug))
    rows = backend.query("SELECT tool_name, billed_micro_cents FROM usage_events WHERE mcp_id = %s",
                         (listing.mcp_id,))
    billed = Counter(str(name) for name, amount in rows if int(amount) > 0)
    return ran - billed


def check(backend: Backend, listing: Listing, hostile: HostileUpstream, canary: Canary,
          settle_wait: float = 6.0) -> None:
    """The suite's invariants: confined, and no tool run upstream without its debit."""
    assert confined(listing, hostile, canary) == []
    deadline = time.monotonic() + settle_wait
    while (missing := unpaid(backend, listing, hostile)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not missing, f"ran upstream without a debit: {dict(missing)}"


@pytest.fixture(autouse=True)
def _canary_starts_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test judges only its own canary hits."""
    if "canary" in request.fixturenames:
        c: Canary = request.getfixturevalue("canary")
        with c.lock:
            c.seen.clear()
    yield


def rpc(method: str = "tools/call", name: str | None = "cheap", rpc_id: Any = 1, **args: Any) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
    if name is not None:
        body["params"] = {"name": name, "arguments": args}
    return json.dumps(body).encode()


def assert_gateway_error(r: RawResponse, status: int, code: str) -> dict[str, Any]:
    assert (r.status, r.error) == (status, code), (r.status, r.body[:300])
    body = r.refusal()
    assert body["request_id"] and r.header("X-Mcpmeter-Request-Id") == body["request_id"]
    return body


# === 1. confinement ===========================================================================

REFUSED_SUBPATHS = [
    "..", "../admin", "./mcp", "a/../../admin", "a/./b", "%2e%2e/admin", "%2E%2E/admin", ".%2E/admin",
    "%2e./admin", "%2e/admin", "..%2fadmin", "..%2Fadmin", "%2fadmin", "a%2F..%2F..%2Fadmin", "..%5cadmin",
    "a%5Cb", "a\\b", "..\\admin", "/admin", "a//b", "a/", "%00", "a%00b", "%zz", "%4", "a%", "%g0x",
    "http://127.0.0.1:{canary}/x", "//127.0.0.1:{canary}/x", "/127.0.0.1:{canary}/x", "http:%2f%2f127.0.0.1:{canary}/x",
    "a\x01b", "a\x7fb", "a\xffb",
]
# "a/" is an empty segment at the end only if the rule counts it; it is listed under allowed below instead.
REFUSED_SUBPATHS.remove("a/")
FORWARDED_SUBPATHS = ["tools", "a%20b", "a.b/c..d/...", "~user;v=1", "x%2Ey", "caf%C3%A9", "a-b_c", "a/", "%e2%82",
                      "a;", "a/b;"]  # an empty ';' part: mitmproxy's url setter would drop it


@pytest.mark.parametrize("transport", ["streamable", "sse"])
@pytest.mark.parametrize("subpath", REFUSED_SUBPATHS)
def test_hostile_subpaths_are_refused_400_invalid_path(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient,
        transport: str, subpath: str) -> None:
    listing = make_listing(backend, hostile, transport)
    target = f"{listing.path}/{subpath.format(canary=canary.port)}"
    r = client.request("POST", target, listing.auth(), rpc(name="pricey"))
    assert_gateway_error(r, 400, "invalid_path")
    assert hostile.records(listing.slug) == [], "a refused path was forwarded"
    check(backend, listing, hostile, canary)
    assert backend.balance(listing.consumer.user_id) == CREDIT


@pytest.mark.parametrize("subpath", FORWARDED_SUBPATHS)
def test_ordinary_subpaths_are_forwarded_exactly_as_sent(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, subpath: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", f"{listing.path}/{subpath}?q=%2e%2e&x=1", listing.auth(), rpc())
    assert r.status == 200, r.body[:300]
    [seen] = hostile.records(listing.slug)
    assert seen.target == f"{listing.base}/{subpath}?q=%2e%2e&x=1"
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("subpath", [".;", "a/.;", "..;", "a/..;"])
def test_semicolon_dot_segments_are_refused_or_forwarded_unchanged(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, subpath: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", f"{listing.path}/{subpath}", listing.auth(), rpc())
    assert r.status in (200, 400)
    assert [s.target for s in hostile.records(listing.slug)] in ([], [f"{listing.base}/{subpath}"])


@pytest.mark.parametrize("query", ["a=\x01", "a=\x7f", "a=\x00", "a=\x1b[31m"])
def test_raw_control_characters_in_the_query_are_refused(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, query: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", f"{listing.path}?{query}", listing.auth(), rpc())
    assert_gateway_error(r, 400, "invalid_path")
    assert hostile.records(listing.slug) == []


def test_malformed_request_line_gets_the_gateways_own_json(backend: Backend, hostile: HostileUpstream,
                                                           client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", f"{listing.path}?token=s3cr3t b", listing.auth(), rpc())
    assert r.status == 400 and hostile.records(listing.slug) == []
    assert b"s3cr3t" not in r.body
    assert r.refusal()["request_id"]


def test_sse_listing_cannot_be_pointed_at_another_host(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """The issue's example: urljoin on client data connects anywhere and sends the publisher's headers."""
    listing = make_listing(backend, hostile, "sse")
    for target in (f"{listing.path}/http://127.0.0.1:{canary.port}/x", f"{listing.path}///127.0.0.1:{canary.port}/x"):
        r = client.request("GET", target, listing.auth())
        assert r.status == 400, (target, r.status)
    leaked = [s for s in canary.records() if s.header("x-publisher-secret")]
    assert leaked == [], "the publisher's secret header went to a foreign host"
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("announced", [
    "messages/..%2f..%2fadmin?session_id={sid}", "messages/%2e%2e/%2e%2e/admin?session_id={sid}",
    "messages/a%5c..%5c..%5cadmin?session_id={sid}",
])
def test_announced_legacy_endpoint_obeys_the_same_rule(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, announced: str) -> None:
    """The route the gateway rewrites from the upstream's `endpoint` event is confined like a client's path."""
    listing = make_listing(backend, hostile, "sse")
    with LegacyStream(client.addr, listing, endpoint=announced, hold=2, require_endpoint=False) as stream:
        route = stream.route
        if route:  # rewritten: then it must be a route the gateway would accept
            assert route.startswith(f"{listing.path}/"), route
            path = route.partition("?")[0]
            assert not has_dot_segment(path) and "%2f" not in path.lower() and "%5c" not in path.lower(), route
            assert "//" not in path, route
            client.request("POST", route, listing.auth(), rpc(name="pricey"))
            stream.read_more(0.5)
        else:  # refused: the stream is dropped (fail closed), nothing of the endpoint reaches the client
            assert b"admin" not in stream.data and b"event: endpoint" not in stream.data, stream.data
    check(backend, listing, hostile, canary)


# === 2. the gateway and the upstream read the same call ========================================

DUPLICATE_BODIES = {
    "method twice": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list","params":{"name":"pricey"}}',
    "name twice": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pricey","name":"cheap"}}',
    "params twice": b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
                    b'"params":{"name":"pricey"},"params":{"name":"cheap"}}',
    "id twice": b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call","params":{"name":"cheap"}}',
    "deep duplicate": b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
                      b'"params":{"name":"cheap","arguments":{"a":{"b":1,"b":2}}}}',
    "escaped twin": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pricey","n\\u0061me":"cheap"}}',
}


@pytest.mark.parametrize("case", list(DUPLICATE_BODIES))
def test_duplicate_keys_are_refused(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                    client: RawClient, case: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, listing.auth(), DUPLICATE_BODIES[case])
    body = assert_gateway_error(r, 400, "invalid_json")
    assert "duplicate" in json.dumps(body).lower()
    assert hostile.records(listing.slug) == []
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("raw_id, code", [
    (b"NaN", "invalid_json"), (b"Infinity", "invalid_json"), (b"-Infinity", "invalid_json"),
    (str(2**53).encode(), "invalid_request"), (str(2**53 + 1).encode(), "invalid_request"),
    (str(-(2**53)).encode(), "invalid_request"), (str(10**30).encode(), "invalid_request"),
    (b"1.0", "invalid_request"), (b"1e3", "invalid_request"), (b"-0.0", "invalid_request"), (b"1.5", "invalid_request"),
    (b'"' + b"i" * 201 + b'"', "invalid_request"),
])
def test_ids_other_languages_cannot_round_trip_are_refused(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, raw_id: bytes,
        code: str) -> None:
    listing = make_listing(backend, hostile)
    body = b'{"jsonrpc":"2.0","id":' + raw_id + b',"method":"tools/call","params":{"name":"pricey"}}'
    r = client.request("POST", listing.path, listing.auth(), body)
    assert_gateway_error(r, 400, code)
    assert hostile.records(listing.slug) == []
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("raw_id", [str(2**53 - 1).encode(), str(-(2**53 - 1)).encode(), b"0",
                                    b'"' + b"i" * 200 + b'"', b'""'])
def test_ids_at_the_limits_are_billed_and_answered(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, raw_id: bytes) -> None:
    listing = make_listing(backend, hostile)
    body = b'{"jsonrpc":"2.0","id":' + raw_id + b',"method":"tools/call","params":{"name":"pricey"}}'
    r = client.request("POST", listing.path, listing.auth(), body)
    assert r.status == 200 and r.header("X-Mcpmeter-Billed") == "100000"
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("body, code", [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pricey","arguments":{"a":'
     + b"[" * 200 + b"]" * 200 + b"}}}", "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pri\\ud800cey"}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pricey","arguments":{"s":"\\udfff"}}}',
     "invalid_json"),
])
def test_unreadable_bodies_are_refused(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                       client: RawClient, body: bytes, code: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, listing.auth(), body)
    assert_gateway_error(r, 400, code)
    assert hostile.records(listing.slug) == []
    check(backend, listing, hostile, canary)


def test_invalid_utf8_is_refused(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                 client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pri\xffcey"}}'
    r = client.request("POST", listing.path, listing.auth(), body)
    assert_gateway_error(r, 400, "invalid_json")
    assert hostile.records(listing.slug) == []


def test_moderately_nested_arguments_still_pass(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                                client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    body = (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pricey","arguments":{"a":'
            + b"[" * 20 + b"]" * 20 + b"}}}")
    r = client.request("POST", listing.path, listing.auth(), body)
    assert r.status == 200 and r.header("X-Mcpmeter-Billed") == "100000"
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "TRACE", "PROPFIND", "FOO"])
def test_other_methods_are_405_and_never_forwarded(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                                    client: RawClient, method: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request(method, listing.path, listing.auth(), rpc(name="pricey"))
    assert_gateway_error(r, 405, "method_not_allowed")
    assert r.header("Allow") == "GET, POST, DELETE, HEAD, OPTIONS"
    assert hostile.records(listing.slug) == []
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
def test_bodies_on_bodiless_methods_are_refused(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                                client: RawClient, method: str) -> None:
    """The hostile upstream runs a tools/call whatever the method: unpriced it would run for free."""
    listing = make_listing(backend, hostile)
    r = client.request(method, listing.path, listing.auth(), rpc(name="pricey"))
    assert_gateway_error(r, 400, "invalid_request")
    assert hostile.records(listing.slug) == []
    check(backend, listing, hostile, canary)


def test_a_head_refusal_has_no_body_and_keeps_the_connection_in_step(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """mitmproxy sends an addon's answer body even to HEAD: a keep-alive client then reads it as the next answer."""
    listing = make_listing(backend, hostile)
    r = client.request("HEAD", listing.path, listing.auth(), rpc(name="pricey"))
    assert r.status == 400 and r.header("X-Mcpmeter-Billed") == "0"
    r = client.request("POST", listing.path, listing.auth(), rpc(name="cheap"))  # the same connection
    assert r.status == 200 and r.header("X-Mcpmeter-Billed") == "1"
    assert r.header("X-Mcpmeter-Balance") == str(CREDIT - 1)  # the HEAD was never charged
    assert [s.ran for s in hostile.records(listing.slug)] == ["cheap"]
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS", "HEAD"])
def test_bodiless_methods_without_a_body_pass_through(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                                      client: RawClient, method: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request(method, listing.path, [("Authorization", f"Bearer {listing.consumer.key}")])
    assert r.status < 500 and r.error is None
    assert [s.method for s in hostile.records(listing.slug)] == [method]
    check(backend, listing, hostile, canary)


# === 3. settlement never depends on the answer's size or shape =================================


def test_sse_result_event_over_the_parser_limit_is_billed(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    listing = make_listing(backend, hostile, timeout=120)
    r = client.request("POST", listing.path, listing.auth(), rpc(name="huge_sse", mb=20))
    assert r.status == 200 and len(r.body) > 20 * 1024 * 1024
    check(backend, listing, hostile, canary, settle_wait=20)
    usage = backend.query("SELECT billed_micro_cents FROM usage_events WHERE mcp_id = %s", (listing.mcp_id,))
    assert [int(b) for b, in usage] == [1000]


@pytest.mark.parametrize("mode", ["nested", "nested_sse"])
def test_deeply_nested_result_is_billed_with_meter_headers(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, mode: str) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, listing.auth(), rpc(name=mode, depth=100_000))
    assert r.status == 200 and r.body.count(b"[") >= 100_000
    assert r.header("X-Mcpmeter-Request-Id") and r.header("X-Mcpmeter-Billed") in ("1000", "0")
    check(backend, listing, hostile, canary)
    usage = backend.query("SELECT billed_micro_cents FROM usage_events WHERE mcp_id = %s", (listing.mcp_id,))
    assert [int(b) for b, in usage] == [1000]


def test_broken_answer_framing_is_refunded_not_billed(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    listing = make_listing(backend, hostile, timeout=10)
    for mode in ("short_body", "bad_chunked", "garbage_status"):
        c = RawClient(f"http://{client.addr[0]}:{client.addr[1]}")
        try:
            r = c.request("POST", listing.path, listing.auth(**{"X-Hostile": mode}), rpc(name="cheap", rpc_id=mode))
            assert r.status in (200, 502), (mode, r.status)
        except (ConnectionError, OSError):
            pass  # the answer was cut short: the client got nothing usable
        finally:
            c.close()
    assert confined(listing, hostile, canary) == []
    # Whatever the framing did, a refunded call has a usage row and its refund: the ledger reconciles (conftest).
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and len(backend.query(
            "SELECT id FROM usage_events WHERE mcp_id = %s", (listing.mcp_id,))) < 3:
        time.sleep(0.1)
    assert len(backend.query("SELECT id FROM usage_events WHERE mcp_id = %s", (listing.mcp_id,))) == 3


def test_an_upstream_answer_head_that_never_ends_is_cut_and_refunded(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    # mitmproxy buffers a head until its blank line; the gateway stops at compat.MAX_HEAD_BYTES.
    listing = make_listing(backend, hostile, timeout=30)
    started = time.monotonic()
    r = client.request("POST", listing.path, listing.auth(**{"X-Hostile": "huge_head"}), rpc(name="cheap"))
    assert r.status == 502 and r.header("X-Mcpmeter-Refunded") == "1"
    assert time.monotonic() - started < 5  # cut at the limit, not at the upstream's pause nor the timeout
    assert confined(listing, hostile, canary) == []
    deadline = time.monotonic() + 10  # refunded: the balance comes back (the ledger reconciles: conftest)
    while time.monotonic() < deadline and backend.balance(listing.consumer.user_id) != CREDIT:
        time.sleep(0.1)
    assert backend.balance(listing.consumer.user_id) == CREDIT


# === 4. bounded resources =======================================================================


def _send_chunked(addr: tuple[str, int], target: str, headers: list[tuple[str, str]], total: int,
                  chunk: int = 1 << 20) -> RawResponse | None:
    """Stream `total` bytes chunked; returns the answer if the gateway sent one."""
    sock = socket.create_connection(addr, timeout=30)
    head = (f"POST {target} HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode()
    block = f"{chunk:x}\r\n".encode() + b"[" * chunk + b"\r\n"
    try:
        sock.sendall(head)
        for _ in range(total // chunk):
            sock.sendall(block)
        sock.sendall(b"0\r\n\r\n")
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except OSError:
        return None
    finally:
        sock.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    return RawResponse(int(lines[0].split()[1]), [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]],
                       body)


def test_unauthenticated_chunked_upload_is_cut_at_the_limit(
        backend: Backend, hostile: HostileUpstream, gateway: Gateway, client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    client.request("GET", "/health")
    before = rss_bytes(gateway.proc.pid)
    r = _send_chunked(client.addr, listing.path, [("Content-Type", "application/json")], 50 * 1024 * 1024)
    grown = rss_bytes(gateway.proc.pid) - before
    assert grown < 25 * 1024 * 1024, f"RSS grew by {grown >> 20} MB for a refused upload"
    # The gateway may cut the connection as soon as the limit is read: no answer is fine, another is not.
    assert r is None or r.status == 413, f"the upload got {r.status}"
    assert hostile.records(listing.slug) == []


def test_compression_bomb_is_not_inflated_by_the_meter(
        backend: Backend, hostile: HostileUpstream, canary: Canary, gateway: Gateway, client: RawClient) -> None:
    """Passed on still compressed, and billed: it reached the client (I5), under its own reason."""
    listing = make_listing(backend, hostile)
    before = rss_bytes(gateway.proc.pid)
    for mode in ("gzip_bomb", "deflate_bomb"):
        r = client.request("POST", listing.path, listing.auth(), rpc(name=mode, mb=200))
        assert r.status == 200 and len(r.body) < 2 * 1024 * 1024  # passed on still compressed
        assert r.header("X-Mcpmeter-Billed") == "1000" and r.header("X-Mcpmeter-Refunded") is None
    grown = rss_bytes(gateway.proc.pid) - before
    assert grown < 50 * 1024 * 1024, f"RSS grew by {grown >> 20} MB inflating a bomb"
    check(backend, listing, hostile, canary)
    reasons = backend.query("SELECT reason FROM mcpmeter_calls WHERE tool_name IN ('gzip_bomb', 'deflate_bomb') "
                            "AND user_id = %s", (listing.consumer.user_id,))
    assert sorted(str(reason) for reason, in reasons) == ["unread_delivered", "unread_delivered"]


def test_one_long_sse_line_costs_no_more_than_many_short_events(
        backend: Backend, hostile: HostileUpstream, canary: Canary, gateway: Gateway, client: RawClient) -> None:
    """16 MB as one line against the same bytes as ~1 KB events: the gateway's CPU must be about linear.

    Measured as the mitmdump process's CPU time (not wall time) so a loaded machine does not decide it.
    """
    listing = make_listing(backend, hostile, timeout=120)
    used = []
    for mode in ("sse_many", "huge_sse"):
        before = cpu_seconds(gateway.proc.pid)
        r = client.request("POST", listing.path, listing.auth(), rpc(name=mode, mb=16, chunk=4096))
        assert r.status == 200 and len(r.body) > 15 * 1024 * 1024
        used.append(cpu_seconds(gateway.proc.pid) - before)
    many, one = used
    assert one < 2 * many + 1.0, f"one 16 MB line cost {one:.2f}s of gateway CPU, 16 MB of short events {many:.2f}s"


# === 5. secrets ===================================================================================


@pytest.fixture
def saving_gateway(backend: Backend, tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    """A gateway of its own that saves every flow (`-w`), like an operator debugging with mitmweb."""
    flows = tmp_path / "flows.mitm"
    gw = launch({**backend.config(), "max_body_bytes": MAX_BODY}, tmp_path, backend.env(), ["-w", str(flows)])
    yield gw, flows
    gw.stop()


def test_upstream_receives_no_consumer_key(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                           client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, listing.auth(Cookie="session=abc"), rpc(name="echo_headers"))
    assert r.status == 200
    assert listing.consumer.key not in r.body.decode() and "session=abc" not in r.body.decode()
    check(backend, listing, hostile, canary)


def test_saved_flows_hold_no_bearer_key_or_publisher_secret(
        backend: Backend, hostile: HostileUpstream, saving_gateway: tuple[Gateway, Path]) -> None:
    gw, flows = saving_gateway
    listing = make_listing(backend, hostile)
    addr = RawClient(gw.url).addr
    auth = f"Authorization: Bearer {listing.consumer.key}\r\n".encode()
    # 1. a normal paid call (the publisher's header is added to the forwarded request)
    c = RawClient(gw.url)
    assert c.request("POST", listing.path, listing.auth(), rpc()).status == 200
    c.close()
    # 2. the client hangs up mid-upload, before the request hook ever runs
    with socket.create_connection(addr) as s:
        s.sendall(b"POST " + listing.path.encode() + b" HTTP/1.1\r\nHost: g\r\nContent-Length: 500000\r\n" + auth
                  + b"\r\n" + b"{" * 1000)
        time.sleep(0.3)
    # 3. a framing error in a chunked body
    with socket.create_connection(addr) as s:
        s.sendall(b"POST " + listing.path.encode() + b" HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n" + auth
                  + b"\r\nzz\r\n{}\r\n0\r\n\r\n")
        s.settimeout(5)
        try:
            s.recv(65536)
        except OSError:
            pass
    time.sleep(1.0)
    gw.stop()  # flushes the flow file
    saved = flows.read_bytes()
    assert saved, "no flows saved"
    log = gw.log()
    assert listing.consumer.key.encode() not in saved, "the bearer key is in the saved flows"
    assert listing.secret.encode() not in saved, "the publisher's upstream header is in the saved flows"
    assert listing.consumer.key not in log and listing.secret not in log


def test_error_bodies_never_name_the_upstream(backend: Backend, client: RawClient) -> None:
    port = closed_port()
    slug = f"adv-dead-{uuid.uuid4().hex[:6]}"
    backend.add_listing(slug, f"http://127.0.0.1:{port}/mcp", price=1000)
    consumer = backend.add_consumer(credit=CREDIT)
    r = client.request("POST", f"/{slug}", [("Authorization", f"Bearer {consumer.key}"),
                                            ("Content-Type", "application/json")], rpc())
    assert_gateway_error(r, 502, "upstream_failed")
    assert str(port).encode() not in r.body and b"127.0.0.1" not in r.body


def test_upstream_cannot_set_the_gateways_headers(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                                   client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    r = client.request("POST", listing.path, listing.auth(), rpc(name="meter_headers"))
    assert r.status == 200
    assert r.header("X-Mcpmeter-Billed") == "1000"
    assert int(r.header("X-Mcpmeter-Balance") or -1) == CREDIT - 1000
    assert r.header("X-Mcpmeter-Refunded") is None, "the upstream claimed a refund in the gateway's name"
    assert r.header("X-Mcpmeter-Evil") is None
    check(backend, listing, hostile, canary)


# === 6. legacy HTTP+SSE sessions ==================================================================


_ENDPOINT_DATA = re.compile(rb"data: ?([^\r\n]*(?:session_id|/)[^\r\n]*)[\r\n]")


class LegacyStream:
    """A legacy session's GET stream through the gateway, read until its endpoint event."""

    def __init__(self, addr: tuple[str, int], listing: Listing, endpoint: str | None = None, hold: float = 30,
                 layout: str = "plain", require_endpoint: bool = True) -> None:
        self.addr, self.listing, self.endpoint, self.hold, self.layout = addr, listing, endpoint, hold, layout
        self.require_endpoint = require_endpoint  # False: a stream that ends without one leaves route ""
        self.sock: socket.socket | None = None
        self.route = ""
        self.data = b""

    def __enter__(self) -> LegacyStream:
        self.sock = socket.create_connection(self.addr, timeout=10)
        extra = f"X-Hostile-Endpoint: {self.endpoint}\r\n" if self.endpoint else ""
        self.sock.sendall(f"GET {self.listing.path} HTTP/1.1\r\nHost: g\r\nAccept: text/event-stream\r\n"
                          f"Authorization: Bearer {self.listing.consumer.key}\r\nX-Hostile-Hold: {self.hold}\r\n"
                          f"X-Hostile-Endpoint-Layout: {self.layout}\r\n{extra}\r\n".encode())
        while (match := _ENDPOINT_DATA.search(self.data)) is None:
            more = self.sock.recv(65536)
            self.data += more
            if not more or self.data.endswith(b"\r\n0\r\n\r\n"):  # the stream ended
                if self.require_endpoint:
                    raise AssertionError(f"stream ended before its endpoint: {self.data[:500]!r}")
                return self
        self.route = match.group(1).decode()
        return self

    def read_more(self, seconds: float) -> bytes:
        assert self.sock is not None
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                more = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not more:
                break
            self.data += more
        return self.data

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()


def test_legacy_session_calls_are_billed_from_the_stream(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    listing = make_listing(backend, hostile, "sse")
    with LegacyStream(client.addr, listing) as stream:
        assert stream.route.startswith(f"{listing.path}/messages/?session_id=")
        r = client.request("POST", stream.route, listing.auth(), rpc(name="pricey", rpc_id=7))
        assert r.status == 202
        assert b'"id": 7' in stream.read_more(1.0)
        check(backend, listing, hostile, canary)


@pytest.mark.parametrize("layout", ["id-between", "data-first", "cr-only", "split"])
def test_every_valid_layout_of_the_endpoint_event_is_rewritten(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, layout: str) -> None:
    """Any valid SSE layout of the endpoint event is rewritten: an absolute endpoint left as it is would
    name the upstream's address and let the client post to it directly, unmetered."""
    listing = make_listing(backend, hostile, "sse")
    absolute = f"{hostile.url}{listing.base}messages/?session_id={{sid}}"
    # hold=3: unrewritten, the endpoint used to be held back until the stream ended
    with LegacyStream(client.addr, listing, endpoint=absolute, layout=layout, hold=3) as stream:
        assert stream.route.startswith(f"{listing.path}/messages/?session_id="), stream.route
        assert str(hostile.port) not in stream.data.decode("latin-1")


def test_a_held_back_endpoint_chunk_does_not_end_the_clients_stream(
        backend: Backend, hostile: HostileUpstream, client: RawClient) -> None:
    """A chunk the rewriter holds back is "nothing to send", not an empty chunk: mitmproxy sends an
    empty chunk as `0\\r\\n\\r\\n`, which ends a chunked answer (the endpoint event comes in pieces)."""
    listing = make_listing(backend, hostile, "sse")
    with LegacyStream(client.addr, listing, layout="split", hold=3) as stream:
        assert stream.route.startswith(f"{listing.path}/messages/?session_id="), stream.route
        assert b"\r\n0\r\n\r\n" not in stream.read_more(1.0)  # the upstream's stream is still open
        assert b": ping" in stream.data


def test_plain_endpoint_event_is_rewritten(backend: Backend, hostile: HostileUpstream, client: RawClient) -> None:
    listing = make_listing(backend, hostile, "sse")
    absolute = f"{hostile.url}{listing.base}messages/?session_id={{sid}}"
    for layout in ("plain", "no-space-crlf"):
        with LegacyStream(client.addr, listing, endpoint=absolute, layout=layout) as stream:
            assert stream.route.startswith(f"{listing.path}/messages/?session_id="), (layout, stream.route)


def test_result_under_a_foreign_event_type_is_not_billed(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    listing = make_listing(backend, hostile, timeout=5)
    r = client.request("POST", listing.path, listing.auth(), rpc(name="sse_other_event"))
    assert r.status == 200 and b"event: debug" in r.body
    deadline = time.monotonic() + 10
    rows: list[Any] = []
    while time.monotonic() < deadline and not rows:
        rows = backend.query("SELECT billed_micro_cents FROM usage_events WHERE mcp_id = %s", (listing.mcp_id,))
        time.sleep(0.1)
    assert [int(b) for b, in rows] == [0]
    assert backend.balance(listing.consumer.user_id) == CREDIT


def test_legacy_result_under_a_foreign_event_type_is_not_billed(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    """On a legacy session's stream too, only a `message` event answers a call: it is refunded at its timeout."""
    listing = make_listing(backend, hostile, "sse", timeout=2)
    with LegacyStream(client.addr, listing, hold=10) as stream:
        r = client.request("POST", stream.route, listing.auth(), rpc(name="sse_other_event", rpc_id=4))
        assert r.status == 202
        assert b"event: debug" in stream.read_more(1.0)
        deadline = time.monotonic() + 10
        rows: list[Any] = []
        while time.monotonic() < deadline and not rows:
            rows = backend.query("SELECT billed_micro_cents FROM usage_events WHERE mcp_id = %s", (listing.mcp_id,))
            time.sleep(0.1)
    assert [int(b) for b, in rows] == [0]
    assert backend.balance(listing.consumer.user_id) == CREDIT
    assert confined(listing, hostile, canary) == []


@pytest.mark.parametrize("variant", ["{route}&x=1", "{route}&", "{path}/messages/?{encoded}"])
def test_textual_variants_of_a_session_route_are_the_same_session(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, variant: str) -> None:
    listing = make_listing(backend, hostile, "sse", timeout=60)
    other = backend.add_consumer(credit=CREDIT)
    with LegacyStream(client.addr, listing) as stream:
        query = stream.route.partition("?")[2]
        assert query.startswith("session_id=")
        encoded = query.replace("session_id", "session%5Fid")  # the same parsed query
        target = variant.format(route=stream.route, path=listing.path, encoded=encoded)
        # another key cannot post into the owner's session through the variant
        r = client.request("POST", target, [("Authorization", f"Bearer {other.key}"),
                                            ("Content-Type", "application/json")], rpc(name="pricey", rpc_id=8))
        assert (r.status, r.error) == (403, "session_forbidden"), (target, r.status, r.body[:200])
        # the owner's call through the variant is settled from the stream, like the announced route's
        r = client.request("POST", target, listing.auth(), rpc(name="pricey", rpc_id=9))
        stream.read_more(1.0)
        check(backend, listing, hostile, canary)
    assert backend.balance(other.user_id) == CREDIT


def test_legacy_call_without_answer_is_refunded_at_the_timeout_while_the_stream_stays_open(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    listing = make_listing(backend, hostile, "sse", timeout=2)
    with LegacyStream(client.addr, listing, hold=20) as stream:
        r = client.request("POST", stream.route, listing.auth(), rpc(name="no_answer", rpc_id=5))
        assert r.status == 202
        deadline = time.monotonic() + 6
        rows: list[Any] = []
        while time.monotonic() < deadline and not rows:
            stream.read_more(0.3)
            rows = backend.query("SELECT status, billed_micro_cents FROM usage_events WHERE mcp_id = %s",
                                 (listing.mcp_id,))
        assert [(int(s), int(b)) for s, b in rows] == [(504, 0)]
    assert backend.balance(listing.consumer.user_id) == CREDIT


# === 7. origin, reflected headers, the gateway's own answers ======================================


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost", "https://app.example.evil"])
def test_foreign_origin_is_refused_before_authentication(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient, origin: str) -> None:
    listing = make_listing(backend, hostile)
    for headers in ([("Origin", origin)], [("Origin", origin), *listing.auth()]):
        r = client.request("POST", listing.path, headers, rpc(name="pricey"))
        assert_gateway_error(r, 403, "origin_forbidden")
    assert hostile.records(listing.slug) == []


def test_allowed_origin_and_no_origin_pass(backend: Backend, hostile: HostileUpstream, canary: Canary,
                                           client: RawClient) -> None:
    listing = make_listing(backend, hostile)
    for extra in ({"Origin": ALLOWED_ORIGIN}, {}):
        r = client.request("POST", listing.path, listing.auth(**extra), rpc())
        assert r.status == 200, r.body[:200]
    check(backend, listing, hostile, canary)


@pytest.mark.parametrize("host", ['evil.example"><x', "a b", "evil.example/phish?", "@evil.example", "[::1"])
def test_invalid_host_is_not_reflected(backend: Backend, hostile: HostileUpstream, client: RawClient,
                                       host: str) -> None:
    listing = make_listing(backend, hostile)
    head = (f"POST {listing.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(rpc())}\r\n\r\n").encode()
    r = client.request("POST", listing.path, raw_head=head, body=rpc())
    assert r.status in (400, 401)
    reflected = (r.header("WWW-Authenticate") or "") + r.body.decode("latin-1")
    assert host not in reflected


@pytest.mark.parametrize("target", ["/", "/Bad_Slug", "/%00", "/a%zz", "/health/../x", "/.well-known/x",
                                    "/-/x", "/" + "a" * 5000])
def test_gateway_errors_are_json_with_a_request_id(client: RawClient, target: str) -> None:
    r = client.request("POST", target, [("Content-Type", "application/json")], rpc())
    assert 400 <= r.status < 500, (target, r.status)
    assert r.refusal()["request_id"]


# === 8. fail closed across reloads ================================================================


def test_a_broken_script_reload_forwards_nothing_unmetered(
        backend: Backend, canary: Canary, tmp_path: Path) -> None:
    """Break the script under a running mitmdump: every flow gets 503 meter_unavailable, none reach the target."""
    real = ROOT / "mcpmeter_addon.py"
    script = tmp_path / "mcpmeter_addon_copy.py"
    script.write_text(f"__file__ = {str(real)!r}\nexec(compile(open(__file__).read(), __file__, 'exec'))\n")
    gw = launch(backend.config(), tmp_path, backend.env(), script=script, reverse=canary.url)
    try:
        time.sleep(1.2)  # mtime granularity: the edit must look newer than the load
        script.write_text("this is not python (\n")
        time.sleep(3.5)  # mitmproxy polls the script for changes
        c = RawClient(gw.url)
        for method, target in (("POST", "/any-slug"), ("GET", "/health"), ("GET", "/x/y")):
            r = c.request(method, target, [("Content-Type", "application/json")],
                          rpc() if method == "POST" else b"")
            assert (r.status, r.error) == (503, "meter_unavailable"), (target, r.status, r.body[:200])
        c.close()
        assert canary.records() == [], "a flow reached the reverse target unmetered"
    finally:
        gw.stop()



def test_a_request_head_past_the_limit_is_431_before_any_hook(
        backend: Backend, hostile: HostileUpstream, canary: Canary, client: RawClient) -> None:
    # Sent without its blank line: mitmproxy would buffer it for ever. The gateway answers 431 and
    # closes the connection once it passes compat.MAX_HEAD_BYTES; nothing reaches the upstream.
    listing = make_listing(backend, hostile)
    sock = socket.create_connection(client.addr, timeout=10)
    try:
        sock.sendall(f"POST {listing.path} HTTP/1.1\r\nHost: gateway.test\r\n".encode())
        data = b""
        try:
            for _ in range(64):  # up to 4 MB, 64 KB at a time
                sock.sendall(b"X-Pad: " + b"a" * 65_000 + b"\r\n")
        except OSError:
            pass  # closed by the gateway after its answer
        while more := sock.recv(65536):
            data += more
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 431 ") and b"Content-Type: application/json" in data
    assert hostile.records(listing.slug) == []
    # A head under the limit passes (a large cookie or token header is legal), on a new connection.
    c = RawClient(f"http://{client.addr[0]}:{client.addr[1]}")
    try:
        r = c.request("POST", listing.path, listing.auth(**{"X-Large": "b" * 12_000}), rpc(name="cheap"))
    finally:
        c.close()
    assert r.status == 200
    check(backend, listing, hostile, canary)
