"""The demo MCP servers, driven through the official SDK client against the fake public APIs."""

import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from demos import fake_apis, github_public
from tests import demo_servers

pytestmark = pytest.mark.timeout(60)

# Session-scoped fixtures: the fake APIs and the demos, wired together, each on a free port.
fake_apis_url = demo_servers.fake_apis_url
demos_url = demo_servers.demos_url

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED_TOOLS = {
    "echo-test": {"echo", "slow_count", "fail", "sleep"},
    "weather": {"current_weather"},
    "currency": {"convert"},
    "wikipedia": {"search"},
    "github-public": {"repo"},
}


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    """Both protocol eras: 'auto' negotiates 2026-07-28 via server/discover, 'legacy' uses initialize."""
    return str(request.param)


@asynccontextmanager
async def connect(url: str, mode: str = "auto") -> AsyncIterator[Client]:
    """An SDK client for `url`, sending an Authorization header as a gateway caller would."""
    headers = {"Authorization": "Bearer demo-key"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(10.0, read=30.0)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, read_timeout_seconds=30) as client,
    ):
        yield client


async def call(demos_url: str, server: str, tool: str, arguments: dict[str, Any], mode: str = "auto") -> CallToolResult:
    async with connect(f"{demos_url}/{server}/mcp", mode) as client:
        return await client.call_tool(tool, arguments)


def text(result: CallToolResult) -> str:
    [content] = result.content
    assert isinstance(content, TextContent)
    return content.text


async def test_health_lists_all_servers(demos_url: str) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.get(f"{demos_url}/health")
    assert response.status_code == 200
    assert [s["path"] for s in response.json()["servers"]] == [f"/{name}/mcp" for name in EXPECTED_TOOLS]


@pytest.mark.parametrize("server", EXPECTED_TOOLS)
async def test_list_tools(demos_url: str, server: str, mode: str) -> None:
    async with connect(f"{demos_url}/{server}/mcp", mode) as client:
        tools = await client.list_tools()
    assert {tool.name for tool in tools.tools} == EXPECTED_TOOLS[server]


async def test_echo(demos_url: str, mode: str) -> None:
    result = await call(demos_url, "echo-test", "echo", {"text": "héllo, gateway"}, mode)
    assert not result.is_error
    assert text(result) == "héllo, gateway"


async def test_fail_is_a_tool_error(demos_url: str, mode: str) -> None:
    result = await call(demos_url, "echo-test", "fail", {"message": "refund me"}, mode)
    assert result.is_error
    assert "refund me" in text(result)


async def test_sleep(demos_url: str) -> None:
    started = time.monotonic()
    result = await call(demos_url, "echo-test", "sleep", {"seconds": 0.3})
    assert text(result) == "slept 0.3s"
    assert time.monotonic() - started >= 0.3
    assert (await call(demos_url, "echo-test", "sleep", {"seconds": -1})).is_error


async def test_slow_count_streams_progress_as_it_happens(demos_url: str, mode: str) -> None:
    steps, delay_ms = 4, 250
    arrivals: list[tuple[float, float, float | None, str | None]] = []
    async with connect(f"{demos_url}/echo-test/mcp", mode) as client:
        started = time.monotonic()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            arrivals.append((time.monotonic() - started, progress, total, message))

        result = await client.call_tool(
            "slow_count", {"steps": steps, "delay_ms": delay_ms}, progress_callback=on_progress
        )
        elapsed = time.monotonic() - started
    assert text(result) == f"counted to {steps}"
    assert [(p, t, m) for _, p, t, m in arrivals] == [(i, steps, f"step {i}/{steps}") for i in range(1, steps + 1)]
    times = [at for at, *_ in arrivals]
    assert times[0] < elapsed - 2 * delay_ms / 1000, "first progress should arrive well before the result"
    assert all(later - earlier > delay_ms / 2000 for earlier, later in itertools.pairwise(times)), times


async def test_current_weather(demos_url: str, mode: str) -> None:
    result = await call(demos_url, "weather", "current_weather", {"latitude": 52.52, "longitude": 13.41}, mode)
    assert not result.is_error
    assert result.structured_content == {
        "latitude": 52.52,
        "longitude": 13.41,
        "time": "2025-01-31T12:00",
        "temperature": 4.2,
        "temperature_unit": "°C",
        "wind_speed": 11.5,
        "wind_speed_unit": "km/h",
    }
    bad = await call(demos_url, "weather", "current_weather", {"latitude": 91, "longitude": 0}, mode)
    assert bad.is_error and "latitude" in text(bad)


async def test_convert(demos_url: str, mode: str) -> None:
    result = await call(
        demos_url, "currency", "convert", {"amount": 10, "from_currency": "usd", "to_currency": "GBP"}, mode
    )
    assert not result.is_error
    expected = round(10 * fake_apis.EUR_RATES["GBP"] / fake_apis.EUR_RATES["USD"], 5)
    assert result.structured_content is not None
    assert result.structured_content["result"] == expected
    assert result.structured_content["from_currency"] == "USD"
    assert result.structured_content["date"] == fake_apis.RATE_DATE


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"amount": 1, "from_currency": "EURO", "to_currency": "USD"}, "3-letter"),
        ({"amount": 1, "from_currency": "XYZ", "to_currency": "USD"}, "does not know"),
        ({"amount": -5, "from_currency": "EUR", "to_currency": "USD"}, "positive"),
    ],
)
async def test_convert_rejects(demos_url: str, arguments: dict[str, Any], message: str) -> None:
    result = await call(demos_url, "currency", "convert", arguments)
    assert result.is_error and message in text(result)


