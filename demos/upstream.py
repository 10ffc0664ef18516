"""The one HTTP call the API-wrapping demo servers make, with failures turned into `ToolError`s."""

import os
from collections.abc import Mapping
from typing import Any

import httpx2
from mcp.server.mcpserver.exceptions import ToolError

TIMEOUT = httpx2.Timeout(10.0, connect=5.0)
HEADERS = {"Accept": "application/json", "User-Agent": "mcpmeter-demos/0.1"}


def base_url(env_var: str, default: str) -> str:
    """The API base URL, read at call time so it can be pointed at `demos.fake_apis` after import."""
    return (os.environ.get(env_var) or default).rstrip("/")


async def get_json(
    api: str, url: str, params: Mapping[str, str | int | float] | None = None, *, not_found: str | None = None
) -> Any:
    """GET `url` and return its JSON body.

    Any failure (unreachable, HTTP error status, non-JSON body) raises `ToolError`, so
    the caller sees `isError: true` with a readable message instead of a crash.
    A 404 raises `not_found` when given.
    """
    try:
        async with httpx2.AsyncClient(timeout=TIMEOUT, headers=HEADERS) as client:
            response = await client.get(url, params=params)
    except httpx2.HTTPError as exc:
        raise ToolError(f"{api} is unreachable ({type(exc).__name__}: {exc})") from exc
    if response.status_code == 404 and not_found is not None:
        raise ToolError(not_found)
    if response.is_error:
        raise ToolError(f"{api} answered HTTP {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except ValueError as exc:
        raise ToolError(f"{api} answered with a body that is not JSON") from exc
