"""GET /metrics: protection, what is counted, and bounded labels. Hooks driven with taddons."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from addon.config import ConfigError, _build
from addon.gateway import Mcpmeter
from tests.test_gateway_hooks import (  # noqa: F401  (isolated is an autouse fixture)
    ALICE, POOR, PRICE, Db, Gw, isolated, json_response, make_flow, rpc, tool_call, upstream_answers,
    upstream_fails, write_config,
)

METRICS_TOKEN = "mcpm_live_metrics0123456789abcdefXYZ"


async def gateway(tmp_path: Path, **settings: Any) -> AsyncIterator[Gw]:
    tmp_path.mkdir(exist_ok=True)
    addon = Mcpmeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mcpmeter_config=str(write_config(tmp_path, **settings)))
        yield Gw(addon, tctx, Db(tmp_path / "mcpmeter.db"))
        addon.done()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    async for g in gateway(tmp_path, metrics_token=METRICS_TOKEN):
        yield g


async def scrape(gw: Gw, token: str | None = METRICS_TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    flow = make_flow("/metrics", token=token, method="GET")
    await gw.addon.request(flow)
    assert flow.response.status_code == 200, flow.response.content
    assert flow.response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(flow.response.content.decode())
            for s in family.samples}


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_need_the_token_and_never_show_it(gw: Gw) -> None:
    missing = make_flow("/metrics", token=None, method="GET")
    await gw.addon.request(missing)
    assert missing.response.status_code == 401 and b"metrics_unauthorized" in missing.response.content
    assert missing.response.headers["WWW-Authenticate"].startswith("Bearer ")
    wrong = make_flow("/metrics", token=ALICE, method="GET")  # a consumer's key is not the metrics token
    await gw.addon.request(wrong)
    assert wrong.response.status_code == 403 and b"metrics_forbidden" in wrong.response.content
    right = make_flow("/metrics", token=METRICS_TOKEN, method="GET")
    await gw.addon.request(right)
    assert right.response.status_code == 200 and b"mcpmeter_calls" in right.response.content
    assert METRICS_TOKEN not in str(right.request.headers)  # redacted like any bearer key


async def test_metrics_are_closed_without_a_token_unless_public(tmp_path: Path) -> None:
    async for g in gateway(tmp_path / "closed"):
        flow = make_flow("/metrics", token=None, method="GET")
        await g.addon.request(flow)
        assert flow.response.status_code == 404 and b"mcpmeter_" not in flow.response.content
    async for g in gateway(tmp_path / "public", metrics_public=True):
        assert sample(await scrape(g, token=None), "mcpmeter_settlement_backlog") == 0


async def test_calls_money_refusals_and_latency_are_counted(gw: Gw) -> None:
    billed = make_flow(body=tool_call("slow_count"))  # has a price rule: its own label
    await gw.addon.request(billed)
    await upstream_answers(gw, billed, json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))
    refunded = make_flow(body=tool_call("whatever-the-client-invents"))
    await gw.addon.request(refunded)
    await upstream_fails(gw, refunded, "Connection refused")
    listed = make_flow(body=rpc("tools/list"))
    await gw.addon.request(listed)
    await upstream_answers(gw, listed, json_response({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}))
    poor = make_flow(token=POOR)
    await gw.addon.request(poor)
    unknown = make_flow("/no-such-listing-here")
    await gw.addon.request(unknown)
    await gw.addon.drain()

    s = await scrape(gw)
    calls = "mcpmeter_calls_total"
    assert sample(s, calls, listing="echo-test", tool="slow_count", decision="billed", status="200") == 1
    assert sample(s, calls, listing="echo-test", tool="other", decision="refunded", status="502") == 1
    assert sample(s, calls, listing="echo-test", tool="-", decision="passthrough", status="200") == 1
    assert sample(s, "mcpmeter_billed_micro_cents_total", listing="echo-test") == 5000
    assert sample(s, "mcpmeter_refunded_micro_cents_total", listing="echo-test") == PRICE
    assert sample(s, "mcpmeter_refusals_total", code="insufficient_credit") == 1
    assert sample(s, "mcpmeter_refusals_total", code="no_such_mcp") == 1
    assert sample(s, "mcpmeter_gateway_overhead_seconds_count") == 3
    assert sample(s, "mcpmeter_upstream_seconds_count", listing="echo-test") == 3
    assert sample(s, "mcpmeter_cache_degraded") == 0
    labels = {dict(k[1]).get("tool") for k in s} | {dict(k[1]).get("listing") for k in s}
    assert "whatever-the-client-invents" not in labels and "no-such-listing-here" not in labels


def test_each_gateway_has_its_own_registry() -> None:
    first, second = Mcpmeter(), Mcpmeter()
    first.metrics.refused("no_such_mcp")
    assert b'mcpmeter_refusals_total{code="no_such_mcp"} 1.0' in generate_latest(first.metrics.registry)
    assert b"no_such_mcp" not in generate_latest(second.metrics.registry)
    assert b"mcpmeter_" not in generate_latest(REGISTRY)  # the process-wide registry stays empty


@pytest.mark.parametrize("raw, message", [
    ({"metrics_public": "yes"}, "true or false"),
    ({"metrics_token": "secret"}, "mcpm_live_"),
    ({"metrics_token": "mcpm_live_short"}, "mcpm_live_"),
    ({"metrics_token": METRICS_TOKEN, "metrics_public": True}, "contradict"),
])
def test_metrics_settings_are_validated(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _build(raw)


async def test_a_failing_counter_never_costs_a_call_its_settlement(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("counter broke")

    monkeypatch.setattr(gw.addon.metrics.tally.overhead, "observe", broken)
    flow = make_flow()
    await gw.addon.request(flow)
    await upstream_fails(gw, flow, "Connection refused")
    assert gw.db.balance(1) == gw.db.ledger(1)[0][1]  # refunded all the same
    assert gw.db.ledger(1)[-1][0] == "refund"
