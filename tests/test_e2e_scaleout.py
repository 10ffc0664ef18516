"""The README's scale-out recipe, run: nginx (deploy/nginx.conf) in front of two gateway processes.

Real `nginx` from the Debian package, two real `mitmdump -s mcpmeter_addon.py` processes sharing
one throwaway MySQL database and one Redis prefix, the fault-on-demand upstream behind them.
Streams must come through unbuffered, calls must reach both gateways, the money must reconcile to
the micro-cent across both, and limits held in MySQL and Redis must hold for the pair.
Without nginx these tests skip, saying so; under MCPMETER_REQUIRE_BACKENDS=1 (CI) they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from bench import nginx
from tests.backends import Backend, ProductionBackend
from tests.gateway_proc import Gateway, gateway_pair
from tests.test_e2e_gateway import MCP_HEADERS, call, eventually, slug
from tests.wallet_money import assert_settled_money, gateway_config, holds_settled

pytestmark = pytest.mark.timeout(150)


def require_nginx() -> None:
    try:
        nginx.binary()
    except nginx.NginxMissing as e:
        if os.environ.get("MCPMETER_REQUIRE_BACKENDS") == "1":  # CI: a skipped scale-out test is a failure
            pytest.fail(f"MCPMETER_REQUIRE_BACKENDS=1 but {e}")
        pytest.skip(f"{e}; the scale-out recipe needs it")


@pytest.fixture(scope="module")
def prod() -> Iterator[Backend]:
    b = ProductionBackend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def pair(prod: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateways on one database and one Redis prefix; /metrics open (loopback only) to count each one's calls."""
    yield from start_pair(prod, tmp_path_factory)


@pytest.fixture(scope="module")
def lb(pair: tuple[Gateway, Gateway], tmp_path_factory: pytest.TempPathFactory) -> Iterator[nginx.Nginx]:
    """nginx running deploy/nginx.conf in front of the pair."""
    yield from start_lb(pair, tmp_path_factory)


@pytest.fixture(scope="module")
def wallet_prod() -> Iterator[ProductionBackend]:
    """Another database and Redis prefix, for gateways running with wallets (addon/store/wallets.py)."""
    b = ProductionBackend(wallets=True)
    yield b
    b.close()


