"""Which MCP client made a call, from its User-Agent, for usage_events.client. Pure."""

from __future__ import annotations

import re

# First match wins: specific products before the libraries they are built on.
_PATTERNS = [
    ("claude-code", re.compile(r"claude-code", re.I)),
    ("claude-desktop", re.compile(r"claude", re.I)),
    ("cursor", re.compile(r"cursor", re.I)),
    ("windsurf", re.compile(r"windsurf|codeium", re.I)),
    ("vscode", re.compile(r"vscode|visual studio code", re.I)),
    ("mcp-inspector", re.compile(r"inspector", re.I)),
    ("openai", re.compile(r"openai", re.I)),
    ("python-sdk", re.compile(r"python-httpx|httpx|mcp[-/ ]python|aiohttp|python-requests", re.I)),
    ("typescript-sdk", re.compile(r"node|undici|axios|typescript", re.I)),
    ("curl", re.compile(r"^curl/", re.I)),
]


def classify(user_agent: str | None) -> str:
    if not user_agent:
        return "unknown"
    for name, pattern in _PATTERNS:
        if pattern.search(user_agent):
            return name
    return "other"
