"""Browser origins and Host values: parsed strictly before anything is compared or reflected. Pure.

The MCP transport spec asks servers to validate `Origin` (DNS rebinding). The gateway rewrites
Host for the upstream, so an upstream's own check never sees the browser's page: the gateway
refuses foreign origins itself. A Host header is reflected into the OAuth resource metadata and
the WWW-Authenticate challenge, so only a plain `host[:port]` is ever used there.
"""

from __future__ import annotations

import re

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]+\])(?::([0-9]{{1,5}}))?\Z")
_ORIGIN = re.compile(r"(https?)://([^/?#\s]+)\Z", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def valid_host(value: str) -> bool:
    """A Host header that is a plain `host[:port]` (name, IPv4 or [IPv6]), nothing else."""
    match = _HOST.match(value)
    return match is not None and len(value) <= 255 and (match.group(1) is None or int(match.group(1)) <= 65535)


def normalize(origin: str) -> str | None:
    """`scheme://host[:port]` in lowercase, default port dropped; None when it is not an origin
    (e.g. `null`, a path, userinfo, a bad port)."""
    match = _ORIGIN.match(origin.strip())
    if match is None or not valid_host(match.group(2)):
        return None
    scheme, host = match.group(1).lower(), match.group(2).lower()
    name, sep, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if sep and int(port) == _DEFAULT_PORTS[scheme]:
        host = name
    return f"{scheme}://{host}"


def of_url(url: str) -> str | None:
    """The origin of a URL such as `public_url` (its path, if any, ignored)."""
    match = re.match(r"(https?://[^/?#]+)", url, re.IGNORECASE)
    return normalize(match.group(1)) if match else None