@pytest.fixture(scope="module")
def wallet_pair(wallet_prod: ProductionBackend,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    """The pair with wallets, and short lives: their sweepers settle every hold within seconds."""
    yield from start_pair(wallet_prod, tmp_path_factory)


@pytest.fixture(scope="module")
def wallet_lb(wallet_pair: tuple[Gateway, Gateway], tmp_path_factory: pytest.TempPathFactory) -> Iterator[nginx.Nginx]:
    yield from start_lb(wallet_pair, tmp_path_factory)


def start_pair(prod: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    require_nginx()
    workdir = tmp_path_factory.mktemp("scaleout")
    with gateway_pair(gateway_config(prod, metrics_public=True), workdir, prod.env()) as both:
        yield both


def start_lb(pair: tuple[Gateway, Gateway], tmp_path_factory: pytest.TempPathFactory) -> Iterator[nginx.Nginx]:
    n = nginx.start([gw.url.removeprefix("http://") for gw in pair], tmp_path_factory.mktemp("nginx"))
    yield n
    n.stop()


def billed_calls(gw: Gateway, listing: str, decision: str = "billed") -> int:
    """Calls of `listing` this gateway settled with `decision`, from its own /metrics."""
    text = httpx2.get(gw.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("mcpmeter_calls_total{") and f'listing="{listing}"' in line \
                and f'decision="{decision}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def refusals(gw: Gateway, code: str) -> int:
    m = re.search(rf'^mcpmeter_refusals_total\{{code="{code}"\}} (\S+)$',
                  httpx2.get(gw.url + "/metrics", timeout=5).text, flags=re.MULTILINE)
    return int(float(m.group(1))) if m else 0


async def spray(url: str, auth: dict[str, str], n: int, tool: str = "ok",
                concurrency: int | None = None, seen: dict[str, int] | None = None) -> Counter[int]:
    """n calls to `url`, at most `concurrency` (default all) at once; the count of each status.

    Bodies of answers other than 200, 402 and 429 are printed: a failing assertion then shows who answered.
    `seen` gets each 200's request id and X-Mcpmeter-Billed.
    """
    limits = httpx2.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    gate = asyncio.Semaphore(concurrency or n)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as client:
        async def one(i: int) -> int:
            async with gate:
                r = await client.post(url, content=json.dumps(call(tool, rpc_id=i)).encode(),
                                      headers={**MCP_HEADERS, **auth})
            if r.status_code not in (200, 402, 429):
                print(f"spray: {r.status_code} {r.headers.get('server', '')!r} {r.text[:300]!r}")
            if seen is not None and r.status_code == 200:
                seen[r.headers["X-Mcpmeter-Request-Id"]] = int(r.headers["X-Mcpmeter-Billed"])
            return r.status_code

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


def assert_money_reconciles(prod: Backend) -> None:
    """Every balance equals its opening top-up plus its ledger (I1); every debit has its usage row (I4)."""
    assert prod.unreconciled() == [], "balances differ from their ledgers"
    debited = {r[0] for r in prod.query("SELECT request_id FROM mcpmeter_calls WHERE verdict = 'debited'")}
    usage_rows = {r[0] for r in prod.query("SELECT request_id FROM credit_transactions WHERE type = 'usage'")}
    assert debited == usage_rows


def test_readme_shows_the_location_block_of_deploy_nginx_conf() -> None:
    assert nginx.location_block(nginx.readme_snippet()) == nginx.location_block(nginx.CONFIG.read_text())
    assert "deploy/nginx.conf" in nginx.README.read_text()


@pytest.fixture(scope="module")
def lb_gzip(pair: tuple[Gateway, Gateway], tmp_path_factory: pytest.TempPathFactory) -> Iterator[nginx.Nginx]:
    """The same recipe where the operator's http block also compresses event streams."""
    n = nginx.start([gw.url.removeprefix("http://") for gw in pair], tmp_path_factory.mktemp("nginx-gzip"),
                    extra_http="gzip on; gzip_types text/event-stream; gzip_min_length 0;")
    yield n
    n.stop()


@pytest.mark.parametrize("proxy", ["lb", "lb_gzip"])
async def test_sse_progress_arrives_unbuffered_through_nginx(proxy: str, request: pytest.FixtureRequest,
                                                             prod: Backend, fault_url: str) -> None:
    lb: nginx.Nginx = request.getfixturevalue(proxy)
    s = slug("scale")
    prod.add_listing(s, fault_url + "/mcp", price=1000)
    c = prod.add_consumer(credit=10_000)
    started = time.monotonic()
    events: list[tuple[float, dict[str, Any]]] = []
    async with httpx2.AsyncClient(timeout=20) as client:
        # The upstream writes the progress event, then the result 0.6 s later.
        async with client.stream("POST", f"{lb.url}/{s}", content=json.dumps(call("sse_ok", {"delay": 0.6})).encode(),
                                 headers={**MCP_HEADERS, **c.auth, "Accept-Encoding": "gzip"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["X-Mcpmeter-Billed"] == "1000"
            assert r.headers.get("content-encoding") == ("gzip" if proxy == "lb_gzip" else None)
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip():
                    events.append((time.monotonic() - started, json.loads(line[5:])))
    assert [e.get("method", "result") for _, e in events] == ["notifications/progress", "result"]
    # Buffered, both would arrive together at the end of the stream (as they do, gzipped, with
    # `proxy_buffering on`: nginx then compresses whole buffers instead of flushing each event).
    assert events[1][0] - events[0][0] > 0.4, f"the progress event was held back: {events}"
    await eventually(lambda: [u["billed"] for u in prod.usage(c)] == [1000])
    assert prod.balance(c.user_id) == 9_000
    assert_money_reconciles(prod)


@pytest.mark.parametrize("stores", ["journal", "wallets"])
async def test_paid_calls_through_nginx_reach_both_gateways_and_reconcile(
        stores: str, request: pytest.FixtureRequest, fault_url: str) -> None:
    wallets = stores == "wallets"
    lb: nginx.Nginx = request.getfixturevalue("wallet_lb" if wallets else "lb")
    pair: tuple[Gateway, Gateway] = request.getfixturevalue("wallet_pair" if wallets else "pair")
    prod: Backend = request.getfixturevalue("wallet_prod" if wallets else "prod")
    s = slug("scale")
    prod.add_listing(s, fault_url + "/mcp", price=1000, rpm=10_000, rpd=100_000)
    c = prod.add_consumer(credit=150_000)
    seen: dict[str, int] = {}
    statuses = await spray(f"{lb.url}/{s}", c.auth, 200, seen=seen)
    # A balance for 150 calls: the two gateways together debit it exactly, never past zero.
    assert statuses == Counter({200: 150, 402: 50})
    assert prod.balance(c.user_id) == 0  # with wallets: nothing left in MySQL nor in a wallet
    await eventually(lambda: len(prod.usage(c)) == 150, timeout=10)
    assert sum(u["billed"] for u in prod.usage(c)) == 150_000
    if isinstance(prod, ProductionBackend) and prod.wallets:  # debited by holds: reconciled once they settle
        await holds_settled(prod)
        assert_settled_money(prod, c, 150_000, 1000, seen)
    else:
        assert [t for _, t, _ in prod.ledger(c.user_id)].count("usage") == 150
        assert_money_reconciles(prod)
    each = await eventually(lambda: (n := [billed_calls(gw, s) for gw in pair]) and sum(n) == 150 and n)
    assert all(n > 0 for n in each), f"nginx sent every call to one gateway: {each}"


async def test_a_session_stays_on_one_gateway(lb: nginx.Nginx, pair: tuple[Gateway, Gateway], prod: Backend,
                                             fault_url: str) -> None:
    """The recipe hashes Mcp-Session-Id: a session's calls (its resumes and cancellations too) reach the
    gateway that holds its state. One listing per session, so each gateway's /metrics tells where they went."""
    c = prod.add_consumer(credit=1_000_000)
    sessions = {slug("sess"): f"session-{i}" for i in range(6)}
    for s in sessions:
        prod.add_listing(s, fault_url + "/mcp", price=1000, rpm=10_000, rpd=100_000)
    for s, session in sessions.items():
        statuses = await spray(f"{lb.url}/{s}", {**c.auth, "Mcp-Session-Id": session}, 12, concurrency=4)
        assert statuses == Counter({200: 12}), statuses
    for s in sessions:
        each = await eventually(lambda s=s: (n := [billed_calls(gw, s) for gw in pair]) and sum(n) == 12 and n)
        assert sorted(each) == [0, 12], f"session of {s} split over the gateways: {each}"
    assert_money_reconciles(prod)


async def test_a_rate_limit_holds_across_both_gateways(lb: nginx.Nginx, pair: tuple[Gateway, Gateway],
                                                       prod: Backend, fault_url: str) -> None:
    s = slug("scale")
    # rpd=30 as well: exactly 30 pass however long the 90 take (see test_e2e_production).
    prod.add_listing(s, fault_url + "/mcp", price=10, rpm=30, rpd=30)
    c = prod.add_consumer(credit=1_000_000)
    await redis_in_use(lb, pair, prod, fault_url)
    logs = [len(gw.log()) for gw in pair]
    before = [refusals(gw, "rate_limited") for gw in pair]
    statuses = await spray(f"{lb.url}/{s}", c.auth, 90, concurrency=16)
    fallbacks = [line for gw, n in zip(pair, logs, strict=True)
                 for line in gw.log()[n:].splitlines() if "failed (" in line]
    # A Redis too slow to answer (a starved machine) sends each gateway to its own limits, as documented.
    assert not fallbacks, f"Redis fell behind and the gateways counted on their own: {fallbacks}"
    assert statuses == Counter({200: 30, 429: 60})
    assert prod.balance(c.user_id) == 1_000_000 - 30 * 10
    refused = [refusals(gw, "rate_limited") - b for gw, b in zip(pair, before, strict=True)]
    assert sum(refused) == 60 and all(n > 0 for n in refused), f"both gateways enforce the one limit: {refused}"
    await eventually(lambda: sum(billed_calls(gw, s) for gw in pair) == 30)
    assert_money_reconciles(prod)


async def redis_in_use(lb: nginx.Nginx, pair: tuple[Gateway, Gateway], prod: Backend, fault_url: str) -> None:
    """Warm both gateways' Redis connections with a burst elsewhere, then wait until neither runs on its own."""
    s = slug("warm")
    prod.add_listing(s, fault_url + "/mcp", price=1, rpm=100_000, rpd=100_000)
    await spray(f"{lb.url}/{s}", prod.add_consumer(credit=1_000).auth, 64, concurrency=16)

    async def shared() -> bool:
        async with httpx2.AsyncClient(timeout=5) as client:
            return all([(await client.get(gw.url + "/health")).json()["cache"].get("degraded") is False
                        for gw in pair])

    deadline = time.monotonic() + 15
    while not await shared():
        assert time.monotonic() < deadline, "the gateways did not go back to Redis"
        await asyncio.sleep(0.2)


async def test_a_free_allowance_holds_across_both_gateways(lb: nginx.Nginx, pair: tuple[Gateway, Gateway],
                                                           prod: Backend, fault_url: str) -> None:
    s = slug("scale")
    mcp_id = prod.add_listing(s, fault_url + "/mcp", price=1000, free=10, rpm=10_000, rpd=100_000)
    c = prod.add_consumer(credit=0)
    before = [refusals(gw, "insufficient_credit") for gw in pair]
    statuses = await spray(f"{lb.url}/{s}", c.auth, 60)
    assert statuses == Counter({200: 10, 402: 50})
    assert prod.free_used(mcp_id, c.user_id) == 10
    assert prod.balance(c.user_id) == 0
    refused = [refusals(gw, "insufficient_credit") - b for gw, b in zip(pair, before, strict=True)]
    assert sum(refused) == 50 and all(n > 0 for n in refused), f"both gateways hold the one allowance: {refused}"
    await eventually(lambda: sum(billed_calls(gw, s, "free") for gw in pair) == 10)
    assert_money_reconciles(prod)
