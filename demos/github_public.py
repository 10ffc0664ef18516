"""github-public: public repository facts from the GitHub REST API (unauthenticated)."""

import re
from typing import TypedDict

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from demos.upstream import base_url, get_json

BASE_URL_ENV = "MCPMETER_DEMO_GITHUB_URL"
DEFAULT_BASE_URL = "https://api.github.com"
OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}")
REPO_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


class Repository(TypedDict):
    name: str
    description: str | None
    stars: int
    forks: int
    language: str | None
    license: str | None


def create_server() -> MCPServer:
    """A fresh github-public server."""
    server = MCPServer("github-public", instructions="Look up public GitHub repositories.")

    @server.tool()
    async def repo(owner: str, name: str) -> Repository:
        """Name, description, stars, forks, language and license of the public repository `owner`/`name`."""
        if not OWNER.fullmatch(owner):
            raise ToolError(f"owner must be a GitHub user or organisation name, got {owner!r}")
        if not REPO_NAME.fullmatch(name) or name in {".", ".."}:
            raise ToolError(f"name must be a GitHub repository name, got {name!r}")
        data = await get_json(
            "GitHub",
            f"{base_url(BASE_URL_ENV, DEFAULT_BASE_URL)}/repos/{owner}/{name}",
            not_found=f"repository {owner}/{name} not found",
        )
        try:
            license_ = data.get("license") or {}
            return Repository(
                name=data["full_name"],
                description=data.get("description"),
                stars=data["stargazers_count"],
                forks=data["forks_count"],
                language=data.get("language"),
                license=license_.get("spdx_id") or license_.get("name"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ToolError(f"GitHub answered without the expected field {exc}") from exc

    return server
