"""End to end with the official MCP SDK client, through the gateway, in front of the demo servers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.client.streamable_http import streamable_http_client

from addon.errors import rpc_code
from tests.refusals import refusal
from tests.backends import Backend, TestConsumer
from tests.gateway_proc import Gateway, run_gateway_expecting_failure, write_config
from tests.test_e2e_gateway import MCP_HEADERS, call, eventually, post, slug


def client(gw: Gateway, path: str, consumer: TestConsumer, mode: str = "auto") -> tuple[httpx2.AsyncClient, Client]:
    http = httpx2.AsyncClient(headers=consumer.auth, timeout=httpx2.Timeout(10.0, read=30.0))
    return http, Client(streamable_http_client(gw.url + path, http_client=http), mode=mode)


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, object]:
    return {"top_up_url": "https://pay.example/top-up"}


@pytest.fixture
def echo_listing(backend: Backend, demos_url: str) -> Callable[..., str]:
    def make(**kwargs: object) -> str:
        s = slug("echo")
        backend.add_listing(s, f"{demos_url}/echo-test/mcp", **kwargs)  # type: ignore[arg-type]
        return s

    return make


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_sdk_client_tools_are_billed_streamed_and_refunded(
        gateway: Gateway, backend: Backend, echo_listing: Callable[..., str], mode: str) -> None:
    s = echo_listing(price=1000, tool_prices={"slow_count": 5000})
    c = backend.add_consumer(credit=100_000)
    http, mcp = client(gateway, f"/{s}", c, mode)
    progress: list[float] = []
    started = time.monotonic()
    async with http, mcp:
        tools = await mcp.list_tools()
        assert {"echo", "slow_count", "fail", "sleep"} <= {t.name for t in tools.tools}
        result = await mcp.call_tool("echo", {"text": "hello through the meter"})
        assert not result.is_error and result.content[0].text == "hello through the meter"

        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            progress.append(time.monotonic() - started)

        result = await mcp.call_tool("slow_count", {"steps": 3, "delay_ms": 400}, progress_callback=on_progress)
        ended = time.monotonic() - started
        assert not result.is_error
        assert len(progress) == 3
        assert ended - progress[0] > 0.6, "the first progress event must arrive well before the call ends"

        result = await mcp.call_tool("fail", {})
        assert result.is_error
    await eventually(lambda: len(backend.usage(c)) == 3)
    assert sorted((u["tool_name"], u["billed"]) for u in backend.usage(c)) == [
        ("echo", 1000), ("fail", 0), ("slow_count", 5000)]
    assert {u["client"] for u in backend.usage(c)} == {"python-sdk"}
    assert backend.balance(c.user_id) == 100_000 - 6000


async def test_sdk_client_without_credit_sees_the_402(gateway: Gateway, backend: Backend,
                                                      echo_listing: Callable[..., str]) -> None:
    s = echo_listing(price=1000)
    c = backend.add_consumer(credit=500)
    http, mcp = client(gateway, f"/{s}", c)
    async with http, mcp:
        await mcp.list_tools()  # unpriced: passes
        # The 402 is a JSON-RPC error answering the call: the SDK raises it with its words and data.
        with pytest.raises(MCPError) as refused:
            await mcp.call_tool("echo", {"text": "x"})
    assert refused.value.code == rpc_code("insufficient_credit")
    assert "1000 µ¢" in refused.value.message and "500 µ¢" in refused.value.message
    assert "https://pay.example/top-up" in refused.value.message
    data = refused.value.data
    assert data["error"] == "insufficient_credit" and data["balance_micro_cents"] == 500
    assert data["required_micro_cents"] == 1000 and data["request_id"]
    assert backend.balance(c.user_id) == 500
    assert backend.usage(c) == []


async def test_sdk_client_rate_limited_sees_when_to_retry(gateway: Gateway, backend: Backend,
                                                          echo_listing: Callable[..., str]) -> None:
    s = echo_listing(price=1000, rpm=4)
    c = backend.add_consumer(credit=100_000)
    http, mcp = client(gateway, f"/{s}", c, "legacy")
    async with http, mcp:
        answered = 0
        with pytest.raises(MCPError) as refused:
            for _ in range(5):  # initialize and its notification count too
                await mcp.call_tool("echo", {"text": "x"})
                answered += 1
    assert refused.value.code == rpc_code("rate_limited")
    data = refused.value.data
    assert data["error"] == "rate_limited" and data["scope"] == "minute" and data["retry_after"] >= 1
    assert f"retry in {data['retry_after']} s" in refused.value.message
    await eventually(lambda: len(backend.usage(c)) == answered)
    assert backend.balance(c.user_id) == 100_000 - 1000 * answered  # the refused call cost nothing


async def test_session_belongs_to_the_key_that_opened_it(gateway: Gateway, backend: Backend, fault_url: str) -> None:
    s = slug()
    backend.add_listing(s, fault_url + "/mcp", price=1000)
    owner, other = backend.add_consumer(credit=10_000), backend.add_consumer(credit=10_000)
    r = await post(gateway, f"/{s}", {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, owner)
    session = r.headers["Mcp-Session-Id"]
    r = await post(gateway, f"/{s}", call("ok"), other, headers={"Mcp-Session-Id": session})
    assert r.status_code == 403 and refusal(r)["error"] == "session_forbidden"
    r = await post(gateway, f"/{s}", call("ok"), owner, headers={"Mcp-Session-Id": session})
    assert r.status_code == 200
    assert backend.balance(other.user_id) == 10_000


async def test_every_gateway_answer_is_json_with_meter_headers(gateway: Gateway) -> None:
    async with httpx2.AsyncClient() as http:
        for method, path in (("GET", "/"), ("POST", "/x"), ("DELETE", "/UPPER"), ("GET", "/health")):
            r = await http.request(method, gateway.url + path, headers=MCP_HEADERS)
            assert r.headers["content-type"].startswith("application/json")
            assert "X-Mcpmeter-Request-Id" in r.headers
            r.json()


@pytest.mark.parametrize("content, message", [
    ("store: [unclosed", "not valid YAML"),
    ("store: postgres\n", "MCPMETER_STORE"),
    ("cache: memcached\n", "MCPMETER_CACHE"),
    ("seed:\n  listings:\n    - slug: Bad Slug\n", "slug"),
    ("seed:\n  listings:\n    - slug: ok\n      upstream_url: ftp://x\n", "upstream_url"),
    ("surprise: 1\n", "surprise"),
])
def test_bad_configuration_stops_the_gateway_at_start(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"sqlite_path: {tmp_path / 'x.db'}\n" + content if "store:" not in content else content)
    done = run_gateway_expecting_failure(path, tmp_path)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr


def test_unreadable_configuration_stops_the_gateway(tmp_path: Path) -> None:
    done = run_gateway_expecting_failure(tmp_path / "missing.yaml", tmp_path)
    assert done.returncode != 0 and "cannot read" in done.stdout + done.stderr


def test_example_configuration_is_valid(tmp_path: Path) -> None:
    from addon.config import load

    root = Path(__file__).resolve().parent.parent
    config = load(str(root / "config.example.yaml"), {})
    assert {x["slug"] for x in config.seed["listings"]} == {
        "echo-test", "weather", "currency", "wikipedia", "github-public"}
    write_config(tmp_path / "copy.yaml", {"sqlite_path": str(tmp_path / "x.db")})