async def test_wikipedia_search(demos_url: str, fake_apis_url: str, mode: str) -> None:
    result = await call(demos_url, "wikipedia", "search", {"query": "python", "limit": 2}, mode)
    assert not result.is_error
    assert result.structured_content is not None
    pages = result.structured_content["result"]
    assert [page["title"] for page in pages] == ["Python (programming language)", "Monty Python"]
    assert pages[0]["excerpt"] == "Python (programming language) \u2013 general-purpose programming language."
    assert pages[1]["url"] == f"{fake_apis_url}/wiki/Monty_Python"
    assert (await call(demos_url, "wikipedia", "search", {"query": "python", "limit": 0})).is_error


async def test_github_repo(demos_url: str, mode: str) -> None:
    result = await call(demos_url, "github-public", "repo", {"owner": "mitmproxy", "name": "mitmproxy"}, mode)
    assert not result.is_error
    assert result.structured_content == {
        "name": "mitmproxy/mitmproxy",
        "description": fake_apis.REPOS["mitmproxy/mitmproxy"]["description"],
        "stars": 38912,
        "forks": 4201,
        "language": "Python",
        "license": "MIT",
    }


@pytest.mark.parametrize(
    ("owner", "name", "message"),
    [
        ("nope", "nothing", "repository nope/nothing not found"),
        ("bad/owner", "x", "owner must be"),
        ("octo", "..", "name must be"),
    ],
)
async def test_github_repo_rejects(demos_url: str, owner: str, name: str, message: str) -> None:
    result = await call(demos_url, "github-public", "repo", {"owner": owner, "name": name})
    assert result.is_error and message in text(result)


async def test_unreachable_upstream_is_a_tool_error(demos_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv(github_public.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    result = await call(demos_url, "github-public", "repo", {"owner": "mitmproxy", "name": "mitmproxy"})
    assert result.is_error and "GitHub is unreachable" in text(result)


def _tools_call(name: str, arguments: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": meta},
    }


MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


@pytest.mark.parametrize(
    ("era_headers", "meta", "plain_content_type"),
    [
        # 2026-07-28: one self-contained POST; the body's method/name are repeated in headers.
        ({"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call"}, MODERN_META, "application/json"),
        # Handshake era, stateless server: no initialize needed, every answer is an SSE stream.
        ({}, {}, "text/event-stream"),
    ],
    ids=["2026-07-28", "legacy"],
)
async def test_raw_http_content_types(
    demos_url: str, era_headers: dict[str, str], meta: dict[str, Any], plain_content_type: str
) -> None:
    url = f"{demos_url}/echo-test/mcp"
    async with httpx2.AsyncClient(headers={**ACCEPT, **era_headers}, timeout=10) as http:
        plain = await http.post(url, json=_tools_call("echo", {"text": "x"}, meta), headers={"Mcp-Name": "echo"})
        assert plain.status_code == 200
        assert plain.headers["content-type"].startswith(plain_content_type)
        assert '"text":"x"' in plain.text

        body = _tools_call("slow_count", {"steps": 2, "delay_ms": 300}, {**meta, "progressToken": "tok-1"})
        started = time.monotonic()
        async with http.stream("POST", url, json=body, headers={"Mcp-Name": "slow_count"}) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            data = [
                (time.monotonic() - started, line) async for line in streamed.aiter_lines() if line.startswith("data:")
            ]
    assert ['"progressToken":"tok-1"' in line for _, line in data] == [True, True, False]
    assert "counted to 2" in data[-1][1]
    assert data[0][0] < data[-1][0] - 0.2, "progress should be flushed as it happens"


@pytest.mark.parametrize(("host", "status"), [("localhost", 200), ("127.0.0.1", 200), ("evil.example", 421)])
async def test_host_check(demos_url: str, host: str, status: int) -> None:
    port = demos_url.rsplit(":", 1)[1]
    async with httpx2.AsyncClient(headers={**ACCEPT, "Host": f"{host}:{port}"}, timeout=10) as http:
        response = await http.post(f"{demos_url}/echo-test/mcp", json=_tools_call("echo", {"text": "x"}, {}))
    assert response.status_code == status


def test_cli_serves_health_on_port_from_env() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "demos"]
    env = {**os.environ, "PORT": str(port)}
    with subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as process:
        try:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, "python -m demos exited early"
                try:
                    response = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except httpx2.TransportError:
                    assert time.monotonic() < deadline, "python -m demos did not start"
                    time.sleep(0.1)
            assert response.status_code == 200
            assert len(response.json()["servers"]) == 5
        finally:
            process.terminate()
            process.wait(timeout=10)
