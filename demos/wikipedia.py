"""wikipedia: page search through the Wikimedia REST API."""

import html
import re
from typing import TypedDict
from urllib.parse import quote

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from demos.upstream import base_url, get_json

BASE_URL_ENV = "MCPMETER_DEMO_WIKIPEDIA_URL"
DEFAULT_BASE_URL = "https://en.wikipedia.org"
MAX_LIMIT = 100
MAX_QUERY_LENGTH = 300
TAG = re.compile(r"<[^>]+>")


class Page(TypedDict):
    title: str
    description: str | None
    excerpt: str
    url: str


def _plain(snippet: str | None) -> str:
    """A search excerpt without its highlight markup."""
    return html.unescape(TAG.sub("", snippet or ""))


def create_server() -> MCPServer:
    """A fresh wikipedia server."""
    server = MCPServer("wikipedia", instructions="Search English Wikipedia pages by keyword.")

    @server.tool()
    async def search(query: str, limit: int = 5) -> list[Page]:
        """Wikipedia pages matching `query`, best first (at most `limit`, 1-100)."""
        query = query.strip()
        if not query or len(query) > MAX_QUERY_LENGTH:
            raise ToolError(f"query must be 1 to {MAX_QUERY_LENGTH} characters")
        if not 1 <= limit <= MAX_LIMIT:
            raise ToolError(f"limit must be between 1 and {MAX_LIMIT}")
        base = base_url(BASE_URL_ENV, DEFAULT_BASE_URL)
        data = await get_json("Wikipedia", f"{base}/w/rest.php/v1/search/page", {"q": query, "limit": limit})
        try:
            return [
                Page(
                    title=page["title"],
                    description=page.get("description"),
                    excerpt=_plain(page.get("excerpt")),
                    url=f"{base}/wiki/{quote(page['key'])}",
                )
                for page in data["pages"]
            ]
        except (KeyError, TypeError) as exc:
            raise ToolError(f"Wikipedia answered without the expected field {exc}") from exc

    return server
